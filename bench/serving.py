"""Serving benchmark: our shipped Ray Serve endpoint against its fair peers, in interleaved rounds of one run.

Everything runs at once on loopback (127.0.0.1, free ports), serving one model trained with the
platform's trainer and registered in a throwaway SQLite MLflow store:

- `ours`: the shipped default, as `make demo` / `make up` start it: a real Ray head with token auth
  (tools/ray_cluster.py, its default Serve ingress: HAProxy through the loopback wrapper of
  tools/serve_ingress.py) and a real deployment of deploy/serve_config.yaml through
  deployment/rollout.py (load-and-query check, live check), with the bearer token, validation,
  Prometheus metrics and the prediction log on;
- `mlflow`: `mlflow models serve --env-manager local --workers N`, N = our scoring replicas;
- `fastapi`: bench/bare_app.py under `uvicorn --workers N`: the same work per request (token,
  validation, scoring call, response, prediction log) without Ray;
- levers, each the shipped default with one thing turned off: on Ray heads of their own, `ours: Ray's
  Python proxy` (no HAProxy) and `ours: HAProxy at Ray's defaults` (four threads, a log datagram per
  request to Ray's HAProxyManager) and, as applications of their own beside the shipped one on its head,
  `ours: no prediction log`, `ours: no batching`, `ours: user code on a second thread` (Ray's default).

Each round measures every cell (records x concurrency) on every target, in a shuffled target order,
one after another: the machine's load (shared 2 cores) hits all targets alike. Figures are the
median over rounds. Loads are closed-loop and bounded by a request count and a time limit.
Run: `python -m bench.serving [--quick] [--json bench/results/serving.json]`; `python -m bench.report`
renders bench/RESULTS.md from bench/results/*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    HOST,
    LoadResult,
    code_version,
    emit,
    encode_post,
    format_table,
    free_port,
    json_check,
    machine,
    median,
    run_load,
    wait_http,
)

TOKEN = "bench-token-0123456789abcdef"
MODEL_NAME = "phishing-classifier-bench"
CONCURRENCY = (1, 8, 32, 64)
RECORDS = (1, 100)
CELLS = tuple((n, c) for n in RECORDS for c in CONCURRENCY)
LEVER_CELLS = ((1, 1), (1, 8), (1, 32), (100, 8))
SHIPPED = "ours"
PEERS = ("mlflow", "fastapi")
# (label, Serve ingress, head env): levers that need a Ray head of their own
HEAD_LEVERS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("ours: Ray's Python proxy", "proxy", {}),
    ("ours: HAProxy at Ray's defaults", "haproxy",
     {"RAY_SERVE_HAPROXY_NBTHREAD": "4", "RAY_SERVE_HAPROXY_METRICS_ENABLED": "1"}),
)
# (label, app args, replica env, deployment overrides): each the shipped config with one lever off
APP_LEVERS: tuple[tuple[str, dict[str, Any], dict[str, str], dict[str, Any]], ...] = (
    ("ours: no prediction log", {"prediction_log": False}, {}, {}),
    ("ours: no batching", {"batch_max_size": 1}, {}, {}),
    ("ours: user code on a second thread", {}, {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}, {}),
    # a candidate, not shipped: a Ray setting measured beside the shipped default before choosing
    ("candidate: handle router on the replica's loop", {}, {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}, {}),
    ("candidate: no batching, router on the replica's loop", {"batch_max_size": 1},
     {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}, {}),
    ("candidate: no batching, router on the replica's loop, user code on a second thread", {"batch_max_size": 1},
     {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}, {}),
    ("candidate: no access log", {}, {}, {"logging_config": {"enable_access_log": False}}),
    ("ours: log parts of 5,000 rows", {"log_flush_rows": 5000}, {}, {}),  # the shipped default before eab62c7
    # every request through a scoring replica (a handle call), as before the ingress scored itself
    ("ours: the ingress does not score", {"ingress_scores": False}, {}, {}),
)
REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m bench.serving --json bench/results/serving.json"


@dataclass(frozen=True)
class Budget:
    rounds: int
    max_requests: int
    max_seconds: float
    warmup_seconds: float

    @staticmethod
    def of(quick: bool, rounds: int | None = None) -> Budget:
        budget = Budget(1, 400, 0.8, 0.3) if quick else Budget(3, 3000, 2.5, 0.5)
        return budget if rounds is None else Budget(rounds, budget.max_requests, budget.max_seconds,
                                                    budget.warmup_seconds)


@dataclass
class Setup:
    root: Path
    tracking_uri: str
    version: str
    spec: Any
    model: Any  # CatBoostClassifier, as the registry holds it
    model_path: Path
    pool: list[dict[str, int]]  # records to draw requests from
    sample: list[dict[str, int]]  # deployment check records
    expected: list[float]


def prepare(root: Path, rows: int = 6000, seed: int = 42) -> Setup:
    """Simulate data, train with the platform's trainer, log, register and promote one version."""
    import mlflow
    from mlflow import MlflowClient

    from mlops_assets.core.dataset_spec import default_spec
    from mlops_assets.deployment import rollout as dep
    from mlops_assets.registry import model_store
    from mlops_assets.tools.simulator import SimulationConfig, simulate_records
    from mlops_assets.training.tracking import use_tracking_uri
    from mlops_assets.training.train import TARGET_COLUMN, TrainingParams, train_model

    spec = default_spec()
    (root / "mlflow").mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    frame = simulate_records(spec, SimulationConfig(n_rows=rows, seed=seed))
    frame[TARGET_COLUMN] = (frame[spec.label] == spec.positive_class).astype(int)
    result = train_model(frame, spec.feature_names, TrainingParams())
    client = MlflowClient(tracking_uri=tracking_uri)
    with use_tracking_uri(tracking_uri):
        experiment = mlflow.create_experiment("bench", artifact_location=(root / "mlflow" / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            info = model_store.log_catboost_model(result.model, input_example=frame[spec.feature_names].head(5))
        mv = model_store.register_version(client, MODEL_NAME, run_id=run.info.run_id, model_uri=info.model_uri,
                                          tags={"decision_threshold": "0.5", "feature_version": "bench",
                                                "data_version": "bench", "trained_at": "2026-01-01T00:00:00+00:00"})
    model_store.promote_to_champion(client, MODEL_NAME, str(mv.version))
    loaded = model_store.load_verified_model(tracking_uri, MODEL_NAME, version=str(mv.version))
    model_path = root / "model.cbm"
    loaded.model.save_model(str(model_path), format="cbm")
    traffic = simulate_records(spec, SimulationConfig(n_rows=2000, seed=seed + 1))
    pool = dep.sample_records(traffic, spec, 2000)
    sample = pool[:64]
    return Setup(root, tracking_uri, str(mv.version), spec, loaded.model, model_path, pool, sample,
                 dep.offline_probabilities(loaded.model, sample, spec))


def bodies(setup: Setup, n_records: int, wrap: str, count: int = 32) -> list[bytes]:
    """`count` distinct JSON bodies of `n_records` records each, as `{wrap: [...]}`."""
    out = []
    for i in range(count):
        start = (i * n_records) % (len(setup.pool) - n_records)
        out.append(json.dumps({wrap: setup.pool[start:start + n_records]}).encode())
    return out



def replica_env(setup: Setup) -> dict[str, str]:
    """Everything replicas read, pinned to this run (a user's .env, exported by make, must not leak in)."""
    import mlops_assets

    spec_path = Path(mlops_assets.__file__).parent / "core" / "datasets" / "phishing_websites.json"
    return {"MLFLOW_TRACKING_URI": setup.tracking_uri, "MLOPS_DATA_URL": str(setup.root / "data"),
            "MLOPS_PREDICTION_LOG_URL": str(setup.root / "data" / "predictions"), "MLOPS_DATASET_SPEC": str(spec_path)}



@contextlib.contextmanager
def subprocess_server(cmd: Sequence[str], env: Mapping[str, str], port: int, ready_path: str,
                      log_file: Path, timeout_s: float = 120) -> Iterator[subprocess.Popen[bytes]]:
    # The venv's bin first: `mlflow models serve` runs `uvicorn` from PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(list(cmd), env={**os.environ, "PATH": path, **env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(HOST, port, ready_path, timeout_s, proc=proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)


def bin_path(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)




# --- targets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    path: str
    wrap: str  # the body's key: "records" (ours) or "dataframe_records" (mlflow)
    auth: bool
    cells: tuple[tuple[int, int], ...] = CELLS

    def requests(self, setup: Setup, n_records: int) -> list[bytes]:
        headers = {"Authorization": f"Bearer {TOKEN}"} if self.auth else {}
        return [encode_post(HOST, self.port, self.path, b, headers) for b in bodies(setup, n_records, self.wrap)]


@contextlib.contextmanager
def ray_head(setup: Setup, ingress: str, log: Any, env: Mapping[str, str] | None = None) -> Iterator[tuple[Any, Any]]:
    """A Ray head on loopback (free ports) with Serve's `ingress` ("haproxy", the default, or "proxy"),
    `env` over what tools/ray_cluster.py gives it."""
    from mlops_assets.deployment import rollout as dep
    from mlops_assets.tools.ray_cluster import ClusterConfig, auth_env, ensure_token, start_head, stop_head

    state = Path(tempfile.mkdtemp(prefix=f"ray-{ingress}-", dir=setup.root))
    cluster = ClusterConfig(
        port=free_port(), dashboard_port=free_port(), metrics_export_port=free_port(), serve_http_port=free_port(),
        state_dir=str(state), client_server_port=free_port(), dashboard_agent_port=free_port(),
        dashboard_agent_grpc_port=free_port(), runtime_env_agent_port=free_port(),
        dashboard_metrics_port=free_port(), autoscaler_metrics_port=free_port(),
        serve_ingress=None if ingress == "haproxy" else ingress,  # None: what make demo / make up get
        token_file=str(setup.root / "ray_auth_token"),  # one token for both heads: this process calls both
    )
    ensure_token(cluster)
    os.environ.update(auth_env(cluster))  # this process's deploy calls authenticate with the head's token
    target = dep.ServeTarget(cluster.dashboard_url, cluster.serve_url, token=TOKEN)
    started = time.monotonic()
    start_head(cluster, env={"MLOPS_API_TOKEN": TOKEN, **replica_env(setup), **(env or {})})
    log(f"  ray head ({cluster.effective_serve_ingress}) up in {time.monotonic() - started:.0f}s")
    try:
        yield target, cluster
    finally:
        with contextlib.suppress(Exception):
            dep.delete_app(target)
        stop_head(cluster)


def deploy_shipped(setup: Setup, target: Any, log: Any) -> float:
    """The shipped serve config through deployment/rollout.py (all its checks); seconds taken."""
    from mlops_assets.deployment import rollout as dep

    for attempt in range(1, 4):
        try:
            result = dep.deploy_version(target=target, tracking_uri=setup.tracking_uri, spec=setup.spec,
                                        version=setup.version, records=setup.sample, expected=setup.expected,
                                        model_name=MODEL_NAME, env_vars=replica_env(setup))
            break
        except dep.DeploymentError as exc:  # a fresh head's dashboard can drop a request on a busy machine
            if attempt == 3 or "Server disconnected" not in str(exc):
                raise
            log(f"  deploy attempt {attempt} failed ({str(exc)[:120]}); again in 10 s")
            time.sleep(10)
    log(f"  deployed version {result.live_version} in {result.seconds:.0f}s")
    return float(result.seconds)


def scoring_replicas() -> int:
    from mlops_assets.deployment import rollout as dep
    from mlops_assets.serving.config import DEPLOYMENT_NAME

    app = dep.load_serve_config()["applications"][0]
    return int(next(d for d in app["deployments"] if d["name"] == DEPLOYMENT_NAME).get("num_replicas", 1))


def deploy_levers(setup: Setup, target: Any, log: Any) -> list[tuple[str, str]]:
    """Every app lever as its own application (route /leverN) beside the shipped one; (label, path)."""
    from mlops_assets.deployment import rollout as dep
    from mlops_assets.serving.config import ModelRef

    live = dep.live_config(target)
    if live is None:
        raise RuntimeError("the shipped application must be deployed before the lever applications")
    apps = list(live["applications"])
    routes = []
    for i, (label, args, env, overrides) in enumerate(APP_LEVERS):
        base = dep.load_serve_config()
        for deployment in base["applications"][0]["deployments"]:
            deployment.update(overrides)
            actor = deployment.setdefault("ray_actor_options", {})
            actor["num_cpus"] = 0.01  # a scheduling figure only: every app fits beside the shipped one
            actor.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
        config = dep.render_serve_config(base, ref=ModelRef(model_name=MODEL_NAME, version=setup.version),
                                         env_vars=replica_env(setup), args=args)
        app = config["applications"][0]
        app["name"], app["route_prefix"] = f"lever{i}", f"/lever{i}"
        apps.append(app)
        routes.append((label, f"/lever{i}/predict"))
    dep.submit(target, {**live, "applications": apps})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            details = dep.serve_applications(target).get("applications") or {}
        except httpx.HTTPError:  # a busy dashboard: ask again
            time.sleep(2)
            continue
        states = {name: d.get("status") for name, d in details.items() if name.startswith("lever")}
        if len(states) == len(APP_LEVERS) and set(states.values()) == {"RUNNING"}:
            break
        if "DEPLOY_FAILED" in states.values():
            raise RuntimeError(f"a lever application failed to deploy: {states}")
        time.sleep(2)
    else:
        raise TimeoutError("lever applications not RUNNING after 600 s")
    log(f"  {len(APP_LEVERS)} lever applications running beside the shipped one")
    return routes


@contextlib.contextmanager
def peers(setup: Setup, workers: int, log: Any) -> Iterator[list[Target]]:
    """`mlflow models serve` and the bare FastAPI app, each with `workers` worker processes."""
    mlflow_port, fastapi_port = free_port(), free_port()
    mlflow_cmd = [bin_path("mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}/{setup.version}",
                  "--env-manager", "local", "-h", HOST, "-p", str(mlflow_port), "--workers", str(workers)]
    fastapi_cmd = [bin_path("uvicorn"), "bench.bare_app:app", "--host", HOST, "--port", str(fastapi_port),
                   "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    fastapi_env = {"BENCH_MODEL_PATH": str(setup.model_path), "BENCH_MODEL_VERSION": setup.version,
                   "MLOPS_API_TOKEN": TOKEN, "BENCH_LOG_URL": str(setup.root / "fastapi-predictions"),
                   "BENCH_SPOOL_DIR": str(setup.root / "fastapi-spool"), "PYTHONPATH": str(REPO)}
    with subprocess_server(mlflow_cmd, {"MLFLOW_TRACKING_URI": setup.tracking_uri}, mlflow_port, "/ping",
                           setup.root / "mlflow-serve.log"), \
            subprocess_server(fastapi_cmd, fastapi_env, fastapi_port, "/healthz", setup.root / "fastapi.log"):
        log(f"  mlflow models serve and the bare FastAPI app up, {workers} workers each")
        yield [Target("mlflow", mlflow_port, "/invocations", "dataframe_records", auth=False),
               Target("fastapi", fastapi_port, "/predict", "records", auth=True)]


# --- rounds -----------------------------------------------------------------------------------


def measure(setup: Setup, targets: Sequence[Target], budget: Budget, log: Any,
            seed: int = 7) -> dict[tuple[str, int, int], list[LoadResult]]:
    """Interleaved rounds: per round and cell, every target once, in a shuffled order."""
    rng = random.Random(seed)
    runs: dict[tuple[str, int, int], list[LoadResult]] = {}
    requests = {(t.name, n): t.requests(setup, n) for t in targets for n in RECORDS}
    for round_no in range(1, budget.rounds + 1):
        for n, conc in CELLS:
            here = [t for t in targets if (n, conc) in t.cells]
            rng.shuffle(here)
            for t in here:
                r = run_load(t.name, HOST, t.port, requests[(t.name, n)], records=n, concurrency=conc,
                             max_requests=budget.max_requests, max_seconds=budget.max_seconds,
                             warmup=max(20, 2 * conc), check=json_check("predictions", n))
                runs.setdefault((t.name, n, conc), []).append(r)
                log(f"  round {round_no} records={n:3d} c={conc:2d} {t.name:36s} {r.throughput:8.1f} req/s  "
                    f"p50 {r.ms(50):7.2f} ms  p99 {r.ms(99):7.2f} ms  failed {r.failed}")
    return runs


def summarize(runs: Mapping[tuple[str, int, int], Sequence[LoadResult]]) -> list[dict[str, Any]]:
    """One row per (target, records, concurrency): medians over rounds, each round's req/s kept."""
    rows = []
    for (name, n, conc), rs in runs.items():
        rows.append({"target": name, "records": n, "concurrency": conc,
                     "rps": round(median([r.throughput for r in rs]), 1),
                     "p50_ms": round(median([r.ms(50) for r in rs]), 2),
                     "p99_ms": round(median([r.ms(99) for r in rs]), 2),
                     "failed": sum(r.failed for r in rs), "ok": sum(r.ok for r in rs),
                     "rounds_rps": [round(r.throughput, 1) for r in rs]})
    return rows


def _cell(rows: Sequence[Mapping[str, Any]], target: str, n: int, conc: int) -> Mapping[str, Any] | None:
    return next((r for r in rows if (r["target"], r["records"], r["concurrency"]) == (target, n, conc)), None)


def _ratio(rows: Sequence[Mapping[str, Any]], a: str, b: str, n: int, conc: int) -> float:
    x, y = _cell(rows, a, n, conc), _cell(rows, b, n, conc)
    return x["rps"] / y["rps"] if x and y and y["rps"] else float("nan")


def goals(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Issue 13's targets for the shipped default, from this run's medians."""
    out = []

    def goal(what: str, value: float, wanted: str, ok: bool) -> None:
        out.append({"goal": what, "measured": round(value, 2), "wanted": wanted, "met": bool(ok)})

    for n in RECORDS:
        value = _ratio(rows, SHIPPED, "mlflow", n, 8)
        goal(f"{n} record(s), c=8: x mlflow (equal workers)", value, ">= 5", value >= 5)
    ours, mlf = _cell(rows, SHIPPED, 1, 1), _cell(rows, "mlflow", 1, 1)
    if ours and mlf:
        value = ours["p50_ms"] / mlf["p50_ms"] if mlf["p50_ms"] else float("nan")
        goal(f"1 record, c=1: p50 vs mlflow's ({ours['p50_ms']} vs {mlf['p50_ms']} ms)", value, "<= 0.5", value <= 0.5)
    for conc in (8, 32):
        value = _ratio(rows, SHIPPED, "fastapi", 1, conc)
        goal(f"1 record, c={conc}: x the bare FastAPI app (equal work)", value, ">= 0.8", value >= 0.8)
    for label, _a, _e, _o in [lever for lever in APP_LEVERS if lever[0] == "ours: no prediction log"]:
        for n, conc in LEVER_CELLS:  # the prediction log's cost
            value = 1 - _ratio(rows, SHIPPED, label, n, conc)
            goal(f"prediction log's cost, {n} record(s), c={conc}", value, "< 0.05", value < 0.05)
    return out


def table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The comparison table: each cell's targets with their ratios to mlflow, fastapi and the shipped default."""
    order = [SHIPPED, *PEERS, *(label for label, *_ in HEAD_LEVERS), *(label for label, *_ in APP_LEVERS)]
    out = []
    for n, conc in CELLS:
        for name in order:
            r = _cell(rows, name, n, conc)
            if r is None:
                continue
            out.append({"records": n, "conc": conc, "target": name, "req/s": r["rps"], "p50 ms": r["p50_ms"],
                        "p99 ms": r["p99_ms"], "failed": r["failed"],
                        "x mlflow": _ratio(rows, name, "mlflow", n, conc),
                        "x fastapi": _ratio(rows, name, "fastapi", n, conc),
                        "x ours": _ratio(rows, name, SHIPPED, n, conc)})
    return out


def parsing_micro(setup: Setup, repeats: int = 200) -> list[dict[str, Any]]:
    """In-process cost of parsing + validating a /predict body: the stdlib's json against orjson (us)."""
    import timeit

    import orjson

    from mlops_assets.serving.request import build_request_model, parse_predict_matrix

    model = build_request_model(setup.spec, 1000)
    out = []
    for n in RECORDS:
        body = bodies(setup, n, "records", count=1)[0]
        for label, fn in (("json.loads", lambda b=body: json.loads(b)), ("orjson.loads", lambda b=body: orjson.loads(b)),
                          ("parse + validate (orjson)", lambda b=body: parse_predict_matrix(b, model))):
            seconds = min(timeit.repeat(fn, number=repeats, repeat=5)) / repeats
            out.append({"records": n, "step": label, "us": round(seconds * 1e6, 1)})
    return out


# --- main -------------------------------------------------------------------------------------


def _setup_and_measure(setup: Setup, budget: Budget, workers: int, levers: bool, deploy_seconds: dict[str, float],
                       log: Any) -> tuple[dict[tuple[str, int, int], list[LoadResult]], list[Target]]:
    """Start every target (the Ray heads, the lever applications, the peers), measure, stop them all."""
    with contextlib.ExitStack() as stack:
        # Every head starts before any replica loads the machine: Ray gives a starting raylet 30 s.
        target, cluster = stack.enter_context(ray_head(setup, "haproxy", log))
        heads = [(label, *stack.enter_context(ray_head(setup, ingress, log, env)))
                 for label, ingress, env in (HEAD_LEVERS if levers else ())]
        deploy_seconds[SHIPPED] = deploy_shipped(setup, target, log)
        port = cluster.serve_http_port
        targets = [Target(SHIPPED, port, "/predict", "records", auth=True)]
        if levers:
            for label, path in deploy_levers(setup, target, log):
                targets.append(Target(label, port, path, "records", auth=True, cells=LEVER_CELLS))
        for label, head_target, head_cluster in heads:
            deploy_seconds[label] = deploy_shipped(setup, head_target, log)
            targets.append(Target(label, head_cluster.serve_http_port, "/predict", "records", auth=True,
                                  cells=LEVER_CELLS))
        targets += stack.enter_context(peers(setup, workers, log))
        return measure(setup, targets, budget, log), targets


def run(quick: bool, root: Path, log: Any = print, levers: bool = True, rounds: int | None = None) -> dict[str, Any]:
    budget = Budget.of(quick, rounds)
    started = time.monotonic()
    at_start = machine()
    log(f"serving benchmark ({'quick' if quick else 'full'}): {budget.rounds} round(s), cells of up to "
        f"{budget.max_requests} requests or {budget.max_seconds}s; load average {at_start['loadavg']}")
    setup = prepare(root)
    workers = scoring_replicas()
    log(f"  model {MODEL_NAME} version {setup.version} ({setup.model.tree_count_} trees); {workers} scoring replicas")
    deploy_seconds: dict[str, float] = {}
    for attempt in range(1, 3):  # a Ray head can die while it starts on an overloaded machine: once more
        try:
            runs, targets = _setup_and_measure(setup, budget, workers, levers, deploy_seconds, log)
            break
        except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
            if attempt == 2:
                raise
            log(f"  setting up failed ({type(exc).__name__}: {str(exc)[:160]}); starting over")
    rows = summarize(runs)
    at_end = machine()
    return {
        "title": "Serving: the shipped default against mlflow models serve and a bare FastAPI app (equal workers)",
        "command": COMMAND + (" --quick" if quick else "") + (f" --rounds {rounds}" if rounds is not None else ""),
        "code_version": code_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**at_start, "loadavg_end": at_end["loadavg"]},
        "quick": quick, "budget": vars(budget), "workers": workers,
        "targets": [t.name for t in targets], "deploy_seconds": deploy_seconds,
        "results": rows, "table": table(rows), "goals": goals(rows),
        "parsing_us": parsing_micro(setup),
        "summary": summary_text(rows),
        "seconds": round(time.monotonic() - started, 1),
    }


def summary_text(rows: Sequence[Mapping[str, Any]]) -> str:
    ours1, mlf1 = _cell(rows, SHIPPED, 1, 8), _cell(rows, "mlflow", 1, 8)
    ours100 = _cell(rows, SHIPPED, 100, 8)
    if not (ours1 and mlf1 and ours100):
        return "incomplete run"
    return (f"shipped default, c=8: {ours1['rps']:.0f} req/s with 1 record ({_ratio(rows, SHIPPED, 'mlflow', 1, 8):.1f}x "
            f"mlflow models serve, {_ratio(rows, SHIPPED, 'fastapi', 1, 8):.2f}x the bare FastAPI app), "
            f"{ours100['rps']:.0f} req/s with 100 records ({_ratio(rows, SHIPPED, 'mlflow', 100, 8):.1f}x mlflow)")


def report(out: Mapping[str, Any]) -> str:
    parts = [f"## {out['title']}", "", f"`{out['command']}` at {out.get('code_version')}: {out.get('summary')}", "",
             format_table(out["table"]), "", "Goals:", "", format_table(out["goals"]), ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of short cells (a smoke run)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 3, or 1 with --quick)")
    parser.add_argument("--no-levers", action="store_true", help="only the shipped default and its peers")
    parser.add_argument("--lever", action="append", metavar="TEXT",
                        help="only the levers whose label holds TEXT (repeatable): a shorter run to look at one")
    parser.add_argument("--json", help="write the results to this file (bench/results/serving.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (model, logs)")
    args = parser.parse_args(argv)
    if args.lever:
        global APP_LEVERS, HEAD_LEVERS
        APP_LEVERS = tuple(lever for lever in APP_LEVERS if any(text in lever[0] for text in args.lever))
        HEAD_LEVERS = tuple(lever for lever in HEAD_LEVERS if any(text in lever[0] for text in args.lever))
        if not APP_LEVERS and not HEAD_LEVERS:
            parser.error(f"--lever {args.lever} matches no lever label")
    root = Path(tempfile.mkdtemp(prefix="mlops-bench-serving-"))
    try:
        out = run(args.quick, root, levers=not args.no_levers, rounds=args.rounds)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    # The command as run (levers and rounds included), so each results file names what made it.
    out["command"] = "python -m bench.serving " + shlex.join(sys.argv[1:] if argv is None else argv)
    emit(report(out), dict(out), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
