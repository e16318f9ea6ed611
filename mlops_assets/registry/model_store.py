"""The MLflow model registry as the platform uses it: log, register, promote, roll back, load.

MLflow 3 aliases (`challenger`, `champion`, `previous-champion`), never stages. The model is
CatBoost's native `model.cb`; its sha256 is recorded on the registry version when it is
registered and checked before every load, and loading goes through
`CatBoostClassifier.load_model` so nothing on the load path unpickles.
Registration, promotion and rollback each leave an event in the history (`registry/history.py`: an
artifact per event on the version's run; tags hold only current facts such as `last_event`). A candidate the gate rejected is
registered too, tagged `gate_passed=false` with the reasons, and never becomes champion.

Moving `champion` / `previous-champion` is a read then several writes, so it runs under a lock
held in the registry's own database (`promotion_lock`): on PostgreSQL a transaction-scoped
advisory lock, on SQLite an exclusive file lock beside the database file. With any other
registry URI (an MLflow tracking server over http, a file store) only writers in the same
process are serialized: run promotions from one place (the Dagster instance) there.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from mlops_assets import constants as c
from mlops_assets.registry import history as registry_history
from mlops_assets.training.tracking import set_version_creator, use_tracking_uri

if TYPE_CHECKING:  # MLflow and CatBoost load where they are used: loading the definitions stays cheap
    from catboost import CatBoostClassifier
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo

MODEL_ARTIFACT_FILE = "model.cb"  # the file mlflow.catboost writes inside the logged model dir
TAG_SHA256 = "model_sha256"
TAG_DECISION_THRESHOLD = "decision_threshold"
HISTORY_TAG_PREFIX = registry_history.LEGACY_TAG_PREFIX  # read for versions recorded before the artifacts
# The gate's verdict on a version, searchable: search_model_versions("tags.gate_passed = 'false'").
TAG_GATE_PASSED = "gate_passed"
TAG_GATE_VERDICT = "gate_verdict"  # "promote" or "reject"
TAG_GATE_FAILURES = "gate_failures"  # the failed checks, "; "-joined ("none" when it passed)
TAG_GATE_COMPARED_TO = "gate_compared_to"  # the champion version it was scored against, or "none"
TAG_VALUE_LIMIT = 5000  # MLflow's model version tag value column
LOCK_TIMEOUT_S = 60.0


class ModelIntegrityError(RuntimeError):
    """The model artifact's hash does not match the one recorded when it was registered."""


class NoChampionError(LookupError):
    """The registered model has no version under the alias asked for."""


class GateRejectedError(RuntimeError):
    """The version was rejected by the promotion gate and may not become champion."""


class ConcurrentPromotionError(RuntimeError):
    """The champion is not the one the caller expected: another writer moved it meanwhile."""


class PromotionLockTimeout(TimeoutError):
    """The registry's promotion lock was not granted in time."""


@dataclass(frozen=True)
class LoadedModel:
    model: CatBoostClassifier
    model_name: str
    version: str
    run_id: str
    sha256: str
    tags: dict[str, str]


@dataclass(frozen=True)
class HistoryEvent:
    version: str
    action: str
    at: str
    by: str
    details: dict[str, Any]


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def actor(explicit: str | None = None) -> str:
    """Who acts: `explicit` (the settings' MLOPS_ACTOR, set in CI or a sensor), else the OS user."""
    if explicit:
        return explicit
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers)
        return "unknown"


# --- logging -------------------------------------------------------------------------------


def log_catboost_model(model: CatBoostClassifier, *, input_example: pd.DataFrame, artifact_name: str = "model") -> ModelInfo:
    """Log the model in the active MLflow run with a signature (features -> phishing probability)."""
    import mlflow
    from mlflow.models import infer_signature

    # The signature's output is predict_proba[:, 1], the positive-class probability serving returns.
    signature = infer_signature(input_example, model.predict_proba(input_example)[:, 1])
    return mlflow.catboost.log_model(
        model,
        name=artifact_name,
        signature=signature,
        input_example=input_example,
        # Explicit pins: MLflow's inference would spawn a subprocess per log (seconds) to guess them.
        pip_requirements=_pip_requirements(),
    )


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "catboost", "pandas", "numpy")]


