"""What the UIs show: metadata tables, lineage through the prediction log, owners and groups, the
links between Dagster and MLflow, the registry history as artifacts, and version creators."""

import json
import math
from pathlib import Path

import dagster as dg
import pytest
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.defs import metadata as md
from mlops_assets.monitoring.drift import DriftScore
from mlops_assets.registry import history as registry_history
from mlops_assets.registry import model_store
from mlops_assets.training import tracking


def _rows(value: dg.MetadataValue) -> list[dict]:
    assert isinstance(value, dg.TableMetadataValue)
    return [dict(r.data) for r in value.records]


def _types(value: dg.MetadataValue) -> dict[str, str]:
    assert isinstance(value, dg.TableMetadataValue)
    return {col.name: col.type for col in value.schema.columns}


# --- tables --------------------------------------------------------------------------------------


def test_the_gate_table_lists_failed_checks_first_with_value_bound_and_reason() -> None:
    decision = {"passed": False, "reasons": [], "checks": [
        {"metric": "roc_auc", "kind": "absolute", "value": 0.97, "bound": 0.9, "op": ">=", "passed": True,
         "reason": "roc_auc 0.9700 >= 0.9"},
        {"metric": "recall", "kind": "absolute", "value": 0.61, "bound": 0.75, "op": ">=", "passed": False,
         "reason": "recall 0.6100 < 0.75"},
        {"metric": "champion", "kind": "vs_champion", "value": math.nan, "bound": math.nan, "op": "n/a",
         "passed": True, "reason": "no champion yet"}]}
    rows = _rows(md.gate_table(decision))
    assert [r["check"] for r in rows][0] == "recall" and rows[0]["verdict"] == "FAIL"
    assert rows[0]["bound"] == ">= 0.75" and rows[0]["reason"] == "recall 0.6100 < 0.75"
    assert rows[1]["reason"] == ""  # a passed threshold: its value and bound say it all
    assert rows[-1]["check"] == "champion (vs_champion)" and rows[-1]["reason"] == "no champion yet"
    assert rows[-1]["bound"] == "n/a" and rows[-1]["value"] == "n/a"  # NaN never reaches the UI as a number
    assert _types(md.gate_table(decision))["value"] == "string"  # mixed with 'n/a': a valid string column


def test_an_older_stored_decision_without_checks_still_gives_a_table_of_its_reasons() -> None:
    rows = _rows(md.gate_table({"passed": True, "reasons": ["roc_auc ok", "recall ok"]}))
    assert [r["reason"] for r in rows] == ["roc_auc ok", "recall ok"] and {r["verdict"] for r in rows} == {"pass"}


def test_the_confusion_table_is_two_by_two_with_true_classes_as_rows() -> None:
    value = md.confusion_table({"tp": 50, "fn": 5, "fp": 3, "tn": 42}, negative="legitimate", positive="phishing")
    rows = _rows(value)
    assert len(rows) == 2 and len(rows[0]) == 3
    assert rows[0] == {"actual \\ predicted": "phishing (positive)", "predicted phishing": 50,
                       "predicted legitimate": 5}
    assert rows[1]["predicted phishing"] == 3 and rows[1]["predicted legitimate"] == 42
    assert _types(value)["predicted phishing"] == "int"


def test_a_drift_report_table_has_feature_statistic_score_threshold_and_verdict_drifted_first() -> None:
    scores = [DriftScore("a", "hellinger+chi2", 0.05, 0.4, 500, 300, False, "no drift"),
              DriftScore("b", "hellinger+chi2", 0.41, 1e-9, 500, 300, True, "hellinger 0.41 >= 0.2"),
              DriftScore("p", "ks", 0.12, 0.01, 500, 300, False, "significant but small"),
              DriftScore("gone", "ks", math.nan, math.nan, 0, 0, False, "column missing")]
    value = md.drift_table(scores, ks_statistic=0.15, hellinger=0.2, p_value=0.05)
    rows = _rows(value)
    assert list(rows[0]) == ["feature", "statistic", "score", "p_value", "threshold", "verdict", "rows", "reason"]
    assert rows[0]["feature"] == "b" and rows[0]["verdict"] == "DRIFT"
    assert {r["feature"]: r["verdict"] for r in rows} == {"b": "DRIFT", "p": "ok", "a": "ok", "gone": "not judged"}
    ks = next(r for r in rows if r["feature"] == "p")
    assert ks["statistic"] == "KS" and ks["threshold"] == ">= 0.15 and p < 0.05"


