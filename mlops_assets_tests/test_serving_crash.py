"""A scoring replica killed with SIGKILL under steady concurrent load, on a real Ray Serve application.

Same platform as test_serving_integration (a real Ray head on loopback, two versions in a temp
SQLite MLflow registry, the app deployed through the dashboard REST API), in a head of its own.
Eight clients send requests while one PredictionService replica's process is killed (with the
ingress forwarding every request, `ingress_scores` off): the ingress must send the requests that
replica held to the other one (zero failed responses),
and every answered request id must reach the prediction log. Then both ingress replicas are
killed while their spools hold rows not yet shipped: their successors must ship them, once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import httpx
import pandas as pd
import pytest

from mlops_assets.deployment import rollout as dep
from mlops_assets.serving.app import INGRESS_DEPLOYMENT_NAME
from mlops_assets.serving.config import DEPLOYMENT_NAME
from mlops_assets.serving.prediction_log import read_prediction_log
from mlops_assets_tests.test_serving_integration import (  # noqa: F401 - platform: the module fixture
    ARGS,
    MODEL_NAME,
    Platform,
    platform,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 8
MAX_REQUESTS = 6000  # bounds the run on a fast machine; the time bounds below usually stop it first
KILLS = 2
BATCH_WAIT_S = 0.25
LOAD_BEFORE_KILL_S = 3.0
LOAD_AFTER_KILL_S = 6.0


def _running_replicas(p: Platform, deployment: str) -> list[dict[str, Any]]:
    details = dep.app_details(p.target) or {}
    replicas = (details.get("deployments", {}).get(deployment) or {}).get("replicas") or []
    return [r for r in replicas if r.get("state") == "RUNNING" and r.get("pid")]


def _wait_for_replicas(p: Platform, deployment: str, count: int, timeout_s: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replicas = _running_replicas(p, deployment)
        if len(replicas) >= count:
            return replicas
        time.sleep(0.5)
    raise AssertionError(f"{deployment}: fewer than {count} running replicas after {timeout_s}s")


def test_a_scoring_replica_killed_under_load_fails_no_request_and_loses_no_log_row(
    platform: Platform,  # noqa: F811 - the fixture imported above
) -> None:
    # Batches that wait a little for company: every request spends BATCH_WAIT_S in its scoring
    # replica, so the replica that dies always holds some (a real serving lever, not a test hook).
    # `ingress_scores` off: every request goes through a scoring replica, the path a release's
    # candidate share and an ingress without a model take (with it on, the champion's /predict
    # never reaches a scoring replica, so killing one shows nothing).
    records = platform.records(10, offset=50)
    dep.deploy_version(target=platform.target, tracking_uri=platform.tracking_uri, spec=platform.spec,
                       version="1", records=records, expected=platform.expected("1", records),
                       model_name=MODEL_NAME, env_vars=platform.env_vars,
                       args={**ARGS, "batch_wait_timeout_s": BATCH_WAIT_S, "ingress_scores": False})
    outcomes: list[tuple[int, str, int]] = []  # (status, request id or error, tries the ingress made)
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(timeout=30, trust_env=False) as client:
            while not stop.is_set():
                with lock:
                    if len(outcomes) >= MAX_REQUESTS:
                        return
                try:
                    response = platform.post(client, {"records": records})
                    outcome = (response.status_code, response.json().get("request_id") or response.text[:200],
                               int(response.headers.get("x-mlops-attempts", "1")))
                except httpx.HTTPError as exc:
                    outcome = (0, type(exc).__name__, 1)
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    victims: list[int] = []
    counts: list[int] = []
    # Kill until a kill caught requests in flight (nearly always the first): else the test shows nothing.
    for _ in range(KILLS):
        running = _wait_for_replicas(platform, DEPLOYMENT_NAME, 2)
        victim = int(running[0]["pid"])
        time.sleep(LOAD_BEFORE_KILL_S)
        with lock:
            counts.append(len(outcomes))
        os.kill(victim, signal.SIGKILL)
        victims.append(victim)
        time.sleep(LOAD_AFTER_KILL_S)
        with lock:
            if any(o[2] > 1 for o in outcomes):
                break
    stop.set()
    for t in threads:
        t.join(60)
    before_kill = counts[0]

    failed = [o for o in outcomes if o[0] != 200]
    retried = [o for o in outcomes if o[2] > 1]
    assert before_kill > 20 and len(outcomes) - before_kill > 20, f"too little load around the kill: {len(outcomes)}"
    assert failed == [], f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    # The kill caught requests in flight (else this test would show nothing), and they were answered.
    assert retried, "no request was in flight on the killed replica"
    # Ray noticed: the dead replica is gone and a new one takes its place.
    after = _wait_for_replicas(platform, DEPLOYMENT_NAME, 2)
    assert not set(victims) & {int(r["pid"]) for r in after}

    answered = {request_id for _, request_id, _ in outcomes}
    deadline = time.monotonic() + 60
    logged = pd.DataFrame()
    while time.monotonic() < deadline:
        logged = read_prediction_log(platform.log_url)
        if not logged.empty and answered <= set(logged["request_id"]):
            break
        time.sleep(0.5)
    missing = answered - set(logged["request_id"])
    assert not missing, f"{len(missing)} of {len(answered)} answered requests are not in the prediction log"
    ours = logged[logged["request_id"].isin(answered)]
    assert len(ours) == len(answered) * len(records)  # each answered request once, all its records
    assert not ours.duplicated(["request_id", "record_index"]).any()
    print(f"replicas {victims} killed under {CLIENTS} clients: {len(outcomes)} requests, 0 failed, "
          f"{len(retried)} answered on a second try, "
          f"{len(answered)} request ids all in the log")


def test_rows_spooled_by_killed_ingress_replicas_are_shipped_by_their_successors(
    platform: Platform,  # noqa: F811 - the fixture imported above
) -> None:
    """Last in the module: it redeploys with a flush interval longer than the test, so rows stay spooled."""
    records = platform.records(8)
    dep.deploy_version(target=platform.target, tracking_uri=platform.tracking_uri, spec=platform.spec,
                       version="1", records=records, expected=platform.expected("1", records),
                       model_name=MODEL_NAME, env_vars=platform.env_vars,
                       args={**ARGS, "log_flush_interval_s": 600})
    ingresses = _wait_for_replicas(platform, INGRESS_DEPLOYMENT_NAME, 2)
    answered: set[str] = set()
    with httpx.Client(timeout=30, trust_env=False) as client:
        for _ in range(30):  # one at a time: nothing is in flight when the replicas die
            response = platform.post(client, {"records": records[:3]})
            assert response.status_code == 200, response.text
            answered.add(response.json()["request_id"])
    logged = read_prediction_log(platform.log_url)
    assert not answered <= set(logged["request_id"])  # still in the spools: the test shows the replay
    for replica in ingresses:
        os.kill(int(replica["pid"]), signal.SIGKILL)
    _wait_for_replicas(platform, INGRESS_DEPLOYMENT_NAME, 2)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        logged = read_prediction_log(platform.log_url)
        if answered <= set(logged["request_id"]):
            break
        time.sleep(1)
    missing = answered - set(logged["request_id"])
    assert not missing, f"{len(missing)} of {len(answered)} spooled requests were never shipped"
    ours = logged[logged["request_id"].isin(answered)]
    assert len(ours) == 3 * len(answered) and not ours.duplicated(["request_id", "record_index"]).any()
