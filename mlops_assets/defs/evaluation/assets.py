"""Evaluation on the held-out test split, the champion scored on the same rows, and the gate."""


import base64
import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.core.records import Evaluation, Split, TrainedModel, content_hash
from mlops_assets.defs.metadata import confusion_table, frame_table, gate_table
from mlops_assets.defs.resources import MlflowResource, PlatformResource
from mlops_assets.evaluation import gate
from mlops_assets.evaluation import metrics as ev
from mlops_assets.training import tracking

if TYPE_CHECKING:  # the registry client (MLflow, CatBoost) loads when a model is evaluated
    from mlops_assets.registry import model_store
from mlops_assets.training import train as tr

_CRITERIA = gate.GateCriteria()
PLOTS_DIR = "evaluation"
EVALUATION_CODE_VERSION = "2"  # bump when metrics or the gate are computed differently
METADATA_RECORD_KEY = "model_evaluation"  # the Evaluation record inside the run's metadata.json


class EvaluationConfig(dg.Config):
    """Gate thresholds (see README, "The promotion gate") and how many top features to slice by."""

    min_roc_auc: float = _CRITERIA.min_roc_auc
    min_accuracy: float = _CRITERIA.min_accuracy
    min_f1: float = _CRITERIA.min_f1
    min_recall: float = _CRITERIA.min_recall
    max_log_loss: float = _CRITERIA.max_log_loss
    max_regression: float = _CRITERIA.max_regression
    compared_metrics: list[str] = list(_CRITERIA.compared_metrics)
    slice_top_k: int = 3

    def criteria(self) -> gate.GateCriteria:
        fields = self.model_dump()
        fields.pop("slice_top_k")
        fields["compared_metrics"] = tuple(fields["compared_metrics"])
        return gate.GateCriteria(**fields)


def _champion(mlflow: MlflowResource, candidate_run_id: str, feature_names: list[str]
              ) -> tuple["model_store.LoadedModel | None", str]:
    """The current champion to compare against, or None with the reason why not."""
    from mlops_assets.registry import model_store

    name = mlflow.model_name
    if model_store.alias_version(mlflow.client(), name, c.ALIAS_CHAMPION) is None:
        return None, f"no {c.ALIAS_CHAMPION} registered for {name!r} yet"
    champion = model_store.load_verified_model(mlflow.tracking_uri, name, alias=c.ALIAS_CHAMPION)
    if list(champion.model.feature_names_) != feature_names:
        return None, f"champion v{champion.version} uses other features; not comparable"
    if champion.run_id == candidate_run_id:
        return champion, f"champion v{champion.version} is this very run"
    return champion, f"champion v{champion.version} (run {champion.run_id})"


def _png_md(path: Path, title: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"![{title}](data:image/png;base64,{data})"


def _md_table(frame: pd.DataFrame, digits: int = 4) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else v) for k, v in metrics.items()}


@dg.asset(group_name=c.GROUP_EVALUATION, owners=c.ASSET_OWNERS, kinds={"catboost", "mlflow", "scikitlearn"},
          code_version=EVALUATION_CODE_VERSION)
