"""Deployments: manifests, transfer, staging, validation in a child, the model store, probation and the journal."""
