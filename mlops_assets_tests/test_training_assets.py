"""trained_model -> model_evaluation (+ gate) -> registered_model (+ passed_gate) -> a stand-in
deployment, materialized for real against a MLflow SQLite store in a temporary folder and a test
Dagster instance."""

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.core import records
from mlops_assets.core.dataset_spec import default_spec
from mlops_assets.core.records import Registration, Split
from mlops_assets.defs.evaluation.assets import model_evaluation, promotion_gate
from mlops_assets.defs.registry.assets import passed_gate, registered_model
from mlops_assets.defs.resources import MlflowResource, ParquetIOManager, PlatformResource
from mlops_assets.defs.training.assets import trained_model
from mlops_assets.registry import governance, model_store
from mlops_assets.settings import load_settings
from mlops_assets.tools import cli
from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch
from mlops_assets.training import tracking
from mlops_assets.training import train as tr
from mlops_assets_tests.settings_support import platform_definitions

pytestmark = pytest.mark.integration

MODEL = "test-classifier"
FAST = {"ops": {"trained_model": {"config": {"iterations": 200, "thread_count": 2}}}}


@dg.asset(name="model_deployment", group_name=c.GROUP_DEPLOYMENT)
def deployment_stand_in(registered_model: Registration) -> dict:
    """Stands for model_deployment (which needs Ray): materialized only if the gate let it run."""
    return {"deployed": registered_model.champion_version}


OURS = [trained_model, model_evaluation, promotion_gate, registered_model, passed_gate, deployment_stand_in]


def split_stand_in(n_rows: int = 1500, seed: int = 3, shuffle_train_labels: bool = False) -> dg.AssetsDefinition:
    """A stand-in for the features group's `train_test_split`: a Split record over the same frame
    shape, its files content-addressed in a temporary folder."""

    @dg.asset(name="train_test_split", group_name=c.GROUP_FEATURES, kinds={"pandas"})
    def _split() -> dg.Output[Split]:
        spec = default_spec()
        raw = simulate_records(spec, SimulationConfig(n_rows=n_rows, seed=seed)).drop_duplicates()
        frame = raw[spec.feature_names].assign(target=(raw[spec.label] == spec.positive_class).astype(np.int64))
        _, test_idx = tr.grouped_stratified_split(frame[spec.feature_names], frame["target"].to_numpy(), 0.25, seed)
        frame["split"] = "train"
        frame.iloc[test_idx, frame.columns.get_loc("split")] = "test"
        if shuffle_train_labels:  # a worse model: it learns noise (test labels stay true)
            train = frame["split"] == "train"
            frame.loc[train, "target"] = np.random.default_rng(0).permutation(frame.loc[train, "target"].to_numpy())
        version = f"stand-in-{n_rows}-{seed}-{int(shuffle_train_labels)}"
        folder = Path(tempfile.gettempdir()) / "mlops-split-stand-in" / version
        records.write_frame(str(folder / "features.parquet"), frame.drop(columns=["split"]))
        records.write_frame(str(folder / "split.parquet"), frame[["split"]])
        record = Split(version=version, feature_version=f"features-{version}", data_version=f"data-{version}",
                       batch_ids=(), feature_path=str(folder / "features.parquet"), path=str(folder / "split.parquet"),
                       seed=seed, test_fraction=0.25, train_rows=int((frame["split"] == "train").sum()),
                       test_rows=int((frame["split"] == "test").sum()))
        return dg.Output(record, metadata={"data_version": record.data_version,
                                           "feature_version": record.feature_version})

    return _split


