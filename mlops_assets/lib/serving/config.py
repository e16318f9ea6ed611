"""Serving defaults and the two configuration objects the Serve app reads.

`ServiceOptions` are build-time arguments (the `args:` of the Serve config): changing them
restarts replicas. `ModelRef` is the deployment's `user_config`: changing it only calls
`reconfigure` on the running replicas, which is how versions are switched without downtime.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
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
PREDICTION_LOG_ENV = "MLOPS_PREDICTION_LOG_URL"
PREDICTIONS_SUBDIR = "predictions"

DEFAULT_MAX_RECORDS = 1000
DEFAULT_MAX_BODY_BYTES = 1_000_000  # ~1000 records of 30 features with room to spare
DEFAULT_PREDICT_TIMEOUT_S = 10.0
DEFAULT_LOG_FLUSH_INTERVAL_S = 5.0
DEFAULT_LOG_FLUSH_ROWS = 5000
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
