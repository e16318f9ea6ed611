"""MLflow tracking helpers: experiments, code version, dataset inputs, curves, metadata.json, links.

Everything goes through an explicit `MlflowClient` and run id, so a later step (evaluation,
registration) can log into the training run without relying on global "active run" state.
"""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd

from mlops_assets.core.redaction import redact_uri, redact_values

if TYPE_CHECKING:  # MLflow is imported where it is used: loading the definitions stays cheap
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput

METADATA_FILE = "metadata.json"
# MLflow 3's UI opens an experiment by its kind: without this tag it guesses, and may open the
# GenAI (traces) view; this platform trains models.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the run's description, rendered as markdown by the MLflow UI
USER_TAG = "mlflow.user"  # the run's "Created by"
DAGSTER_RUN_URL_TAG = "dagster_run_url"
MAX_DIGEST_CHARS = 36  # MLflow's dataset digest column width
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_TRACKING_ENV = "MLFLOW_TRACKING_URI"


@contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at `uri` for a block, then restore it exactly.

    `mlflow.set_tracking_uri` also writes `MLFLOW_TRACKING_URI` into os.environ (and MLflow's own
    `_use_tracking_uri` unsets it on exit), which would silently redirect every later settings
    lookup; so both the global and the environment variable are put back as they were.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous_global = tracking_utils._tracking_uri
    previous_env = os.environ.get(_TRACKING_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(cast(Any, previous_global))  # None: back to "not set"
        if previous_env is None:
            os.environ.pop(_TRACKING_ENV, None)
        else:
            os.environ[_TRACKING_ENV] = previous_env


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """Id of the named experiment, created with `artifact_location` when it does not exist yet.

    An existing experiment keeps its artifact location (MLflow cannot move it).
    """
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        if (found.tags or {}).get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag existed
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location or None,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
    except Exception:
        found = client.get_experiment_by_name(name)  # created concurrently by another run
        if found is None:
            raise
        return str(found.experiment_id)


def git_sha(start: str | Path | None = None, *, explicit: str | None = None) -> str:
    """The code's commit: `explicit` when given (the settings' MLOPS_GIT_SHA, for images without
    .git), else `git rev-parse`.

    Best effort: "unknown" outside a git checkout. A "-dirty" suffix marks uncommitted changes.
    """
    if explicit:
        return explicit
    cwd = Path(start) if start else _PACKAGE_DIR
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", str(_PACKAGE_DIR)],
            cwd=cwd, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha or "unknown"


def short_digest(version: str) -> str:
    """A version string fitted into MLflow's digest field (the full one goes into a tag)."""
    return (version or "unknown")[:MAX_DIGEST_CHARS]


def _source(uri: str | None) -> Any:
    """The dataset source MLflow records; credentials in `uri` never reach MLflow."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    if not uri:
        return HTTPDatasetSource(url="about:unknown")
    uri = redact_uri(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": any local source is fine
        try:
            return resolve_dataset_source(uri)
        except Exception:
            return HTTPDatasetSource(url=uri)


def _input(dataset: Any, context: str, tags: Mapping[str, str] | None) -> DatasetInput:
    from mlflow.entities import DatasetInput, InputTag

    input_tags = [InputTag(key="mlflow.data.context", value=context)]
    input_tags += [InputTag(key=k, value=str(v)) for k, v in (tags or {}).items()]
    return DatasetInput(dataset=dataset._to_mlflow_entity(), tags=input_tags)


def _log_inputs_once(client: MlflowClient, run_id: str, item: DatasetInput) -> None:
    """Log one dataset input. Two runs logging the same dataset (same digest) at the same moment
    race on the store's unique key; the loser retries and then links the row the winner made."""
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=[item])
            return
        except MlflowException as exc:
            if attempt == 2 or "unique" not in str(exc).lower():
                raise
            time.sleep(0.2 * (attempt + 1))


