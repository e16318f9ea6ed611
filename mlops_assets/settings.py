"""Per-environment settings, read from the environment when asked (never at import time).

Every path the platform writes is under the data root (`MLOPS_DATA_URL`, default `data`),
which may be any fsspec URL; MLflow's SQLite store needs a local folder and gets one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mlops_assets import constants as c


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an fsspec URL without losing the scheme."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _absolute_local(url: str) -> str:
    return url if "://" in url else str(Path(url).resolve())


@dataclass(frozen=True)
class Settings:
    data_url: str
    landing_url: str
    dataset_spec_path: str | None
    mlflow_tracking_uri: str
    mlflow_artifact_root: str
    mlflow_experiment: str
    model_name: str

    @property
    def batches_url(self) -> str:
        return join_url(self.data_url, c.BATCHES_SUBDIR)

    @property
    def quarantine_url(self) -> str:
        return join_url(self.data_url, c.QUARANTINE_SUBDIR)

    @property
    def reports_url(self) -> str:
        return join_url(self.data_url, c.REPORTS_SUBDIR)

    @property
    def features_url(self) -> str:
        return join_url(self.data_url, c.FEATURES_SUBDIR)

    @property
    def assets_url(self) -> str:
        return join_url(self.data_url, c.ASSETS_SUBDIR)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from environment variables, with the defaults of `constants`."""
    env = os.environ if env is None else env
    data_url = _absolute_local(env.get("MLOPS_DATA_URL") or c.DEFAULT_DATA_DIR)
    landing_url = _absolute_local(env.get("MLOPS_LANDING_URL") or join_url(data_url, c.LANDING_SUBDIR))
    local_mlflow = Path(data_url if "://" not in data_url else c.DEFAULT_DATA_DIR).resolve() / c.MLFLOW_SUBDIR
    tracking = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local_mlflow / 'mlflow.db'}"
    artifact_root = env.get("MLOPS_MLFLOW_ARTIFACT_ROOT") or (local_mlflow / "artifacts").as_uri()
    return Settings(
        data_url=data_url,
        landing_url=landing_url,
        dataset_spec_path=env.get("MLOPS_DATASET_SPEC") or None,
        mlflow_tracking_uri=tracking,
        mlflow_artifact_root=artifact_root,
        mlflow_experiment=env.get("MLOPS_MLFLOW_EXPERIMENT") or c.MLFLOW_EXPERIMENT,
        model_name=env.get("MLOPS_MODEL_NAME") or c.REGISTERED_MODEL_NAME,
    )
