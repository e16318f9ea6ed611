"""Governance: model cards, `mlops-assets status --history`, and `mlops-assets trace`.

The trace test runs the real chain: raw files in the landing folder -> the training path and
`model_deployment` on a Dagster instance (DAGSTER_HOME) -> a real Ray Serve endpoint on loopback
-> one HTTP prediction -> `mlops-assets trace <request id> --json`; then every link the trace
names is resolved independently: the MLflow run and version exist, the batches are on disk with
the sha256 of the landed files, the Dagster runs are in the instance.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from catboost import CatBoostClassifier
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.core.dataset_spec import default_spec
from mlops_assets.deployment import rollout as dep
from mlops_assets.ingestion import batches as ingestion
from mlops_assets.registry import governance, model_store
from mlops_assets.serving.prediction_log import read_prediction_log
from mlops_assets.tools import cli
from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch
from mlops_assets.training import tracking
from mlops_assets_tests.e2e_support import FAST, ingest_landed, platform_on_head
from mlops_assets_tests.settings_support import platform_definitions

TOKEN = "governance-test-token-5f1c2a9e"
TRAINING_PATH = ["raw_dataset", "validation_report", "feature_set", "train_test_split",
                 "trained_model", "model_evaluation", "registered_model"]


# --- fast: the card and the history ---------------------------------------------------------------


def test_the_model_card_names_data_evaluation_gate_and_code() -> None:
    batch = ingestion.BatchRecord(batch_id="a" * 64, source="/land/x.csv", file_name="x.csv", file_format="csv",
                                  rows=10, columns=["f"], accepted_at="2024-01-01T00:00:00Z", stored_at="/b/a")
    facts = governance.card_facts(
        "m", "3", aliases=["challenger", "champion"], registration_dagster_run_id="reg-run", batches=[batch],
        trained_model={"run_id": "r1", "experiment_id": "1", "trained_at": "2024-01-02", "model_sha256": "s" * 64,
                       "git_sha": "abc123", "dagster_run_id": "train-run", "positive_class": -1,
                       "decision_threshold": 0.5, "raw_dataset_version": "raw-v", "data_version": "raw-v",
                       "feature_version": "feat-v", "feature_path": "/f/features.parquet", "feature_names": ["f"],
                       "params": {"iterations": 80}},
        model_evaluation={"n_test": 100, "metrics": {"roc_auc": 0.97, "f1": float("nan")},
                          "champion": {"metrics": {"roc_auc": 0.96}},
                          "gate": {"passed": True, "reasons": ["roc_auc 0.97 >= 0.90"], "failures": [],
                                   "champion_version": "2"}},
    )
    card = governance.model_card_markdown(facts)
    for expected in ("# Model card: m version 3", "challenger, champion", "`r1`", "`abc123`", "train-run",
                     "reg-run", "a" * 64, "x.csv, 10 rows", "feat-v", "| roc_auc | 0.9700 | 0.9600 |",
                     "| f1 | n/a | n/a |", "passed: promoted to champion", "champion version 2",
                     "roc_auc 0.97 >= 0.90", "`iterations=80`", "## Limitations"):
        assert expected in card, expected


def test_the_card_of_a_rejected_candidate_lists_the_failed_checks_and_says_it_stays_challenger() -> None:
    from mlops_assets.evaluation import gate

    metrics = {"roc_auc": 0.62, "pr_auc": 0.6, "accuracy": 0.9, "f1": 0.85, "recall": 0.8, "log_loss": 0.3}
    decision = gate.decide(metrics, {**metrics, "roc_auc": 0.97}, gate.GateCriteria(), champion_version="4")
    facts = governance.card_facts(
        "m", "5", aliases=["challenger"], registration_dagster_run_id="reg", batches=None,
        trained_model={"run_id": "r5"}, model_evaluation={"metrics": metrics, "gate": decision.as_dict()})
    card = governance.model_card_markdown(facts)
    assert "failed: stays challenger" in card and "compared with champion version 4" in card
    failed = card.split("Failed checks (2):")[1].split("Passed checks:")[0]
    assert "FAIL: roc_auc 0.6200 >= 0.9000" in failed and "FAIL: roc_auc 0.6200 vs champion v4" in failed
    passed = card.split("Passed checks:")[1].split("## Training parameters")[0]
    assert "ok: accuracy" in passed and "FAIL" not in passed
    assert "never becomes `champion`" in card and "passed: promoted" not in card
    # A decision stored before `failures` was kept still names them (from its checks).
    legacy = {k: v for k, v in decision.as_dict().items() if k != "failures"}
    assert governance.gate_failures(legacy) == decision.failures


def test_batches_for_a_version_are_the_prefix_that_hashes_to_it(tmp_path: Path, spec) -> None:
    land, store = tmp_path / "raw", tmp_path / "batches"
    for seed in (1, 2, 3):
        write_batch(simulate_records(spec, SimulationConfig(n_rows=300, seed=seed)), str(land), name=f"b{seed}.csv")
        ingestion.ingest_landed_files(str(land), str(store), str(tmp_path / "q"), spec)
    accepted = ingestion.accepted_batches(str(store))
    two = ingestion.dataset_version([b.batch_id for b in accepted[:2]])
    assert governance.batches_for_version(str(store), two) == accepted[:2]
    assert governance.batches_for_version(str(store), two, [b.batch_id for b in accepted[:2]]) == accepted[:2]
    assert governance.batches_for_version(str(store), "nope") is None
    checked = governance.verify_batch(accepted[0])
    assert checked["exists"] and checked["sha256_matches"]
    Path(checked["source_copy"]).write_text("tampered")
    assert not governance.verify_batch(accepted[0])["sha256_matches"]


def _tiny_logged_model(uri: str, experiment: str) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.integers(-1, 2, size=(100, 3)), columns=["a", "b", "c"])
    model = CatBoostClassifier(iterations=5, depth=2, verbose=False, thread_count=1, allow_writing_files=False)
    model.fit(X, (X["a"] > 0).astype(int))
    with tracking.use_tracking_uri(uri), mlflow.start_run(experiment_id=experiment) as run:
        info = model_store.log_catboost_model(model, input_example=X.head(2))
    return run.info.run_id, info.model_uri


@pytest.mark.integration
def test_status_history_lists_who_promoted_and_rolled_back_what_and_when(tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "history", (tmp_path / "artifacts").as_uri())
    for _ in range(2):
        run_id, model_uri = _tiny_logged_model(uri, experiment)
        version = model_store.register_version(client, "hist", run_id=run_id, model_uri=model_uri, tags={},
                                               by="alice").version
        model_store.promote_to_champion(client, "hist", str(version), by="alice")
    model_store.rollback_champion(client, "hist", by="bob")

    assert cli.main(["status", "--history", "--json", "--tracking-uri", uri, "--model-name", "hist"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["action"], r["version"], r["by"]) for r in rows] == [
        ("register", "1", "alice"), ("promote", "1", "alice"), ("register", "2", "alice"),
        ("demote", "1", "alice"), ("promote", "2", "alice"), ("rollback-to", "1", "bob"),
        ("rollback-from", "2", "bob")]
    assert [r["at"] for r in rows] == sorted(r["at"] for r in rows)
    rollback = next(r for r in rows if r["action"] == "rollback-to")
    assert rollback["version"] == "1" and rollback["details"] == {"replaced": "2"}

    assert cli.main(["status", "--history", "--tracking-uri", uri, "--model-name", "hist"]) == 0
    text = capsys.readouterr().out
    assert "7 registry event(s)" in text and "rollback-to" in text and "bob" in text


# --- the whole chain on a real Ray Serve endpoint -------------------------------------------------


@dataclass
class Served:
    root: Path
    data: Path
    tracking_uri: str
    target: dep.ServeTarget
    instance: dg.DagsterInstance
    run_id: str
    landed: dict[str, str]  # landed file name -> sha256 of its bytes

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("governance")
    home = root / "dagster_home"  # the CLI's trace reads the runs from the instance DAGSTER_HOME names
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    spec = default_spec()
    with ExitStack() as stack:
        head = stack.enter_context(platform_on_head(
            root, TOKEN, env={"DAGSTER_HOME": str(home), "MLOPS_ACTOR": "governance-test"}))
        data, tracking_uri, target = head.data, head.tracking_uri, head.target
        # Two raw files, as a user drops them into the landing folder.
        landed = {}
        for seed, rows in ((42, 1500), (43, 700)):
            path = Path(write_batch(simulate_records(spec, SimulationConfig(n_rows=rows, seed=seed)),
                                    str(data / "raw"), name=f"landed-{seed}.csv"))
            landed[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        instance = stack.enter_context(dg.DagsterInstance.get())
        defs = platform_definitions()  # built from the environment just set

        ingest_landed(instance, defs, data / "raw")
        job = defs.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(
            instance=instance, run_config=FAST, raise_on_error=False,
            asset_selection=[dg.AssetKey(k) for k in [*TRAINING_PATH, "model_deployment"]])
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        yield Served(root, data, tracking_uri, target, instance, result.run_id, landed)


@pytest.mark.integration
@pytest.mark.slow
def test_trace_names_every_link_from_one_prediction_back_to_the_raw_batches(served: Served, capsys) -> None:
    spec = default_spec()
    records = dep.sample_records(simulate_records(spec, SimulationConfig(n_rows=50, seed=7)), spec, 3)
    response = httpx.post(served.target.endpoint, json={"records": records}, timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    answer = response.json()
    request_id = answer["request_id"]
    deadline = time.monotonic() + 30
    while read_prediction_log(str(served.data / "predictions"), request_id=request_id).empty:
        assert time.monotonic() < deadline, "the prediction never reached the log"
        time.sleep(0.5)

    assert cli.main(["trace", request_id, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["links_ok"] and report["broken"] == []
    client = served.client()

    # The prediction -> the version that answered it.
    assert report["prediction"]["records"] == 3
    assert report["prediction"]["model_version"] == answer["model_version"] == "1"
    assert [o["label"] for o in report["prediction"]["outputs"]] == [p["label"] for p in answer["predictions"]]
    version = client.get_model_version(c.REGISTERED_MODEL_NAME, report["model"]["version"])
    assert report["model"]["model_sha256"] == version.tags[model_store.TAG_SHA256]
    assert c.ALIAS_CHAMPION in report["model"]["aliases_now"]
    # The version -> its MLflow run, evaluation and gate decision.
    run = client.get_run(report["mlflow_run"]["run_id"])
    assert run.info.run_id == version.run_id and run.info.status == "FINISHED"
    assert report["evaluation"]["exists"] and report["evaluation"]["gate_passed"] is True
    assert report["evaluation"]["test_metrics"]["roc_auc"] == pytest.approx(run.data.metrics["test_roc_auc"])
    assert report["evaluation"]["gate_reasons"]
    # -> the feature set and the raw batches, re-hashed on disk, equal to the files that landed.
    assert Path(report["features"]["feature_path"]).is_file()
    assert report["features"]["feature_version"] == version.tags["feature_version"]
    batches = report["data"]["batches"]
    assert {b["batch_id"] for b in batches} == set(served.landed.values())
    for b in batches:
        stored = Path(b["source_copy"])
        assert stored.is_file() and hashlib.sha256(stored.read_bytes()).hexdigest() == b["batch_id"]
        assert served.landed[b["file_name"]] == b["batch_id"]
    assert report["data"]["raw_dataset_version"] == ingestion.dataset_version(list(served.landed.values()))
    # -> the Dagster runs, which exist in the instance; -> the code version.
    roles = {r["role"]: r["run_id"] for r in report["dagster_runs"]}
    assert set(roles) == {"training", "registration", "ingestion", "features"}
    for run_id in roles.values():
        assert served.instance.get_run_by_id(run_id) is not None
    assert roles["training"] == run.data.tags["dagster_run_id"] == served.run_id
    assert report["code"]["git_sha"] == run.data.tags["git_sha"] == version.tags["git_sha"]

    # The model card is stored with the version and tells the same story.
    card = governance.read_model_card(client, version.tags[governance.TAG_MODEL_CARD])
    assert f"version {version.version}" in card and "passed: promoted to champion" in card
    for sha in served.landed.values():
        assert sha in card
    assert "Model card: runs:/" in (version.description or "")

    # The same trace for people; a tampered batch breaks the chain and says which link.
    assert cli.main(["trace", request_id]) == 0
    text = capsys.readouterr().out
    assert "all links resolve" in text and all(sha in text for sha in served.landed.values())
    tampered = Path(batches[0]["source_copy"])
    original = tampered.read_bytes()
    try:
        tampered.write_bytes(original + b"\n")
        assert cli.main(["trace", request_id]) == 1
        assert f"batch {batches[0]['batch_id']}" in capsys.readouterr().out
    finally:
        tampered.write_bytes(original)
    assert cli.main(["trace", "no-such-request"]) == 1


@pytest.mark.integration
@pytest.mark.slow
def test_the_token_is_in_no_serve_config_and_no_response(served: Served) -> None:
    """The token reaches replicas through the head's environment, never a config the dashboard shows."""
    from mlops_assets.tools.ray_cluster import auth_headers

    url = f"{served.target.dashboard_url}/api/serve/applications/"
    assert httpx.get(url, timeout=10).status_code == 401  # the dashboard itself wants the Ray token
    config = httpx.get(url, headers=auth_headers(), timeout=10)
    assert config.status_code == 200 and TOKEN not in config.text
    spec = default_spec()
    records = dep.sample_records(simulate_records(spec, SimulationConfig(n_rows=20, seed=8)), spec, 2)
    responses = [
        httpx.post(served.target.endpoint, json={"records": records}, headers={"Authorization": f"Bearer {TOKEN}"}),
        httpx.post(served.target.endpoint, json={"records": records}, headers={"Authorization": f"Bearer {TOKEN}x"}),
        httpx.post(served.target.endpoint, json={"records": [{"x": 1}]},
                   headers={"Authorization": f"Bearer {TOKEN}"}),
        httpx.get(f"{served.target.serve_url}/model"),
        httpx.get(f"{served.target.serve_url}/healthz"),
    ]
    assert [r.status_code for r in responses] == [200, 401, 422, 200, 200]
    for r in responses:
        assert TOKEN not in r.text and TOKEN not in str(r.headers)


