"""A release's aliases and history in the MLflow registry.

While a shadow or canary runs, the registry says what serves: `champion` is the version that
answers for everyone, `candidate` the version under release. Promotion moves `champion` to the
candidate (the old champion becomes `previous-champion`, as every promotion does); an abort
removes `candidate` and leaves `champion` where it was. Each step is a history event on the
candidate's version (`release-start`, `release-promote`, `release-abort`), so `status --history`
lists the release beside registrations, promotions and rollbacks.
"""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlops_assets import constants as c
from mlops_assets.registry import model_store

ALIAS_CANDIDATE = "candidate"


def _previous_of(client: MlflowClient, model_name: str, champion: str) -> str | None:
    """The version `champion` replaced when it was last promoted (what previous-champion was then)."""
    promotions = [e for e in model_store.history(client, model_name) if e.version == champion and e.action == "promote"]
    replaced = promotions[-1].details.get("replaced") if promotions else None
    return str(replaced) if replaced not in (None, "") else None


def begin_release(client: MlflowClient, model_name: str, *, candidate: str, champion: str, strategy: str,
                  release_id: str, by: str | None = None, **details: Any) -> None:
    """Alias `candidate`; keep (or put back) `champion` on the version that serves.

    The gate may have already moved `champion` to the candidate (registered_model promotes a
    passing version): during a release the serving version stays champion, so that move is
    undone here, with `previous-champion` back on what it was before.
    """
    candidate, champion = str(candidate), str(champion)
    with model_store.promotion_lock(client, model_name):
        if model_store.alias_version(client, model_name, c.ALIAS_CHAMPION) == candidate:
            client.set_registered_model_alias(model_name, c.ALIAS_CHAMPION, champion)
            before = _previous_of(client, model_name, champion)
            if before is not None:
                client.set_registered_model_alias(model_name, c.ALIAS_PREVIOUS_CHAMPION, before)
            else:
                _delete_alias(client, model_name, c.ALIAS_PREVIOUS_CHAMPION)
        client.set_registered_model_alias(model_name, ALIAS_CANDIDATE, candidate)
    model_store._record_event(client, model_name, candidate, "release-start", by=by, strategy=strategy,
                              release_id=release_id, champion=champion, **details)


def promote_release(client: MlflowClient, model_name: str, *, candidate: str, release_id: str,
                    by: str | None = None, **details: Any) -> str | None:
    """`champion` := candidate (the old champion becomes previous-champion); `candidate` removed."""
    former = model_store.promote_to_champion(client, model_name, str(candidate), by=by)
    _delete_alias(client, model_name, ALIAS_CANDIDATE)
    model_store._record_event(client, model_name, str(candidate), "release-promote", by=by, release_id=release_id,
                              replaced=former, **details)
    return former


def abort_release(client: MlflowClient, model_name: str, *, candidate: str, release_id: str,
                  by: str | None = None, **details: Any) -> None:
    """`candidate` removed; `champion` stays on the version that served."""
    _delete_alias(client, model_name, ALIAS_CANDIDATE)
    model_store._record_event(client, model_name, str(candidate), "release-abort", by=by, release_id=release_id,
                              **details)


def _delete_alias(client: MlflowClient, model_name: str, alias: str) -> None:
    try:
        client.delete_registered_model_alias(model_name, alias)
    except MlflowException:
        pass  # not set: nothing to remove