# --- the graph -----------------------------------------------------------------------------------


def test_lineage_runs_from_the_deployment_through_the_prediction_log_to_drift_in_four_groups() -> None:
    from mlops_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in keys}
    assert parents["prediction_log"] == {"model_deployment"}
    assert "prediction_log" in parents["production_profiles"]
    assert {"prediction_log", "delayed_labels"} <= parents["online_performance"]
    assert "production_profiles" in parents["drift_report"]
    assert {graph.get(k).group_name for k in keys} == {c.GROUP_DATA, c.GROUP_TRAINING, c.GROUP_DEPLOYMENT,
                                                      c.GROUP_MONITORING}
    for key in keys:
        spec = defs.resolve_assets_def(key).specs_by_key[key]
        assert spec.owners and spec.kinds and spec.description, key.to_user_string()
    # External: serving writes the log, nothing in Dagster materializes it or the labels.
    assert not graph.get(dg.AssetKey("prediction_log")).is_materializable
    assert not graph.get(dg.AssetKey("delayed_labels")).is_materializable
    # The training jobs stop at the deployment: the hourly monitoring assets are monitoring's.
    for job in ("ingestion_onward", "retraining"):
        selected = {k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.selected_asset_keys}
        assert "model_deployment" in selected and not selected & {"prediction_log", "production_profiles",
                                                                   "drift_report", "online_performance"}


def test_the_training_jobs_end_mlflow_runs_with_dagster_mlflows_hook() -> None:
    from types import SimpleNamespace

    from mlops_assets.definitions import defs
    from mlops_assets.defs.resources import end_mlflow_on_run_finished

    for job in ("retraining", "ingestion_onward"):
        assert end_mlflow_on_run_finished in defs.resolve_job_def(job).hook_defs, job
    # It is dagster-mlflow's hook, imported when it fires: a failed step ends its open run as FAILED.
    ended: list[str | None] = []
    mlflow = SimpleNamespace(end_run=lambda status=None: ended.append(status))
    failed_step = SimpleNamespace(is_step_success=False, is_step_failure=True)
    end_mlflow_on_run_finished.hook_fn(SimpleNamespace(resources=SimpleNamespace(mlflow=mlflow)), [failed_step])
    assert ended == ["FAILED"]


def test_loading_the_definitions_does_not_import_mlflow() -> None:
    """Every CLI call, sensor tick and skipped `make pipeline` loads them: MLflow costs about a second."""
    import subprocess
    import sys

    code = "import sys, mlops_assets.definitions; print(sorted(m for m in ('mlflow', 'catboost') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


# --- links ---------------------------------------------------------------------------------------


def test_mlflow_runs_link_back_to_their_dagster_run_in_a_tag_and_a_markdown_description() -> None:
    tags = tracking.dagster_link_tags("http://127.0.0.1:3000/", "0123456789abcdef", "trained_model")
    assert tags[tracking.DAGSTER_RUN_URL_TAG] == "http://127.0.0.1:3000/runs/0123456789abcdef"
    assert "[01234567](http://127.0.0.1:3000/runs/0123456789abcdef)" in tags[tracking.NOTE_TAG]
    assert tracking.dagster_link_tags(None, "0123456789abcdef") == {}
    assert tracking.dagster_run_url("https://u:secret@dagster.example/", "r1") == "https://u:secret@dagster.example/runs/r1"
    assert "secret" not in tracking.dagster_link_tags("https://u:secret@dagster.example/", "r1")[tracking.NOTE_TAG]


