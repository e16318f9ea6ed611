"""Shadow and canary releases on a real Ray Serve application and a real Dagster instance.

Version 1 serves. A better version 2 goes out as a shadow (through the model_deployment asset's
launchpad config): the champion answers, version 2 scores a mirror of each request off the request
path, and both answers land in the prediction log; with delayed labels the release sensor promotes
it, and the promote run moves the aliases and the champion deployment. Then a worse version 3
(trained on shuffled labels, let through as if the gate had passed) goes out as a canary to a
quarter of the requests, sticky by client key; the sensor ends it on its labels, the abort run
removes it and alerts. Throughout: no failed response, every response names its version. One Ray
head for the module; small models.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
from mlops_assets.core.dataset_spec import DatasetSpec, default_spec
from mlops_assets.core.records import Registration
from mlops_assets.deployment import rollout as dep
from mlops_assets.monitoring import estimation as est
from mlops_assets.monitoring import live as mon
from mlops_assets.registry import model_store
from mlops_assets.registry.releases import ALIAS_CANDIDATE
from mlops_assets.settings import load_settings
from mlops_assets.tools import traffic
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets.training.tracking import use_tracking_uri
from mlops_assets_tests.e2e_support import Webhook, platform_on_head
from mlops_assets_tests.settings_support import platform_definitions, platform_resources

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "release-test-token-0123456789"
MODEL = c.REGISTERED_MODEL_NAME
TERMS = {"min_requests": 300, "min_duration_s": 15.0, "min_labelled": 200, "max_metric_drop": 0.02}
CANARY_SHARE = 0.25


@dataclass
class Answers:
    """Every response of a phase: status, version, request id, latency, client key, true labels."""

    statuses: list[int] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)  # request_id, record_index, label


@dataclass
class Platform:
    data: Path
    spec: DatasetSpec
    instance: dg.DagsterInstance
    defs: dg.Definitions
    target: dep.ServeTarget
    tracking_uri: str
    webhook: Webhook

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def alias(self, alias: str) -> str | None:
        return model_store.alias_version(self.client(), MODEL, alias)

    def send(self, frame: pd.DataFrame, *, batch: int = 1, keys: list[str | None] | None = None,
             threads: int = 2, into: Answers | None = None) -> Answers:
        """POST the frame's records in requests of `batch` (request i with client key keys[i])."""
        out = Answers()
        features = frame[self.spec.feature_names].astype("int64").to_dict("records")
        truth = frame[self.spec.label].astype(int).tolist()
        todo = list(range(0, len(frame), batch))
        lock = threading.Lock()

        def worker(mine: list[int]) -> None:
            with httpx.Client(timeout=30, trust_env=False) as http:
                for start in mine:
                    key = keys[start // batch] if keys else None
                    headers = {"Authorization": f"Bearer {TOKEN}", **({"x-client-key": key} if key else {})}
                    sent = time.perf_counter()
                    response = http.post(self.target.endpoint, json={"records": features[start:start + batch]},
                                         headers=headers)
                    elapsed = time.perf_counter() - sent
                    body = response.json() if response.status_code == 200 else {}
                    with lock:
                        out.statuses.append(response.status_code)
                        out.versions.append(str(body.get("model_version")))
                        out.keys.append(key)
                        out.latencies.append(elapsed)
                        for i in range(len(body.get("predictions", []))):
                            out.labels.append({"request_id": body["request_id"], "record_index": i,
                                               "label": truth[start + i]})

        workers = [threading.Thread(target=worker, args=(todo[i::threads],)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if into is not None:  # everything the test sent, for the checks that hold throughout
            for name in ("statuses", "versions", "keys", "latencies", "labels"):
                getattr(into, name).extend(getattr(out, name))
        return out

    def label(self, answers: Answers) -> None:
        frame = pd.DataFrame(answers.labels).assign(labelled_at=pd.Timestamp.now(tz="UTC").isoformat())
        traffic.write_labels(frame, str(self.data / "labels"))

    def wait_logged(self, answers: Answers, versions: int = 1, timeout_s: float = 90) -> pd.DataFrame:
        wanted = {(a["request_id"], a["record_index"]) for a in answers.labels}
        deadline = time.monotonic() + timeout_s
        while True:
            log = mon.read_prediction_log(str(self.data / "predictions"))
            if not log.empty:
                mine = log[log[mon.REQUEST_ID].isin({k for k, _ in wanted})]
                if len(mine) >= versions * len(wanted):
                    return mine
            assert time.monotonic() < deadline, f"{len(wanted)} answered records x {versions} versions not in the log: {len(mine) if not log.empty else 0}"
            time.sleep(0.5)

    def tick(self, cursor: str | None) -> tuple[list[dg.RunRequest], str | None, str]:
        sensor = self.defs.get_sensor_def("release_decision_sensor")
        context = dg.build_sensor_context(instance=self.instance, cursor=cursor, resources=platform_resources())
        result = sensor(context)
        assert isinstance(result, dg.SensorResult)
        skip = result.skip_reason.skip_message if result.skip_reason else ""
        return list(result.run_requests or []), result.cursor, skip

    def decide(self, timeout_s: float = 90) -> tuple[dg.RunRequest, dict]:
        """Tick the release sensor until it requests a decision; the request and the cursor's evidence."""
        cursor, deadline, why = None, time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:
            requests, cursor, why = self.tick(cursor)
            if requests:
                [request] = requests
                again, _, _ = self.tick(cursor)
                assert again == []  # one decision per release, however often the sensor looks
                return request, json.loads(cursor or "{}")["last"]
            time.sleep(2)
        raise AssertionError(f"no release decision within {timeout_s}s: {why}")

    def run(self, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
        job = self.defs.resolve_job_def(str(request.job_name))
        return job.execute_in_process(instance=self.instance, raise_on_error=False,
                                      tags={**request.tags, "dagster/run_key": str(request.run_key)})

    def release(self, version: str, strategy: str, **config: object) -> dg.ExecuteInProcessResult:
        """What the training job's last steps do: the gate passed `version` (champion alias), then
        model_deployment releases it with the launchpad's strategy."""
        from mlops_assets.defs.deployment.assets import model_deployment
        from mlops_assets.defs.resources import ParquetIOManager

        model_store.promote_to_champion(self.client(), MODEL, version)
        frame = simulate_records(self.spec, SimulationConfig(n_rows=200, seed=77))

        @dg.asset(name="registered_model")
        def registered() -> Registration:
            return Registration(model_name=MODEL, version=version, champion_version=version)

        @dg.asset(name="train_test_split")
        def split() -> pd.DataFrame:
            return frame.assign(split="test")

        resources = {k: v for k, v in self.defs.resources.items() if k in ("platform", "mlflow", "ray_serve")}
        return dg.materialize(
            [registered, split, model_deployment], instance=self.instance,
            resources={**resources, "io_manager": ParquetIOManager(base_url=str(self.data / "stand-in"))},
            run_config={"ops": {"model_deployment": {"config": {"strategy": strategy, **config}}}})


def _register(tracking_uri: str, spec: DatasetSpec, *, rows: int, seed: int, iterations: int,
              shuffle: bool = False) -> str:
    """A registered version with its calibrator (fitted on held-out rows) and hold-out accuracy tag."""
    frame = simulate_records(spec, SimulationConfig(n_rows=rows, seed=seed))
    holdout = simulate_records(spec, SimulationConfig(n_rows=1500, seed=seed + 1000))
    y = (frame[spec.label] == spec.positive_class).astype(int).to_numpy()
    if shuffle:
        y = np.random.default_rng(seed).permutation(y)
    model = CatBoostClassifier(iterations=iterations, depth=4, random_seed=seed, verbose=False, thread_count=1,
                               allow_writing_files=False).fit(frame[spec.feature_names], y)
    p = model.predict_proba(holdout[spec.feature_names])[:, 1]
    truth = (holdout[spec.label] == spec.positive_class).astype(int).to_numpy()
    calibrator = est.fit_calibrator(p, truth)
    client = MlflowClient(tracking_uri=tracking_uri)
    with use_tracking_uri(tracking_uri):
        experiment = client.get_experiment_by_name(c.MLFLOW_EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(c.MLFLOW_EXPERIMENT)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            info = model_store.log_catboost_model(model, input_example=frame[spec.feature_names].head(5))
            mlflow.log_dict(calibrator.to_dict(), est.CALIBRATOR_ARTIFACT)
    accuracy = float(((p >= 0.5) == truth).mean())
    mv = model_store.register_version(client, MODEL, run_id=run.info.run_id, model_uri=info.model_uri,
                                      tags={"decision_threshold": "0.5", "metric.test_accuracy": f"{accuracy:.4f}"})
    return str(mv.version)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    # Two cores: one replica of each deployment, plus the candidate's.
    with (platform_on_head(tmp_path_factory.mktemp("release"), TOKEN, one_replica=True) as head,
          dg.instance_for_test() as instance):
        yield Platform(head.data, default_spec(), instance, platform_definitions(), head.target,
                       head.tracking_uri, head.webhook)


def test_a_better_shadow_is_promoted_and_a_worse_canary_is_ended_on_live_evidence(platform: Platform) -> None:
    started = time.monotonic()
    spec, tracking_uri = platform.spec, platform.tracking_uri
    v1 = _register(tracking_uri, spec, rows=400, seed=1, iterations=8)  # the champion: weak
    v2 = _register(tracking_uri, spec, rows=3000, seed=2, iterations=150)  # the better candidate
    v3 = _register(tracking_uri, spec, rows=3000, seed=3, iterations=60, shuffle=True)  # the worse one
    sample = dep.sample_records(simulate_records(spec, SimulationConfig(n_rows=64, seed=9)), spec)
    model_store.promote_to_champion(platform.client(), MODEL, v1)
    expected = dep.offline_probabilities(dep.offline_model(tracking_uri, MODEL, v1), sample, spec)
    dep.deploy_version(target=platform.target, tracking_uri=tracking_uri, spec=spec, version=v1, records=sample,
                       expected=expected, model_name=MODEL, base_config=dep.load_serve_config(load_settings().serve_config_path),
                       env_vars=dep.replica_env_vars(tracking_uri=tracking_uri, data_url=str(platform.data)))
    everything = Answers()

    # Direct: the latency baseline (one record per request, one client at a time).
    probe = simulate_records(spec, SimulationConfig(n_rows=300, seed=10))
    platform.send(probe.head(50), threads=1)  # warm-up
    direct = platform.send(probe, threads=1, into=everything)
    assert set(direct.versions) == {v1}

    # 1. Shadow of the better version 2, from the launchpad's config.
    # In-flight room for every mirror of the steady phase: this test checks that each shadowed record
    # is logged by both versions; dropping mirrors beyond the bound is test_release.py's.
    shadow_start = platform.release(v2, "shadow", shadow_max_in_flight=4096, **TERMS)
    assert shadow_start.success
    deployed = shadow_start.asset_materializations_for_node("model_deployment")[0].metadata
    assert deployed["release_strategy"].value == "shadow" and deployed["live_version"].value == v1
    assert platform.alias(c.ALIAS_CHAMPION) == v1 and platform.alias(ALIAS_CANDIDATE) == v2
    shadowed = platform.send(probe, threads=1, into=everything)  # the same requests: the latency with a shadow
    assert set(shadowed.versions) == {v1}  # the champion answers every request of a shadow
    steady = platform.send(simulate_records(spec, SimulationConfig(n_rows=1500, seed=11)), batch=5,
                           into=everything)
    log = platform.wait_logged(steady, versions=2)
    pairs = log.groupby([mon.REQUEST_ID, mon.RECORD_INDEX])[mon.MODEL_VERSION].agg(lambda v: tuple(sorted(set(v))))
    assert (pairs == tuple(sorted((v1, v2)))).all()  # each shadowed record: both versions' answers
    assert set(log[log["shadow"].fillna(False).astype(bool)][mon.MODEL_VERSION]) == {v2}
    # The shipped ingress scored the mirrors itself, with the candidate's model beside the champion's.
    counts = [(dep.release_state(platform.target) or {}).get("counts", {}) for _ in range(6)]  # either replica
    assert any(n.get("shadow_batches_here", 0) > 0 for n in counts), counts
    platform.label(steady)  # the delayed labels
    request, evidence = platform.decide()
    assert request.job_name == "release_promote" and evidence["action"] == "promote"
    assert evidence["evidence"] == "labels" and evidence["candidate_accuracy"] > evidence["champion_accuracy"]
    assert 0 < evidence["agreement_rate"] < 1
    promoted = platform.run(request)
    assert promoted.success
    assert platform.alias(c.ALIAS_CHAMPION) == v2 and platform.alias(c.ALIAS_PREVIOUS_CHAMPION) == v1
    assert platform.alias(ALIAS_CANDIDATE) is None and dep.live_version(platform.target) == v2
    assert not dep.current_release(platform.target).active

    # 2. Canary of the worse version 3 (shuffled labels), a quarter of the requests, sticky by client key.
    canary_start = platform.release(v3, "canary", canary_share=CANARY_SHARE, **TERMS)
    assert canary_start.success and platform.alias(ALIAS_CANDIDATE) == v3 and platform.alias(c.ALIAS_CHAMPION) == v2
    shares = simulate_records(spec, SimulationConfig(n_rows=2000, seed=12))
    split = platform.send(shares, keys=[f"user-{i}" for i in range(2000)], threads=4, into=everything)
    share = split.versions.count(v3) / len(split.versions)
    assert set(split.versions) == {v2, v3} and abs(share - CANARY_SHARE) <= 0.03
    sticky_keys = [f"client-{i % 40}" for i in range(240)]
    sticky = platform.send(simulate_records(spec, SimulationConfig(n_rows=240, seed=13)), keys=sticky_keys,
                           threads=4, into=everything)
    by_client = pd.DataFrame({"key": sticky.keys, "version": sticky.versions}).groupby("key")["version"].nunique()
    assert (by_client == 1).all() and len(by_client) == 40
    platform.wait_logged(split)
    platform.label(split)
    request, evidence = platform.decide()
    assert request.job_name == "release_abort" and evidence["action"] == "abort"
    assert evidence["candidate_accuracy"] < evidence["champion_accuracy"] - 0.1
    ended = platform.run(request)
    assert ended.success
    assert platform.alias(c.ALIAS_CHAMPION) == v2 and platform.alias(ALIAS_CANDIDATE) is None
    assert dep.live_version(platform.target) == v2 and not dep.current_release(platform.target).active
    [alert] = [a for a in platform.webhook.received if a["kind"] == "release_aborted"]
    assert alert["details"]["candidate"] == v3
    after = platform.send(shares.head(200), keys=[f"user-{i}" for i in range(200)], into=everything)
    assert set(after.versions) == {v2}

    # Throughout: no failed response, every response named its version.
    assert set(everything.statuses) == {200} and "None" not in everything.versions
    history = [(e.version, e.action) for e in model_store.history(platform.client(), MODEL)]
    assert (v2, "release-start") in history and (v2, "release-promote") in history
    assert (v3, "release-start") in history and (v3, "release-abort") in history
    p50_direct, p50_shadow = statistics.median(direct.latencies), statistics.median(shadowed.latencies)
    print(f"\nrelease: shadow p50 {p50_shadow * 1000:.2f} ms vs direct {p50_direct * 1000:.2f} ms "
          f"({p50_shadow / p50_direct - 1:+.1%}); canary share {share:.3f} of {len(split.versions)} requests; "
          f"shadow decision on {evidence}; {len(everything.statuses)} responses; {time.monotonic() - started:.0f}s")
