"""Release logic without a cluster: routing (share, stickiness, fallback, the bounded shadow), the
config's validation, the live comparison and the decision rule, and the registry's release history."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlops_assets import constants as c
from mlops_assets.deployment import rollout as dep
from mlops_assets.monitoring import comparison as cmp
from mlops_assets.serving.config import ModelRef
from mlops_assets.serving.ingress import ForwardedRequest, ForwardedResponse
from mlops_assets.serving.prediction_log import decode_spool, encode_request
from mlops_assets.serving.release import (
    CANDIDATE_DEPLOYMENT_NAME,
    ReleaseConfig,
    ReleaseConfigError,
    ReleaseRouter,
    bucket,
    chooses_candidate,
    mark_shadow,
    mirrors,
    score_mirrors,
)


def test_the_canary_share_is_what_was_configured_and_a_client_key_always_routes_the_same_way() -> None:
    release = ReleaseConfig(strategy="canary", candidate_version="2", canary_share=0.2)
    chosen = [chooses_candidate(release, None, f"request-{i}") for i in range(20000)]
    assert abs(np.mean(chosen) - 0.2) < 0.01
    for key in ("alice", "bob", "client-17"):
        assert len({chooses_candidate(release, key, f"r{i}") for i in range(50)}) == 1
    assert bucket("alice") == bucket("alice") and 0 <= bucket("alice") < 1
    direct = ReleaseConfig()
    assert not any(chooses_candidate(direct, None, f"r{i}") for i in range(100))


def test_a_bad_release_config_names_the_setting() -> None:
    with pytest.raises(ReleaseConfigError, match="not one of"):
        ReleaseConfig(strategy="blue-green")
    with pytest.raises(ReleaseConfigError, match="canary_share must be in"):
        ReleaseConfig(strategy="canary", candidate_version="2", canary_share=1.5)
    with pytest.raises(ReleaseConfigError, match="needs candidate_version"):
        ReleaseConfig(strategy="shadow")
    with pytest.raises(ReleaseConfigError, match="shadow_sample_share must be in"):
        ReleaseConfig(strategy="shadow", candidate_version="2", shadow_sample_share=0.0)
    with pytest.raises(ReleaseConfigError, match="shadow_batch_max_size must be at least 1"):
        ReleaseConfig(strategy="shadow", candidate_version="2", shadow_batch_max_size=0)
    with pytest.raises(ReleaseConfigError, match="shadow_batch_wait_s must be in"):
        ReleaseConfig(strategy="shadow", candidate_version="2", shadow_batch_wait_s=-1)
    with pytest.raises(ReleaseConfigError, match="unknown release setting"):
        ReleaseConfig.from_user_config({"strategy": "direct", "percent": 5})
    again = ReleaseConfig.from_user_config(ReleaseConfig(strategy="canary", candidate_version=2,  # type: ignore[arg-type]
                                                         canary_share=0.3).to_user_config())
    assert again.candidate_version == "2" and again.canary_share == 0.3 and again.active


def _request(i: int, key: str | None = None) -> ForwardedRequest:
    headers = [(b"content-type", b"application/json")] + ([(b"x-client-key", key.encode())] if key else [])
    return ForwardedRequest("POST", "/predict", b"", headers, b"{}", f"req-{i}")


def _line(version: str, request_id: str) -> bytes:
    return encode_request(request_id=request_id, model_version=version, columns=["a", "b"],
                          matrix=np.array([[1, 0]]), labels=[1], probabilities=[0.7])


class Deployment:
    """A stand-in for a Serve handle: answers with its version, or fails, after `delay_s`."""

    def __init__(self, version: str, fail: bool = False, delay_s: float = 0.0) -> None:
        self.version, self.fail, self.delay_s, self.calls = version, fail, delay_s, 0
        self.batches: list[int] = []  # sizes of the shadow batches it was sent

    async def handle_many(self, batch: list[ForwardedRequest]) -> list[ForwardedResponse]:
        """What the scoring deployment's `handle_many` runs (score_mirrors), without Ray or a priority change."""
        self.batches.append(len(batch))

        async def one(request: ForwardedRequest) -> ForwardedResponse:
            return (await self(request))[0]

        return await score_mirrors(one, batch, lower=False)

    async def __call__(self, request: ForwardedRequest) -> tuple[ForwardedResponse, int]:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.fail:
            return ForwardedResponse(500, [], b'{"error":"boom"}'), 1
        body = json.dumps({"request_id": request.request_id, "model_version": self.version}).encode()
        return ForwardedResponse(200, [], body, [(_line(self.version, request.request_id), 1)]), 1


