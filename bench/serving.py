"""Serving benchmark: our Ray Serve endpoint against `mlflow models serve`, a bare FastAPI app and
the model in-process, at concurrency 1, 8, 32, 64 with 1- and 100-record requests.

Everything runs on loopback (127.0.0.1) on free ports, against one model trained with the
platform's training code and registered in a throwaway SQLite MLflow store:

- `ray` / `ray-haproxy`: a real Ray head (lib/ray_cluster.py) and a real deployment through
  lib/deployment.py (load-and-query check, declarative config, live check) of deploy/serve_config.yaml,
  with the bearer token, request validation, Prometheus metrics and the prediction log all on;
  `ray-haproxy` is the same with Ray 2.60's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1 on the head);
- `mlflow`: `mlflow models serve -m models:/<name>/<version> --env-manager local` (its defaults: 1 worker);
- `our-app-uvicorn`: our FastAPI app and ServiceCore (token, validation, prediction log) under one
  uvicorn worker without Ray (bench/our_app.py): what our request path costs before Ray's machinery;
- `fastapi`: bench/bare_app.py under uvicorn (1 worker), no auth/validation/logging: Python HTTP alone;
- `in-process`: CatBoost predict_proba on a prepared array in this process (threads = min(concurrency, cores)).

Every load is closed-loop and bounded by a request count and a time limit.
Run: `python -m bench.serving [--quick] [--levers] [--targets ray,mlflow,...]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    HOST,
    LoadResult,
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
ALL_TARGETS = ("ray", "ray-haproxy", "mlflow", "our-app-uvicorn", "fastapi", "in-process")
RAY_INGRESS = {"ray": "proxy", "ray-haproxy": "haproxy", "ray-proxy-grpc": "proxy-grpc"}
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Budget:
    max_requests: int
    max_seconds: float
    warmup: int

    @staticmethod
    def of(quick: bool) -> Budget:
        return Budget(600, 1.5, 20) if quick else Budget(4000, 4.0, 50)


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


def http_grid(name: str, port: int, path: str, setup: Setup, wrap: str, budget: Budget,
              headers: Mapping[str, str] | None = None, log: Any = print) -> list[LoadResult]:
    results = []
    for n in RECORDS:
        reqs = [encode_post(HOST, port, path, b, dict(headers or {})) for b in bodies(setup, n, wrap)]
        for conc in CONCURRENCY:
            r = run_load(name, HOST, port, reqs, records=n, concurrency=conc, max_requests=budget.max_requests,
                         max_seconds=budget.max_seconds, warmup=max(budget.warmup, 2 * conc),
                         check=json_check("predictions", n))
            log(f"  {name:12s} records={n:3d} c={conc:2d}: {r.throughput:8.1f} req/s  p50 {r.ms(50):7.2f} ms  "
                f"p99 {r.ms(99):7.2f} ms  failed {r.failed}")
            results.append(r)
    return results


def in_process_grid(setup: Setup, budget: Budget, log: Any = print) -> list[LoadResult]:
    """predict_proba on prepared float32 arrays; threads = min(concurrency, cores)."""
    results = []
    names = setup.spec.feature_names
    for n in RECORDS:
        arrays = [np.array([[r[f] for f in names] for r in setup.pool[i * n % 1800:i * n % 1800 + n]],
                           dtype=np.float32) for i in range(32)]
        for conc in CONCURRENCY:
            threads = min(conc, os.cpu_count() or 1)
            result = LoadResult("in-process", n, conc)
            for x in arrays[:3]:
                setup.model.predict_proba(x, thread_count=1)
            left = [budget.max_requests]
            lock = threading.Lock()
            deadline = time.perf_counter() + budget.max_seconds

            def work(i: int, left: list[int] = left, lock: threading.Lock = lock, deadline: float = deadline,
                     arrays: list[np.ndarray] = arrays, result: LoadResult = result) -> None:
                k = i
                while time.perf_counter() < deadline:
                    with lock:
                        if left[0] <= 0:
                            return
                        left[0] -= 1
                    t0 = time.perf_counter()
                    setup.model.predict_proba(arrays[k % len(arrays)], thread_count=1)
                    t1 = time.perf_counter()
                    k += 1
                    with lock:
                        result.latencies.append(t1 - t0)
                        result.statuses[200] += 1

            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(work, range(threads)))
            result.seconds = time.perf_counter() - start
            log(f"  {'in-process':12s} records={n:3d} c={conc:2d}: {result.throughput:8.1f} calls/s  "
                f"p50 {result.ms(50):7.3f} ms")
            results.append(result)
    return results


# --- servers ----------------------------------------------------------------------------------


def haproxy_env(state: Path) -> dict[str, str]:
    """Head environment for the HAProxy ingress, with its files and side ports made private to this run."""
    # HAProxy limits unix socket paths to 97 characters and adds a 64-character folder: keep the base short.
    base = Path(tempfile.mkdtemp(prefix="hap-", dir="/tmp"))
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
    }


@contextlib.contextmanager
def ray_platform(setup: Setup, ingress: str, log: Any = print) -> Iterator[tuple[Any, Any]]:
    """A Ray head on loopback (free ports) with `ingress` ('proxy' or 'haproxy'); yields (target, cluster)."""
    from mlops_assets.deployment import rollout as dep
    from mlops_assets.tools.ray_cluster import ClusterConfig, auth_env, ensure_token, start_head, stop_head

    state = Path(tempfile.mkdtemp(prefix=f"ray-{ingress}-", dir=setup.root))
    cluster = ClusterConfig(
        port=free_port(), dashboard_port=free_port(), metrics_export_port=free_port(), serve_http_port=free_port(),
        state_dir=str(state), client_server_port=free_port(), dashboard_agent_port=free_port(),
        dashboard_agent_grpc_port=free_port(), runtime_env_agent_port=free_port(),
        dashboard_metrics_port=free_port(), autoscaler_metrics_port=free_port(),
    )
    # The head runs with token auth; this process's deploy calls find the token through these variables.
    ensure_token(cluster)
    os.environ.update(auth_env(cluster))
    env = {"MLOPS_API_TOKEN": TOKEN, **replica_env(setup), "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    if ingress == "haproxy":
        env.update(haproxy_env(state))
    elif ingress == "proxy-grpc":  # the default proxy, talking gRPC to replicas (head-wide Ray settings)
        env.update({"RAY_SERVE_PROXY_USE_GRPC": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"})
    target = dep.ServeTarget(cluster.dashboard_url, cluster.serve_url, token=TOKEN)
    started = time.monotonic()
    start_head(cluster, env=env)
    log(f"  ray head ({ingress}) up in {time.monotonic() - started:.0f}s on {cluster.dashboard_url}")
    try:
        yield target, cluster
    finally:
        with contextlib.suppress(Exception):
            dep.delete_app(target)
        stop_head(cluster)
        if "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" in env:
            shutil.rmtree(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)


def replica_env(setup: Setup) -> dict[str, str]:
    """Everything replicas read, pinned to this run (a user's .env, exported by make, must not leak in)."""
    import mlops_assets

    spec_path = Path(mlops_assets.__file__).parent / "core" / "datasets" / "phishing_websites.json"
    return {"MLFLOW_TRACKING_URI": setup.tracking_uri, "MLOPS_DATA_URL": str(setup.root / "data"),
            "MLOPS_PREDICTION_LOG_URL": str(setup.root / "data" / "predictions"), "MLOPS_DATASET_SPEC": str(spec_path)}


def deploy(setup: Setup, target: Any, deployment: Mapping[str, Any] | None = None,
           args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, log: Any = print,
           code: Path | None = None) -> float:
    """Deploy the bench version through lib/deployment.py (all checks); return seconds taken.

    `code`: a folder holding another checkout's `mlops_assets/` and `deploy/` (e.g. `git archive` of an
    older commit): replicas import the package from there (PYTHONPATH) and its serve config is used.
    """
    from mlops_assets.deployment import rollout as dep

    if code:
        prefer_code_dir(code)
    base = dep.load_serve_config(code / "deploy" / "serve_config.yaml" if code else None)
    spec = base["applications"][0]["deployments"][0]
    if deployment:
        spec.update(dict(deployment))
    if env:  # replica-side knobs live in the deployment's ray_actor_options (they override the app's)
        actor_env = spec.setdefault("ray_actor_options", {}).setdefault("runtime_env", {}).setdefault("env_vars", {})
        actor_env.update(dict(env))
    result = dep.deploy_version(target=target, tracking_uri=setup.tracking_uri, spec=setup.spec,
                                version=setup.version, records=setup.sample, expected=setup.expected,
                                model_name=MODEL_NAME, base_config=base, args=args,
                                env_vars={**replica_env(setup), **({"PYTHONPATH": str(code)} if code else {})})
    log(f"  deployed version {result.live_version} in {result.seconds:.1f}s "
        f"({dict(deployment or {})} {dict(args or {})} {dict(env or {})}{' code ' + str(code) if code else ''})")
    return result.seconds


SITECUSTOMIZE = """# Written by bench/serving.py --baseline: on PYTHONPATH, this folder's mlops_assets must win over
# the editable install of the working tree, whose import hook would otherwise be asked first.
import sys

sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
"""


def prefer_code_dir(code: Path) -> None:
    """Make replicas started with PYTHONPATH=code import that folder's package (see SITECUSTOMIZE)."""
    target = code / "sitecustomize.py"
    if not target.exists():
        target.write_text(SITECUSTOMIZE)


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


# --- the table --------------------------------------------------------------------------------


def comparison_rows(results: Sequence[LoadResult]) -> list[dict[str, Any]]:
    """One row per (records, concurrency, target) with throughput ratios to mlflow, in-process and fastapi."""
    index = {(r.target, r.records, r.concurrency): r for r in results}
    rows = []
    for n in RECORDS:
        for conc in CONCURRENCY:
            peers = {k: index.get((k, n, conc)) for k in ("mlflow", "in-process", "fastapi")}
            for r in results:
                if (r.records, r.concurrency) != (n, conc):
                    continue
                row = {"records": n, "conc": conc, "target": r.target, "req/s": r.throughput,
                       "p50 ms": r.ms(50), "p90 ms": r.ms(90), "p99 ms": r.ms(99), "failed": r.failed}
                for key, label in (("mlflow", "x mlflow"), ("in-process", "x in-proc"), ("fastapi", "x fastapi")):
                    peer = peers[key]
                    row[label] = r.throughput / peer.throughput if peer and peer.throughput else float("nan")
                rows.append(row)
    return rows


def goals(results: Sequence[LoadResult]) -> list[dict[str, Any]]:
    """The issue's goals for each Ray target: >= 5x mlflow at c >= 8, p50 at c = 1 below mlflow's,
    >= 0.7x the bare FastAPI app's throughput (worst cell over c >= 8 for the ratios)."""
    index = {(r.target, r.records, r.concurrency): r for r in results}
    out = []
    for name in sorted({r.target for r in results if r.target.startswith("ray")}):
        for n in RECORDS:
            def ratio(peer: str, concs: Sequence[int], n: int = n, name: str = name) -> float:
                vals = []
                for c in concs:
                    a, b = index.get((name, n, c)), index.get((peer, n, c))
                    if a and b and b.throughput:
                        vals.append(a.throughput / b.throughput)
                return min(vals) if vals else float("nan")

            ours1, mlf1 = index.get((name, n, 1)), index.get(("mlflow", n, 1))
            out.append({
                "target": name, "records": n,
                "min x mlflow (c>=8)": ratio("mlflow", CONCURRENCY[1:]),
                "goal >=5x": _ok(ratio("mlflow", CONCURRENCY[1:]) >= 5),
                "p50 c=1 ms": ours1.ms(50) if ours1 else float("nan"),
                "mlflow p50 c=1 ms": mlf1.ms(50) if mlf1 else float("nan"),
                "goal p50 below": _ok(bool(ours1 and mlf1 and ours1.ms(50) < mlf1.ms(50))),
                "min x fastapi (c>=8)": ratio("fastapi", CONCURRENCY[1:]),
                "goal >=0.7x": _ok(ratio("fastapi", CONCURRENCY[1:]) >= 0.7),
            })
    return out


def _ok(flag: bool) -> str:
    return "met" if flag else "MISSED"


# --- levers -----------------------------------------------------------------------------------


LEVER_CELLS = ((1, 1), (1, 32), (100, 32))  # (records, concurrency) probed per configuration


def lever_apps(setup: Setup, target: Any, log: Any) -> list[tuple[str, str]]:
    """Deploy every lever configuration side by side as its own application (route /leverN).

    Side by side, the configurations can be measured in interleaved rounds under the same machine
    load: on a shared 2-core machine, measuring them one after another mostly measures the neighbours.
    Replicas ask for 0.05 CPU each so that all fit beside the main app in the head's 2 CPUs (a scheduling figure only).
    """
    from mlops_assets.deployment import rollout as dep
    from mlops_assets.serving.config import ModelRef

    live = dep.live_config(target)
    if live is None:
        raise RuntimeError("the main application must be deployed before the lever applications")
    apps = [a for a in live["applications"] if not str(a.get("name", "")).startswith("lever")]
    routes = []
    for i, (label, deployment, args, env) in enumerate(LEVERS):
        base = dep.load_serve_config()
        spec = base["applications"][0]["deployments"][0]
        spec.update(dict(deployment))
        actor = spec.setdefault("ray_actor_options", {})
        actor["num_cpus"] = 0.05
        actor.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(dict(env))
        config = dep.render_serve_config(base, ref=ModelRef(model_name=MODEL_NAME, version=setup.version),
                                         env_vars=replica_env(setup), args=args)
        app = config["applications"][0]
        app["name"], app["route_prefix"] = f"lever{i}", f"/lever{i}"
        apps.append(app)
        routes.append((label, f"/lever{i}/predict"))
    dep.submit(target, {**live, "applications": apps})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        details = dep.serve_applications(target).get("applications") or {}
        states = {name: d.get("status") for name, d in details.items() if name.startswith("lever")}
        if len(states) == len(LEVERS) and set(states.values()) == {"RUNNING"}:
            break
        if "DEPLOY_FAILED" in states.values():
            raise RuntimeError(f"a lever application failed to deploy: {states}")
        time.sleep(2)
    else:
        raise TimeoutError("lever applications not RUNNING after 600 s")
    log(f"  {len(LEVERS)} lever applications running side by side")
    return routes


def lever_rounds(setup: Setup, target: Any, budget: Budget, name: str, rounds: int, log: Any) -> list[dict[str, Any]]:
    """Interleaved rounds over the lever applications; the median of each cell over the rounds."""
    routes = lever_apps(setup, target, log)
    port = int(target.serve_url.rsplit(":", 1)[1])
    headers = {"Authorization": f"Bearer {TOKEN}"}
    runs: dict[tuple[str, int, int], list[LoadResult]] = {}
    for round_no in range(rounds):
        for label, path in routes:
            for n, conc in LEVER_CELLS:
                reqs = [encode_post(HOST, port, path, b, headers) for b in bodies(setup, n, "records")]
                r = run_load(label, HOST, port, reqs, records=n, concurrency=conc, max_requests=budget.max_requests,
                             max_seconds=budget.max_seconds, warmup=max(budget.warmup, 2 * conc),
                             check=json_check("predictions", n))
                runs.setdefault((label, n, conc), []).append(r)
                log(f"  round {round_no + 1} {label:44s} records={n:3d} c={conc:2d}: {r.throughput:8.1f} req/s "
                    f"p50 {r.ms(50):6.2f} ms failed {r.failed}")
    rows = []
    for (label, n, conc), rs in runs.items():
        shipped = runs.get((LEVERS[0][0], n, conc))
        rps = median([r.throughput for r in rs])
        base_rps = median([r.throughput for r in shipped]) if shipped else float("nan")
        rows.append({"ingress": name, "configuration": label, "records": n, "conc": conc, "req/s": rps,
                     "vs shipped": rps / base_rps if base_rps else float("nan"),
                     "p50 ms": median([r.ms(50) for r in rs]), "p99 ms": median([r.ms(99) for r in rs]),
                     "failed": sum(r.failed for r in rs)})
    return rows


LEVERS: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, str]]] = [
    # (label, deployment overrides, app args overrides, replica env overrides), each against the shipped config
    ("shipped config", {}, {}, {}),
    ("1 replica", {"num_replicas": 1}, {}, {}),
    ("no batching (batch_max_size 1)", {}, {"batch_max_size": 1}, {}),
    ("batch wait 2 ms", {}, {"batch_wait_timeout_s": 0.002}, {}),
    ("user code in a separate thread (Ray default)", {}, {}, {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}),
    ("access log buffered (1000 lines)", {}, {}, {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}),
    ("replica logs not copied to stderr", {}, {}, {"RAY_SERVE_LOG_TO_STDERR": "0"}),
    ("access log off", {"logging_config": {"enable_access_log": False}}, {}, {}),
]


