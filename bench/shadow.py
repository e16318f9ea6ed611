"""Shadow benchmark: what a shadow release adds to the champion's latency, in interleaved rounds of one run.

One Ray head on loopback (the shipped default: token auth, HAProxy ingress, tools/ray_cluster.py),
one application deployed from deploy/serve_config.yaml through deployment/rollout.py, serving a
champion trained with the platform's trainer (bench/serving.py's `prepare`); a second version,
trained on other simulated rows, goes out beside it as a shadow (`rollout.start_release`, one
candidate replica). The same replicas are then measured under two ingress strategies, switched by
a `reconfigure` of the ingress's user_config only (no replica restarts; the candidate replica stays
up in both):

- `direct`: the champion answers, the candidate is idle (today's behaviour, no release);
- `shadow`: the champion answers, and each answered request is also scored by the candidate off
  the request path (serving/release.py: mirrors queued in the ingress in batches of the release's
  default size and wait, each batch scored by the ingress itself with the candidate's version
  loaded beside the champion's, the shipped `ingress_scores`), its answer logged with `shadow = true`.

Each round measures both strategies, the order alternating per round (direct, shadow, then shadow,
direct, ...), each at every concurrency with the same clients (closed loop, single-record bodies,
bench/common.py's load generator): the machine's load (2 cores shared with other work) hits both
alike. Figures are medians over rounds; the ratio is shadow / direct. The candidate's answers are
counted from the ingress's release metrics at the end, so a run where the mirror did not happen
shows it.
Run: `python -m bench.shadow [--quick] [--json bench/results/shadow.json]`; `python -m bench.report`
renders bench/RESULTS.md from bench/results/*.json.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    HOST,
    LoadResult,
    code_version,
    emit,
    format_table,
    json_check,
    machine,
    median,
    run_load,
)
from bench.serving import MODEL_NAME, Setup, Target, deploy_shipped, prepare, ray_head, replica_env

COMMAND = "python -m bench.shadow --json bench/results/shadow.json"
STRATEGIES = ("direct", "shadow")
CONCURRENCY = (1, 8)
RECORDS = 1
GOAL = 1.05  # "a few percent": shadow / direct at most this, on p50 and p95 latency
RELEASE_ID = "bench-shadow"


@dataclass(frozen=True)
class Budget:
    rounds: int
    max_requests: int
    max_seconds: float

    @staticmethod
    def of(quick: bool, rounds: int | None = None) -> Budget:
        base = Budget(2, 500, 1.0) if quick else Budget(6, 4000, 4.0)
        return replace(base, rounds=rounds) if rounds else base


def register_candidate(setup: Setup, rows: int = 6000, seed: int = 1042) -> tuple[str, list[float]]:
    """A second version of the same model, trained on other simulated rows; (version, its sample answers)."""
    import mlflow
    from mlflow import MlflowClient

    from mlops_assets.deployment import rollout as dep
    from mlops_assets.registry import model_store
    from mlops_assets.tools.simulator import SimulationConfig, simulate_records
    from mlops_assets.training.tracking import use_tracking_uri
    from mlops_assets.training.train import TARGET_COLUMN, TrainingParams, train_model

    spec = setup.spec
    frame = simulate_records(spec, SimulationConfig(n_rows=rows, seed=seed))
    frame[TARGET_COLUMN] = (frame[spec.label] == spec.positive_class).astype(int)
    result = train_model(frame, spec.feature_names, TrainingParams())
    client = MlflowClient(tracking_uri=setup.tracking_uri)
    with use_tracking_uri(setup.tracking_uri):
        experiment = mlflow.get_experiment_by_name("bench").experiment_id
        with mlflow.start_run(experiment_id=experiment) as run:
            info = model_store.log_catboost_model(result.model, input_example=frame[spec.feature_names].head(5))
        mv = model_store.register_version(client, MODEL_NAME, run_id=run.info.run_id, model_uri=info.model_uri,
                                          tags={"decision_threshold": "0.5", "feature_version": "bench",
                                                "data_version": "bench-candidate",
                                                "trained_at": "2026-01-01T00:00:00+00:00"})
    loaded = model_store.load_verified_model(setup.tracking_uri, MODEL_NAME, version=str(mv.version))
    return str(mv.version), dep.offline_probabilities(loaded.model, setup.sample, spec)


def start_shadow(setup: Setup, target: Any, candidate: str, expected: Sequence[float], log: Any) -> Any:
    """The shadow release of `candidate` beside the deployed champion, through rollout (its checks)."""
    from mlops_assets.deployment import rollout as dep
    from mlops_assets.serving.release import ReleaseConfig

    release = ReleaseConfig(strategy="shadow", candidate_version=candidate, release_id=RELEASE_ID,
                            started_at=datetime.now(UTC).isoformat())
    result = dep.start_release(target=target, tracking_uri=setup.tracking_uri, spec=setup.spec, model_name=MODEL_NAME,
                               release=release, records=setup.sample, expected=expected, env_vars=replica_env(setup),
                               candidate_replicas=1)
    log(f"  shadow of version {candidate} beside champion {result.champion_version} in {result.seconds:.0f}s")
    return result.release


def set_strategy(target: Any, release: Any, strategy: str, timeout_s: float = 180.0) -> float:
    """Switch the ingress to `strategy` (the shadow release, or direct with the candidate kept); seconds."""
    from mlops_assets.deployment import rollout as dep
    from mlops_assets.serving.app import INGRESS_DEPLOYMENT_NAME
    from mlops_assets.serving.release import CHAMPION_REF_KEY, ReleaseConfig

    wanted = release if strategy == "shadow" else ReleaseConfig()
    start = time.monotonic()

    def edit(app: dict[str, Any]) -> None:
        for deployment in app.get("deployments") or []:
            if deployment.get("name") == INGRESS_DEPLOYMENT_NAME:
                # The champion's ModelRef stays, as every rollout keeps it (release.ingress_user_config):
                # the ingress answers the champion and, in a shadow, scores the mirrors with it beside.
                champion = (deployment.get("user_config") or {}).get(CHAMPION_REF_KEY)
                deployment["user_config"] = {**wanted.to_user_config(),
                                             **({CHAMPION_REF_KEY: champion} if champion else {})}

    dep.submit(target, dep._edit_live(target, edit))
    dep._wait_release(target, wanted, timeout_s, candidate_running=True)
    return time.monotonic() - start


_DROPPED = re.compile(r"^(?:ray_)?mlops_serving_release_shadow_dropped_total(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.M)


def shadow_counts(metrics_url: str) -> dict[str, int]:
    """The candidate's mirrored answers, failures and drops, from the head's Prometheus endpoint."""
    from mlops_assets.monitoring.comparison import parse_release_counters

    text = httpx.get(metrics_url, timeout=10, trust_env=False).text
    counters = parse_release_counters(text)
    answered, failed, _ = counters.get("shadow", (0, 0, {}))
    champion, _, _ = counters.get("champion", (0, 0, {}))
    dropped = int(sum(float(x) for x in _DROPPED.findall(text)))
    return {"shadow_answered": answered, "shadow_failed": failed, "shadow_dropped": dropped,
            "champion_answers_in_shadow": champion}


def measure(setup: Setup, target: Any, release: Any, port: int, budget: Budget, log: Any) -> list[dict[str, Any]]:
    """Every round: both strategies (order alternating), each at every concurrency; one record per load."""
    requests = Target("ours", port, "/predict", "records", auth=True).requests(setup, RECORDS)  # bearer token on
    out: list[dict[str, Any]] = []
    current = "shadow"  # start_release left the shadow on
    for round_no in range(1, budget.rounds + 1):
        order = STRATEGIES if round_no % 2 else tuple(reversed(STRATEGIES))
        for strategy in order:
            switch_s = set_strategy(target, release, strategy) if strategy != current else 0.0
            current = strategy
            for conc in CONCURRENCY:
                r: LoadResult = run_load(strategy, HOST, port, requests, records=RECORDS, concurrency=conc,
                                         max_requests=budget.max_requests, max_seconds=budget.max_seconds,
                                         warmup=max(20, 4 * conc), check=json_check("predictions", RECORDS))
                load = machine()["loadavg"]
                out.append({"round": round_no, "strategy": strategy, "concurrency": conc, "ok": r.ok,
                            "failed": r.failed, "rps": round(r.throughput, 1), "p50_ms": round(r.ms(50), 3),
                            "p95_ms": round(r.ms(95), 3), "p99_ms": round(r.ms(99), 3), "loadavg": load,
                            "switch_s": round(switch_s, 1)})
                log(f"  round {round_no} {strategy:6s} c={conc:2d} {r.throughput:7.1f} req/s  p50 {r.ms(50):6.2f} ms  "
                    f"p95 {r.ms(95):6.2f} ms  failed {r.failed}  load {load}")
    return out


def summarize(per_round: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per strategy and concurrency: medians over rounds; per concurrency: shadow / direct)."""
    table, ratios = [], []
    for conc in CONCURRENCY:
        cell = {}
        for strategy in STRATEGIES:
            rs = [r for r in per_round if r["strategy"] == strategy and r["concurrency"] == conc]
            if not rs:
                continue
            cell[strategy] = row = {
                "strategy": strategy, "concurrency": conc, "rounds": len(rs),
                "p50_ms": round(median([r["p50_ms"] for r in rs]), 3),
                "p95_ms": round(median([r["p95_ms"] for r in rs]), 3),
                "p99_ms": round(median([r["p99_ms"] for r in rs]), 3),
                "rps": round(median([r["rps"] for r in rs]), 1),
                "ok": sum(r["ok"] for r in rs), "failed": sum(r["failed"] for r in rs)}
            table.append(row)
        if len(cell) < 2:
            continue
        d, s = cell["direct"], cell["shadow"]
        paired = _paired(per_round, conc)
        p50, p95 = s["p50_ms"] / d["p50_ms"], s["p95_ms"] / d["p95_ms"]
        ratios.append({"concurrency": conc, "p50 x direct": round(p50, 3), "p95 x direct": round(p95, 3),
                       "p99 x direct": round(s["p99_ms"] / d["p99_ms"], 3),
                       "rps x direct": round(s["rps"] / d["rps"], 3),
                       "p50 x direct, median of rounds": round(median([x[0] for x in paired]), 3),
                       "p95 x direct, median of rounds": round(median([x[1] for x in paired]), 3),
                       "goal": f"p50 and p95 <= {GOAL}x", "met": bool(p50 <= GOAL and p95 <= GOAL)})
    return table, ratios


