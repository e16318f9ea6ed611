"""Two data sets at once on one real Ray head and one real Dagster instance: each goes from a raw
CSV in its own landing folder through its own jobs to its own champion, served as its own Serve
application on its own route; each data set's sensors see only their own deployment and traffic."""

from __future__ import annotations

import json
from collections.abc import Iterator

import dagster as dg
import httpx
import pytest
from mlflow import MlflowClient

from mlops_assets.core.dataset_spec import load_spec
from mlops_assets.defs.datasets import PRIMARY, DatasetNames
from mlops_assets.defs.ingestion import assets as ingestion
from mlops_assets.deployment import rollout as dep
from mlops_assets.settings import dataset_settings, load_settings
from mlops_assets.tools.simulator import SimulationConfig, json_records, simulate_records, write_batch
from mlops_assets_tests.e2e_support import FAST, metadata_of, platform_on_head
from mlops_assets_tests.settings_support import platform_definitions, platform_resources

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "several-datasets-token-0123456789"
FLOWS = DatasetNames("network_flows")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dg.Definitions, dg.DagsterInstance]]:
    # One replica a deployment: two applications on the test head's 2 logical CPUs.
    with (platform_on_head(tmp_path_factory.mktemp("several"), TOKEN, one_replica=True,
                           env={"MLOPS_DATASETS": "phishing_websites,network_flows"}),
          dg.instance_for_test() as instance):
        yield platform_definitions(), instance


def _post(target: dep.ServeTarget, records: list[dict]) -> httpx.Response:
    return httpx.post(target.endpoint, json={"records": records}, timeout=30, trust_env=False,
                      headers={"Authorization": f"Bearer {TOKEN}"})


def test_both_data_sets_trained_deployed_and_served_side_by_side(platform) -> None:
    defs, instance = platform
    settings = load_settings()
    both = {PRIMARY: dataset_settings(settings, None), FLOWS: dataset_settings(settings, "network_flows")}
    raws = {}
    for seed, (names, own) in enumerate(both.items()):
        raws[names] = simulate_records(load_spec(own.dataset_spec_path), SimulationConfig(n_rows=1500, seed=40 + seed))
        write_batch(raws[names], own.landing_url, name=f"{names.dataset or 'phishing'}.csv")

    for names, own in both.items():  # each data set's files, jobs and resources
        ingested = ingestion.ingest_landed_on_instance(
            instance, defs.resolve_job_def(names.name(ingestion.INGEST_JOB)), own.landing_url, names)
        assert [f.status for f in ingested] == ["accepted"], ingested
        result = defs.resolve_job_def(names.name("retraining")).execute_in_process(
            instance=instance, run_config=FAST, raise_on_error=False)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        deployed = metadata_of(result, "model_deployment")  # ops keep their names
        assert deployed["live_version"] == "1"
        health = [e for e in result.get_asset_check_evaluations() if e.check_name == "serving_health"]
        assert health and health[0].passed and health[0].asset_key == names.key("model_deployment")

    client = MlflowClient(settings.mlflow_tracking_uri)
    for model in ("phishing-classifier", "network_flows-classifier"):  # each its own champion
        assert str(client.get_model_version_by_alias(model, "champion").version) == "1"

    # Both answer over HTTP on their own routes, each with its own spec's labels.
    phishing, flows = (dep.target_from_settings(own) for own in both.values())
    assert phishing.endpoint.endswith("/predict") and flows.endpoint.endswith("/network_flows/predict")
    answers = {}
    for names, target in ((PRIMARY, phishing), (FLOWS, flows)):
        spec = load_spec(both[names].dataset_spec_path)
        response = _post(target, json_records(raws[names].head(3), spec))
        assert response.status_code == 200, response.text
        answers[names] = response.json()
        assert answers[names]["model_version"] == "1"
        assert {p["label"] for p in answers[names]["predictions"]} <= set(spec.label_values)  # its own label values
    assert "attack_probability" in answers[FLOWS]["predictions"][0]
    # A flows record is refused by the phishing application, naming a field: the routes do not mix.
    assert _post(phishing, json_records(raws[FLOWS].head(1), load_spec("network_flows"))).status_code == 422
    apps = dep.serve_applications(flows).get("applications") or {}
    assert {"phishing", "network_flows"} <= set(apps)

    # Each data set's watch reads its own deployment (named by its own sensor).
    for names in (PRIMARY, FLOWS):
        sensor = defs.get_sensor_def(names.name("post_deploy_watch"))
        context = dg.build_sensor_context(instance=instance, sensor_name=sensor.name, resources=platform_resources())
        result = sensor(context)
        skip = result.skip_reason.skip_message if isinstance(result, dg.SensorResult) and result.skip_reason else ""
        assert skip.startswith("v1: watching"), skip
        assert json.loads(result.cursor)["deployment"].startswith("1@")