def _download(client: MlflowClient, artifact_uri: str, dst: str) -> str:
    import mlflow.artifacts

    # Resolve models:/ URIs through this client: MLflow would use the global tracking and registry URIs.
    model_id = _model_id(artifact_uri)
    if model_id is not None:
        artifact_uri = client.get_logged_model(model_id).artifact_location
    elif artifact_uri.startswith("models:/"):
        artifact_uri = _registry_download_uri(client, artifact_uri)
    return mlflow.artifacts.download_artifacts(
        artifact_uri=artifact_uri, dst_path=dst, tracking_uri=client.tracking_uri
    )


def _registry_download_uri(client: MlflowClient, model_uri: str) -> str:
    """Where a registered version's files are, for models:/<name>/<version> or models:/<name>@<alias>."""
    tail = model_uri.removeprefix("models:/")
    if "@" in tail:
        name, alias = tail.split("@", 1)
        version = str(client.get_model_version_by_alias(name, alias).version)
    else:
        name, _, version = tail.partition("/")
    if not name or not version or "/" in version:
        raise ValueError(f"not a registered model version URI: {model_uri!r} (models:/<name>/<version> or @<alias>)")
    return str(client.get_model_version_download_uri(name, version))


def _model_id(model_uri: str) -> str | None:
    # MLflow 3 logged models are addressed as models:/m-<id>; registry URIs are models:/<name>/...
    tail = model_uri.removeprefix("models:/")
    return tail if model_uri.startswith("models:/m-") and "/" not in tail else None


def artifact_sha256(client: MlflowClient, model_uri: str) -> str:
    """sha256 of the native model file under a logged model URI, as the store holds it."""
    # The whole model dir is fetched: `models:/m-<id>/model.cb` would parse as a registry name.
    with tempfile.TemporaryDirectory(prefix="mlops-model-") as tmp:
        local = Path(_download(client, model_uri, tmp)) / MODEL_ARTIFACT_FILE
        if not local.is_file():
            raise ModelIntegrityError(f"{model_uri} holds no {MODEL_ARTIFACT_FILE}: not a native CatBoost model")
        return file_sha256(local)


# --- registry ------------------------------------------------------------------------------




def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException:
        try:
            client.create_registered_model(
                model_name, description="Binary classifier trained and gated by mlops_assets."
            )
        except MlflowException:
            client.get_registered_model(model_name)  # created concurrently: fine if it exists now


def find_version_for_run(client: MlflowClient, model_name: str, run_id: str) -> ModelVersion | None:
    found = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def register_version(
    client: MlflowClient, model_name: str, *, run_id: str, model_uri: str, tags: Mapping[str, str],
    by: str | None = None, sha256: str | None = None,
) -> ModelVersion:
    """Register the run's model as a new version tagged with its hash; alias it `challenger`.

    `sha256`: the model file's hash as already verified in this run (the training path checks the
    downloaded file against it when it evaluates the model), so the file is not fetched again to
    hash it; without it, the stored file is downloaded and hashed here.

    Idempotent per run: when a version from `run_id` exists it is returned unchanged, so
    re-materializing the same training run never makes a second version.
    """
    _ensure_registered_model(client, model_name)
    existing = find_version_for_run(client, model_name, run_id)
    if existing is not None:
        return existing
    all_tags = {**{k: str(v) for k, v in tags.items()}, TAG_SHA256: sha256 or artifact_sha256(client, model_uri)}
    # MLflow's SQL registry resolves `models:/m-<id>` sources through the *global* tracking URI
    # (an open gap in MLflow itself), so point it at this client's store for the call.
    with use_tracking_uri(client.tracking_uri):
        version = client.create_model_version(
            model_name, source=model_uri, run_id=run_id, tags=all_tags, model_id=_model_id(model_uri)
        )
    set_version_creator(client.tracking_uri, model_name, str(version.version), actor(by))  # "Created by"
    # Under the lock: MLflow's SQL store sets an alias by select-then-insert, so two registrations
    # at once can both insert the `challenger` row and one fails on its unique key.
    with promotion_lock(client, model_name):
        client.set_registered_model_alias(model_name, c.ALIAS_CHALLENGER, version.version)
    _record_event(client, model_name, version.version, "register", by=by, run_id=run_id)
    return client.get_model_version(model_name, version.version)


def alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    """The version under `alias`, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def _record_event(client: MlflowClient, model_name: str, version: str, action: str, *, by: str | None,
                  **details: Any) -> None:
    now = datetime.now(UTC)
    body = {"action": action, "at": now.isoformat(), "by": actor(by), **{k: v for k, v in details.items() if v is not None}}
    registry_history.record_event(client, model_name, str(version), body, now)  # an artifact, not a tag per event


# --- the promotion lock --------------------------------------------------------------------


_process_locks: dict[tuple[str, str], threading.Lock] = {}
_engines: dict[str, Any] = {}
_registry_guard = threading.Lock()


def registry_uri(client: MlflowClient) -> str:
    """The URI of the store that holds the aliases (the tracking URI unless a registry URI is set)."""
    return str(getattr(client, "_registry_uri", None) or client.tracking_uri)


def lock_kind(uri: str) -> str:
    """Which lock `promotion_lock` takes for a registry URI: postgres, sqlite-file or process."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        return "postgres"
    if scheme == "sqlite" and _sqlite_path(uri) is not None:
        return "sqlite-file"
    return "process"


def _sqlite_path(uri: str) -> Path | None:
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return None if not database or database == ":memory:" else Path(database)


def _lock_key(model_name: str) -> int:
    # A signed 64-bit advisory lock key per registered model.
    digest = hashlib.sha256(f"mlops_assets/champion/{model_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    # flock is per open file: each caller opens its own handle, so threads exclude each other too.
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PromotionLockTimeout(f"promotion lock {path} still held after {timeout_s:.0f} s") from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _engine(uri: str) -> Any:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    with _registry_guard:
        if uri not in _engines:
            # No pool: a promotion is rare, and an idle pooled connection would outlive the caller's need.
            _engines[uri] = create_engine(uri, poolclass=NullPool)
        return _engines[uri]


@contextmanager
def _postgres_lock(uri: str, model_name: str, timeout_s: float) -> Iterator[None]:
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    with _engine(uri).connect() as conn, conn.begin():
        # Transaction-scoped: released at commit or rollback, and by the server if this process dies.
        conn.execute(text(f"SET LOCAL lock_timeout = '{int(timeout_s * 1000)}ms'"))
        try:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(model_name)})
        except OperationalError as exc:
            raise PromotionLockTimeout(f"promotion lock of {model_name!r} still held after {timeout_s:.0f} s") from exc
        yield


