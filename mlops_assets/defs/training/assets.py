"""Training: one MLflow run per materialization, holding everything needed to trace the model."""


import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.core.records import Split, TrainedModel, content_hash
from mlops_assets.defs.resources import MlflowResource, PlatformResource
from mlops_assets.monitoring.estimation import CALIBRATOR_ARTIFACT
from mlops_assets.training import tracking
from mlops_assets.training import train as tr

_DEFAULTS = tr.TrainingParams()
TRAINING_CODE_VERSION = "2"  # bump when training changes in a way the sources below do not show
# The training code whose every change retrains (the fingerprint holds a digest of these files).
TRAINING_SOURCES = ("mlops_assets.training.train",)
TAG_FINGERPRINT = "training_fingerprint"
METADATA_RECORD_KEY = "trained_model"  # the TrainedModel record inside metadata.json
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


def training_fingerprint(split: Split, params: tr.TrainingParams, dataset_spec: str) -> str:
    """What a model is trained from: data, features, split, training code and parameters.

    The same fingerprint twice means the same model: the second request reuses the first."""
    return content_hash(split.data_version, split.feature_version, split.version, TRAINING_CODE_VERSION,
                        tracking.source_digest(TRAINING_SOURCES), params.as_dict(), dataset_spec)


def _reuse(client: Any, model_name: str, fingerprint: str, context: dg.AssetExecutionContext) -> TrainedModel | None:
    """The record of a registered version trained from this very fingerprint, if there is one."""
    found = client.search_model_versions(
        f"name = '{model_name}' and tags.{TAG_FINGERPRINT} = '{fingerprint}'", order_by=["version_number DESC"])
    for mv in found:
        stored = tracking.read_metadata_json(client, mv.run_id).get(METADATA_RECORD_KEY)
        if stored:
            context.log.info(f"skipped training: version {mv.version} (run {mv.run_id}) was trained from the same "
                             f"data, features, code and parameters (fingerprint {fingerprint})")
            return replace(TrainedModel.from_dict(stored), reused=True)
    return None


@dg.asset(group_name=c.GROUP_TRAINING, owners=c.ASSET_OWNERS, kinds={"catboost", "mlflow"},
          # The training sources' digest is in the code version, so Dagster shows a change to them as stale.
          code_version=f"{TRAINING_CODE_VERSION}.{tracking.source_digest(TRAINING_SOURCES)}")
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    platform: PlatformResource,
    mlflow: MlflowResource,
    train_test_split: Split,
) -> dg.Output[TrainedModel]:
    """A seeded CatBoost classifier, logged to MLflow with its data, code and training curves.

    Trains only what is stale: when a registered version already has this run's fingerprint
    (same data, features, split, training code and parameters), that version's record is returned
    and no MLflow run is made."""
    from mlops_assets.registry import model_store

    spec = platform.spec()
    params = config.params()
    split = train_test_split
    client = mlflow.client()
    fingerprint = training_fingerprint(split, params, spec.name)
    reused = _reuse(client, mlflow.model_name, fingerprint, context)
    if reused is not None:
        return dg.Output(reused, data_version=dg.DataVersion(fingerprint), metadata={
            "skipped": True,
            "skip_reason": f"unchanged: run {reused.run_id} was trained from the same inputs",
            "fingerprint": fingerprint, "mlflow_run_id": reused.run_id, "model_uri": reused.model_uri,
            "model_sha256": reused.model_sha256, "git_sha": reused.git_sha,
            "data_version": reused.data_version, "feature_version": reused.feature_version,
        })
    frame = split.frame()
    train, test = tr.split_frame(frame)
    git_sha = tracking.git_sha(explicit=mlflow.git_sha)
    tags = {
        "dagster_run_id": context.run_id,
        "dagster_asset_key": context.asset_key.to_user_string(),
        "dagster_job": context.job_name,
        "git_sha": git_sha,
        "data_version": split.data_version,
        "feature_version": split.feature_version,
        "dataset_spec": spec.name,
        TAG_FINGERPRINT: fingerprint,
    }
    with mlflow.start_run(run_name=f"trained_model-{context.run_id[:8]}", tags=tags) as run:
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        with tempfile.TemporaryDirectory(prefix="catboost-") as train_dir:
            result = tr.train_model(train, spec.feature_names, params, train_dir=train_dir,
                                    cat_features=spec.catboost_cat_features)
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
        if result.calibrator is not None:  # for label-free estimates of this version in monitoring
            client.log_dict(run_id, result.calibrator.to_dict(), CALIBRATOR_ARTIFACT)
        _log_inputs(client, run_id, frame, train, test, split)
        example = train[spec.feature_names].head(INPUT_EXAMPLE_ROWS)
        info = model_store.log_catboost_model(result.model, input_example=example)
        # Hashed here, from the bytes just uploaded (CatBoost's native save, as mlflow.catboost writes
        # it): no download. model_evaluation's load checks the stored file against this hash.
        sha256 = _native_sha256(result.model)
        record = TrainedModel(
            run_id=run_id, experiment_id=str(experiment_id), model_uri=info.model_uri, model_id=str(info.model_id),
            model_sha256=sha256, trained_at=datetime.now(UTC).isoformat(), git_sha=git_sha,
            dagster_run_id=context.run_id, fingerprint=fingerprint, feature_names=tuple(spec.feature_names),
            positive_class=spec.positive_class, decision_threshold=tr.DECISION_THRESHOLD,
            params=result.params.as_dict(), best_iteration=result.best_iteration,
            validation_metrics=dict(result.validation_metrics), data_version=split.data_version,
            raw_dataset_version=split.data_version, feature_version=split.feature_version,
            feature_path=split.feature_path, split_version=split.version, batch_ids=split.batch_ids,
            batches_url=split.batches_url,
            # Probabilities of the input example from the in-memory model: a loaded model must match them.
            input_example=example.to_dict(orient="records"),
            input_example_proba=[float(p) for p in tr.predict_positive(result.model, example)],
        )
        metadata_uri = tracking.run_artifact_uri(client, run_id, tracking.METADATA_FILE)
        record = replace(record, metadata_uri=metadata_uri)
        tracking.write_metadata_json(client, run_id, _metadata_json(record, info.artifact_path))
    return dg.Output(
        record,
        data_version=dg.DataVersion(fingerprint),
        metadata={
            "skipped": False,
            "fingerprint": fingerprint,
            "mlflow_run": mlflow.run_link(experiment_id, run_id),
            "mlflow_run_id": run_id,
            "model_uri": info.model_uri,
            "model_sha256": sha256,
            "git_sha": git_sha,
            "best_iteration": result.best_iteration,
            "tree_count": result.tree_count,
            "calibration": (f"{result.calibrator.method} on {result.calibrator.rows} held-out rows"
                            if result.calibrator is not None else "none"),
            "train_rows": result.n_fit,
            "early_stopping_rows": result.n_validation,
            **{k: dg.MetadataValue.float(round(v, 5)) for k, v in result.validation_metrics.items()},
            "params": dg.MetadataValue.json(result.params.as_dict()),
            "tuning": dg.MetadataValue.json({"best": result.tuning.best, "trials": result.tuning.trials})
            if result.tuning else "off",
            "data_version": split.data_version,
            "feature_version": split.feature_version,
        },
    )


