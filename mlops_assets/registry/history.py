"""The registry's history: who registered, rejected, promoted, demoted or rolled back which version,
when. One small JSON artifact per event on the version's MLflow run
(`registry_history/<model>/<when>-<action>-<id>.json`), so the history grows without bound where
MLflow keeps artifacts, never in the registry's tag table; a version's tags keep only current facts
(`last_event`). Versions recorded before this store carry one `history.<when>.<action>` tag per event:
those are still read, so the history of an old registry stays whole.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # MLflow loads where it is used (model_store imports this module)
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

HISTORY_DIR = "registry_history"
LEGACY_TAG_PREFIX = "history."  # one tag per event, as versions recorded before this store have
TAG_LAST_EVENT = "last_event"  # the version's newest event, in one line (a current fact)


def _folder(model_name: str) -> str:
    return f"{HISTORY_DIR}/{model_name.replace('/', '_')}"


def record_event(client: MlflowClient, model_name: str, version: str, body: Mapping[str, Any],
                 at: datetime) -> str:
    """Store one event (`body` holds action, at, by and details) and return where it went.

    The event file is named by time, action and a random id, so concurrent writers never collide
    and the files sort by time. A version without a readable run (deleted) keeps the event as a
    tag, as before, rather than lose it."""
    from mlflow.exceptions import MlflowException

    action = str(body.get("action", "event"))
    text = json.dumps(dict(body), sort_keys=True)
    mv = client.get_model_version(model_name, str(version))
    name = f"{at.strftime('%Y%m%dT%H%M%S%fZ')}-{action}-{uuid.uuid4().hex[:8]}.json"
    where = f"tag {LEGACY_TAG_PREFIX}..."
    try:
        if not mv.run_id:
            raise MlflowException("version has no run")
        client.log_text(mv.run_id, text, f"{_folder(model_name)}/{name}")
        where = f"runs:/{mv.run_id}/{_folder(model_name)}/{name}"
    except MlflowException:
        client.set_model_version_tag(model_name, str(version),
                                     f"{LEGACY_TAG_PREFIX}{at.strftime('%Y%m%dT%H%M%S%fZ')}.{action}", text)
    client.set_model_version_tag(model_name, str(version), TAG_LAST_EVENT,
                                 f"{action} by {body.get('by', '?')} at {body.get('at', '?')}")
    return where


def version_events(client: MlflowClient, model_name: str, mv: ModelVersion) -> list[dict[str, Any]]:
    """Every event of one version (artifacts and legacy tags), unordered, as stored bodies."""
    from mlflow.exceptions import MlflowException

    bodies: list[dict[str, Any]] = []
    for key, value in (mv.tags or {}).items():
        if key.startswith(LEGACY_TAG_PREFIX):
            bodies.extend(_parsed(value))
    if mv.run_id:
        folder = _folder(model_name)
        try:
            listed = client.list_artifacts(mv.run_id, folder)
            if listed:
                with tempfile.TemporaryDirectory(prefix="registry-history-") as tmp:
                    local = Path(client.download_artifacts(mv.run_id, folder, tmp))
                    for path in sorted(local.glob("*.json")):
                        bodies.extend(_parsed(path.read_text()))
        except (MlflowException, OSError):
            pass  # a run whose artifacts are gone: its tags (if any) are what is left
    return bodies


def _parsed(text: str) -> list[dict[str, Any]]:
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [body] if isinstance(body, dict) else []