@contextmanager
def promotion_lock(client: MlflowClient, model_name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[str]:
    """Hold the lock that serializes alias moves of `model_name`; yields the kind of lock held.

    PostgreSQL: `pg_advisory_xact_lock` on the registry database (every process and host that
    writes that registry). SQLite: an exclusive `flock` on `<db file>.promotion.lock` (every
    process on the machine; SQLite itself needs a local disk). Anything else: a lock in this
    process only.
    """
    uri = registry_uri(client)
    kind = lock_kind(uri)
    if kind == "postgres":
        with _postgres_lock(uri, model_name, timeout_s):
            yield kind
    elif kind == "sqlite-file":
        db = _sqlite_path(uri)
        assert db is not None
        with _file_lock(db.with_name(f"{db.name}.promotion.lock"), timeout_s):
            yield kind
    else:
        with _registry_guard:
            lock = _process_locks.setdefault((uri, model_name), threading.Lock())
        if not lock.acquire(timeout=timeout_s):
            raise PromotionLockTimeout(f"promotion lock of {model_name!r} still held after {timeout_s:.0f} s")
        try:
            yield kind
        finally:
            lock.release()


# --- promotion and rollback ----------------------------------------------------------------


def promote_to_champion(client: MlflowClient, model_name: str, version: str, *,
                        allow_rejected: bool = False, by: str | None = None) -> str | None:
    """Alias `version` as champion; the former champion becomes `previous-champion`.

    Returns the former champion's version when it was a different one, else None. A version the
    gate rejected (`gate_passed=false`) is refused unless `allow_rejected` (an explicit override).
    Runs under `promotion_lock`, so concurrent promotions form one chain in the history.
    """
    version = str(version)
    mv = client.get_model_version(model_name, version)  # fail clearly on an unknown version
    rejected = (mv.tags or {}).get(TAG_GATE_PASSED) == "false"
    if rejected and not allow_rejected:
        raise GateRejectedError(
            f"{model_name} version {version} was rejected by the promotion gate "
            f"({(mv.tags or {}).get(TAG_GATE_FAILURES, 'reasons not recorded')}); it stays {c.ALIAS_CHALLENGER}")
    with promotion_lock(client, model_name):
        former = alias_version(client, model_name, c.ALIAS_CHAMPION)
        if former == version:
            return None
        if former is not None:
            client.set_registered_model_alias(model_name, c.ALIAS_PREVIOUS_CHAMPION, former)
            _record_event(client, model_name, former, "demote", by=by, replaced_by=version)
        client.set_registered_model_alias(model_name, c.ALIAS_CHAMPION, version)
        _record_event(client, model_name, version, "promote", by=by, replaced=former,
                      override="gate rejected" if rejected else None)
    return former


def rollback_champion(client: MlflowClient, model_name: str, *, expected_champion: str | None = None,
                      by: str | None = None) -> tuple[str, str]:
    """Swap champion and previous-champion (rolling back twice returns to where it was).

    Returns (new champion, replaced champion). With `expected_champion`, the swap happens only
    if the champion is still that version (ConcurrentPromotionError otherwise): an undo must not
    swap away a promotion someone made in between.
    """
    with promotion_lock(client, model_name):
        current = alias_version(client, model_name, c.ALIAS_CHAMPION)
        if current is None:
            raise NoChampionError(f"model {model_name!r} has no {c.ALIAS_CHAMPION!r} version: nothing to roll back")
        if expected_champion is not None and current != str(expected_champion):
            raise ConcurrentPromotionError(
                f"model {model_name!r}: champion is version {current}, not {expected_champion}; not rolled back")
        previous = alias_version(client, model_name, c.ALIAS_PREVIOUS_CHAMPION)
        if previous is None:
            raise NoChampionError(
                f"model {model_name!r} has no {c.ALIAS_PREVIOUS_CHAMPION!r} version to roll back to "
                f"(champion is version {current})"
            )
        client.set_registered_model_alias(model_name, c.ALIAS_CHAMPION, previous)
        client.set_registered_model_alias(model_name, c.ALIAS_PREVIOUS_CHAMPION, current)
        _record_event(client, model_name, previous, "rollback-to", by=by, replaced=current)
        _record_event(client, model_name, current, "rollback-from", by=by, replaced_by=previous)
    return previous, current


# --- the gate's verdict ----------------------------------------------------------------------


def gate_tags(passed: bool, failures: list[str], compared_to: str | None) -> dict[str, str]:
    """The version tags that record the gate's verdict and why."""
    joined = "; ".join(failures) or "none"
    if len(joined) > TAG_VALUE_LIMIT:
        joined = joined[: TAG_VALUE_LIMIT - 3] + "..."
    return {TAG_GATE_PASSED: str(bool(passed)).lower(), TAG_GATE_VERDICT: "promote" if passed else "reject",
            TAG_GATE_FAILURES: joined, TAG_GATE_COMPARED_TO: str(compared_to or "none")}


def record_rejection(client: MlflowClient, model_name: str, version: str, failures: list[str],
                     compared_to: str | None, by: str | None = None) -> bool:
    """Tag the version with the gate's reject verdict and add a `reject` history event, once.

    Returns False when the rejection was already recorded (re-materializing the same run).
    """
    version = str(version)
    if any(e.version == version and e.action == "reject" for e in history(client, model_name)):
        return False
    for key, value in gate_tags(False, failures, compared_to).items():
        client.set_model_version_tag(model_name, version, key, value)
    _record_event(client, model_name, version, "reject", by=by, failures=failures, compared_to=compared_to)
    return True


def rejected_versions(client: MlflowClient, model_name: str) -> list[ModelVersion]:
    """Every version the gate rejected, newest first (its tags say why)."""
    found = client.search_model_versions(f"name = '{model_name}' and tags.{TAG_GATE_PASSED} = 'false'")
    return sorted(found, key=lambda v: -int(v.version))


def resolve_version(
    client: MlflowClient, model_name: str, *, alias: str | None = None, version: str | None = None
) -> ModelVersion:
    """One registry version by alias or number (champion when neither is given)."""
    from mlflow.exceptions import MlflowException

    if alias and version:
        raise ValueError("give an alias or a version, not both")
    if version:
        return client.get_model_version(model_name, str(version))
    alias = alias or c.ALIAS_CHAMPION
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        raise NoChampionError(f"model {model_name!r} has no version under alias {alias!r}") from exc


def history(client: MlflowClient, model_name: str) -> list[HistoryEvent]:
    """Registration, promotion and rollback events of every version, oldest first."""
    events: list[HistoryEvent] = []
    for mv in client.search_model_versions(f"name = '{model_name}'"):
        for body in registry_history.version_events(client, model_name, mv):
            details = {k: v for k, v in body.items() if k not in ("action", "at", "by")}
            events.append(HistoryEvent(str(mv.version), body.get("action", ""), body.get("at", ""),
                                       body.get("by", ""), details))
    return sorted(events, key=lambda e: (e.at, int(e.version)))


# --- loading -------------------------------------------------------------------------------


def _load_native(path: Path) -> CatBoostClassifier:
    from catboost import CatBoostClassifier

    model = CatBoostClassifier()
    model.load_model(str(path), format="cbm")  # CatBoost's own format: nothing is unpickled
    return model


def load_logged_model(client: MlflowClient, model_uri: str, expected_sha256: str) -> CatBoostClassifier:
    """Load a logged (not necessarily registered) model after checking its file's sha256."""
    with tempfile.TemporaryDirectory(prefix="mlops-model-") as tmp:
        local = Path(_download(client, model_uri, tmp)) / MODEL_ARTIFACT_FILE
        actual = file_sha256(local)
        if actual != expected_sha256:
            raise ModelIntegrityError(
                f"{model_uri}: {MODEL_ARTIFACT_FILE} sha256 {actual} does not match the recorded {expected_sha256}"
            )
        return _load_native(local)


def load_verified_model(
    tracking_uri: str, model_name: str, *, alias: str | None = None, version: str | None = None
) -> LoadedModel:
    """Download a registry version's native model, check its sha256, then load it.

    Raises ModelIntegrityError when the file's hash differs from the version's `model_sha256`
    tag (or when there is no recorded hash to check against).
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    mv = resolve_version(client, model_name, alias=alias, version=version)
    tags = dict(mv.tags or {})
    expected = tags.get(TAG_SHA256)
    if not expected:
        raise ModelIntegrityError(f"{model_name} version {mv.version} has no {TAG_SHA256!r} tag; refusing to load")
    source = client.get_model_version_download_uri(model_name, mv.version)
    with tempfile.TemporaryDirectory(prefix="mlops-model-") as tmp:
        local = Path(_download(client, f"{source.rstrip('/')}/{MODEL_ARTIFACT_FILE}", tmp))
        actual = file_sha256(local)
        if actual != expected:
            raise ModelIntegrityError(
                f"{model_name} version {mv.version}: {MODEL_ARTIFACT_FILE} sha256 {actual} "
                f"does not match the registered {expected}"
            )
        model = _load_native(local)
    return LoadedModel(
        model=model,
        model_name=model_name,
        version=str(mv.version),
        run_id=mv.run_id or "",
        sha256=actual,
        tags=tags,
    )