def _native_sha256(model: Any) -> str:
    from mlops_assets.registry import model_store

    with tempfile.TemporaryDirectory(prefix="catboost-hash-") as tmp:
        path = f"{tmp}/{model_store.MODEL_ARTIFACT_FILE}"
        model.save_model(path)
        return model_store.file_sha256(path)


def _param(key: str, value: Any) -> Any:
    from mlflow.entities import Param

    return Param(key, str(value))


def _log_inputs(client: Any, run_id: str, full: pd.DataFrame, train: pd.DataFrame, test: pd.DataFrame,
                split: Split) -> None:
    """Raw data and feature set by version; train and test splits by the digest of their rows."""
    tracking.log_version_input(client, run_id, name="raw_dataset", version=split.data_version, context="source",
                               tags={"batch_ids": ",".join(split.batch_ids)[:4000]})
    tracking.log_frame_input(client, run_id, full, name="feature_set", context="features",
                             source=split.feature_path, digest=split.feature_version, targets=tr.TARGET_COLUMN,
                             tags={"version": split.feature_version, "data_version": split.data_version})
    for name, part in (("train", train), ("test", test)):
        tracking.log_frame_input(client, run_id, part.drop(columns=[tr.SPLIT_COLUMN]), name=f"{name}_split",
                                 context="training" if name == "train" else "evaluation",
                                 targets=tr.TARGET_COLUMN, tags={"feature_version": split.feature_version})


def _metadata_json(record: TrainedModel, artifact_location: str) -> dict[str, Any]:
    """The run's metadata.json, written from the record: the model card and `trace` read lineage here."""
    return {
        "model": {
            "uri": record.model_uri,
            "model_id": record.model_id,
            "sha256": record.model_sha256,
            "artifact_location": artifact_location,
            "registered": None,  # filled in by registered_model
        },
        "trained_at": record.trained_at,
        "metrics": {"validation": record.validation_metrics},
        "data_version": record.data_version,
        "raw_dataset_version": record.raw_dataset_version,
        "batch_ids": list(record.batch_ids),
        "batch_store": record.batches_url,
        "feature_version": record.feature_version,
        "feature_path": record.feature_path,
        "split_version": record.split_version,
        "feature_names": list(record.feature_names),
        "decision_threshold": record.decision_threshold,
        "git_sha": record.git_sha,
        "dagster_run_id": record.dagster_run_id,
        "fingerprint": record.fingerprint,
        "params": record.params,
        METADATA_RECORD_KEY: record.as_dict(),
    }


defs = dg.Definitions(assets=[trained_model])