def _paired(per_round: Sequence[Mapping[str, Any]], conc: int) -> list[tuple[float, float]]:
    """Each round's shadow / direct (p50, p95): both measured minutes apart at most."""
    out = []
    for round_no in sorted({r["round"] for r in per_round}):
        got = {r["strategy"]: r for r in per_round if r["round"] == round_no and r["concurrency"] == conc}
        if len(got) == 2 and got["direct"]["p50_ms"] and got["direct"]["p95_ms"]:
            out.append((got["shadow"]["p50_ms"] / got["direct"]["p50_ms"],
                        got["shadow"]["p95_ms"] / got["direct"]["p95_ms"]))
    return out


def summary_text(ratios: Sequence[Mapping[str, Any]], shadow: Mapping[str, int], table: Sequence[Mapping[str, Any]]) \
        -> str:
    if not ratios:
        return "incomplete run"
    parts = []
    for r in ratios:
        d = next(t for t in table if t["strategy"] == "direct" and t["concurrency"] == r["concurrency"])
        parts.append(f"c={r['concurrency']}: p50 {r['p50 x direct']:.3f}x direct ({d['p50_ms']:.2f} ms direct), "
                     f"p95 {r['p95 x direct']:.3f}x, throughput {r['rps x direct']:.3f}x")
    mirrored = shadow.get("shadow_answered", 0)
    return (f"shadow / direct, medians over rounds: {'; '.join(parts)}; the candidate answered {mirrored} mirrors "
            f"({shadow.get('shadow_dropped', 0)} dropped, {shadow.get('shadow_failed', 0)} failed)")