@pytest.fixture()
def root(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    monkeypatch.delenv("MLFLOW_UI_URL", raising=False)
    # MLflow's global tracking URI points elsewhere: the assets must only use the resource's store.
    with tracking.use_tracking_uri(f"sqlite:///{tmp_path}/elsewhere.db"):
        yield tmp_path
    assert not (tmp_path / "elsewhere.db").exists()


def _resources(root: Path) -> dict:
    return {
        "platform": PlatformResource.at(str(root / "data")),
        "io_manager": ParquetIOManager(base_url=str(root / "assets")),
        # Built as the definitions build it from the environment (MLFLOW_UI_URL), on this test's store.
        "mlflow": MlflowResource.from_settings(load_settings(), tracking_uri=f"sqlite:///{root}/mlflow.db",
                                               artifact_root=(root / "artifacts").as_uri(), experiment="test",
                                               model_name=MODEL),
    }


def _chain(root: Path, instance: dg.DagsterInstance, split: dg.AssetsDefinition | None = None,
           selection: list[str] | None = None) -> dg.ExecuteInProcessResult:
    return dg.materialize([split or split_stand_in(), *OURS], resources=_resources(root), instance=instance,
                          run_config=FAST if selection is None or "trained_model" in selection else None,
                          raise_on_error=False, selection=selection)


def _output(root: Path, asset: str) -> dict:
    """The value the latest run stored for an asset (the IO manager's per-run pointer names it)."""
    pointers = sorted((root / "assets" / asset / "by-run").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    stored = json.loads(pointers[-1].read_text())["path"]
    return json.loads(Path(stored).read_text())["value"]


def _uri(root: Path) -> str:
    return f"sqlite:///{root}/mlflow.db"


def _client(root: Path) -> MlflowClient:
    return MlflowClient(_uri(root))


def test_the_run_holds_what_tracking_promises_and_the_champion_predicts_like_training(root, monkeypatch):
    monkeypatch.setenv("MLFLOW_UI_URL", "http://127.0.0.1:5000")
    with dg.instance_for_test() as instance:
        result = _chain(root, instance)
        assert result.success
        meta = result.asset_materializations_for_node("trained_model")[0].metadata
        eval_meta = result.asset_materializations_for_node("model_evaluation")[0].metadata
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        gate = checks["promotion_gate"]
        assert checks["passed_gate"].passed and result.asset_materializations_for_node("model_deployment")
    trained, evaluation, registered = (_output(root, a) for a in ("trained_model", "model_evaluation",
                                                                   "registered_model"))
    client = _client(root)
    run = client.get_run(trained["run_id"])

    # Either side leads to the other.
    assert meta["mlflow_run"].value == (f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}"
                                        f"/runs/{run.info.run_id}?workflowType=machine_learning")
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert run.data.tags["dagster_asset_key"] == "trained_model"
    sha = run.data.tags["git_sha"]
    assert sha == "unknown" or len(sha.removesuffix("-dirty")) == 40
    # Parameters, training curves (one point per iteration), metrics.
    assert run.data.params["iterations"] == "200" and run.data.params["random_seed"] == str(c.TRAINING_SEED)
    curve = client.get_metric_history(run.info.run_id, "validation_logloss")
    assert len(curve) > 10 and [m.step for m in curve] == list(range(len(curve)))
    for name in ("test_roc_auc", "test_accuracy", "test_log_loss", "test_brier", "best_validation_logloss"):
        assert name in run.data.metrics
    # Data and feature versions as dataset inputs with digests.
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"raw_dataset", "feature_set", "train_split", "test_split"}
    assert inputs["feature_set"].dataset.digest == tracking.short_digest(trained["feature_version"])
    assert inputs["raw_dataset"].dataset.digest == tracking.short_digest(trained["raw_dataset_version"])
    assert inputs["train_split"].dataset.digest != inputs["test_split"].dataset.digest
    # The model, with its signature and input example.
    # URI-only MLflow calls use the global tracking URI: scope it (other tests may have set it).
    with tracking.use_tracking_uri(_uri(root)):
        info = mlflow.models.get_model_info(trained["model_uri"])
    assert [col.name for col in info.signature.inputs.inputs] == default_spec().feature_names
    assert info.saved_input_example_info is not None
    # metadata.json: model version, trained at, metrics, artifact location, data and feature versions.
    metadata = tracking.read_metadata_json(client, run.info.run_id)
    assert metadata["model"]["registered"] == {"name": MODEL, "version": "1",
                                               "aliases": [c.ALIAS_CHALLENGER, c.ALIAS_CHAMPION]}
    assert metadata["model"]["artifact_location"].startswith((root / "artifacts").as_uri())
    assert metadata["trained_at"] == trained["trained_at"]
    assert metadata["metrics"]["test"]["roc_auc"] == pytest.approx(run.data.metrics["test_roc_auc"])
    assert (metadata["data_version"], metadata["feature_version"]) == (trained["data_version"],
                                                                      trained["feature_version"])
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/roc.png", "evaluation/pr.png", "evaluation/calibration.png",
            "evaluation/slices.csv"} <= artifacts
    # Plots visible in the UI, gate passed with reasons, first version is champion.
    assert eval_meta["plot_roc"].value.startswith("![roc](data:image/png;base64,")
    assert gate.passed and "no champion yet" in gate.metadata["reasons"].value
    assert registered["promoted"] and registered["champion_version"] == "1"
    assert evaluation["metrics"]["roc_auc"] > 0.9 and evaluation["metrics"]["accuracy"] > 0.85

    # The champion loads from the registry and predicts what the in-memory model predicted.
    example = pd.DataFrame(trained["input_example"])[trained["feature_names"]]
    expected = np.array(trained["input_example_proba"])
    with tracking.use_tracking_uri(_uri(root)):
        by_alias = mlflow.catboost.load_model(f"models:/{MODEL}@{c.ALIAS_CHAMPION}")
    assert np.allclose(by_alias.predict_proba(example)[:, 1], expected, rtol=0, atol=1e-12)
    verified = model_store.load_verified_model(_uri(root), MODEL, alias=c.ALIAS_CHAMPION)
    assert np.allclose(verified.model.predict_proba(example)[:, 1], expected, rtol=0, atol=1e-12)
    assert verified.tags["decision_threshold"] == "0.5"
    assert verified.tags["data_version"] == trained["data_version"]
    assert float(verified.tags["metric.test_roc_auc"]) == pytest.approx(evaluation["metrics"]["roc_auc"], abs=1e-6)


