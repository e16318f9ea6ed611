"""Registry: every evaluated candidate as an MLflow model version, with the gate's verdict.

A candidate that passes becomes `champion` (the former champion `previous-champion`); one that
fails is registered all the same, as `challenger`, tagged `gate_passed=false` with the failed
checks, and a `reject` event in the history. The blocking `passed_gate` check on
registered_model then stops the run before model_deployment.
"""


import math

import dagster as dg

from mlops_assets import constants as c
from mlops_assets.defs.resources import MlflowResource
from mlops_assets.evaluation import gate
from mlops_assets.registry import governance, model_store
from mlops_assets.settings import load_settings
from mlops_assets.training import tracking

PROMOTION_ACTIONS = frozenset({"promote", "rollback-to"})


def version_tags(trained_model: dict, model_evaluation: dict) -> dict[str, str]:
    """What a registry version says about itself: data, features, code, run, metrics, gate."""
    tags = {
        "data_version": trained_model["data_version"],
        "raw_dataset_version": trained_model["raw_dataset_version"],
        "feature_version": trained_model["feature_version"],
        "feature_names": ",".join(trained_model["feature_names"]),
        "positive_class": str(trained_model["positive_class"]),
        model_store.TAG_DECISION_THRESHOLD: str(trained_model["decision_threshold"]),
        "training_run_id": trained_model["run_id"],
        "dagster_run_id": trained_model["dagster_run_id"],
        "git_sha": trained_model["git_sha"],
        "trained_at": trained_model["trained_at"],
    }
    decision = gate.GateDecision.from_dict(model_evaluation["gate"])
    tags.update(model_store.gate_tags(decision.passed, decision.failures, decision.champion_version))
    for name, value in model_evaluation["metrics"].items():
        if value is not None and not math.isnan(value):
            tags[f"metric.test_{name}"] = f"{value:.6f}"
    return tags


def _ever_champion(client, model_name: str, version: str) -> bool:
    return any(e.version == version and e.action in PROMOTION_ACTIONS for e in model_store.history(client, model_name))


@dg.asset(group_name=c.GROUP_REGISTRY, kinds={"mlflow"})
def registered_model(
    context: dg.AssetExecutionContext,
    mlflow: MlflowResource,
    trained_model: dict,
    model_evaluation: dict,
) -> dg.MaterializeResult:
    """The model version in the MLflow registry: challenger always, champion when the gate passed."""
    client = mlflow.client()
    name = mlflow.resolved_model_name()
    run_id = trained_model["run_id"]
    if model_evaluation["run_id"] != run_id:
        raise dg.Failure(f"model_evaluation is of run {model_evaluation['run_id']}, trained_model of {run_id}: "
                         "materialize model_evaluation again first")
    decision = gate.GateDecision.from_dict(model_evaluation["gate"])
    existed = model_store.find_version_for_run(client, name, run_id) is not None
    mv = model_store.register_version(client, name, run_id=run_id, model_uri=trained_model["model_uri"],
                                      tags=version_tags(trained_model, model_evaluation))
    version = str(mv.version)
    if not decision.passed:  # tags again for a version registered before they existed; event once
        model_store.record_rejection(client, name, version, decision.failures, decision.champion_version)
    # Promote once per version: re-materializing must not undo a later rollback or promotion.
    promoted, former = False, None
    if decision.passed and not _ever_champion(client, name, version):
        former = model_store.promote_to_champion(client, name, version)
        promoted = True
    champion = model_store.alias_version(client, name, c.ALIAS_CHAMPION)
    previous = model_store.alias_version(client, name, c.ALIAS_PREVIOUS_CHAMPION)
    challenger = model_store.alias_version(client, name, c.ALIAS_CHALLENGER)
    aliases = sorted(a for a, v in ((c.ALIAS_CHAMPION, champion), (c.ALIAS_PREVIOUS_CHAMPION, previous),
                                    (c.ALIAS_CHALLENGER, challenger)) if v == version)

    meta = tracking.read_metadata_json(client, run_id)
    meta.setdefault("model", {})["registered"] = {"name": name, "version": version, "aliases": aliases}
    tracking.write_metadata_json(client, run_id, meta)
    card_uri = governance.record_model_card(
        client, name, version, trained_model=trained_model, model_evaluation=model_evaluation, aliases=aliases,
        registration_dagster_run_id=context.run_id, batches_url=load_settings().batches_url)
    if not decision.passed:
        context.log.warning(f"gate failed: version {version} stays {c.ALIAS_CHALLENGER}; champion is "
                            f"{champion or 'none'}: {'; '.join(decision.failures)}")
    output = {
        "model_name": name,
        "version": version,
        "run_id": run_id,
        "newly_registered": not existed,
        "promoted": promoted,
        "replaced_champion": former,
        "champion_version": champion,
        "previous_champion_version": previous,
        "aliases": aliases,
        "gate_passed": decision.passed,
        "gate_failures": decision.failures,
        "gate_compared_to": decision.champion_version,
        "model_sha256": mv.tags.get(model_store.TAG_SHA256),
        "data_version": trained_model["data_version"],
        "feature_version": trained_model["feature_version"],
    }
    return dg.MaterializeResult(
        value=output,
        metadata={
            "model_name": name,
            "version": version,
            "aliases": ", ".join(aliases) or "none",
            "champion_version": champion or "none",
            "previous_champion_version": previous or "none",
            "promoted": promoted,
            "newly_registered": not existed,
            "gate_passed": decision.passed,
            "gate_failures": dg.MetadataValue.md("\n".join(f"- {f}" for f in decision.failures) or "none"),
            "model_version": mlflow.model_version_link(name, version),
            "mlflow_run": mlflow.run_link(trained_model["experiment_id"], run_id),
            "model_uri": f"models:/{name}/{version}",
            "model_card": card_uri,
        },
    )


@dg.asset_check(asset=registered_model, blocking=True,
                description="The registered version passed the promotion gate; a rejected challenger stops "
                            "the run here, before model_deployment.")
def passed_gate(registered_model: dict) -> dg.AssetCheckResult:
    passed = bool(registered_model["gate_passed"])
    failures = registered_model.get("gate_failures") or []
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(f"version {registered_model['version']} passed the gate" if passed else
                     f"version {registered_model['version']} rejected, stays {c.ALIAS_CHALLENGER}: "
                     + "; ".join(failures)),
        metadata={
            "version": registered_model["version"],
            "decision": "promote" if passed else "reject",
            "failures": dg.MetadataValue.md("\n".join(f"- {f}" for f in failures) or "none"),
            "aliases": ", ".join(registered_model.get("aliases") or []) or "none",
            "champion_version": registered_model.get("champion_version") or "none",
        },
    )


defs = dg.Definitions(assets=[registered_model], asset_checks=[passed_gate])
