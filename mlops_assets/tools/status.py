"""What `mlops-assets status` reports: the champion, its metrics and versions, and the endpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.core.redaction import redact_text, redact_values
from mlops_assets.registry import model_store

METRIC_TAG_PREFIX = "metric.test_"


def _version_summary(client: MlflowClient, model_name: str, alias: str) -> dict[str, Any] | None:
    version = model_store.alias_version(client, model_name, alias)
    if version is None:
        return None
    mv = client.get_model_version(model_name, version)
    tags = dict(mv.tags or {})
    return {
        "version": str(mv.version),
        "training_run_id": mv.run_id,
        "source": mv.source,
        "registered_at_ms": mv.creation_timestamp,
        "trained_at": tags.get("trained_at"),
        "data_version": tags.get("data_version"),
        "raw_dataset_version": tags.get("raw_dataset_version"),
        "feature_version": tags.get("feature_version"),
        "git_sha": tags.get("git_sha"),
        "dagster_run_id": tags.get("dagster_run_id"),
        "decision_threshold": tags.get(model_store.TAG_DECISION_THRESHOLD),
        "model_sha256": tags.get(model_store.TAG_SHA256),
        "metrics": {k.removeprefix(METRIC_TAG_PREFIX): float(v) for k, v in sorted(tags.items())
                    if k.startswith(METRIC_TAG_PREFIX)},
    }


def endpoint_health(url: str | None, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """GET <url>/healthz; None when no URL is configured. Never raises: status must always print.
    URIs in the answer (the URL itself, an error message) are redacted."""
    if not url:
        return None
    import httpx

    try:
        response = httpx.get(f"{url.rstrip('/')}/healthz", timeout=timeout_s)
        body: Any
        try:
            body = response.json()
        except ValueError:
            body = response.text[:200]
        return redact_values({"url": url, "healthy": response.status_code == 200,
                              "status_code": response.status_code, "body": body})
    except httpx.HTTPError as exc:
        return redact_values({"url": url, "healthy": False, "error": f"{type(exc).__name__}: {exc}"})


def champion_status(tracking_uri: str, model_name: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """The registry's view: champion, previous champion and challenger; plus the endpoint's health.

    What it returns is meant to be printed: every URI in it (the store, sources) is redacted."""
    shown_uri = redact_text(tracking_uri)
    empty = {"model_name": model_name, "tracking_uri": shown_uri, "champion": None,
             "previous_champion": None, "challenger": None}
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        # Asking MLflow would create an empty store as a side effect of a read-only command.
        return {**empty, "note": "no MLflow store yet", "endpoint": endpoint_health(endpoint_url)}
    client = MlflowClient(tracking_uri=tracking_uri)
    return redact_values({
        "model_name": model_name,
        "tracking_uri": shown_uri,
        "champion": _version_summary(client, model_name, c.ALIAS_CHAMPION),
        "previous_champion": _version_summary(client, model_name, c.ALIAS_PREVIOUS_CHAMPION),
        "challenger": _version_summary(client, model_name, c.ALIAS_CHALLENGER),
        "endpoint": endpoint_health(endpoint_url),
    })


def to_json(status: dict[str, Any]) -> str:
    return redact_text(json.dumps(status, indent=2, sort_keys=True, default=str))


def format_status(status: dict[str, Any]) -> str:
    """Human-readable lines."""
    lines = [f"model {status['model_name']} ({status['tracking_uri']})"]
    champ = status.get("champion")
    if champ is None:
        lines.append("champion: none yet (run `make pipeline` to train, gate and register one)")
    else:
        lines += [
            f"champion: version {champ['version']} (trained {champ.get('trained_at') or '?'})",
            f"  training run:    {champ['training_run_id']}",
            f"  data version:    {champ.get('data_version')}",
            f"  feature version: {champ.get('feature_version')}",
            f"  code (git):      {champ.get('git_sha')}",
        ]
        metrics = champ.get("metrics") or {}
        if metrics:
            lines.append("  test metrics:    " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    for key, label in (("previous_champion", "previous champion"), ("challenger", "challenger")):
        other = status.get(key)
        lines.append(f"{label}: " + (f"version {other['version']}" if other else "none"))
    endpoint = status.get("endpoint")
    if endpoint is not None:
        state = "healthy" if endpoint.get("healthy") else f"unhealthy ({endpoint.get('error') or endpoint.get('status_code')})"
        lines.append(f"endpoint: {endpoint['url']} {state}")
    return redact_text("\n".join(lines))