@pytest.mark.integration
def test_the_experiment_opens_on_model_training_and_versions_name_who_created_them(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    old = client.create_experiment("made-before", artifact_location=(tmp_path / "a").as_uri())
    assert tracking.EXPERIMENT_KIND_TAG not in (client.get_experiment(old).tags or {})
    assert tracking.ensure_experiment(client, "made-before") == old  # an existing experiment gets its kind
    fresh = tracking.ensure_experiment(client, "fresh", (tmp_path / "b").as_uri())
    for experiment in (old, fresh):
        assert client.get_experiment(experiment).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"

    client.create_registered_model("m")
    run = client.create_run(fresh)
    mv = client.create_model_version("m", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    assert not client.get_model_version("m", mv.version).user_id  # MLflow's client leaves it empty
    assert tracking.set_version_creator(uri, "m", mv.version, "alice")
    assert client.get_model_version("m", mv.version).user_id == "alice"
    assert not tracking.set_version_creator(uri, "m", mv.version, "bob")  # set once, never overwritten
    assert not tracking.set_version_creator("http://127.0.0.1:5000", "m", mv.version, "alice")  # a server: its auth


@pytest.mark.integration
def test_the_registry_history_grows_as_artifacts_and_tags_keep_only_the_current_fact(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "h", (tmp_path / "artifacts").as_uri())
    client.create_registered_model("hist")
    run = client.create_run(experiment)
    mv = client.create_model_version("hist", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    # A version recorded by the earlier code: one tag per event. It must stay in the history.
    legacy = {"action": "register", "at": "2026-01-01T00:00:00+00:00", "by": "old", "run_id": run.info.run_id}
    client.set_model_version_tag("hist", mv.version, "history.20260101T000000000000Z.register", json.dumps(legacy))
    for _ in range(3):  # an event once: then it is already champion
        model_store.promote_to_champion(client, "hist", mv.version, by="alice")
    model_store._record_event(client, "hist", mv.version, "demote", by="bob", replaced_by="2")

    events = model_store.history(client, "hist")
    assert [(e.action, e.by) for e in events] == [("register", "old"), ("promote", "alice"), ("demote", "bob")]
    assert events[-1].details == {"replaced_by": "2"}
    tags = client.get_model_version("hist", mv.version).tags
    assert [k for k in tags if k.startswith("history.")] == ["history.20260101T000000000000Z.register"]
    assert tags[registry_history.TAG_LAST_EVENT].startswith("demote by bob at ")
    stored = client.list_artifacts(run.info.run_id, f"{registry_history.HISTORY_DIR}/hist")
    assert len(stored) == 2 and all(f.path.endswith(".json") for f in stored)


# --- the file sensor after `make demo` -------------------------------------------------------------


def test_make_up_after_make_demo_ingests_and_trains_nothing_again(tmp_path: Path) -> None:
    """`make demo` ingests from the command line; the file sensor that `make up` starts then ticks with
    an empty cursor: the landed files are already partitions, so it requests no run and remembers them."""
    from mlops_assets.core.dataset_spec import default_spec
    from mlops_assets.defs.ingestion import assets as ingestion
    from mlops_assets.defs.resources import PlatformResource
    from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch

    root = tmp_path / "data"
    platform = PlatformResource(data_url=str(root), landing_url=str(root / "raw"))
    write_batch(simulate_records(default_spec(), SimulationConfig(n_rows=150, seed=3)), str(root / "raw"),
                name="demo-seed42.csv")
    job = dg.Definitions(assets=[ingestion.raw_batches], jobs=[ingestion.ingest_raw_batch_job],
                         resources={"platform": platform}).resolve_job_def(ingestion.INGEST_JOB)
    with dg.instance_for_test() as instance:
        [done] = ingestion.ingest_landed_on_instance(instance, job, platform.landing_url)  # make demo
        assert done.status == "accepted"
        result = ingestion.raw_files_sensor(dg.build_sensor_context(instance=instance, cursor=None,
                                                                    resources={"platform": platform}))
        assert isinstance(result, dg.SensorResult) and not result.run_requests
        assert not result.dynamic_partitions_requests
        cursor = json.loads(result.cursor or "{}")
        assert list(cursor["seen"]) == ["demo-seed42.csv"] and cursor["pending"] == []


def test_resources_built_from_the_default_settings_show_no_null_field(tmp_path: Path) -> None:
    """What the UI's resource pages show on a default local setup: a value (or "" for "not set") in
    every field, the actor and the commit resolved, never `null`."""
    from mlops_assets.defs.resources import build_resources
    from mlops_assets.settings import load_settings

    resources = build_resources(load_settings({"MLOPS_DATA_URL": str(tmp_path)}))
    for name, resource in resources.items():
        values = {k: getattr(resource, k) for k in type(resource).model_fields}
        assert not [k for k, v in values.items() if v is None], (name, values)
    mlflow = resources["mlflow"]
    assert mlflow.actor and mlflow.git_sha and mlflow.ui_url == ""
    assert resources["ray_serve"].serve_config_path.endswith("deploy/serve_config.yaml")
    assert Path(resources["ray_serve"].serve_config_path).is_file()