def _router(champion: Deployment, candidate: Deployment | None) -> ReleaseRouter:
    return ReleaseRouter(champion, candidate, send_mirrors=candidate.handle_many if candidate else None)


def _route(router: ReleaseRouter, requests: list[ForwardedRequest],
           drain: bool = True) -> tuple[list[str], list[tuple[bytes, int]]]:
    logged: list[tuple[bytes, int]] = []

    def sender(request: ForwardedRequest):  # like the ingress's lambda: bound to its own request
        async def send(deployment: Deployment) -> tuple[ForwardedResponse, int]:
            return await deployment(request)
        return send

    async def go() -> list[str]:
        versions = []
        for current in requests:
            answer, _ = await router.forward(current, sender(current), lambda line, rows: logged.append((line, rows)))
            versions.append(json.loads(answer.body)["model_version"] if answer.status == 200 else "failed")
        if drain:
            await router.drain()  # the queued mirrors go now; every batch finishes
        else:
            await asyncio.sleep(0.3)
        return versions

    return asyncio.run(go()), logged


def test_a_failing_canary_candidate_is_answered_for_by_the_champion() -> None:
    champion, candidate = Deployment("1"), Deployment("2", fail=True)
    router = _router(champion, candidate)
    router.reconfigure({"strategy": "canary", "candidate_version": "2", "canary_share": 1.0})
    versions, _ = _route(router, [_request(i) for i in range(10)])
    assert versions == ["1"] * 10 and candidate.calls == 10 and router.counts.fallbacks == 10
    assert router.counts.failed == {"candidate": 10}


def test_the_shadow_answers_with_the_champion_and_logs_the_candidate_marked_as_shadow() -> None:
    champion, candidate = Deployment("1"), Deployment("2")
    router = _router(champion, candidate)
    router.reconfigure({"strategy": "shadow", "candidate_version": "2"})
    versions, logged = _route(router, [_request(i) for i in range(5)])
    assert versions == ["1"] * 5 and candidate.calls == 5
    rows = [row for line, _ in logged for row in decode_spool(line)]
    assert {r["model_version"] for r in rows} == {"2"} and all(r["shadow"] is True for r in rows)
    assert sorted(r["request_id"] for r in rows) == [f"req-{i}" for i in range(5)]  # same ids as the champion's
    assert router.counts.answered == {"champion": 5, "shadow": 5} and router.counts.shadow_in_flight == 0


def test_the_shadow_sends_its_mirrors_in_batches_of_the_configured_size() -> None:
    class Recorded:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str, int, int]] = []

        def answered(self, role: str, version: str, status: int, latency_s: float, count: int = 1) -> None:
            self.calls.append((role, version, status, count))

        def shadow_dropped(self) -> None:
            pass

    champion, candidate, metrics = Deployment("1"), Deployment("2"), Recorded()
    router = ReleaseRouter(champion, candidate, metrics, send_mirrors=candidate.handle_many)
    router.reconfigure({"strategy": "shadow", "candidate_version": "2", "shadow_batch_max_size": 4,
                        "shadow_batch_wait_s": 10.0})
    versions, logged = _route(router, [_request(i) for i in range(10)])  # 4, 4, then 2 sent by drain()
    assert versions == ["1"] * 10 and candidate.batches == [4, 4, 2] and router.counts.shadow_batches == 3
    shadow_calls = [call for call in metrics.calls if call[0] == "shadow"]  # one metrics call per batch
    assert shadow_calls == [("shadow", "2", 200, 4), ("shadow", "2", 200, 4), ("shadow", "2", 200, 2)]
    assert sorted(row["request_id"] for line, _ in logged for row in decode_spool(line)) == sorted(
        f"req-{i}" for i in range(10))