def log_frame_input(
    client: MlflowClient, run_id: str, frame: pd.DataFrame, *, name: str, context: str,
    source: str | None = None, digest: str | None = None, targets: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log a DataFrame as a dataset input (schema and profile, not the data); return its digest."""
    from mlflow.data.pandas_dataset import from_pandas

    dataset = from_pandas(
        frame, source=_source(source), name=name, targets=targets,
        digest=short_digest(digest) if digest else None,
    )
    _log_inputs_once(client, run_id, _input(dataset, context, tags))
    return dataset.digest


def log_version_input(
    client: MlflowClient, run_id: str, *, name: str, version: str, context: str,
    source: str | None = None, tags: Mapping[str, str] | None = None,
) -> str:
    """Log a dataset known only by its version (no frame at hand) as a dataset input."""
    from mlflow.data.meta_dataset import MetaDataset

    # MetaDataset has no profile by design; the stubs mark it abstract.
    dataset = MetaDataset(source=_source(source), name=name, digest=short_digest(version))  # type: ignore[abstract]
    _log_inputs_once(client, run_id, _input(dataset, context, {"version": version, **(tags or {})}))
    return dataset.digest


def log_curves(client: MlflowClient, run_id: str, curves: Mapping[str, Mapping[str, list[float]]]) -> int:
    """Training curves as step metrics `<part>_<metric>` (e.g. validation_logloss); return the count."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(key=f"{part}_{name.lower()}", value=float(value), timestamp=now, step=step)
        for part, by_metric in curves.items()
        for name, values in by_metric.items()
        for step, value in enumerate(values)
    ]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    return len(metrics)


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], prefix: str = "") -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key=f"{prefix}{k}", value=float(v), timestamp=now, step=0) for k, v in metrics.items()]
    if batch:
        client.log_batch(run_id, metrics=batch)


def write_metadata_json(client: MlflowClient, run_id: str, metadata: Mapping[str, Any]) -> str:
    """Write (or overwrite) `metadata.json` at the run's artifact root; return its artifact URI.

    URIs in it are redacted: the artifact is readable by everyone who can read the run."""
    client.log_dict(run_id, redact_values(dict(metadata)), METADATA_FILE)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{METADATA_FILE}"


def run_artifact_uri(client: MlflowClient, run_id: str, path: str) -> str:
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"


def source_digest(modules: tuple[str, ...]) -> str:
    """A short hash of the source files of `modules`: a change to the training code changes it."""
    import hashlib
    import importlib.util

    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec else None
        digest.update(name.encode())
        if origin and Path(origin).exists():
            digest.update(Path(origin).read_bytes())
    return digest.hexdigest()[:16]


def read_metadata_json(client: MlflowClient, run_id: str) -> dict[str, Any]:
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, METADATA_FILE, tmp)
        return json.loads(Path(path).read_text())


# MLflow 3's UI has one switch for every page, GenAI or model training, remembered per browser and
# GenAI until changed; a link that names it opens on model training (runs, metrics, models).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def run_url(ui_url: str | None, experiment_id: str, run_id: str) -> str | None:
    return (f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"
            if ui_url else None)


def model_version_url(ui_url: str | None, model_name: str, version: str) -> str | None:
    return (f"{ui_url.rstrip('/')}/#/models/{model_name}/versions/{version}?{MODEL_TRAINING_VIEW}"
            if ui_url else None)


def dagster_run_url(ui_url: str | None, run_id: str) -> str | None:
    """The Dagster UI's page of one run, when the UI's URL is known."""
    return f"{ui_url.rstrip('/')}/runs/{run_id}" if ui_url and run_id else None


def dagster_link_tags(ui_url: str | None, run_id: str, asset_key: str | None = None) -> dict[str, str]:
    """Tags that link an MLflow run back to the Dagster run that made it: the URL as a tag, and as a
    markdown link in the run's description (the MLflow UI shows tag values as plain text)."""
    url = dagster_run_url(ui_url, run_id)
    if url is None:
        return {}
    what = f" (asset `{asset_key}`)" if asset_key else ""
    return {DAGSTER_RUN_URL_TAG: redact_uri(url),
            NOTE_TAG: f"Made by Dagster run [{run_id[:8]}]({redact_uri(url)}){what}."}


SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def set_version_creator(tracking_uri: str, model_name: str, version: str, user: str) -> bool:
    """Fill a model version's "Created by" (its `user_id`), which MLflow's client cannot set: with a
    SQL registry, written into the registry's own row (only when still empty); with a tracking
    server, its authentication fills it, or nothing can. True when written."""
    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0]
    if scheme not in SQL_SCHEMES or not user:
        return False
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(tracking_uri, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(text("UPDATE model_versions SET user_id = :user WHERE name = :name AND "
                                       "version = :version AND (user_id IS NULL OR user_id = '')"),
                                  {"user": user[:256], "name": model_name, "version": int(version)})
        return bool(result.rowcount)
    finally:
        engine.dispose()
