"""mlops_assets: a Dagster asset-based MLOps platform, from raw files to a served model."""

__version__ = "0.1.0"
