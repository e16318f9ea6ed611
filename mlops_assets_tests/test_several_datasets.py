"""Several data sets in one Definitions (MLOPS_DATASETS): each its own prefixed asset graph, jobs,
sensors, landing folder, registered model and Serve route; one real Dagster instance trains both,
each into its own registered model, from its own landing folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from mlflow import MlflowClient

from mlops_assets.core.dataset_spec import load_spec
from mlops_assets.defs.datasets import DATASET_TAG, DatasetNames, names_for_run
from mlops_assets.defs.ingestion import assets as ingestion
from mlops_assets.settings import dataset_settings, load_settings
from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch
from mlops_assets_tests.settings_support import platform_definitions

FLOWS = DatasetNames("network_flows")
TRAINING_PATH = ["raw_dataset", "validation_report", "feature_set", "train_test_split", "trained_model",
                 "model_evaluation", "registered_model"]


def _env(root: Path) -> dict[str, str]:
    return {"MLOPS_DATA_URL": str(root), "MLOPS_DATASETS": "phishing_websites,network_flows",
            "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "MLOPS_MLFLOW_ARTIFACT_ROOT": (root / "artifacts").as_uri()}


def test_each_data_set_gets_its_own_names_folders_model_and_route(tmp_path: Path) -> None:
    settings = load_settings(_env(tmp_path))
    flows = dataset_settings(settings, "network_flows")
    assert settings.model_name == "phishing-classifier" and settings.serve_route_prefix == "/"
    assert (flows.model_name, flows.serve_app_name, flows.serve_route_prefix) == (
        "network_flows-classifier", "network_flows", "/network_flows")
    assert flows.landing_url == str(tmp_path / "datasets" / "network_flows" / "raw")
    assert flows.prediction_log_url.startswith(str(tmp_path / "datasets" / "network_flows"))

    defs = platform_definitions(_env(tmp_path))
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"raw_dataset", "network_flows/raw_dataset", "network_flows/model_deployment"} <= keys
    assert graph.get(FLOWS.key("trained_model")).parent_keys == {FLOWS.key("train_test_split")}
    assert graph.get(FLOWS.key("trained_model")).group_name == "network_flows_training"
    jobs = {job.name for job in defs.resolve_all_job_defs()}
    assert {"ingestion_onward", "network_flows__ingestion_onward", "network_flows__rollback",
            "network_flows__release_promote"} <= jobs
    sensors = {sensor.name for sensor in defs.sensors or ()}
    assert {"raw_files_sensor", "network_flows__raw_files_sensor", "network_flows__post_deploy_watch"} <= sensors
    assert "network_flows__run_failure_alert" not in sensors  # one alert sensor watches every run
    ray_serve = defs.resources["ray_serve"]
    assert ray_serve.for_dataset("network_flows").target().endpoint.endswith("/network_flows/predict")
    assert ray_serve.target().endpoint.endswith(":8000/predict")
    with pytest.raises(dg.Failure, match="no data set named 'nope'"):
        ray_serve.for_dataset("nope")


def test_bad_dataset_lists_are_refused_naming_the_entry() -> None:
    with pytest.raises(ValueError, match="MLOPS_DATASETS entry 2 .'nope.json'"):
        load_settings({"MLOPS_DATASETS": "phishing_websites,nope.json"})
    with pytest.raises(ValueError, match="both named 'network_flows'"):
        load_settings({"MLOPS_DATASETS": "network_flows,network_flows"})
    with pytest.raises(ValueError, match="the first of MLOPS_DATASETS is the primary"):
        load_settings({"MLOPS_DATASETS": "phishing_websites,network_flows", "MLOPS_DATASET_SPEC": "network_flows"})


def test_a_run_selecting_two_data_sets_is_refused() -> None:
    run = dg.DagsterRun(job_name="__ASSET_JOB", asset_selection={dg.AssetKey("raw_dataset"), FLOWS.key("raw_dataset")})
    with pytest.raises(dg.DagsterInvariantViolationError, match="several data sets"):
        names_for_run(run)
    assert names_for_run(dg.DagsterRun(job_name="x", tags={DATASET_TAG: "network_flows"})) == FLOWS
    assert names_for_run(dg.DagsterRun(job_name="__ASSET_JOB", asset_selection={FLOWS.key("trained_model")})) == FLOWS


def test_one_instance_trains_both_data_sets_each_into_its_own_model(tmp_path: Path) -> None:
    env = _env(tmp_path)
    settings = load_settings(env)
    flows = dataset_settings(settings, "network_flows")
    write_batch(simulate_records(load_spec(None), SimulationConfig(n_rows=600, seed=3)), settings.landing_url,
                name="p.csv")
    write_batch(simulate_records(load_spec("network_flows"), SimulationConfig(n_rows=600, seed=4)),
                flows.landing_url, name="f.csv")
    defs = platform_definitions(env)
    fast = {"iterations": 60, "thread_count": 1}
    with dg.instance_for_test() as instance:
        for names, landing in ((DatasetNames(), settings.landing_url), (FLOWS, flows.landing_url)):
            ingest = defs.resolve_job_def(names.name(ingestion.INGEST_JOB))
            ingested = ingestion.ingest_landed_on_instance(instance, ingest, landing, names)
            assert [f.status for f in ingested] == ["accepted"], ingested
            job = defs.resolve_job_def(names.name(ingestion.TRAINING_JOB))
            result = job.execute_in_process(
                instance=instance, asset_selection=[names.key(a) for a in TRAINING_PATH],
                run_config={"ops": {"trained_model": {"config": fast}}}, raise_on_error=False)
            assert result.success, [e.message for e in result.all_events if e.is_failure]
            run = instance.get_run_by_id(result.run_id)
            assert run is not None and names_for_run(run) == names
        for names in (DatasetNames(), FLOWS):  # every asset of the path under its own data set's key
            assert all(instance.get_latest_materialization_event(names.key(a)) for a in TRAINING_PATH)
        # each data set's landed files are its own partitions of its own raw_batches
        primary_files = instance.get_dynamic_partitions(ingestion.RAW_BATCHES_PARTITIONS)
        flows_files = instance.get_dynamic_partitions(FLOWS.name(ingestion.RAW_BATCHES_PARTITIONS))
        assert len(primary_files) == len(flows_files) == 1 and primary_files != flows_files
        assert instance.get_materialized_partitions(FLOWS.key("raw_batches")) == set(flows_files)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiments = set()
    for name in ("phishing-classifier", "network_flows-classifier"):
        version = client.get_model_version_by_alias(name, "champion")
        experiments.add(client.get_run(version.run_id).info.experiment_id)
    assert len(experiments) == 2  # each data set's runs in its own experiment
    assert (tmp_path / "datasets" / "network_flows" / "batches").exists()


def test_dg_check_defs_passes_with_both_data_sets(tmp_path: Path) -> None:
    """`dg check defs` (what `make test` runs) and `dagster definitions validate` on the project's
    definitions with both data sets configured."""
    env = {**os.environ, **_env(tmp_path)}
    env.pop("MLOPS_DATASET_SPEC", None)
    repo = Path(__file__).resolve().parents[1]
    bin_dir = Path(sys.executable).parent
    for command in ([str(bin_dir / "dg"), "check", "defs"],
                    [str(bin_dir / "dagster"), "definitions", "validate", "-m", "mlops_assets.definitions"]):
        done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])


@pytest.mark.integration
@pytest.mark.slow
def test_make_pipeline_trains_every_data_set_and_then_each_only_when_stale(tmp_path: Path) -> None:
    """`mlops-assets pipeline` (what `make pipeline` runs) with two data sets: each landing folder
    ingested and trained into its own champion; run again, neither trains; `status --dataset` names each."""
    from mlops_assets_tests.test_postgres_platform import FAST, IN_PROCESS, REPO, training_path

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").touch()
    env = {**os.environ, **_env(tmp_path / "data"), "DAGSTER_HOME": str(home)}
    env.pop("MLOPS_DATASET_SPEC", None)
    settings = load_settings(env)
    write_batch(simulate_records(load_spec(None), SimulationConfig(n_rows=800, seed=5)), settings.landing_url)
    write_batch(simulate_records(load_spec("network_flows"), SimulationConfig(n_rows=800, seed=6)),
                dataset_settings(settings, "network_flows").landing_url)
    cli = str(Path(sys.executable).with_name("mlops-assets"))

    def pipeline() -> str:
        done = subprocess.run([cli, "pipeline", "--select", ",".join(training_path()),
                               "--config-json", json.dumps({**FAST, **IN_PROCESS})],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        return done.stdout

    first = pipeline()
    assert first.count("launching a run") == 2, first[-3000:]
    assert "model phishing-classifier" in first and "model network_flows-classifier" in first
    again = pipeline()
    assert again.count("skipped, no run launched") == 2, again[-3000:]
    done = subprocess.run([cli, "status", "--dataset", "network_flows", "--no-endpoint", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["champion"]["version"] == "1"
    bad = subprocess.run([cli, "status", "--dataset", "nope"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "no data set named 'nope'" in bad.stderr


def test_every_serve_submit_step_is_in_one_pool_the_shipped_instances_limit_to_one(tmp_path: Path) -> None:
    """A Serve submit replaces every data set's application: two data sets' deploys, rollbacks or
    release decisions at once could undo each other, so their steps share a pool of one slot."""
    from mlops_assets import constants as c

    defs = platform_definitions(_env(tmp_path))
    graph = defs.resolve_asset_graph()
    for names in (DatasetNames(), FLOWS):
        assert graph.get(names.key("model_deployment")).pools == {c.SERVE_DEPLOY_POOL}
        for job, op in (("rollback", "rollback_champion_op"), ("release_promote", "promote_release_op"),
                        ("release_abort", "abort_release_op")):
            assert defs.resolve_job_def(names.name(job)).graph.node_named(op).definition.pool == c.SERVE_DEPLOY_POOL
    repo = Path(__file__).resolve().parents[1] / "deploy"
    for shipped in ("local/dagster.yaml", "dagster.yaml", "production/dagster.yaml", "production/dagster-k8s.yaml",
                    "production/dagster-docker.yaml"):
        import yaml

        assert yaml.safe_load((repo / shipped).read_text())["concurrency"]["pools"]["default_limit"] == 1, shipped


def test_trace_looks_up_the_data_sets_own_assets_in_the_instance() -> None:
    """`mlops-assets trace --dataset network_flows` finds the runs that built that data set's raw
    data, not the primary's of the same name."""
    from mlops_assets.defs.registry.lookups import InstanceLookup

    with dg.instance_for_test() as instance:
        for names, batches in ((DatasetNames(), ["p1"]), (FLOWS, ["f1", "f2"])):
            instance.report_runless_asset_event(dg.AssetMaterialization(
                names.key("raw_dataset"), metadata={"data_version": "same-version", "batch_ids": batches}))
        assert InstanceLookup(instance).batch_ids("same-version") == ["p1"]
        assert InstanceLookup(instance, FLOWS).batch_ids("same-version") == ["f1", "f2"]