# --- main -------------------------------------------------------------------------------------


def run(targets: Sequence[str], quick: bool, levers: bool, root: Path, log: Any = print,
        grid: bool = True, baseline: Path | None = None) -> dict[str, Any]:
    budget = Budget.of(quick)
    log(f"serving benchmark ({'quick' if quick else 'full'}): up to {budget.max_requests} requests or "
        f"{budget.max_seconds}s per cell; machine {machine()}")
    started = time.monotonic()
    setup = prepare(root)
    log(f"  model trained and registered as {MODEL_NAME} version {setup.version} in {time.monotonic() - started:.0f}s "
        f"({setup.model.tree_count_} trees)")
    results: list[LoadResult] = []
    lever_rows: list[dict[str, Any]] = []
    deploy_seconds: dict[str, float] = {}
    failures: dict[str, str] = {}
    for name in targets:
        try:
            results += run_target(name, setup, budget, levers, lever_rows, deploy_seconds, log, grid, baseline)
        except Exception as exc:  # one target that cannot start must not hide the others' figures
            failures[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(f"  {name} FAILED: {failures[name]}")
    return {"machine": machine(), "budget": vars(budget), "results": [r.row() for r in results],
            "table": comparison_rows(results), "goals": goals(results), "levers": lever_rows,
            "deploy_seconds": deploy_seconds, "failures": failures, "seconds": time.monotonic() - started}


def run_target(name: str, setup: Setup, budget: Budget, levers: bool, lever_rows: list[dict[str, Any]],
               deploy_seconds: dict[str, float], log: Any, grid: bool = True,
               baseline: Path | None = None) -> list[LoadResult]:
    results: list[LoadResult] = []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    if name in RAY_INGRESS:
        ingress = RAY_INGRESS[name]
        with ray_platform(setup, ingress, log) as (target, cluster):
            port = cluster.serve_http_port
            if baseline is not None:  # the older code first, on the same head, same load
                deploy(setup, target, log=log, code=baseline)
                results += http_grid(f"{name}@before", port, "/predict", setup, "records", budget, auth, log)
            deploy_seconds[name] = deploy(setup, target, log=log)
            if grid:
                results += http_grid(name, port, "/predict", setup, "records", budget, auth, log)
            if levers:
                lever_rows += lever_rounds(setup, target, budget, name, 3, log)
    elif name == "mlflow":
        port = free_port()
        cmd = [bin_path("mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}/{setup.version}",
               "--env-manager", "local", "-h", HOST, "-p", str(port)]
        with subprocess_server(cmd, {"MLFLOW_TRACKING_URI": setup.tracking_uri}, port, "/ping",
                               setup.root / "mlflow-serve.log"):
            results += http_grid(name, port, "/invocations", setup, "dataframe_records", budget, log=log)
    elif name == "fastapi":
        port = free_port()
        cmd = [bin_path("uvicorn"), "bench.bare_app:app", "--host", HOST, "--port", str(port),
               "--log-level", "warning"]
        env = {"BENCH_MODEL_PATH": str(setup.model_path), "BENCH_FEATURES": ",".join(setup.spec.feature_names),
               "PYTHONPATH": str(REPO)}
        with subprocess_server(cmd, env, port, "/healthz", setup.root / "fastapi.log"):
            results += http_grid(name, port, "/predict", setup, "records", budget, log=log)
    elif name == "our-app-uvicorn":
        port = free_port()
        cmd = [bin_path("uvicorn"), "bench.our_app:app", "--host", HOST, "--port", str(port), "--log-level", "warning"]
        env = {"MLFLOW_TRACKING_URI": setup.tracking_uri, "BENCH_MODEL_NAME": MODEL_NAME,
               "BENCH_MODEL_VERSION": setup.version, "MLOPS_API_TOKEN": TOKEN,
               "BENCH_LOG_URL": str(setup.root / "our-app-predictions"), "PYTHONPATH": str(REPO)}
        with subprocess_server(cmd, env, port, "/healthz", setup.root / "our-app.log"):
            results += http_grid(name, port, "/predict", setup, "records", budget, auth, log)
    elif name == "in-process":
        results += in_process_grid(setup, budget, log)
    else:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(ALL_TARGETS)}")
    return results


def report(out: Mapping[str, Any]) -> str:
    parts = ["## Serving: throughput and latency (closed loop, loopback)", "",
             format_table(out["table"]), ""]
    if out["goals"]:
        parts += ["## Serving goals (issue 7)", "", format_table(out["goals"]), ""]
    if out.get("failures"):
        parts += ["Targets that failed: " + "; ".join(f"{k}: {v}" for k, v in out["failures"].items()), ""]
    if out["levers"]:
        parts += ["## Serving levers: each configuration against the shipped one (side by side, median of "
                  "3 interleaved rounds)", "", format_table(out["levers"]), ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short cells (1.5 s / 600 requests)")
    parser.add_argument("--levers", action="store_true", help="also probe replicas, batching and logging options")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"comma list of {', '.join(ALL_TARGETS)}")
    parser.add_argument("--levers-only", action="store_true", help="only the lever probes (implies --levers)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--baseline", type=Path,
                        help="experimental, unverified (see bench/RESULTS.md): a folder with an older checkout's "
                             "mlops_assets/ and deploy/ (git archive <commit> mlops_assets deploy | tar -x -C DIR), "
                             "measured first on each Ray head")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (model, logs)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mlops-bench-serving-"))
    try:
        out = run([t.strip() for t in args.targets.split(",") if t.strip()], args.quick,
                  args.levers or args.levers_only, root, grid=not args.levers_only,
                  baseline=args.baseline.resolve() if args.baseline else None)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    emit(report(out), out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
