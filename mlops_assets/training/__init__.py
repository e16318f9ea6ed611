"""Training: the CatBoost model and its MLflow tracking.

Pure, typed functions: no Dagster imports here."""
