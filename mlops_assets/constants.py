"""Defaults in one place. Per-environment values (folders, URIs, tokens) come from the
environment through `mlops_assets.lib.settings`; everything else that is a default lives here."""

from __future__ import annotations

# Dagster asset groups.
GROUP_INGESTION = "ingestion"
GROUP_VALIDATION = "validation"
GROUP_FEATURES = "features"
GROUP_TRAINING = "training"
GROUP_EVALUATION = "evaluation"
GROUP_REGISTRY = "registry"
GROUP_DEPLOYMENT = "deployment"
GROUP_MONITORING = "monitoring"

# Folders, relative to the data root unless a setting says otherwise.
DEFAULT_DATA_DIR = "data"
LANDING_SUBDIR = "raw"
BATCHES_SUBDIR = "batches"
QUARANTINE_SUBDIR = "quarantine"
REPORTS_SUBDIR = "reports"
FEATURES_SUBDIR = "features"
ASSETS_SUBDIR = "assets"
MLFLOW_SUBDIR = "mlflow"
DAGSTER_HOME_SUBDIR = "dagster_home"
BATCH_MANIFEST_NAME = "manifest.jsonl"

# Files the landing folder accepts, by suffix.
RAW_FILE_SUFFIXES = (".csv", ".parquet", ".pq")

# Seeds: one for data simulation, one for the split, one for training.
SIMULATOR_SEED = 42
SPLIT_SEED = 20240611
TRAINING_SEED = 7

# Feature engineering.
TRANSFORMATION_VERSION = "clean-v1"
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.15  # carved from the training side for early stopping
MISSING_FEATURE_POLICY = "drop_row"  # or "keep_nan": CatBoost treats NaN as its own value

# Validation thresholds (dataset-level checks).
MIN_ROWS = 200
MAX_NULL_SHARE = 0.05
MIN_MINORITY_CLASS_SHARE = 0.05
WARN_DUPLICATE_SHARE = 0.6

# MLflow.
MLFLOW_EXPERIMENT = "mlops_assets"
REGISTERED_MODEL_NAME = "phishing-classifier"
ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"
ALIAS_PREVIOUS_CHAMPION = "previous-champion"

# Sensor.
RAW_FILES_SENSOR_INTERVAL_SECONDS = 30