def test_unchanged_inputs_train_nothing_and_changed_parameters_retrain(root):
    with dg.instance_for_test() as instance:
        assert _chain(root, instance).success
        first = _output(root, "model_evaluation")
        client = _client(root)
        runs_before = client.search_runs([client.get_experiment_by_name("test").experiment_id])
        again = _chain(root, instance)  # the same data, code and parameters
        assert again.success
        # Nothing trained, registered or promoted; the run says why.
        trained_meta = again.asset_materializations_for_node("trained_model")[0].metadata
        assert trained_meta["skipped"].value is True and "unchanged" in trained_meta["skip_reason"].value
        assert again.asset_materializations_for_node("registered_model")[0].metadata["skipped"].value is True
        assert _output(root, "model_evaluation")["run_id"] == first["run_id"]
        assert len(client.search_runs([client.get_experiment_by_name("test").experiment_id])) == len(runs_before)
        assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1
        assert model_store.alias_version(client, MODEL, c.ALIAS_CHAMPION) == "1"

        # Changed training parameters retrain: equal-or-better metrics are no regression, v2 is champion.
        changed = {"ops": {"trained_model": {"config": {"iterations": 150, "thread_count": 2}}}}
        retrained = dg.materialize([split_stand_in(), *OURS], resources=_resources(root), instance=instance,
                                   run_config=changed, raise_on_error=False)
        assert retrained.success
        second = _output(root, "model_evaluation")
        assert second["run_id"] != first["run_id"] and second["champion"]["version"] == "1"
        assert model_store.alias_version(client, MODEL, c.ALIAS_CHAMPION) == "2"
        assert model_store.alias_version(client, MODEL, c.ALIAS_PREVIOUS_CHAMPION) == "1"

        model_store.rollback_champion(client, MODEL)
        # registered_model alone does not pick up another run's trained_model: it says what to select.
        alone = _chain(root, instance, selection=["registered_model"])
        assert not alone.success
        failure = next(e for e in alone.all_events if e.is_step_failure).step_failure_data.error
        assert failure is not None and "registered_model loads model_evaluation only from its own run" in failure.message
        again = dg.materialize([split_stand_in(), *OURS], resources=_resources(root), instance=instance,
                               run_config=changed, raise_on_error=False)  # the same run once more
        assert again.success
        meta = again.asset_materializations_for_node("registered_model")[0].metadata
    assert meta["version"].value == "2" and meta["newly_registered"].value is False and meta["skipped"].value is True
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2
    # ...and it does not undo the rollback.
    assert model_store.alias_version(client, MODEL, c.ALIAS_CHAMPION) == "1"


