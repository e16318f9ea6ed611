"""Training: one MLflow run per materialization, holding everything needed to trace the model."""


import tempfile
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.defs.metadata import latest_metadata
from mlops_assets.defs.resources import MlflowResource, PlatformResource
from mlops_assets.registry import model_store
from mlops_assets.training import tracking
from mlops_assets.training import train as tr

_DEFAULTS = tr.TrainingParams()
UPSTREAM = "train_test_split"
INPUT_EXAMPLE_ROWS = 5


class TrainingConfig(dg.Config):
    """CatBoost hyperparameters and protocol; defaults come from `lib.training.TrainingParams`."""

    iterations: int = _DEFAULTS.iterations
    learning_rate: float = _DEFAULTS.learning_rate
    depth: int = _DEFAULTS.depth
    l2_leaf_reg: float = _DEFAULTS.l2_leaf_reg
    early_stopping_rounds: int = _DEFAULTS.early_stopping_rounds
    validation_fraction: float = _DEFAULTS.validation_fraction
    random_seed: int = _DEFAULTS.random_seed
    thread_count: int = _DEFAULTS.thread_count
    tune: bool = _DEFAULTS.tune
    tuning_max_trials: int = _DEFAULTS.tuning_max_trials
    tuning_cv_folds: int = _DEFAULTS.tuning_cv_folds

    def params(self) -> tr.TrainingParams:
        return tr.TrainingParams(**self.model_dump())


def upstream_versions(instance: dg.DagsterInstance) -> dict[str, str]:
    """Data and feature versions from the split's latest materialization ("unknown" if absent)."""
    meta = latest_metadata(instance, UPSTREAM)
    keys = ("data_version", "feature_version", "feature_path", "raw_dataset_version")
    return {k: str(meta.get(k) or "unknown") for k in keys}


@dg.asset(group_name=c.GROUP_TRAINING, kinds={"catboost", "mlflow"})
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    platform: PlatformResource,
    mlflow: MlflowResource,
    train_test_split: pd.DataFrame,
) -> dg.MaterializeResult:
    """A seeded CatBoost classifier, logged to MLflow with its data, code and training curves."""
    spec = platform.spec()
    params = config.params()
    versions = upstream_versions(context.instance)
    train, test = tr.split_frame(train_test_split)
    git_sha = tracking.git_sha()
    client = mlflow.client()
    tags = {
        "dagster_run_id": context.run_id,
        "dagster_asset_key": context.asset_key.to_user_string(),
        "dagster_job": context.job_name,
        "git_sha": git_sha,
        "data_version": versions["data_version"],
        "feature_version": versions["feature_version"],
        "dataset_spec": spec.name,
    }
    with mlflow.start_run(run_name=f"trained_model-{context.run_id[:8]}", tags=tags) as run:
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        with tempfile.TemporaryDirectory(prefix="catboost-") as train_dir:
            result = tr.train_model(train, spec.feature_names, params, train_dir=train_dir)
        client.log_batch(run_id, params=[_param(k, v) for k, v in result.params.as_dict().items()])
        tracking.log_curves(client, run_id, result.curves)
        tracking.log_metrics(client, run_id, {
            **result.validation_metrics,
            "best_iteration": result.best_iteration,
            "tree_count": result.tree_count,
            "n_fit": result.n_fit,
            "n_validation": result.n_validation,
            "n_test": len(test),
        })
        if result.tuning is not None:
            client.log_dict(run_id, {"best": result.tuning.best, "trials": result.tuning.trials}, "tuning.json")
        _log_inputs(client, run_id, train_test_split, train, test, versions)
        example = train[spec.feature_names].head(INPUT_EXAMPLE_ROWS)
        info = model_store.log_catboost_model(result.model, input_example=example)
        sha256 = model_store.artifact_sha256(client, info.model_uri)
        trained_at = datetime.now(UTC).isoformat()
        output: dict[str, Any] = {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "model_uri": info.model_uri,
            "model_id": info.model_id,
            "model_sha256": sha256,
            "trained_at": trained_at,
            "git_sha": git_sha,
            "dagster_run_id": context.run_id,
            "feature_names": spec.feature_names,
            "positive_class": spec.positive_class,
            "decision_threshold": tr.DECISION_THRESHOLD,
            "params": result.params.as_dict(),
            "best_iteration": result.best_iteration,
            "validation_metrics": result.validation_metrics,
            # Probabilities of the input example from the in-memory model: a loaded model must match them.
            "input_example": example.to_dict(orient="records"),
            "input_example_proba": [float(p) for p in tr.predict_positive(result.model, example)],
            **versions,
        }
        metadata_uri = tracking.write_metadata_json(client, run_id, _metadata_json(output, info.artifact_path))
    output["metadata_uri"] = metadata_uri
    return dg.MaterializeResult(
        value=output,
        metadata={
            "mlflow_run": mlflow.run_link(experiment_id, run_id),
            "mlflow_run_id": run_id,
            "model_uri": info.model_uri,
            "model_sha256": sha256,
            "git_sha": git_sha,
            "best_iteration": result.best_iteration,
            "tree_count": result.tree_count,
            "train_rows": result.n_fit,
            "early_stopping_rows": result.n_validation,
            **{k: dg.MetadataValue.float(round(v, 5)) for k, v in result.validation_metrics.items()},
            "params": dg.MetadataValue.json(result.params.as_dict()),
            "tuning": dg.MetadataValue.json({"best": result.tuning.best, "trials": result.tuning.trials})
            if result.tuning else "off",
            **{k: versions[k] for k in ("data_version", "feature_version")},
        },
    )


def _param(key: str, value: Any) -> Any:
    from mlflow.entities import Param

    return Param(key, str(value))


def _log_inputs(client: Any, run_id: str, full: pd.DataFrame, train: pd.DataFrame, test: pd.DataFrame,
                versions: dict[str, str]) -> None:
    """Raw data and feature set by version; train and test splits by the digest of their rows."""
    tracking.log_version_input(client, run_id, name="raw_dataset", version=versions["raw_dataset_version"],
                               context="source")
    tracking.log_frame_input(client, run_id, full, name="feature_set", context="features",
                             source=versions["feature_path"] if versions["feature_path"] != "unknown" else None,
                             digest=versions["feature_version"], targets=tr.TARGET_COLUMN,
                             tags={"version": versions["feature_version"], "data_version": versions["data_version"]})
    for name, part in (("train", train), ("test", test)):
        tracking.log_frame_input(client, run_id, part.drop(columns=[tr.SPLIT_COLUMN]), name=f"{name}_split",
                                 context="training" if name == "train" else "evaluation",
                                 targets=tr.TARGET_COLUMN, tags={"feature_version": versions["feature_version"]})


def _metadata_json(output: dict[str, Any], artifact_location: str, registered: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    return {
        "model": {
            "uri": output["model_uri"],
            "model_id": output["model_id"],
            "sha256": output["model_sha256"],
            "artifact_location": artifact_location,
            "registered": registered,  # filled in by registered_model
        },
        "trained_at": output["trained_at"],
        "metrics": {"validation": output["validation_metrics"]},
        "data_version": output["data_version"],
        "raw_dataset_version": output["raw_dataset_version"],
        "feature_version": output["feature_version"],
        "feature_path": output["feature_path"],
        "feature_names": output["feature_names"],
        "decision_threshold": output["decision_threshold"],
        "git_sha": output["git_sha"],
        "dagster_run_id": output["dagster_run_id"],
        "params": output["params"],
    }


defs = dg.Definitions(assets=[trained_model])
