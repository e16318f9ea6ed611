"""Registry: every evaluated candidate as an MLflow model version, with the gate's verdict.

A candidate that passes becomes `champion` (the former champion `previous-champion`); one that
fails is registered all the same, as `challenger`, tagged `gate_passed=false` with the failed
checks, and a `reject` event in the history. The blocking `passed_gate` check on
registered_model then stops the run before model_deployment.
"""


import math
from typing import Any

import dagster as dg

from mlops_assets import constants as c
from mlops_assets.core.records import Evaluation, Registration, TrainedModel, content_hash
from mlops_assets.defs.resources import MlflowResource
from mlops_assets.defs.training.assets import TAG_FINGERPRINT
from mlops_assets.evaluation import gate
from mlops_assets.training import tracking

PROMOTION_ACTIONS = frozenset({"promote", "rollback-to"})
REGISTRY_CODE_VERSION = "2"


def version_tags(trained_model: TrainedModel, model_evaluation: Evaluation) -> dict[str, str]:
    """What a registry version says about itself: data, features, code, run, metrics, gate."""
    from mlops_assets.registry import model_store

    tags = {
        "data_version": trained_model.data_version,
        "raw_dataset_version": trained_model.raw_dataset_version,
        "feature_version": trained_model.feature_version,
        "feature_names": ",".join(trained_model.feature_names),
        "positive_class": str(trained_model.positive_class),
        model_store.TAG_DECISION_THRESHOLD: str(trained_model.decision_threshold),
        "training_run_id": trained_model.run_id,
        "dagster_run_id": trained_model.dagster_run_id,
        "git_sha": trained_model.git_sha,
        "trained_at": trained_model.trained_at,
        TAG_FINGERPRINT: trained_model.fingerprint,
    }
    decision = gate.GateDecision.from_dict(model_evaluation.gate)
    tags.update(model_store.gate_tags(decision.passed, decision.failures, decision.champion_version))
    for name, value in model_evaluation.metrics.items():
        if value is not None and not math.isnan(value):
            tags[f"metric.test_{name}"] = f"{value:.6f}"
    return tags


def _ever_champion(client, model_name: str, version: str) -> bool:
    from mlops_assets.registry import model_store

    return any(e.version == version and e.action in PROMOTION_ACTIONS for e in model_store.history(client, model_name))


def _aliases(client: Any, name: str) -> dict[str, str | None]:
    from mlops_assets.registry import model_store

    return {alias: model_store.alias_version(client, name, alias)
            for alias in (c.ALIAS_CHAMPION, c.ALIAS_PREVIOUS_CHAMPION, c.ALIAS_CHALLENGER)}


