"""Governance: the model card of each registered version, the provenance trace of one prediction,
and the promotion/rollback history, all read from the stores the platform already writes.

- `record_model_card` writes a markdown card into the version's MLflow run
  (`model_card/version-<n>.md`), links it from the version's `model_card` tag and sets a short
  version description; the registered_model asset calls it.
- `trace` follows one request id from the prediction log to the registry version, its MLflow
  run, evaluation and gate decision, feature and data versions, the raw batches (re-hashed on
  disk), the Dagster runs and the code version; every link says whether it resolved.
- `history_rows` / `format_history`: who registered, rejected (with the gate's reasons), promoted,
  demoted or rolled back what, when.

No Dagster imports here: Dagster run lookups come in through the small `DagsterLookup` protocol
(implemented in `mlops_assets.defs.registry.lookups`).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlops_assets import constants as c
from mlops_assets.core import storage
from mlops_assets.core.redaction import redact_text, redact_values
from mlops_assets.ingestion import batches as ingestion
from mlops_assets.registry import model_store
from mlops_assets.settings import join_url
from mlops_assets.training import tracking

MODEL_CARD_DIR = "model_card"
TAG_MODEL_CARD = "model_card"
TAG_REGISTRATION_RUN = "registration_dagster_run_id"
EVALUATION_ARTIFACT = "evaluation/evaluation.json"
DESCRIPTION_LIMIT = 4000  # MLflow's version description column holds 5000 characters


class DagsterLookup(Protocol):
    """What the trace asks of a Dagster instance (see mlops_assets.defs.registry.lookups)."""

    def run(self, run_id: str) -> dict[str, Any] | None: ...

    def materializing_runs(self, asset: str, key: str, value: str) -> list[str]: ...

    def batch_ids(self, raw_dataset_version: str) -> list[str] | None: ...


# --- data lineage -------------------------------------------------------------------------------


def batches_for_version(batches_url: str, raw_dataset_version: str,
                        batch_ids: Sequence[str] | None = None) -> list[ingestion.BatchRecord] | None:
    """The accepted batches whose union is `raw_dataset_version`, or None when none match.

    With `batch_ids` (from the raw_dataset materialization) those batches are taken; otherwise the
    version is matched against every prefix of the accepted batches in acceptance order (batches
    are only ever added, so the set a version was built from is such a prefix).
    """
    accepted = ingestion.accepted_batches(batches_url)
    if batch_ids is not None:
        by_id = {b.batch_id: b for b in accepted}
        if ingestion.dataset_version(list(batch_ids)) != raw_dataset_version:
            return None
        return [by_id[i] for i in batch_ids if i in by_id] if set(batch_ids) <= set(by_id) else None
    for end in range(1, len(accepted) + 1):
        if ingestion.dataset_version([b.batch_id for b in accepted[:end]]) == raw_dataset_version:
            return accepted[:end]
    return None


def verify_batch(record: ingestion.BatchRecord) -> dict[str, Any]:
    """Re-hash the stored original bytes of a batch: the id is the sha256 of the landed file."""
    source = join_url(record.stored_at, f"source.{record.file_format}")
    out: dict[str, Any] = {"batch_id": record.batch_id, "file_name": record.file_name, "rows": record.rows,
                           "accepted_at": record.accepted_at, "stored_at": record.stored_at, "source_copy": source}
    if not storage.exists(source):
        return {**out, "exists": False, "sha256_matches": False, "problem": f"{source} is missing"}
    actual = ingestion.sha256_bytes(storage.read_bytes(source))
    return {**out, "exists": True, "sha256": actual, "sha256_matches": actual == record.batch_id}


# --- model card ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return "n/a" if value is None else str(value)


def model_card_markdown(card: Mapping[str, Any]) -> str:
    """A model card in markdown from plain facts (see `card_facts` for the keys)."""
    metrics: Mapping[str, Any] = card.get("metrics") or {}
    champion: Mapping[str, Any] = card.get("champion_metrics") or {}
    gate: Mapping[str, Any] = card.get("gate") or {}
    batches: Sequence[Mapping[str, Any]] = card.get("batches") or []
    lines = [
        f"# Model card: {card['model_name']} version {card['version']}",
        "",
        "| | |",
        "|---|---|",
        f"| registered model | `{card['model_name']}` version {card['version']} |",
        f"| aliases at registration | {', '.join(card.get('aliases') or []) or 'none'} |",
        f"| MLflow run | `{card['run_id']}` (experiment {card.get('experiment_id', '?')}) |",
        f"| trained at | {card.get('trained_at', '?')} |",
        f"| model file | CatBoost native `model.cb`, sha256 `{card.get('model_sha256', '?')}` |",
        f"| code version (git) | `{card.get('git_sha', '?')}` |",
        f"| Dagster runs | training `{card.get('dagster_run_id', '?')}`, "
        f"registration `{card.get('registration_dagster_run_id', '?')}` |",
        "",
        "## Intended use",
        "",
        f"Binary classification of tabular records with the features listed below; the positive class "
        f"(`{card.get('positive_class', '?')}`) is the one the model scores. Served by Ray Serve behind "
        f"a bearer token; a record is labelled positive when its probability is at least "
        f"{card.get('decision_threshold', '?')}. Meant to rank and flag records for the team that owns "
        "this platform, not to take irreversible decisions without review.",
        "",
        "## Training data",
        "",
        f"- raw dataset version `{card.get('raw_dataset_version', '?')}` "
        f"(the union of {len(batches)} accepted raw batch(es), each the sha256 of the landed file):",
    ]
    lines += [f"  - `{b['batch_id']}` {b.get('file_name', '')}, {b.get('rows', '?')} rows, accepted "
              f"{b.get('accepted_at', '?')}" for b in batches] or ["  - (batches not found in the batch store "
                                                                    "at registration)"]
    lines += [
        f"- feature version `{card.get('feature_version', '?')}` (`{card.get('feature_path', '?')}`), "
        f"transformation `{card.get('transformation_version', c.TRANSFORMATION_VERSION)}`",
        f"- features ({len(card.get('feature_names') or [])}): "
        + ", ".join(f"`{n}`" for n in card.get("feature_names") or []),
        "",
        f"## Evaluation (held-out test split, {card.get('n_test', '?')} rows, no feature vector shared "
        "with training)",
        "",
        "| metric | this version | champion at the time |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {_fmt(value)} | {_fmt(champion.get(name))} |" for name, value in sorted(metrics.items())]
    failures = gate_failures(gate)
    lines += [
        "",
        "## Promotion gate",
        "",
        f"Decision: **{'passed: promoted to champion' if gate.get('passed') else 'failed: stays challenger'}**"
        + (f" (compared with champion version {gate['champion_version']})" if gate.get("champion_version") else ""),
        "",
    ]
    if not gate.get("passed"):
        lines += [f"Rejected: registered as `{c.ALIAS_CHALLENGER}` only, tagged `gate_passed=false` with the "
                  f"failed checks; it never becomes `{c.ALIAS_CHAMPION}` and is not deployed.", "",
                  f"Failed checks ({len(failures)}):", ""]
        lines += [f"- {failure}" for failure in failures]
        lines += ["", "Passed checks:", ""]
    lines += [f"- {reason}" for reason in gate.get("reasons") or [] if reason not in failures]
    params: Mapping[str, Any] = card.get("params") or {}
    lines += ["", "## Training parameters", "", ", ".join(f"`{k}={v}`" for k, v in sorted(params.items()))
              or "(none recorded)"]
    lines += [
        "",
        "## Limitations",
        "",
        "- The model knows only the batches above; records unlike them (new feature values, a changed "
        "data-collection process) are out of scope. Production inputs are profiled and compared with this "
        "version's reference profile; drift triggers retraining through the same gate.",
        "- Metrics come from one held-out split of the same sources; live performance is measured again "
        "from delayed labels (`online_performance`).",
        "- Exact duplicate rows are removed and conflicting labels resolved by majority "
        "(ties to the positive class) before training.",
        "",
    ]
    return "\n".join(lines)


def gate_failures(gate: Mapping[str, Any]) -> list[str]:
    """The failed checks of a stored gate decision (older records carry only `checks`)."""
    if gate.get("failures"):
        return [str(f) for f in gate["failures"]]
    return [str(ch.get("reason")) for ch in gate.get("checks") or [] if not ch.get("passed")]


def card_facts(
    model_name: str, version: str, *, trained_model: Mapping[str, Any], model_evaluation: Mapping[str, Any],
    aliases: Sequence[str], registration_dagster_run_id: str, batches: Sequence[ingestion.BatchRecord] | None,
) -> dict[str, Any]:
    """Everything the card says, as plain values (also returned for metadata and tests)."""
    champion = model_evaluation.get("champion") or {}
    return {
        "model_name": model_name,
        "version": str(version),
        "aliases": list(aliases),
        "registration_dagster_run_id": registration_dagster_run_id,
        **{k: trained_model.get(k) for k in (
            "run_id", "experiment_id", "trained_at", "model_sha256", "git_sha", "dagster_run_id",
            "positive_class", "decision_threshold", "raw_dataset_version", "data_version", "feature_version",
            "feature_path", "feature_names", "params")},
        "n_test": model_evaluation.get("n_test"),
        "metrics": dict(model_evaluation.get("metrics") or {}),
        "champion_metrics": dict(champion.get("metrics") or {}),
        "gate": dict(model_evaluation.get("gate") or {}),
        "batches": [b.as_dict() for b in batches or []],
    }


def record_model_card(
    client: MlflowClient, model_name: str, version: str, *, trained_model: Mapping[str, Any],
    model_evaluation: Mapping[str, Any], aliases: Sequence[str], registration_dagster_run_id: str,
    batches_url: str | None = None, dagster_ui_url: str | None = None,
) -> str:
    """Write the version's model card into its MLflow run and link it from the version; return its URI.

    The batches are the ones the trained_model record names (its `batch_ids`, in its batch store):
    the card describes the data this model learnt from, whatever was landed since."""
    batches = None
    raw_version = str(trained_model.get("raw_dataset_version") or "")
    store = str(trained_model.get("batches_url") or batches_url or "")
    recorded = trained_model.get("batch_ids")
    if store and raw_version:
        try:
            batches = batches_for_version(store, raw_version, list(recorded) if recorded else None)
        except OSError:
            batches = None  # an unreachable batch store leaves the card without the batch list
    facts = card_facts(model_name, version, trained_model=trained_model, model_evaluation=model_evaluation,
                       aliases=aliases, registration_dagster_run_id=registration_dagster_run_id, batches=batches)
    markdown = redact_text(model_card_markdown(facts))  # the card is read by anyone who can read the run
    run_id = str(trained_model["run_id"])
    artifact_path = f"{MODEL_CARD_DIR}/version-{version}.md"
    client.log_text(run_id, markdown, artifact_path)
    uri = f"runs:/{run_id}/{artifact_path}"
    client.set_model_version_tag(model_name, str(version), TAG_MODEL_CARD, uri)
    client.set_model_version_tag(model_name, str(version), TAG_REGISTRATION_RUN, registration_dagster_run_id)
    gate_word = ("passed" if facts["gate"].get("passed") else
                 f"failed ({'; '.join(gate_failures(facts['gate']))}); {c.ALIAS_CHALLENGER} only")
    summary = (f"Gate {gate_word}. Trained {facts.get('trained_at')} on raw dataset {raw_version} "
               f"(features {facts.get('feature_version')}), code {facts.get('git_sha')}."
               f"{_dagster_links(dagster_ui_url, facts)} Model card: {uri}")
    training_url = tracking.dagster_run_url(dagster_ui_url, str(facts.get("dagster_run_id") or ""))
    if training_url:
        client.set_model_version_tag(model_name, str(version), tracking.DAGSTER_RUN_URL_TAG, redact_text(training_url))
    if len(summary) > DESCRIPTION_LIMIT:  # keep the card link at the end
        tail = f" Model card: {uri}"
        summary = summary[: DESCRIPTION_LIMIT - len(tail) - 3] + "..." + tail
    client.update_model_version(model_name, str(version), description=summary)
    return uri


def _dagster_links(ui_url: str | None, facts: Mapping[str, Any]) -> str:
    """Markdown links to the Dagster runs that trained and registered the version (the version's
    description is rendered as markdown by the MLflow UI)."""
    links = []
    for label, key in (("training", "dagster_run_id"), ("registration", "registration_dagster_run_id")):
        url = tracking.dagster_run_url(ui_url, str(facts.get(key) or ""))
        if url:
            links.append(f"[{label} run {str(facts[key])[:8]}]({redact_text(url)})")
    return f" Dagster: {', '.join(links)}." if links else ""


def read_model_card(client: MlflowClient, uri: str) -> str:
    """The markdown behind a `runs:/<run>/<path>` model card URI."""
    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    with tempfile.TemporaryDirectory(prefix="model-card-") as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_text()


# --- history --------------------------------------------------------------------------------------


def history_rows(client: MlflowClient, model_name: str) -> list[dict[str, Any]]:
    """Registry events (register, reject, promote, demote, rollback-to, rollback-from), oldest first."""
    return [asdict(e) for e in model_store.history(client, model_name)]


def format_history(model_name: str, rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return f"model {model_name}: no registry events yet"
    lines = [f"model {model_name}: {len(rows)} registry event(s), oldest first",
             f"{'when (UTC)':<32} {'who':<16} {'action':<14} {'version':<8} details"]
    for row in rows:
        details = ", ".join(f"{k}={'; '.join(map(str, v)) if isinstance(v, list) else v}"
                            for k, v in sorted((row.get("details") or {}).items()))
        lines.append(f"{row['at']:<32} {row['by']:<16} {row['action']:<14} {row['version']:<8} {details}")
    return "\n".join(lines)


# --- trace ----------------------------------------------------------------------------------------


@dataclass
class TraceSources:
    """Where the trace looks: the prediction log, the registry, the batch store, the Dagster instance."""

    prediction_log_url: str
    tracking_uri: str
    model_name: str
    batches_url: str
    dagster: DagsterLookup | None = None


class RequestNotFound(LookupError):
    """No prediction with that request id in the log (yet: the log is flushed in batches)."""


def _download_json(client: MlflowClient, run_id: str, path: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory(prefix="trace-") as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())
        except (MlflowException, OSError, ValueError):
            return None


def _exists(url: str | None) -> bool:
    if not url or url == "unknown":
        return False
    try:
        return storage.exists(url)
    except (OSError, ValueError):
        return False


def trace(request_id: str, sources: TraceSources) -> dict[str, Any]:
    """The provenance of one prediction; `broken` lists every link that did not resolve."""
    from mlops_assets.serving.prediction_log import read_prediction_log

    rows = read_prediction_log(sources.prediction_log_url, request_id=request_id)
    if rows.empty:
        raise RequestNotFound(redact_text(f"request {request_id!r} is not in the prediction log at "
                                          f"{sources.prediction_log_url} (it is flushed every few seconds; retry shortly)"))
    version = str(rows["model_version"].iloc[0])
    out: dict[str, Any] = {
        "request_id": request_id,
        "prediction": {
            "logged_at": str(rows["logged_at"].iloc[0]),
            "records": len(rows),
            "model_version": version,
            "outputs": [{"label": int(r.label), "probability": float(r.probability)}
                        for r in rows[["label", "probability"]].itertuples(index=False)][:20],
            "prediction_log": sources.prediction_log_url,
        },
    }
    return _trace_model(version, sources, out)


def trace_version(version: str, sources: TraceSources) -> dict[str, Any]:
    """The provenance of one registry version (what `trace` reports after the prediction)."""
    return _trace_model(str(version), sources, {"request_id": None})


def _trace_model(version: str, sources: TraceSources, out: dict[str, Any]) -> dict[str, Any]:
    broken: list[str] = []
    client = MlflowClient(tracking_uri=sources.tracking_uri)
    try:
        mv = client.get_model_version(sources.model_name, version)
    except MlflowException:
        out["model"] = {"name": sources.model_name, "version": version, "exists": False}
        out["broken"] = [f"model version {sources.model_name}/{version} is not in the registry"]
        out["links_ok"] = False
        return redact_values(out)
    tags = dict(mv.tags or {})
    aliases = [a for a in (c.ALIAS_CHAMPION, c.ALIAS_PREVIOUS_CHAMPION, c.ALIAS_CHALLENGER)
               if model_store.alias_version(client, sources.model_name, a) == version]
    out["model"] = {"name": sources.model_name, "version": version, "exists": True, "aliases_now": aliases,
                    "model_sha256": tags.get(model_store.TAG_SHA256), "source": mv.source,
                    "model_card": tags.get(TAG_MODEL_CARD)}
    if not tags.get(model_store.TAG_SHA256):
        broken.append(f"version {version} has no recorded model sha256")

    run_id = mv.run_id or tags.get("training_run_id") or ""
    try:
        run = client.get_run(run_id)
        out["mlflow_run"] = {"run_id": run_id, "exists": True, "experiment_id": run.info.experiment_id,
                             "status": run.info.status, "run_name": run.info.run_name,
                             "artifact_uri": run.info.artifact_uri}
        run_tags, metrics = dict(run.data.tags), dict(run.data.metrics)
    except MlflowException:
        out["mlflow_run"] = {"run_id": run_id, "exists": False}
        broken.append(f"MLflow run {run_id!r} of version {version} does not exist")
        run_tags, metrics = {}, {}

    evaluation = _download_json(client, run_id, EVALUATION_ARTIFACT) if run_id else None
    decision = (evaluation or {}).get("decision") or {}
    out["evaluation"] = {
        "exists": evaluation is not None,
        "artifact": f"runs:/{run_id}/{EVALUATION_ARTIFACT}",
        "test_metrics": {k.removeprefix("test_"): v for k, v in sorted(metrics.items()) if k.startswith("test_")},
        "gate_passed": decision.get("passed", tags.get("gate_passed")),
        "gate_reasons": decision.get("reasons", []),
        "gate_failures": decision.get("failures", []),
        "compared_to_champion": decision.get("champion_version"),
        "champion_note": (evaluation or {}).get("champion"),
    }
    if evaluation is None:
        broken.append(f"evaluation record {EVALUATION_ARTIFACT} missing from run {run_id}")

    metadata = _download_json(client, run_id, "metadata.json") if run_id else None
    feature_path = (metadata or {}).get("feature_path")
    out["features"] = {"feature_version": tags.get("feature_version"), "feature_path": feature_path,
                       "exists": _exists(feature_path)}
    if not out["features"]["exists"]:
        broken.append(f"feature set {feature_path!r} (version {tags.get('feature_version')}) not found")

    raw_version = tags.get("raw_dataset_version") or tags.get("data_version") or ""
    # Lineage from the run's own record (metadata.json, written from the trained_model record): the
    # batch ids and the store they are in. Older runs fall back to the Dagster instance / prefixes.
    recorded_ids = (metadata or {}).get("batch_ids") or None
    batch_store = str((metadata or {}).get("batch_store") or sources.batches_url)
    if recorded_ids is None and sources.dagster and raw_version:
        recorded_ids = sources.dagster.batch_ids(raw_version)
    batches = batches_for_version(batch_store, raw_version, recorded_ids) if raw_version else None
    checked = [verify_batch(b) for b in batches or []]
    out["data"] = {"raw_dataset_version": raw_version, "data_version": tags.get("data_version"),
                   "batch_store": batch_store, "batches": checked,
                   "exists": bool(checked) and all(b["exists"] and b["sha256_matches"] for b in checked)}
    if not checked:
        broken.append(f"no accepted batches in {batch_store} make up raw dataset version {raw_version!r}")
    broken += [f"batch {b['batch_id']}: {b.get('problem') or 'sha256 of the stored file does not match'}"
               for b in checked if not (b["exists"] and b["sha256_matches"])]

    runs: list[dict[str, Any]] = []
    roles = [("training", tags.get("dagster_run_id") or run_tags.get("dagster_run_id")),
             ("registration", tags.get(TAG_REGISTRATION_RUN))]
    if sources.dagster is not None:
        roles += [("ingestion", r) for r in sources.dagster.materializing_runs("raw_dataset", "data_version",
                                                                               raw_version)]
        roles += [("features", r) for r in sources.dagster.materializing_runs(
            "feature_set", "feature_version", str(tags.get("feature_version")))]
    seen: set[tuple[str, str]] = set()
    for role, dagster_run_id in roles:
        if not dagster_run_id or (role, dagster_run_id) in seen:
            continue
        seen.add((role, dagster_run_id))
        entry: dict[str, Any] = {"role": role, "run_id": dagster_run_id}
        if sources.dagster is None:
            entry["exists"] = None  # not checked: no Dagster instance configured
        else:
            found = sources.dagster.run(dagster_run_id)
            entry.update({"exists": found is not None, **(found or {})})
            if found is None:
                broken.append(f"Dagster {role} run {dagster_run_id} is not in the instance")
        runs.append(entry)
    if not any(r["role"] == "training" for r in runs):
        broken.append(f"version {version} names no Dagster training run")
    out["dagster_runs"] = runs
    out["code"] = {"git_sha": tags.get("git_sha") or run_tags.get("git_sha")}
    if not out["code"]["git_sha"]:
        broken.append("no code version (git sha) recorded")
    out["broken"] = broken
    out["links_ok"] = not broken
    return redact_values(out)  # printed by `mlops-assets trace`: no URI with its credentials


def format_trace(report: Mapping[str, Any]) -> str:
    """Human-readable provenance, one link per line, marked ok / MISSING."""

    def mark(ok: Any) -> str:
        return "ok" if ok else ("not checked" if ok is None else "MISSING")

    p, m = report["prediction"], report.get("model", {})
    lines = [f"request {report['request_id']}: {p['records']} record(s) at {p['logged_at']}, "
             f"answered by version {p['model_version']}"]
    lines.append(f"  model version   {m.get('name')}/{m.get('version')} [{mark(m.get('exists'))}] aliases now: "
                 f"{', '.join(m.get('aliases_now') or []) or 'none'}; sha256 {m.get('model_sha256')}")
    if m.get("model_card"):
        lines.append(f"  model card      {m['model_card']}")
    if "mlflow_run" in report:
        r = report["mlflow_run"]
        lines.append(f"  MLflow run      {r['run_id']} [{mark(r.get('exists'))}] {r.get('status', '')}")
    if "evaluation" in report:
        e = report["evaluation"]
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in e["test_metrics"].items()
                            if k in ("roc_auc", "accuracy", "f1", "recall"))
        lines.append(f"  evaluation      [{mark(e['exists'])}] {metrics}")
        lines.append(f"  gate            {'passed' if str(e['gate_passed']).lower() == 'true' else 'failed'}"
                     + (f" vs champion v{e['compared_to_champion']}" if e.get("compared_to_champion") else ""))
    if "features" in report:
        f = report["features"]
        lines.append(f"  features        {f['feature_version']} [{mark(f['exists'])}] {f['feature_path']}")
    if "data" in report:
        d = report["data"]
        lines.append(f"  raw data        {d['raw_dataset_version']} [{mark(d['exists'])}] "
                     f"{len(d['batches'])} batch(es) in {d['batch_store']}")
        for b in d["batches"]:
            ok = b["exists"] and b["sha256_matches"]
            lines.append(f"    batch         {b['batch_id']} [{'sha256 ok' if ok else 'MISMATCH'}] "
                         f"{b['file_name']} ({b['rows']} rows)")
    for run in report.get("dagster_runs", []):
        lines.append(f"  Dagster run     {run['run_id']} ({run['role']}) [{mark(run.get('exists'))}] "
                     f"{run.get('status', '')}")
    if "code" in report:
        lines.append(f"  code (git)      {report['code']['git_sha']}")
    lines.append("all links resolve" if report.get("links_ok") else
                 "BROKEN LINKS:\n" + "\n".join(f"  - {b}" for b in report.get("broken", [])))
    return redact_text("\n".join(lines))