def test_a_worse_model_is_registered_as_a_rejected_challenger_and_never_deployed(root, capsys):
    with dg.instance_for_test() as instance:
        assert _chain(root, instance).success
        worse = _chain(root, instance, split=split_stand_in(shuffle_train_labels=True))
        assert not worse.success  # the blocking passed_gate check fails the run
        checks = {e.check_name: e for e in worse.get_asset_check_evaluations()}
        gate = checks["promotion_gate"]
        assert not gate.passed and gate.metadata["decision"].value == "reject"
        reasons = gate.metadata["reasons"].value
        assert "FAIL: roc_auc" in reasons and "vs champion v1" in reasons
        assert not checks["passed_gate"].passed and checks["passed_gate"].metadata["decision"].value == "reject"
        assert "FAIL: roc_auc" in checks["passed_gate"].metadata["failures"].value
        # Registered, but only as challenger; deployment never ran.
        [meta] = [m.metadata for m in worse.asset_materializations_for_node("registered_model")]
        assert meta["version"].value == "2" and meta["aliases"].value == c.ALIAS_CHALLENGER
        assert meta["gate_passed"].value is False and meta["champion_version"].value == "1"
        assert not worse.asset_materializations_for_node("model_deployment")  # blocked downstream

        # The same inputs again: nothing new registered, the rejection recorded once, still blocked.
        again = _chain(root, instance, split=split_stand_in(shuffle_train_labels=True))
        assert not again.success and not again.asset_materializations_for_node("model_deployment")
        assert again.asset_materializations_for_node("registered_model")[0].metadata["newly_registered"].value is False

    client = _client(root)
    rejected_run = _output(root, "model_evaluation")["run_id"]
    assert client.get_run(rejected_run).data.tags["gate_passed"] == "false"
    assert model_store.alias_version(client, MODEL, c.ALIAS_CHAMPION) == "1"
    assert model_store.alias_version(client, MODEL, c.ALIAS_CHALLENGER) == "2"
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2

    # After the fact: the registry search finds the rejected candidate and says why.
    [found] = client.search_model_versions(f"name = '{MODEL}' and tags.gate_passed = 'false'")
    assert str(found.version) == "2" and found.run_id == rejected_run
    assert found.tags["gate_verdict"] == "reject" and found.tags["gate_compared_to"] == "1"
    assert "FAIL: roc_auc" in found.tags["gate_failures"] and "FAIL: roc_auc" in found.description
    card = governance.read_model_card(client, found.tags[governance.TAG_MODEL_CARD])
    assert "failed: stays challenger" in card and "Failed checks" in card
    assert "FAIL: roc_auc" in card.split("Failed checks")[1].split("Passed checks")[0]
    with pytest.raises(model_store.GateRejectedError):
        model_store.promote_to_champion(client, MODEL, "2")
    rejects = [e for e in model_store.history(client, MODEL) if e.action == "reject"]
    assert [(e.version, e.details["compared_to"]) for e in rejects] == [("2", "1")]
    assert cli.main(["status", "--history", "--tracking-uri", _uri(root), "--model-name", MODEL]) == 0
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if " reject " in ln]
    assert " 2 " in line and "FAIL: roc_auc" in line


def test_the_whole_training_path_from_raw_files_ends_with_a_champion_that_status_shows(
        data_root: Path, simulated, capsys):
    """The foundation's real assets upstream, the definitions' own resources (from the environment)."""
    defs = platform_definitions()

    write_batch(simulated, str(data_root / "raw"), name="batch1.csv")
    from mlops_assets.defs.ingestion.assets import INGEST_JOB, ingest_landed_on_instance

    graph = defs.resolve_asset_graph()
    # Landed files are raw_batches partitions, ingested first (as `make pipeline` does).
    keys = dg.AssetSelection.assets("registered_model").upstream().resolve(graph) - {dg.AssetKey("raw_batches")}
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        ingest_landed_on_instance(instance, defs.resolve_job_def(INGEST_JOB), str(data_root / "raw"))
        result = job.execute_in_process(instance=instance, asset_selection=list(keys), run_config=FAST)
        assert result.success
        split_meta = result.asset_materializations_for_node("train_test_split")[0].metadata

    assert cli.main(["status", "--json", "--no-endpoint"]) == 0
    status = json.loads(capsys.readouterr().out)
    champion = status["champion"]
    assert champion["version"] == "1" and status["model_name"] == c.REGISTERED_MODEL_NAME
    assert champion["data_version"] == split_meta["data_version"].value
    assert champion["feature_version"] == split_meta["feature_version"].value
    assert champion["metrics"]["roc_auc"] > 0.9
    assert cli.main(["status", "--no-endpoint"]) == 0
    assert "champion: version 1" in capsys.readouterr().out
    assert (data_root / "mlflow" / "mlflow.db").exists()
