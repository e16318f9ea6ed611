"""A scoring replica killed with SIGKILL under steady concurrent load, on a real Ray Serve application.

Same platform as test_serving_integration (a real Ray head on loopback, two versions in a temp
SQLite MLflow registry, the app deployed through the dashboard REST API), in a head of its own.
Eight clients send requests while one PredictionService replica's process is killed: the
ingress must send the requests that replica held to the other one (zero failed responses),
and every answered request id must reach the prediction log.
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

from mlops_assets.lib import deployment as dep
from mlops_assets.lib.serving.config import DEPLOYMENT_NAME
from mlops_assets.lib.serving.prediction_log import read_prediction_log
from mlops_assets_tests.test_serving_integration import Platform, platform  # noqa: F401 - the module fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 8
MAX_REQUESTS = 3000  # bounds the run on a slow machine; the time bounds below usually stop it first
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
    replicas = _wait_for_replicas(platform, DEPLOYMENT_NAME, 2)
    victim = int(replicas[0]["pid"])
    records = platform.records(5, offset=50)
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
    time.sleep(LOAD_BEFORE_KILL_S)
    with lock:
        before_kill = len(outcomes)
    os.kill(victim, signal.SIGKILL)
    time.sleep(LOAD_AFTER_KILL_S)
    stop.set()
    for t in threads:
        t.join(60)

    failed = [o for o in outcomes if o[0] != 200]
    retried = [o for o in outcomes if o[2] > 1]
    assert before_kill > 20 and len(outcomes) - before_kill > 20, f"too little load around the kill: {len(outcomes)}"
    assert failed == [], f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    # The kill caught requests in flight (else this test would show nothing), and they were answered.
    assert retried, "no request was in flight on the killed replica"
    # Ray noticed: the dead replica is gone and a new one takes its place.
    after = _wait_for_replicas(platform, DEPLOYMENT_NAME, 2)
    assert victim not in {int(r["pid"]) for r in after}

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
    print(f"replica {victim} killed under {CLIENTS} clients: {len(outcomes)} requests, 0 failed, "
          f"{len(retried)} answered on a second try, "
          f"{len(answered)} request ids all in the log")
