"""Registry: MLflow model versions and aliases, model cards and lineage traces.

Pure, typed functions: no Dagster imports here."""