@dg.asset(group_name=c.GROUP_REGISTRY, owners=c.ASSET_OWNERS, kinds={"mlflow"}, code_version=REGISTRY_CODE_VERSION)
def registered_model(
    context: dg.AssetExecutionContext,
    mlflow: MlflowResource,
    trained_model: TrainedModel,
    model_evaluation: Evaluation,
) -> dg.Output[Registration]:
    """The model version in the MLflow registry: challenger always, champion when the gate passed."""
    from mlops_assets.registry import governance, model_store

    client = mlflow.client()
    name = mlflow.model_name
    run_id = trained_model.run_id
    if model_evaluation.run_id != run_id:
        raise dg.Failure(f"model_evaluation is of run {model_evaluation.run_id}, trained_model of {run_id}: "
                         "materialize model_evaluation again first")
    decision = gate.GateDecision.from_dict(model_evaluation.gate)
    found = model_store.find_version_for_run(client, name, run_id)
    if trained_model.reused and found is not None:
        # Nothing new was trained: register nothing, move no alias, rewrite no card.
        now = _aliases(client, name)
        version = str(found.version)
        aliases = tuple(sorted(a for a, v in now.items() if v == version))
        context.log.info(f"skipped registration: version {version} already holds run {run_id} "
                         f"(aliases now: {', '.join(aliases) or 'none'})")
        record = Registration(
            model_name=name, version=version, run_id=run_id, champion_version=now[c.ALIAS_CHAMPION],
            previous_champion_version=now[c.ALIAS_PREVIOUS_CHAMPION], aliases=aliases,
            gate_passed=decision.passed, gate_failures=tuple(decision.failures),
            gate_compared_to=decision.champion_version, model_sha256=(found.tags or {}).get(model_store.TAG_SHA256),
            data_version=trained_model.data_version, feature_version=trained_model.feature_version,
            fingerprint=trained_model.fingerprint, reused=True)
        return dg.Output(record, data_version=dg.DataVersion(content_hash(record.as_dict())),
                         metadata={**_registration_metadata(mlflow, trained_model, record, (found.tags or {}).get(
                             governance.TAG_MODEL_CARD, "")),
                                   "skipped": True,
                                   "skip_reason": f"version {version} already registered from the same inputs"})
    existed = found is not None
    # The hash model_evaluation checked the downloaded file against in this run: the model is fetched
    # once per run. A reused model was not loaded in this run, so its stored file is hashed here.
    mv = model_store.register_version(client, name, run_id=run_id, model_uri=trained_model.model_uri,
                                      tags=version_tags(trained_model, model_evaluation), by=mlflow.actor,
                                      sha256=None if trained_model.reused else trained_model.model_sha256)
    version = str(mv.version)
    if not decision.passed:  # tags again for a version registered before they existed; event once
        model_store.record_rejection(client, name, version, decision.failures, decision.champion_version,
                                     by=mlflow.actor)
    # Promote once per version: re-materializing must not undo a later rollback or promotion.
    promoted, former = False, None
    if decision.passed and not _ever_champion(client, name, version):
        former = model_store.promote_to_champion(client, name, version, by=mlflow.actor)
        promoted = True
    now = _aliases(client, name)
    champion = now[c.ALIAS_CHAMPION]
    aliases = tuple(sorted(a for a, v in now.items() if v == version))

    meta = tracking.read_metadata_json(client, run_id)
    meta.setdefault("model", {})["registered"] = {"name": name, "version": version, "aliases": list(aliases)}
    tracking.write_metadata_json(client, run_id, meta)
    card_uri = governance.record_model_card(
        client, name, version, trained_model=trained_model.as_dict(), model_evaluation=model_evaluation.as_dict(),
        aliases=aliases, registration_dagster_run_id=context.run_id, dagster_ui_url=mlflow.dagster_ui_url)
    if not decision.passed:
        context.log.warning(f"gate failed: version {version} stays {c.ALIAS_CHALLENGER}; champion is "
                            f"{champion or 'none'}: {'; '.join(decision.failures)}")
    record = Registration(
        model_name=name, version=version, run_id=run_id, champion_version=champion, newly_registered=not existed,
        promoted=promoted, replaced_champion=former, previous_champion_version=now[c.ALIAS_PREVIOUS_CHAMPION],
        aliases=aliases, gate_passed=decision.passed, gate_failures=tuple(decision.failures),
        gate_compared_to=decision.champion_version, model_sha256=mv.tags.get(model_store.TAG_SHA256),
        data_version=trained_model.data_version, feature_version=trained_model.feature_version,
        fingerprint=trained_model.fingerprint)
    return dg.Output(record, data_version=dg.DataVersion(content_hash(record.as_dict())),
                     metadata={**_registration_metadata(mlflow, trained_model, record, card_uri), "skipped": False})


def _registration_metadata(mlflow: MlflowResource, trained_model: TrainedModel, record: Registration,
                           card_uri: str) -> dict[str, Any]:
    name, version = record.model_name, record.version
    return {
        "model_name": name,
        "version": version,
        "aliases": ", ".join(record.aliases) or "none",
        "champion_version": record.champion_version or "none",
        "previous_champion_version": record.previous_champion_version or "none",
        "promoted": record.promoted,
        "newly_registered": record.newly_registered,
        "gate_passed": record.gate_passed,
        "gate_failures": dg.MetadataValue.md("\n".join(f"- {f}" for f in record.gate_failures) or "none"),
        "model_version": mlflow.model_version_link(name, version),
        "mlflow_run": mlflow.run_link(trained_model.experiment_id, record.run_id),
        "model_uri": f"models:/{name}/{version}",
        "model_card": card_uri,
        "data_version": record.data_version or "unknown",
        "feature_version": record.feature_version or "unknown",
    }


@dg.asset_check(asset=registered_model, blocking=True,
                description="The registered version passed the promotion gate; a rejected challenger stops "
                            "the run here, before model_deployment.")
def passed_gate(registered_model: Registration) -> dg.AssetCheckResult:
    passed = bool(registered_model.gate_passed)
    failures = list(registered_model.gate_failures)
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(f"version {registered_model.version} passed the gate" if passed else
                     f"version {registered_model.version} rejected, stays {c.ALIAS_CHALLENGER}: "
                     + "; ".join(failures)),
        metadata={
            "version": registered_model.version,
            "decision": "promote" if passed else "reject",
            "failures": dg.MetadataValue.md("\n".join(f"- {f}" for f in failures) or "none"),
            "aliases": ", ".join(registered_model.aliases) or "none",
            "champion_version": registered_model.champion_version or "none",
        },
    )


defs = dg.Definitions(assets=[registered_model], asset_checks=[passed_gate])
