"""agent-ctl bench: the bare interpreter and the whole agent on the same model, threads and machine."""