def run(quick: bool, root: Path, log: Any = print, rounds: int | None = None) -> dict[str, Any]:
    budget = Budget.of(quick, rounds)
    started = time.monotonic()
    at_start = machine()
    log(f"shadow benchmark ({'quick' if quick else 'full'}): {budget.rounds} round(s), loads of up to "
        f"{budget.max_requests} requests or {budget.max_seconds}s; load average {at_start['loadavg']}")
    setup = prepare(root)
    candidate, expected = register_candidate(setup)
    log(f"  champion version {setup.version}, candidate version {candidate}")
    with ray_head(setup, "haproxy", log) as (target, cluster):
        deploy_shipped(setup, target, log)
        release = start_shadow(setup, target, candidate, expected, log)
        metrics_url = f"http://{HOST}:{cluster.metrics_export_port}/metrics"
        per_round = measure(setup, target, release, cluster.serve_http_port, budget, log)
        time.sleep(15)  # Ray's metrics agent exports every few seconds: the last loads' counters arrive
        shadow = shadow_counts(metrics_url)
    shadow_requests = sum(r["ok"] + r["failed"] for r in per_round if r["strategy"] == "shadow")
    table, ratios = summarize(per_round)
    return {
        "title": "Shadow release: the champion's latency with and without a candidate scoring mirrors",
        "command": COMMAND + (" --quick" if quick else "") + (f" --rounds {rounds}" if rounds else ""),
        "code_version": code_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**at_start, "loadavg_end": machine()["loadavg"]},
        "quick": quick, "budget": vars(budget), "records_per_request": RECORDS,
        "champion_version": setup.version, "candidate_version": candidate,
        "table": table, "ratios": ratios, "per_round": per_round,
        "shadow": {**shadow, "measured_requests_in_shadow": shadow_requests},
        "summary": summary_text(ratios, shadow, table),
        "seconds": round(time.monotonic() - started, 1),
    }


def report(out: Mapping[str, Any]) -> str:
    parts = [f"## {out['title']}", "", f"`{out['command']}` at {out.get('code_version')}: {out.get('summary')}", "",
             format_table(out["table"]), "", format_table(out["ratios"]), ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shadow", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two rounds of short loads (a smoke run)")
    parser.add_argument("--rounds", type=int, help="rounds (default 6; 2 with --quick)")
    parser.add_argument("--json", help="write the results to this file (bench/results/shadow.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (model, logs)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mlops-bench-shadow-"))
    try:
        out = run(args.quick, root, rounds=args.rounds if args.rounds != Budget.of(args.quick).rounds else None)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    emit(report(out), dict(out), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