def test_a_part_filled_batch_goes_to_the_candidate_after_the_batch_wait() -> None:
    champion, candidate = Deployment("1"), Deployment("2")
    router = _router(champion, candidate)
    router.reconfigure({"strategy": "shadow", "candidate_version": "2", "shadow_batch_wait_s": 0.05})
    _, logged = _route(router, [_request(i) for i in range(5)], drain=False)  # only the timer sends them
    assert candidate.batches == [5] and router.counts.shadow_in_flight == 0
    # The batch's five answers in one spool write, each row still its own request's.
    assert len(logged) == 1 and logged[0][1] == 5
    assert sorted(row["request_id"] for row in decode_spool(logged[0][0])) == [f"req-{i}" for i in range(5)]


def _shadow_then_close(candidate: Deployment, timeout_s: float) -> tuple[bool, list[tuple[bytes, int]], ReleaseRouter]:
    """Mirrors queued behind a long batch wait, then the ingress's shutdown: close() instead of drain()."""
    router = _router(Deployment("1"), candidate)
    router.reconfigure({"strategy": "shadow", "candidate_version": "2", "shadow_batch_wait_s": 10.0})
    logged: list[tuple[bytes, int]] = []

    async def go() -> bool:
        for i in range(3):
            await router.forward(_request(i), lambda deployment, i=i: deployment(_request(i)),
                                 lambda line, rows: logged.append((line, rows)))
        return await router.close(timeout_s)

    return asyncio.run(go()), logged, router


def test_closing_the_router_sends_the_queued_mirrors_and_logs_their_answers() -> None:
    candidate = Deployment("2")
    closed, logged, router = _shadow_then_close(candidate, timeout_s=5.0)
    assert closed and candidate.batches == [3] and router.counts.shadow_in_flight == 0
    assert sorted(row["request_id"] for line, _ in logged for row in decode_spool(line)) == ["req-0", "req-1", "req-2"]


def test_closing_the_router_gives_up_on_a_hanging_candidate_after_its_timeout() -> None:
    candidate = Deployment("2", delay_s=30.0)
    closed, logged, _ = _shadow_then_close(candidate, timeout_s=0.2)  # returns in 0.2 s, not 30
    assert not closed and candidate.batches == [3] and logged == []


def test_the_shadow_drops_mirrors_beyond_its_bound_instead_of_queueing_them() -> None:
    champion, candidate = Deployment("1"), Deployment("2", delay_s=0.2)
    router = _router(champion, candidate)
    router.reconfigure({"strategy": "shadow", "candidate_version": "2", "shadow_max_in_flight": 3,
                        "shadow_batch_max_size": 2})
    versions, _ = _route(router, [_request(i) for i in range(10)])  # a batch of 2 in flight, 1 queued: the rest drop
    assert versions == ["1"] * 10 and router.counts.shadow_dropped == 7 and candidate.calls == 3
    assert candidate.batches == [2, 1]


def test_a_failing_shadow_is_counted_against_the_candidate_and_never_reaches_the_client() -> None:
    champion, failing = Deployment("1"), Deployment("2", fail=True)
    router = _router(champion, failing)
    router.reconfigure({"strategy": "shadow", "candidate_version": "2"})
    versions, logged = _route(router, [_request(i) for i in range(6)])
    assert versions == ["1"] * 6 and logged == [] and router.counts.failed == {"shadow": 6}

    async def unreachable(batch: list[ForwardedRequest]) -> list[ForwardedResponse]:
        raise ConnectionError("the candidate replica died")

    router = ReleaseRouter(champion, failing, send_mirrors=unreachable)
    router.reconfigure({"strategy": "shadow", "candidate_version": "2"})
    versions, logged = _route(router, [_request(i) for i in range(6)])
    assert versions == ["1"] * 6 and logged == [] and router.counts.failed == {"shadow": 6}
    assert router.counts.shadow_in_flight == 0


