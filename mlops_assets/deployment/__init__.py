"""Deployment: Ray Serve configs, the load-and-query check, rollout and rollback.

Pure, typed functions: no Dagster imports here."""
