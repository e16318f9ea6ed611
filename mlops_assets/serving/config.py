"""Serving defaults and the two configuration objects the Serve app reads.

`ServiceOptions` are build-time arguments (the `args:` of the Serve config): changing them
restarts replicas. `ModelRef` is the deployment's `user_config`: changing it only calls
`reconfigure` on the running replicas, which is how versions are switched without downtime.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mlops_assets import constants as c

APP_NAME = "phishing"
DEPLOYMENT_NAME = "PredictionService"
ROUTE_PREFIX = "/"
DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_RAY_PORT = 6380  # not Ray's 6379, so a Redis on the default port does not collide
DEFAULT_METRICS_EXPORT_PORT = 8080

TOKEN_ENV = "MLOPS_API_TOKEN"
TOKEN_FILE_ENV = "MLOPS_API_TOKEN_FILE"  # a mounted secret file, the alternative to the variable
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# The registry URI of the replicas when it carries a credential: a file, so the URI never sits in
# the Serve config's runtime_env, which the dashboard shows to whoever can read it.
TRACKING_URI_FILE_ENV = "MLOPS_MLFLOW_TRACKING_URI_FILE"
TRACKING_URI_FILE_NAME = "mlflow_tracking_uri"
SECRETS_SUBDIR = "secrets"
PREDICTION_LOG_ENV = "MLOPS_PREDICTION_LOG_URL"
PREDICTIONS_SUBDIR = "predictions"

DEFAULT_MAX_RECORDS = 1000
DEFAULT_MAX_BODY_BYTES = 1_000_000  # ~1000 records of 30 features with room to spare
DEFAULT_PREDICT_TIMEOUT_S = 10.0
DEFAULT_LOG_FLUSH_INTERVAL_S = 5.0
# A part per 50,000 rows (or per interval, whichever comes first): Parquet parts of 5,000 rows at
# 100 records a request were a dozen small files a second, each with its own footer and column metadata.
DEFAULT_LOG_FLUSH_ROWS = 50_000
DEFAULT_LOG_MAX_BUFFER_ROWS = 200_000  # beyond this, unflushable rows are dropped and counted
DEFAULT_DECISION_THRESHOLD = 0.5
# Dynamic batching (bench/RESULTS.md has the measurements behind these): up to 32 waiting requests
# are scored in one model call, and a batch never waits for more requests to arrive (0 s), so a
# lone request pays nothing for batching while concurrent ones share a call.
DEFAULT_BATCH_MAX_SIZE = 32
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.0


@dataclass(frozen=True)
class ServiceOptions:
    """Build-time options of the service (Serve config `args`)."""

    max_records: int = DEFAULT_MAX_RECORDS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    predict_timeout_s: float = DEFAULT_PREDICT_TIMEOUT_S
    log_flush_interval_s: float = DEFAULT_LOG_FLUSH_INTERVAL_S
    log_flush_rows: int = DEFAULT_LOG_FLUSH_ROWS
    log_max_buffer_rows: int = DEFAULT_LOG_MAX_BUFFER_ROWS
    prediction_log_url: str | None = None  # None: env MLOPS_PREDICTION_LOG_URL, else <data>/predictions
    dataset_spec_path: str | None = None  # None: env MLOPS_DATASET_SPEC, else the packaged spec
    batch_max_size: int = DEFAULT_BATCH_MAX_SIZE  # requests per model call; 1 turns batching off
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S  # how long a batch waits to fill up
    # False: no prediction log at all (what bench/serving.py measures the log's cost against; monitoring
    # then has nothing to read, so no shipped config turns it off)
    prediction_log: bool = True
    # True (shipped): the ingress loads the champion (the ModelRef in its user_config) and answers the
    # champion's POST /predict itself, without the handle call to a PredictionService replica, the
    # hop that was most of a request's time (bench/RESULTS.md). The scoring replicas still answer
    # /healthz, /model, a release's candidate share, and /predict while the ingress has no model, is
    # switching, or failed a load. False: every request goes through a scoring replica, and a request
    # caught on a dying scoring replica is sent again to another one.
    ingress_scores: bool = True

    def __post_init__(self) -> None:
        if float(self.batch_wait_timeout_s) < 0:
            raise ValueError(f"serving option batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")
        for name in ("max_records", "max_body_bytes", "log_flush_rows", "log_max_buffer_rows", "batch_max_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"serving option {name} must be at least 1, got {getattr(self, name)}")
        for name in ("predict_timeout_s", "log_flush_interval_s"):
            if float(getattr(self, name)) <= 0:
                raise ValueError(f"serving option {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> ServiceOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args or {}) - known)
        if unknown:
            raise ValueError(f"unknown serving option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(args or {}))


@dataclass(frozen=True)
class ModelRef:
    """Which registry version a replica serves: a pinned version, or an alias resolved at load."""

    model_name: str = c.REGISTERED_MODEL_NAME
    version: str | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        if self.version and self.alias:
            raise ValueError("user_config names both a version and an alias; give one")
        if not self.version and not self.alias:
            object.__setattr__(self, "alias", c.ALIAS_CHAMPION)

    @classmethod
    def from_user_config(cls, user_config: Mapping[str, Any] | None) -> ModelRef:
        raw = dict(user_config or {})
        unknown = sorted(set(raw) - {"model_name", "version", "alias"})
        if unknown:
            raise ValueError(f"unknown user_config key(s) {unknown}; known: model_name, version, alias")
        version = raw.get("version")
        return cls(
            model_name=str(raw.get("model_name") or c.REGISTERED_MODEL_NAME),
            version=str(version) if version not in (None, "") else None,
            alias=str(raw["alias"]) if raw.get("alias") else None,
        )

    def to_user_config(self) -> dict[str, str]:
        out = {"model_name": self.model_name}
        if self.version:
            out["version"] = self.version
        else:
            out["alias"] = str(self.alias)
        return out

    def describe(self) -> str:
        return f"{self.model_name} version {self.version}" if self.version else f"{self.model_name}@{self.alias}"


def api_token(env: Mapping[str, str] | None = None) -> str:
    """The serving token: MLOPS_API_TOKEN, else the contents of the file MLOPS_API_TOKEN_FILE names,
    else "" (read when asked, never at import). A named but unreadable file is an error that says which."""
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV]
    path = env.get(TOKEN_FILE_ENV)
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise ValueError(f"{TOKEN_FILE_ENV}={path}: cannot read the token file ({exc.strerror})") from None


def _read_secret_file(variable: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise ValueError(f"{variable}={path}: cannot read the file ({exc.strerror})") from None


def mlflow_tracking_uri(env: Mapping[str, str] | None = None) -> str | None:
    """A replica's registry URI when it is given as a file: the contents of the file
    MLOPS_MLFLOW_TRACKING_URI_FILE names; None when that variable is unset (then MLFLOW_TRACKING_URI,
    through the settings, applies). A named but unreadable file is an error that says which."""
    env = os.environ if env is None else env
    path = env.get(TRACKING_URI_FILE_ENV)
    return _read_secret_file(TRACKING_URI_FILE_ENV, path) if path else None


def write_secret_file(path: str | Path, content: str) -> str:
    """Write `content` to `path` readable by its owner only (0600, folder 0700), atomically."""
    target = Path(path)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(target)


def replica_tracking_env(tracking_uri: str, *, secrets_dir: str | Path | None,
                         env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that tell replicas the registry, with no credential among their values.

    A URI without credentials goes as MLFLOW_TRACKING_URI. One with a credential goes as a file
    path, MLOPS_MLFLOW_TRACKING_URI_FILE: the operator's (a mounted secret, named by that variable
    in this process's environment), else a 0600 file written under `secrets_dir` (which the
    replicas must see at the same path: the local data root). Neither: a ValueError that says so.
    """
    from mlops_assets.core.redaction import has_credentials, redact_uri

    env = os.environ if env is None else env
    if not has_credentials(tracking_uri):
        return {TRACKING_URI_ENV: tracking_uri}
    if env.get(TRACKING_URI_FILE_ENV):
        return {TRACKING_URI_FILE_ENV: env[TRACKING_URI_FILE_ENV]}
    if secrets_dir is None:
        raise ValueError(f"the tracking URI {redact_uri(tracking_uri)} carries a credential and there is no local "
                         f"folder to hand it to replicas: mount it as a file on the Ray nodes and set "
                         f"{TRACKING_URI_FILE_ENV} to its path")
    path = write_secret_file(Path(secrets_dir) / TRACKING_URI_FILE_NAME, tracking_uri)
    return {TRACKING_URI_FILE_ENV: path}
