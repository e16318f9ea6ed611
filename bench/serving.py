"""Serving benchmark: our Ray Serve endpoint against `mlflow models serve`, a bare FastAPI app and
the model in-process, at concurrency 1, 8, 32, 64 with 1- and 100-record requests.

Everything runs on loopback (127.0.0.1) on free ports, against one model trained with the
platform's training code and registered in a throwaway SQLite MLflow store:

- `ray` / `ray-haproxy`: a real Ray head (lib/ray_cluster.py) and a real deployment through
  lib/deployment.py (load-and-query check, declarative config, live check) of deploy/serve_config.yaml,
  with the bearer token, request validation, Prometheus metrics and the prediction log all on;
  `ray-haproxy` is the same with Ray 2.60's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1 on the head);
- `mlflow`: `mlflow models serve -m models:/<name>/<version> --env-manager local` (its defaults: 1 worker);
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
    encode_post,
    format_table,
    free_port,
    json_check,
    machine,
    run_load,
    wait_http,
)

TOKEN = "bench-token-0123456789abcdef"
MODEL_NAME = "phishing-classifier-bench"
CONCURRENCY = (1, 8, 32, 64)
RECORDS = (1, 100)
ALL_TARGETS = ("ray", "ray-haproxy", "mlflow", "fastapi", "in-process")
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

    from mlops_assets.lib import deployment as dep
    from mlops_assets.lib import model_store
    from mlops_assets.lib.dataset_spec import default_spec
    from mlops_assets.lib.simulator import SimulationConfig, simulate_records
    from mlops_assets.lib.tracking import use_tracking_uri
    from mlops_assets.lib.training import TARGET_COLUMN, TrainingParams, train_model

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
    from mlops_assets.lib import deployment as dep
    from mlops_assets.lib.ray_cluster import ClusterConfig, start_head, stop_head

    state = Path(tempfile.mkdtemp(prefix=f"ray-{ingress}-", dir=setup.root))
    cluster = ClusterConfig(
        port=free_port(), dashboard_port=free_port(), metrics_export_port=free_port(), serve_http_port=free_port(),
        state_dir=str(state),
        extra_ports={"ray-client-server-port": free_port(), "dashboard-agent-listen-port": free_port(),
                     "dashboard-agent-grpc-port": free_port(), "runtime-env-agent-port": free_port()},
    )
    env = {"MLOPS_API_TOKEN": TOKEN, **replica_env(setup)}
    if ingress == "haproxy":
        env.update(haproxy_env(state))
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
    return {"MLFLOW_TRACKING_URI": setup.tracking_uri, "MLOPS_DATA_URL": str(setup.root / "data")}


def deploy(setup: Setup, target: Any, deployment: Mapping[str, Any] | None = None,
           args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, log: Any = print) -> float:
    """Deploy the bench version through lib/deployment.py (all checks); return seconds taken."""
    from mlops_assets.lib import deployment as dep

    base = dep.load_serve_config()
    spec = base["applications"][0]["deployments"][0]
    if deployment:
        spec.update(dict(deployment))
    if env:  # replica-side knobs live in the deployment's ray_actor_options (they override the app's)
        actor_env = spec.setdefault("ray_actor_options", {}).setdefault("runtime_env", {}).setdefault("env_vars", {})
        actor_env.update(dict(env))
    result = dep.deploy_version(target=target, tracking_uri=setup.tracking_uri, spec=setup.spec,
                                version=setup.version, records=setup.sample, expected=setup.expected,
                                model_name=MODEL_NAME, base_config=base, env_vars=replica_env(setup), args=args)
    log(f"  deployed version {result.live_version} in {result.seconds:.1f}s "
        f"({dict(deployment or {})} {dict(args or {})} {dict(env or {})})")
    return result.seconds


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


def lever_cells(setup: Setup, target: Any, budget: Budget, label: str, log: Any) -> list[dict[str, Any]]:
    """A short probe of one configuration: 1 record at c = 1 and 32, 100 records at c = 32."""
    port = int(target.serve_url.rsplit(":", 1)[1])
    headers = {"Authorization": f"Bearer {TOKEN}"}
    rows = []
    for n, conc in ((1, 1), (1, 32), (100, 32)):
        reqs = [encode_post(HOST, port, "/predict", b, headers) for b in bodies(setup, n, "records")]
        r = run_load(label, HOST, port, reqs, records=n, concurrency=conc, max_requests=budget.max_requests,
                     max_seconds=budget.max_seconds, warmup=max(budget.warmup, 2 * conc),
                     check=json_check("predictions", n))
        log(f"  lever {label:40s} records={n:3d} c={conc:2d}: {r.throughput:8.1f} req/s p50 {r.ms(50):6.2f} ms "
            f"failed {r.failed}")
        rows.append({"configuration": label, "records": n, "conc": conc, "req/s": r.throughput,
                     "p50 ms": r.ms(50), "p99 ms": r.ms(99), "failed": r.failed})
    return rows


LEVERS: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, str]]] = [
    # (label, deployment overrides, app args overrides, replica env overrides), each against the shipped config
    ("shipped config", {}, {}, {}),
    ("1 replica", {"num_replicas": 1}, {}, {}),
    ("3 replicas", {"num_replicas": 3}, {}, {}),
    ("no batching (batch_max_size 1)", {}, {"batch_max_size": 1}, {}),
    ("batch wait 2 ms", {}, {"batch_wait_timeout_s": 0.002}, {}),
    ("user code in a separate thread (Ray default)", {}, {}, {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}),
    ("access log written per line (Ray default)", {}, {}, {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}),
    ("access log off", {"logging_config": {"enable_access_log": False}}, {}, {}),
]


# --- main -------------------------------------------------------------------------------------


def run(targets: Sequence[str], quick: bool, levers: bool, root: Path, log: Any = print,
        grid: bool = True) -> dict[str, Any]:
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
            results += run_target(name, setup, budget, levers, lever_rows, deploy_seconds, log, grid)
        except Exception as exc:  # one target that cannot start must not hide the others' figures
            failures[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(f"  {name} FAILED: {failures[name]}")
    return {"machine": machine(), "budget": vars(budget), "results": [r.row() for r in results],
            "table": comparison_rows(results), "goals": goals(results), "levers": lever_rows,
            "deploy_seconds": deploy_seconds, "failures": failures, "seconds": time.monotonic() - started}


def run_target(name: str, setup: Setup, budget: Budget, levers: bool, lever_rows: list[dict[str, Any]],
               deploy_seconds: dict[str, float], log: Any, grid: bool = True) -> list[LoadResult]:
    results: list[LoadResult] = []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    if name in ("ray", "ray-haproxy"):
        ingress = "haproxy" if name == "ray-haproxy" else "proxy"
        with ray_platform(setup, ingress, log) as (target, cluster):
            deploy_seconds[name] = deploy(setup, target, log=log)
            port = cluster.serve_http_port
            if grid:
                results += http_grid(name, port, "/predict", setup, "records", budget, auth, log)
            if levers:
                for label, deployment, args, env in LEVERS:
                    deploy(setup, target, deployment, args, env, log=log)
                    lever_rows += lever_cells(setup, target, budget, f"{name}: {label}", log)
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
        parts += ["## Serving levers (each against the shipped config)", "", format_table(out["levers"]), ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short cells (1.5 s / 600 requests)")
    parser.add_argument("--levers", action="store_true", help="also probe replicas, batching and logging options")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"comma list of {', '.join(ALL_TARGETS)}")
    parser.add_argument("--levers-only", action="store_true", help="only the lever probes (implies --levers)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (model, logs)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mlops-bench-serving-"))
    try:
        out = run([t.strip() for t in args.targets.split(",") if t.strip()], args.quick,
                  args.levers or args.levers_only, root, grid=not args.levers_only)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(report(out))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
