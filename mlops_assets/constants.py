"""Defaults in one place. Per-environment values (folders, URIs, tokens) come from the
environment through `mlops_assets.settings`; everything else that is a default lives here."""

from __future__ import annotations

# Dagster asset groups: one per lifecycle stage, so the graph reads data -> training -> deployment
# -> monitoring. The stage names below say where each stage's assets go.
GROUP_DATA = "data"  # landed files to validated, versioned features and the split
GROUP_TRAINING = "training"  # train, evaluate against the champion (the gate), register
GROUP_DEPLOYMENT = "deployment"  # the champion served by Ray Serve
GROUP_MONITORING = "monitoring"  # prediction log, delayed labels, profiles, drift, live performance
GROUP_INGESTION = GROUP_VALIDATION = GROUP_FEATURES = GROUP_DATA
GROUP_EVALUATION = GROUP_REGISTRY = GROUP_TRAINING
# Who answers for the assets (Dagster owners: a team or an e-mail), set on every asset at load.
ASSET_OWNERS = ("team:mlops",)
# The training path (`make pipeline`'s selection): each of these loads its inputs from its own run's
# upstream steps only, never from another run's (or the latest) materialization.
TRAINING_PATH_ASSETS = ("raw_dataset", "validation_report", "feature_set", "train_test_split", "trained_model",
                        "model_evaluation", "registered_model")
# Downstream of the training path, they too load their inputs only from their own run (never the
# latest materialization of registered_model or train_test_split).
RUN_SCOPED_AFTER_TRAINING = ("model_deployment", "reference_profile")

# Folders, relative to the data root unless a setting says otherwise.
DEFAULT_DATA_DIR = "data"
LANDING_SUBDIR = "raw"
# Every step that submits a Serve config (deploy, rollback, a release decision) is in this Dagster
# pool: the dashboard's PUT replaces the cluster's whole config (every data set's application), so
# two data sets' submits at once could undo each other. The shipped dagster.yaml files limit it to 1.
SERVE_DEPLOY_POOL = "ray_serve_deploy"
DATASETS_SUBDIR = "datasets"  # another data set's data root, under the primary's (MLOPS_DATASETS)
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

# Deployment: how long a rollout may take until the new version answers.
DEPLOY_TIMEOUT_S = 180.0

# Sensor.
RAW_FILES_SENSOR_INTERVAL_SECONDS = 30

# Monitoring: profiles, drift, delayed labels, the post-deployment watch and retraining.
# Folders under the data root.
PROFILES_SUBDIR = "profiles"  # reference/<model version>/ and production/<window>/
LABELS_SUBDIR = "labels"  # landing folder of delayed ground-truth labels
PRODUCTION_BATCH_STAGING_SUBDIR = "labels_staging"  # labelled production records on their way to a batch
# Drift rule (monitoring/drift.py): a column drifts when the test is significant AND the distance is large.
DRIFT_P_VALUE = 0.01  # significance level of the chi-squared / KS test
DRIFT_HELLINGER = 0.1  # categorical: e.g. a balanced binary feature moving 50/50 -> 64/36
DRIFT_KS_STATISTIC = 0.1  # continuous: largest CDF gap of 10 percentage points
DRIFT_MIN_ROWS = 100  # fewer current rows: scores are reported, drift is never flagged
# Drift check: an event when more than this share of the features drifted, or the predictions did.
DRIFT_MAX_FEATURE_SHARE = 0.1  # up to 3 of 30 features may drift alone without a retraining
DRIFT_FAIL_ON_PREDICTION_DRIFT = True
# Windows and freshness of the production profiles (monitoring/live.py).
MONITORING_WINDOW = "1h"
MAX_PROFILE_AGE = "3h"  # newest prediction older than this: the monitoring data is stale
PROFILES_MAX_LAG_MINUTES = 120  # production_profiles not materialized for this long: freshness fails
# Live performance from delayed labels.
DEGRADATION_TOLERANCE = 0.05  # absolute drop of a live metric below its offline value
DEGRADATION_METRICS = ("f1", "roc_auc", "accuracy")
MIN_LABELLED = 200  # fewer labelled predictions: live metrics are reported, never judged
# labelled_production_batch reads the log hours this far back (a label arriving later is not learned from).
LABEL_LOOKBACK_HOURS = 72
# The watch after each deployment.
WATCH_WINDOW = "30min"
WATCH_MAX_ERROR_RATE = 0.05
WATCH_MAX_LATENCY_P95_S = 0.5
# The new version is compared with the one it replaced on the SAME logged inputs (the replaced
# version is scored offline on them), so a change of the inputs is never blamed on a version.
WATCH_MAX_FLIP_SHARE = 0.15  # share of rows whose predicted label differs between the two versions
WATCH_MAX_MEAN_ABS_DELTA = 0.15  # mean |probability(new) - probability(old)| on the same rows
WATCH_MAX_POSITIVE_SHARE_DELTA = 0.15  # absolute change of the share predicted positive, same rows
WATCH_MAX_PROBABILITY_KS = 0.2  # KS between the two versions' probabilities on the same rows
WATCH_MIN_REQUESTS = 50  # before error rate and latency are judged
WATCH_MIN_COMPARED_ROWS = 100  # before the two versions' answers are judged; fewer: keep watching
WATCH_MAX_COMPARED_ROWS = 5000  # newest rows the replaced version scores per tick (bounds the cost)
# The new version's label-free estimate (monitoring/estimation.py) on its rows since the deploy: roll
# back when its estimated accuracy is this far below its hold-out accuracy (over the compared rows' minimum).
WATCH_MAX_ESTIMATED_ACCURACY_DROP = 0.05
# Releases (serving/release.py, monitoring/comparison.py): a shadow or canary candidate is promoted once
# it answered (or mirrored) RELEASE_MIN_REQUESTS requests over RELEASE_MIN_DURATION_S without trailing
# the champion, and ended as soon as it trails (after the same minimum of requests).
RELEASE_STRATEGY = "direct"  # or "shadow", "canary"; the launchpad's model_deployment config overrides it
RELEASE_CANARY_SHARE = 0.1
RELEASE_MIN_REQUESTS = 500
RELEASE_MIN_DURATION_S = 1800.0
RELEASE_MAX_METRIC_DROP = 0.02  # accuracy / ROC-AUC below the champion's (realized, else estimated)
RELEASE_MAX_ERROR_RATE_DELTA = 0.01
RELEASE_MIN_LABELLED = 200  # labelled rows per side before realized metrics decide
RELEASE_SENSOR_INTERVAL_SECONDS = 30
# Retraining requests.
RETRAIN_COOLDOWN_S = 6 * 3600
RETRAIN_KEYS_KEPT = 200  # event keys remembered in a sensor cursor (bounded)
MONITORING_SENSOR_INTERVAL_SECONDS = 60
# The monitoring assets are hourly partitions from this hour on (UTC); the schedule runs the last
# complete hour this many minutes past each hour (a replica ships its spool every few seconds).
MONITORING_PARTITIONS_START = "2026-01-01-00:00"
MONITORING_SCHEDULE_MINUTE = 5
# Prediction log retention: hours that ended this many days before the current hour are compacted
# (their parts merged into one) or deleted; None keeps everything. The current hour is never touched.
PREDICTION_LOG_RETENTION_DAYS: float | None = 30
PREDICTION_LOG_RETENTION_ACTION = "compact"  # or "delete"
RETRAINING_SCHEDULE_CRON = "0 3 * * 0"  # weekly, Sunday 03:00 UTC
ALERT_WEBHOOK_TIMEOUT_S = 5.0