def model_evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    platform: PlatformResource,
    mlflow: MlflowResource,
    trained_model: TrainedModel,
    train_test_split: Split,
) -> dg.Output[Evaluation]:
    """Hold-out metrics, plots and slices of the candidate and of the champion, with the gate decision."""
    from mlops_assets.registry import model_store

    spec = platform.spec()
    client = mlflow.client()
    run_id = trained_model.run_id
    if trained_model.reused:  # nothing was trained: the stored evaluation of that run stands
        stored = tracking.read_metadata_json(client, run_id).get(METADATA_RECORD_KEY)
        if stored:
            evaluation = replace(Evaluation.from_dict(stored), reused=True)
            context.log.info(f"skipped evaluation: run {run_id} was evaluated when it was trained")
            return dg.Output(evaluation, data_version=dg.DataVersion(trained_model.fingerprint), metadata={
                "gate_decision": gate_table(evaluation.gate),
                "skipped": True, "skip_reason": f"model of run {run_id} reused, evaluated before",
                **{k: dg.MetadataValue.float(v) for k, v in evaluation.metrics.items() if v is not None},
                "gate_passed": bool(evaluation.gate.get("passed")), "champion": evaluation.champion_note,
                "mlflow_run": mlflow.run_link(trained_model.experiment_id, run_id)})
    feature_names = list(trained_model.feature_names)
    threshold = float(trained_model.decision_threshold)
    # Only the test split: rows the model (and its early stopping) never saw.
    _, test = tr.split_frame(train_test_split.frame())
    X_test, y_test = tr.features_and_target(test, feature_names)
    candidate = model_store.load_logged_model(client, trained_model.model_uri, trained_model.model_sha256)
    champion, champion_note = _champion(mlflow, run_id, feature_names)
    class_names = (spec.label_values[spec.negative_class], spec.positive_name)
    with tempfile.TemporaryDirectory(prefix="evaluation-") as tmp:
        result = ev.evaluate(candidate, X_test, y_test, tmp, threshold=threshold,
                             champion=champion.model if champion else None,
                             slice_top_k=config.slice_top_k, class_names=class_names,
                             numeric_features=spec.numeric_features)
        plots_md = {f"plot_{name}": dg.MetadataValue.md(_png_md(path, name)) for name, path in result.plots.items()}
        for path in result.plots.values():
            client.log_artifact(run_id, str(path), PLOTS_DIR)
        slices_path = Path(tmp) / "slices.csv"
        result.slices.to_csv(slices_path, index=False)
        client.log_artifact(run_id, str(slices_path), PLOTS_DIR)
    decision = gate.decide(result.metrics, result.champion_metrics, config.criteria(),
                           champion_version=champion.version if champion else None)
    tracking.log_metrics(client, run_id, result.metrics, prefix="test_")
    if result.champion_metrics:
        tracking.log_metrics(client, run_id, result.champion_metrics, prefix="champion_test_")
    client.set_tag(run_id, "gate_passed", str(decision.passed).lower())
    client.log_dict(run_id, {"decision": decision.as_dict(), "criteria": config.criteria().as_dict(),
                             "confusion": result.confusion, "champion": champion_note,
                             "importance": dict(result.importance)}, f"{PLOTS_DIR}/evaluation.json")
    evaluation = Evaluation(
        run_id=run_id, model_uri=trained_model.model_uri, fingerprint=trained_model.fingerprint,
        n_test=result.n_test, test_positive_share=result.positive_share, metrics=_finite(result.metrics),
        confusion=result.confusion,
        champion=None if champion is None else {
            "version": champion.version, "run_id": champion.run_id,
            "metrics": _finite(result.champion_metrics or {}), "confusion": result.champion_confusion,
        },
        champion_note=champion_note, gate=decision.as_dict(), criteria=config.criteria().as_dict(),
        importance=[list(item) for item in result.importance[:10]],
    )
    meta = tracking.read_metadata_json(client, run_id)
    meta["metrics"] = {**meta.get("metrics", {}), "test": _finite(result.metrics)}
    meta[METADATA_RECORD_KEY] = evaluation.as_dict()
    tracking.write_metadata_json(client, run_id, meta)

    compare = pd.DataFrame({"candidate": result.metrics, **({"champion": result.champion_metrics}
                                                             if result.champion_metrics else {})})
    return dg.Output(
        evaluation,
        data_version=dg.DataVersion(content_hash(trained_model.fingerprint, evaluation.gate)),
        metadata={
            # First what a reader asks first: the decision and why, then the 2x2, then the numbers.
            "gate_decision": gate_table(decision.as_dict()),
            "confusion": confusion_table(result.confusion, negative=str(class_names[0]), positive=str(class_names[1])),
            "metrics": frame_table(compare.reset_index(names="metric")),
            **{k: dg.MetadataValue.float(v) for k, v in result.metrics.items() if not math.isnan(v)},
            "skipped": False,
            "n_test": result.n_test,
            "gate_passed": decision.passed,
            "champion": champion_note,
            "metrics_vs_champion": dg.MetadataValue.md(_md_table(compare.reset_index(names="metric"))),
            "confusion_matrix": dg.MetadataValue.json(result.confusion),
            "slices": dg.MetadataValue.md(_md_table(result.slices)),
            "slices_table": frame_table(result.slices),
            "feature_importance": dg.MetadataValue.md(
                _md_table(pd.DataFrame(result.importance[:10], columns=["feature", "importance"]), 2)),
            "mlflow_run": mlflow.run_link(trained_model.experiment_id, run_id),
            **plots_md,
        },
    )


# Not blocking: a rejected candidate is still registered (as challenger, with the verdict), and the
# blocking `passed_gate` check on registered_model is what stops its deployment.
@dg.asset_check(asset=model_evaluation,
                description="Promotion gate: absolute thresholds and no regression against the champion.")
def promotion_gate(model_evaluation: Evaluation) -> dg.AssetCheckResult:
    decision = gate.GateDecision.from_dict(model_evaluation.gate)
    return dg.AssetCheckResult(
        passed=decision.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description="passed" if decision.passed else "; ".join(decision.failures),
        metadata={
            "gate_decision": gate_table(model_evaluation.gate),
            "decision": "promote" if decision.passed else "reject",
            "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            "failures": len(decision.failures),
            "compared_to_champion": decision.compared_to_champion,
            "champion_version": decision.champion_version or "none",
            "criteria": dg.MetadataValue.json(model_evaluation.criteria),
            "mlflow_run_id": model_evaluation.run_id,
        },
    )


defs = dg.Definitions(assets=[model_evaluation], asset_checks=[promotion_gate])
