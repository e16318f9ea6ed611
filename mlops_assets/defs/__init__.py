"""The thin Dagster layer: assets, checks, resources, sensors and jobs, one module per concern.

Each module exposes `defs`; `mlops_assets.definitions` merges them and binds the resources.
"""