@pytest.mark.integration
@pytest.mark.slow
def test_the_training_path_and_deployment_again_on_unchanged_data_change_nothing(served: Served) -> None:
    """Stale-only: no new run or version, no alias moved, and the champion that already serves is
    not redeployed; each step says it skipped."""
    defs = platform_definitions()  # as the fixture built them, from its environment
    client = served.client()
    before = sorted(str(v.version) for v in client.search_model_versions(f"name = '{c.REGISTERED_MODEL_NAME}'"))
    champion = model_store.alias_version(client, c.REGISTERED_MODEL_NAME, c.ALIAS_CHAMPION)
    job = defs.resolve_implicit_global_asset_job_def()
    again = job.execute_in_process(
        instance=served.instance, run_config=FAST, raise_on_error=False,
        asset_selection=[dg.AssetKey(k) for k in [*TRAINING_PATH, "model_deployment"]])
    assert again.success, [e.message for e in again.all_events if e.is_failure]
    for asset in ("trained_model", "model_evaluation", "registered_model", "model_deployment"):
        meta = again.asset_materializations_for_node(asset)[0].metadata
        assert meta["skipped"].value is True and meta["skip_reason"].value, asset
    assert sorted(str(v.version) for v in client.search_model_versions(
        f"name = '{c.REGISTERED_MODEL_NAME}'")) == before
    assert model_store.alias_version(client, c.REGISTERED_MODEL_NAME, c.ALIAS_CHAMPION) == champion
    assert dep.live_version(served.target) == champion