def test_a_sampled_shadow_mirrors_its_share_of_requests_and_counts_the_rest() -> None:
    champion, candidate = Deployment("1"), Deployment("2")
    router = _router(champion, candidate)
    router.reconfigure({"strategy": "shadow", "candidate_version": "2", "shadow_sample_share": 0.25,
                        "shadow_max_in_flight": 10000, "shadow_batch_max_size": 64})
    versions, logged = _route(router, [_request(i) for i in range(2000)])
    assert versions == ["1"] * 2000 and router.counts.shadow_dropped == 0
    assert abs(candidate.calls / 2000 - 0.25) < 0.03 and router.counts.shadow_sampled_out == 2000 - candidate.calls
    mirrored = {row["request_id"] for line, _ in logged for row in decode_spool(line)}
    assert mirrored == {f"req-{i}" for i in range(2000) if mirrors(router.config, f"req-{i}")}
    assert all(mirrors(ReleaseConfig(strategy="shadow", candidate_version="2"), f"r{i}") for i in range(100))


def test_a_candidate_lowers_the_priority_of_every_one_of_its_threads() -> None:
    """In a child process (the priority cannot come back up without privileges): Ray's threads too."""
    import subprocess
    import sys

    code = """
import os, threading, time
from mlops_assets.serving.release import lower_priority
stop = threading.Event()
worker = threading.Thread(target=stop.wait, daemon=True)
worker.start()
before = {t: os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}
assert lower_priority(5)
after = {t: os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}
print(len(before), all(after[t] == min(19, before[t] + 5) for t in before))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    count, all_lowered = out.stdout.split()
    assert int(count) >= 2 and all_lowered == "True"  # this thread, the worker and any the imports started


def test_a_release_needs_a_candidate_deployment() -> None:
    router = ReleaseRouter(Deployment("1"), None)
    with pytest.raises(ReleaseConfigError, match="no candidate deployment"):
        router.reconfigure({"strategy": "shadow", "candidate_version": "2"})


def test_mark_shadow_keeps_the_rows_and_marks_them() -> None:
    from mlops_assets.serving.prediction_log import decode_spool_table, encode_rows

    unmarked = _line("4", "r1")
    line, rows = mark_shadow(unmarked)
    [row] = decode_spool(line)
    assert rows == 1 and row["shadow"] is True and row["model_version"] == "4" and row["probability"] == 0.7
    assert line[:1] == b"M"  # a raw-array frame stays one: only its header gains the mark
    # Marked JSON rows (a data set of strings and floats) read back as the same table, shadow column included.
    json_line, _ = mark_shadow(encode_rows(decode_spool(unmarked)))
    assert json_line[:1] == b"J"
    assert decode_spool_table(line).equals(decode_spool_table(json_line))
    # A segment holding the champion's frames and a shadow's: one table, `shadow` only on the shadow's rows.
    table = decode_spool_table(_line("3", "r1") + line).to_pandas()
    assert list(table["model_version"]) == ["3", "4"] and table["shadow"].tolist()[1] is True


def test_the_serve_config_of_a_release_pins_the_champion_and_gives_the_candidate_replicas() -> None:
    release = ReleaseConfig(strategy="canary", candidate_version="5", canary_share=0.3, release_id="5-1")
    config = dep.render_serve_config(dep.load_serve_config(), ref=ModelRef(version="4"), release=release)
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert deployments["PredictionService"]["user_config"] == {"model_name": c.REGISTERED_MODEL_NAME, "version": "4"}
    assert deployments[CANDIDATE_DEPLOYMENT_NAME]["user_config"]["version"] == "5"
    assert deployments[CANDIDATE_DEPLOYMENT_NAME]["num_replicas"] == 1
    assert deployments["PredictionIngress"]["user_config"]["strategy"] == "canary"
    idle = dep.render_serve_config(dep.load_serve_config(), ref=ModelRef(version="4"))
    entries = {d["name"]: d for d in idle["applications"][0]["deployments"]}
    assert "num_replicas" not in entries[CANDIDATE_DEPLOYMENT_NAME]  # the code's scale-to-zero
    assert entries["PredictionIngress"]["user_config"]["strategy"] == "direct"
    assert (bucket(dep.sticky_key_for(release, True)) < 0.3) and (bucket(dep.sticky_key_for(release, False)) >= 0.3)


# --- comparison and decision -------------------------------------------------------------------


def _log_and_labels(n: int, accuracy: dict[str, float], shadow: bool, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Champion "1" answers n records; candidate "2" mirrors them (shadow) or answers its own n (canary)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice([-1, 1], size=n)
    frames = []
    for version, acc in accuracy.items():
        right = rng.uniform(size=n) < acc
        label = np.where(right, truth, -truth)
        p = np.where(label == -1, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.4, n))
        ids = [f"r{i}" if shadow or version == "1" else f"c{i}" for i in range(n)]
        frames.append(pd.DataFrame({"timestamp": pd.Timestamp("2026-03-01", tz="UTC"), "request_id": ids,
                                    "record_index": 0, "model_version": version, "label": label,
                                    "phishing_probability": p, "shadow": shadow and version == "2"}))
    log = pd.concat(frames, ignore_index=True)
    ids = [f"r{i}" for i in range(n)] + ([] if shadow else [f"c{i}" for i in range(n)])
    labels = pd.DataFrame({"request_id": ids, "record_index": 0,
                           "label": list(truth) + ([] if shadow else list(truth)), "labelled_at": "2026-03-01T02:00:00Z"})
    return log, labels


TERMS = cmp.ReleaseTerms(min_requests=300, min_duration_s=600, max_metric_drop=0.02, max_error_rate_delta=0.01,
                         min_labelled=200)
START = datetime(2026, 3, 1, tzinfo=UTC)


def _compare(log: pd.DataFrame, labels: pd.DataFrame, strategy: str, **kw: object) -> cmp.ReleaseComparison:
    return cmp.compare_release(log, labels, strategy=strategy, champion_version="1", candidate_version="2",
                               positive_class=-1, label_values=[-1, 1], **kw)  # type: ignore[arg-type]


def test_a_shadow_is_compared_on_the_same_rows_and_a_better_candidate_promoted_after_its_time() -> None:
    log, labels = _log_and_labels(500, {"1": 0.85, "2": 0.95}, shadow=True)
    result = _compare(log, labels, "shadow")
    assert result.paired_rows == 500 and 0.7 < (result.agreement or 0) < 0.95
    assert result.candidate.realized["accuracy"] > result.champion.realized["accuracy"]
    early = cmp.release_decision(result, TERMS, START, START + timedelta(seconds=60))
    assert early.action == "wait" and "60 of 600 s" in early.reasons[0]
    late = cmp.release_decision(result, TERMS, START, START + timedelta(seconds=700))
    assert late.action == "promote" and late.evidence == "labels"


def test_a_worse_canary_is_ended_as_soon_as_it_has_its_requests_without_labels_on_the_estimate() -> None:
    log, labels = _log_and_labels(400, {"1": 0.95, "2": 0.95}, shadow=False)
    # Without labels the estimate decides: make the candidate's scores uncertain (estimated accuracy ~0.6).
    worse = log["model_version"] == "2"
    log.loc[worse, "phishing_probability"] = np.where(log.loc[worse, "label"] == -1, 0.6, 0.4)
    result = _compare(log, labels.iloc[:0], "canary")
    decision = cmp.release_decision(result, TERMS, START, START + timedelta(seconds=30))
    assert decision.action == "abort" and decision.evidence == "estimate"
    assert "estimated accuracy" in decision.reasons[0]
    few = _compare(log.iloc[:500], labels.iloc[:0], "canary")  # the candidate's first 100 requests only
    assert cmp.release_decision(few, TERMS, START, START + timedelta(seconds=30)).action == "wait"


def test_a_candidate_failing_more_often_than_the_champion_is_ended() -> None:
    log, labels = _log_and_labels(400, {"1": 0.9, "2": 0.9}, shadow=False)
    counts = {"champion": cmp.ServedCounts(1000, 0), "candidate": cmp.ServedCounts(380, 20)}
    decision = cmp.release_decision(_compare(log, labels, "canary", counts=counts), TERMS, START,
                                    START + timedelta(seconds=700))
    assert decision.action == "abort" and "error rate" in decision.reasons[0]


def test_release_counters_are_read_per_role_from_the_prometheus_text() -> None:
    text = "\n".join([
        'ray_mlops_serving_release_answers_total{role="candidate",version="2",status="200"} 90',
        'ray_mlops_serving_release_answers_total{role="candidate",version="none",status="503"} 10',
        'ray_mlops_serving_release_answers_total{role="champion",version="1",status="200"} 300',
        'ray_mlops_serving_release_latency_ms_bucket{role="champion",le="10.0"} 280',
        'ray_mlops_serving_release_latency_ms_bucket{role="champion",le="20.0"} 299',
        'ray_mlops_serving_release_latency_ms_bucket{role="champion",le="+Inf"} 300', ""])
    parsed = cmp.parse_release_counters(text)
    assert parsed["candidate"][:2] == (90, 10) and parsed["champion"][:2] == (300, 0)
    counts = cmp.counts_since(parsed, {"candidate": (40, 0, {})})
    assert counts["candidate"].answered == 50 and counts["candidate"].error_rate == pytest.approx(10 / 60)
    assert counts["champion"].latency_p95_ms == 20.0


# --- the registry's record of a release ---------------------------------------------------------


def test_a_release_moves_the_aliases_and_leaves_events_that_status_history_lists(tmp_path: Path, spec) -> None:
    from mlops_assets.registry import governance, model_store, releases
    from mlops_assets_tests.registry_support import register_simulated_versions

    tracking_uri, client, _ = register_simulated_versions(
        tmp_path, spec, model_name="m", experiment="e", seeds_and_iterations=[(1, 5), (2, 5), (3, 5)], n_rows=300)
    model_store.promote_to_champion(client, "m", "1")
    model_store.promote_to_champion(client, "m", "2")  # what registered_model does when the gate passes
    releases.begin_release(client, "m", candidate="2", champion="1", strategy="shadow", release_id="2-1")
    assert model_store.alias_version(client, "m", c.ALIAS_CHAMPION) == "1"  # the serving version stays champion
    assert model_store.alias_version(client, "m", releases.ALIAS_CANDIDATE) == "2"
    assert model_store.alias_version(client, "m", c.ALIAS_PREVIOUS_CHAMPION) is None  # as before version 2
    releases.promote_release(client, "m", candidate="2", release_id="2-1", reasons=["matched"])
    assert model_store.alias_version(client, "m", c.ALIAS_CHAMPION) == "2"
    assert model_store.alias_version(client, "m", c.ALIAS_PREVIOUS_CHAMPION) == "1"
    assert model_store.alias_version(client, "m", releases.ALIAS_CANDIDATE) is None
    releases.begin_release(client, "m", candidate="3", champion="2", strategy="canary", release_id="3-1")
    releases.abort_release(client, "m", candidate="3", release_id="3-1", reasons=["trails"])
    assert model_store.alias_version(client, "m", c.ALIAS_CHAMPION) == "2"
    text = governance.format_history("m", governance.history_rows(client, "m"))
    for action in ("release-start", "release-promote", "release-abort"):
        assert action in text
    assert "release_id=3-1" in text and "reasons=trails" in text


def test_release_comparison_materializes_one_hour_with_numeric_metadata(tmp_path: Path) -> None:
    import dagster as dg

    from mlops_assets.defs.monitoring.release import release_comparison
    from mlops_assets.defs.resources import (
        MlflowResource,
        MonitoringResource,
        PlatformResource,
        RayServeResource,
    )
    from mlops_assets.serving.prediction_log import write_part

    log, labels = _log_and_labels(300, {"1": 0.85, "2": 0.95}, shadow=True)
    hour = pd.Timestamp("2026-03-01T10:00:00Z")
    rows = log.rename(columns={"timestamp": "logged_at", "phishing_probability": "probability"}).assign(
        logged_at=hour + pd.Timedelta(minutes=5))
    write_part(rows.to_dict("records"), str(tmp_path / "predictions"), "part-test.parquet")
    (tmp_path / "labels").mkdir()
    labels.to_csv(tmp_path / "labels" / "labels.csv", index=False)
    (tmp_path / "mlflow").mkdir()
    result = dg.materialize([release_comparison], partition_key="2026-03-01-10:00", resources={
        "platform": PlatformResource.at(str(tmp_path)),
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"),
        "ray_serve": RayServeResource(dashboard_url="http://127.0.0.1:9", serve_url="http://127.0.0.1:9"),
        "monitoring": MonitoringResource.at(str(tmp_path))})
    assert result.success
    [event] = result.asset_materializations_for_node("release_comparison")
    meta = {k: getattr(v, "value", v) for k, v in event.metadata.items()}
    assert meta["compared"] is True and meta["strategy"] == "shadow"
    assert meta["champion_version"] == "1" and meta["candidate_version"] == "2"
    assert meta["paired_rows"] == 300 and 0.7 < meta["agreement_rate"] < 0.95
    assert meta["candidate_accuracy"] > meta["champion_accuracy"] and "candidate_estimated_accuracy" in meta


def test_the_hourly_monitoring_job_compares_a_release_and_skips_an_hour_without_one(tmp_path: Path) -> None:
    """The monitoring job (what the hourly schedule runs) holds release_comparison: on a real instance, an
    hour with a shadow's rows is materialized for its partition; an hour without a release is skipped
    (no materialization, the run succeeds) and the run log says why."""
    import dagster as dg

    from mlops_assets.defs.monitoring.assets import drift_report, online_performance, production_profiles
    from mlops_assets.defs.monitoring.release import release_comparison
    from mlops_assets.defs.monitoring.sensors import monitoring_job, monitoring_schedule
    from mlops_assets.defs.resources import (
        MlflowResource,
        MonitoringResource,
        PlatformResource,
        RayServeResource,
    )
    from mlops_assets.serving.prediction_log import write_part

    log, labels = _log_and_labels(300, {"1": 0.85, "2": 0.95}, shadow=True)
    hour = pd.Timestamp("2026-03-01T10:00:00Z")
    rows = log.rename(columns={"timestamp": "logged_at", "phishing_probability": "probability"}).assign(
        logged_at=hour + pd.Timedelta(minutes=5))
    write_part(rows.to_dict("records"), str(tmp_path / "predictions"), "part-test.parquet")
    (tmp_path / "labels").mkdir()
    labels.to_csv(tmp_path / "labels" / "labels.csv", index=False)
    (tmp_path / "mlflow").mkdir()
    defs = dg.Definitions(
        assets=[production_profiles, drift_report, online_performance, release_comparison], jobs=[monitoring_job],
        schedules=[monitoring_schedule], resources={
            "platform": PlatformResource.at(str(tmp_path)),
            "mlflow": MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"),
            # no cluster answers: no live release, so only the windows' own rows say whether one ran
            "ray_serve": RayServeResource(dashboard_url="http://127.0.0.1:9", serve_url="http://127.0.0.1:9"),
            "monitoring": MonitoringResource.at(str(tmp_path))})
    job = defs.resolve_job_def("monitoring")
    key = dg.AssetKey("release_comparison")
    assert key in job.asset_layer.executable_asset_keys
    assert defs.resolve_schedule_def("periodic_monitoring").job_name == "monitoring"
    with dg.instance_for_test() as instance:
        shadowed = job.execute_in_process(instance=instance, partition_key="2026-03-01-10:00", asset_selection=[key])
        quiet = job.execute_in_process(instance=instance, partition_key="2026-03-01-11:00", asset_selection=[key])
        assert shadowed.success and quiet.success
        [event] = shadowed.asset_materializations_for_node("release_comparison")
        assert event.partition == "2026-03-01-10:00" and event.metadata["compared"].value is True
        assert event.metadata["candidate_version"].value == "2"
        assert quiet.asset_materializations_for_node("release_comparison") == []
        messages = [e.user_message for e in instance.all_logs(quiet.run_id)]
        assert any("release_comparison skipped: no release in progress and no second version answered in "
                   "2026-03-01-11:00" in m for m in messages)
        materialized = instance.get_materialized_partitions(key)
        assert materialized == {"2026-03-01-10:00"}


def test_the_release_command_says_when_there_is_no_cluster_to_ask(monkeypatch, capsys) -> None:
    import socket

    from mlops_assets.tools.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLOPS_API_TOKEN", "t")
    for action in ("status", "abort"):
        assert main(["release", action, "--dashboard-url", closed, "--endpoint", closed]) == 1
        err = capsys.readouterr().err
        assert f"the Ray dashboard at {closed} did not answer" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["release", "rollout"])


def test_a_mirror_carries_the_champions_frames_but_the_call_to_a_candidate_replica_does_not() -> None:
    """The ingress scoring a mirror reads the features from the champion's frame; the Serve call to a
    candidate replica (which parses the body itself) does not carry them."""
    from mlops_assets.serving.release import batch_call

    queued: list[ForwardedRequest] = []

    async def send(batch: list[ForwardedRequest]) -> list[ForwardedResponse]:
        queued.extend(batch)
        return [ForwardedResponse(200, [], b'{"model_version":"2"}') for _ in batch]

    router = ReleaseRouter(Deployment("1"), Deployment("2"), send_mirrors=send)
    router.reconfigure({"strategy": "shadow", "candidate_version": "2"})
    _route(router, [_request(i) for i in range(3)])
    assert len(queued) == 3
    for i, mirror in enumerate(queued):
        [(frame, rows)] = mirror.champion_lines
        [row] = decode_spool(frame)
        assert rows == 1 and (row["request_id"], row["model_version"]) == (f"req-{i}", "1")

    class Remote:
        def __init__(self) -> None:
            self.sent: list[ForwardedRequest] = []

        async def remote(self, batch: list[ForwardedRequest]) -> list[ForwardedResponse]:
            self.sent.extend(batch)
            return []

    class Handle:
        handle_many = Remote()

    handle = Handle()
    asyncio.run(batch_call(handle)(queued))
    assert [r.request_id for r in handle.handle_many.sent] == ["req-0", "req-1", "req-2"]
    assert all(r.champion_lines == [] for r in handle.handle_many.sent)


def test_the_answering_version_is_read_from_the_answer_without_parsing_when_it_is_known() -> None:
    from mlops_assets.serving.release import _version_of

    assert _version_of(ForwardedResponse(200, [], b'{"model_version": "3"}')) == "3"
    # Made in this process: the version it carries wins, the body is not read (here it cannot be).
    assert _version_of(ForwardedResponse(200, [], b"not json", model_version="4")) == "4"
    assert _version_of(ForwardedResponse(503, [], b"", model_version="4")) == "none"
