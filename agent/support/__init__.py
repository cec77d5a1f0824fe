"""Small pieces several rooms use: OS thread settings, percentiles, and the registry that backends and tasks use."""
