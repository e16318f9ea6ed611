"""A local Ray head on loopback, with token authentication, for `make up` / `make demo` / tests.

The head runs as `ray start --head --block` in its own session, so stopping it is a signal to
that one process group (the one we started, found by its pid file), never `ray stop`, which
would end every Ray process of the user on the machine. Workers inherit the head's
environment: that is how `MLOPS_API_TOKEN` reaches replicas without being written into the
Serve config. Run as `python -m mlops_assets.tools.ray_cluster up|down|status|token`.

Authentication: every head starts with `RAY_AUTH_MODE=token`. The token is generated on first
use (`ensure_token`) into `<state_dir>/auth_token` (git-ignored `data/ray/` for make, mode
0600) and handed to Ray as a path (`RAY_AUTH_TOKEN_PATH`), never as a value in an environment
that replicas or the dashboard could show. Clients of the cluster:

- `auth_env(cfg)`: the environment a Ray client process needs (`ray` CLI, `ray.init`,
  `ray://`, `JobSubmissionClient`, Serve APIs): auth mode, token path, and the single-node
  switch that keeps a driver on 127.0.0.1. Merge it into a subprocess env, or into
  `os.environ` before `ray` is imported for in-process clients.
- `auth_headers(cfg)`: `Authorization: Bearer <token>` for the dashboard's REST API (jobs,
  Serve deploys, `/api/version`). Without `cfg` it reads `RAY_AUTH_TOKEN` /
  `RAY_AUTH_TOKEN_PATH`, then the token of the cluster `config_from_env()` names.

Loopback: `--node-ip-address=127.0.0.1` alone is not enough, Ray replaces a loopback node IP
with the machine's address unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (single-node mode: no
other node can join). With it every listener of the head binds 127.0.0.1: GCS, raylet, dashboard
and its agent, runtime env agent, Ray client server, the metrics exporters, the workers. The one
exception, Ray Serve's per-replica gRPC server (hard-coded to every interface), answers a caller
without the token UNAUTHENTICATED (mlops_assets_tests/test_ray_auth.py checks both).

More nodes: `ray start --address` refuses to join in single-node mode, and outside it Ray replaces
`127.0.0.1`/`localhost` (never another address) with the machine's own. So a cluster of several
nodes puts its head on another address (`MLOPS_RAY_HOST`: another loopback address such as
127.0.0.2 on one machine, the machine's network address across machines) and each worker on its own
(`start_worker`, `... ray_cluster worker`; 127.0.0.3 by default). A worker runs
`ray start --address=<head> --block` with the head's token file (copy it to a worker on another
machine) and its own environment, which its replicas inherit (`MLOPS_API_TOKEN` included). Started
with `MLOPS_RAY_NUM_CPUS=0`, the head keeps the Serve controller and proxy, and every replica (each
asks for CPUs) runs on the workers.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mlops_assets.serving.config import (
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_EXPORT_PORT,
    DEFAULT_RAY_PORT,
)
from mlops_assets.settings import load_settings

HOST = "127.0.0.1"
TOKEN_FILE = "auth_token"
# Ray's own defaults for the ports `make` keeps fixed; tests pass free ones.
DEFAULT_CLIENT_SERVER_PORT = 10001
DEFAULT_DASHBOARD_AGENT_PORT = 52365
DEFAULT_DASHBOARD_METRICS_PORT = 44227
DEFAULT_AUTOSCALER_METRICS_PORT = 44217


@dataclass(frozen=True)
class ClusterConfig:
    """Where the local head listens. Every port is configurable so tests can run beside `make up`."""

    host: str = HOST
    port: int = DEFAULT_RAY_PORT
    dashboard_port: int = DEFAULT_DASHBOARD_PORT
    metrics_export_port: int = DEFAULT_METRICS_EXPORT_PORT
    serve_http_port: int = DEFAULT_HTTP_PORT
    client_server_port: int = DEFAULT_CLIENT_SERVER_PORT  # ray://
    dashboard_agent_port: int = DEFAULT_DASHBOARD_AGENT_PORT  # the agent's HTTP API
    dashboard_agent_grpc_port: int | None = None  # None: Ray picks a free one
    runtime_env_agent_port: int | None = None
    # The dashboard's and the autoscaler's own Prometheus endpoints (Ray reads these from env).
    dashboard_metrics_port: int = DEFAULT_DASHBOARD_METRICS_PORT
    autoscaler_metrics_port: int = DEFAULT_AUTOSCALER_METRICS_PORT
    num_cpus: int = 2
    extra_ports: Mapping[str, int] = field(default_factory=dict)  # any other `ray start --<name>-port`
    temp_dir: str | None = None
    state_dir: str = "data/ray"  # pid file, head log and the auth token
    token_file: str | None = None  # default: <state_dir>/auth_token
    # Serve's HTTP ingress (tools/serve_ingress.py): "haproxy" or "proxy" (Ray's Python proxy); None:
    # HAProxy on a single loopback node, the proxy for a head that other nodes join (their replicas
    # bind the serve config's loopback host, which the head's HAProxy could not reach).
    serve_ingress: str | None = None

    @property
    def effective_serve_ingress(self) -> str:
        from mlops_assets.tools.serve_ingress import DEFAULT_INGRESS

        return self.serve_ingress or (DEFAULT_INGRESS if self.host == HOST else "proxy")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    @property
    def serve_url(self) -> str:
        return f"http://{self.host}:{self.serve_http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_export_port}/metrics"

    @property
    def pid_file(self) -> Path:
        return Path(self.state_dir) / f"head-{self.port}.pid"

    @property
    def log_file(self) -> Path:
        return Path(self.state_dir) / f"head-{self.port}.log"

    @property
    def token_path(self) -> Path:
        # Absolute: workers and clients resolve it from other working directories.
        return Path(self.token_file or Path(self.state_dir) / TOKEN_FILE).absolute()


def config_from_env(env: Mapping[str, str] | None = None) -> ClusterConfig:
    """MLOPS_RAY_HOST, MLOPS_RAY_PORT, MLOPS_RAY_DASHBOARD_PORT, MLOPS_RAY_METRICS_PORT, MLOPS_SERVE_PORT, MLOPS_RAY_NUM_CPUS,
    MLOPS_RAY_CLIENT_PORT, MLOPS_RAY_AGENT_PORT, MLOPS_RAY_AGENT_GRPC_PORT, MLOPS_RAY_RUNTIME_ENV_AGENT_PORT,
    MLOPS_RAY_DASHBOARD_METRICS_PORT, MLOPS_RAY_AUTOSCALER_METRICS_PORT, MLOPS_RAY_TOKEN_FILE, MLOPS_SERVE_INGRESS."""
    env = os.environ if env is None else env
    settings = load_settings(env)  # the ports the platform shares with this head: one reading of them
    data_url = settings.data_url
    state = str(Path(data_url) / "ray") if "://" not in data_url else "data/ray"

    def port(name: str, default: int | None) -> int | None:
        return int(env[name]) if env.get(name) else default

    return ClusterConfig(
        host=env.get("MLOPS_RAY_HOST") or HOST,
        port=settings.ray_port,
        dashboard_port=settings.ray_dashboard_port,
        metrics_export_port=settings.ray_metrics_port,
        serve_http_port=settings.serve_port,
        client_server_port=int(env.get("MLOPS_RAY_CLIENT_PORT") or DEFAULT_CLIENT_SERVER_PORT),
        dashboard_agent_port=int(env.get("MLOPS_RAY_AGENT_PORT") or DEFAULT_DASHBOARD_AGENT_PORT),
        dashboard_agent_grpc_port=port("MLOPS_RAY_AGENT_GRPC_PORT", None),
        runtime_env_agent_port=port("MLOPS_RAY_RUNTIME_ENV_AGENT_PORT", None),
        dashboard_metrics_port=int(env.get("MLOPS_RAY_DASHBOARD_METRICS_PORT") or DEFAULT_DASHBOARD_METRICS_PORT),
        autoscaler_metrics_port=int(env.get("MLOPS_RAY_AUTOSCALER_METRICS_PORT") or DEFAULT_AUTOSCALER_METRICS_PORT),
        num_cpus=int(env.get("MLOPS_RAY_NUM_CPUS") or 2),
        state_dir=state,
        token_file=env.get("MLOPS_RAY_TOKEN_FILE") or None,
        serve_ingress=env.get("MLOPS_SERVE_INGRESS") or None,
    )


# --- authentication -----------------------------------------------------------------------------


def ensure_token(cfg: ClusterConfig) -> Path:
    """The cluster's token file, created on first use (random, mode 0600, never overwritten)."""
    path = cfg.token_path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32))
    return path


def auth_env(cfg: ClusterConfig) -> dict[str, str]:
    """The environment a Ray client process (or the head) needs for this cluster: token mode, the
    token's path, and single-node mode so a loopback node IP stays loopback."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(cfg.token_path),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


def read_token(cfg: ClusterConfig | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """This cluster's token; without `cfg`, the one Ray's own variables or `config_from_env` name."""
    env = os.environ if env is None else env
    if cfg is None:
        if env.get("RAY_AUTH_TOKEN"):
            return env["RAY_AUTH_TOKEN"].strip()
        path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else config_from_env(env).token_path
    else:
        path = cfg.token_path
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers(cfg: ClusterConfig | None = None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`Authorization: Bearer <token>` for the dashboard's REST API; empty when no token is found."""
    token = read_token(cfg, env)
    return {"Authorization": f"Bearer {token}"} if token else {}


def head_command(cfg: ClusterConfig, ray_bin: str) -> list[str]:
    cmd = [
        ray_bin, "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={cfg.host}", f"--port={cfg.port}",
        "--include-dashboard=true", f"--dashboard-host={cfg.host}", f"--dashboard-port={cfg.dashboard_port}",
        f"--metrics-export-port={cfg.metrics_export_port}", f"--num-cpus={cfg.num_cpus}",
        f"--ray-client-server-port={cfg.client_server_port}",
        f"--dashboard-agent-listen-port={cfg.dashboard_agent_port}",
    ]
    if cfg.dashboard_agent_grpc_port:
        cmd.append(f"--dashboard-agent-grpc-port={cfg.dashboard_agent_grpc_port}")
    if cfg.runtime_env_agent_port:
        cmd.append(f"--runtime-env-agent-port={cfg.runtime_env_agent_port}")
    cmd += [f"--{name}={value}" for name, value in sorted(cfg.extra_ports.items())]
    if cfg.temp_dir:
        cmd.append(f"--temp-dir={cfg.temp_dir}")
    return cmd


def dashboard_state(cfg: ClusterConfig, timeout_s: float = 2.0) -> str:
    """"up" (answers with our token), "unauthorized" (a dashboard answers, refusing our token) or "down"."""
    try:
        code = httpx.get(f"{cfg.dashboard_url}/api/version", headers=auth_headers(cfg), timeout=timeout_s,
                         trust_env=False).status_code
    except httpx.HTTPError:
        return "down"
    return "up" if code == 200 else "unauthorized" if code in (401, 403) else "down"


def dashboard_up(cfg: ClusterConfig, timeout_s: float = 2.0) -> bool:
    """True when a Ray dashboard answers at the configured address and accepts this cluster's token."""
    return dashboard_state(cfg, timeout_s) == "up"


def head_env(cfg: ClusterConfig, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The head's environment (inherited by every Ray process and worker): the token as a path only."""
    full = {**os.environ, **(env or {}), **auth_env(cfg), "RAY_USAGE_STATS_ENABLED": "0",
            "DASHBOARD_METRIC_PORT": str(cfg.dashboard_metrics_port),
            "AUTOSCALER_METRIC_PORT": str(cfg.autoscaler_metrics_port)}
    full.pop("RAY_AUTH_TOKEN", None)  # would win over the path and be visible in every worker's env
    # On a busy 2-core machine the dashboard agent can take longer than Ray's 30 s to start, and the
    # raylet then aborts the whole head; Ray itself allows 100 s where agents start slowly (Windows).
    full.setdefault("RAY_agent_register_timeout_ms", "100000")
    return full


def _ray_bin() -> str:
    # The venv's `ray`, so workers import the editable mlops_assets of this environment.
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def _ingress_env(cfg: ClusterConfig) -> dict[str, str]:
    from mlops_assets.tools.serve_ingress import head_env as serve_ingress_env

    return serve_ingress_env(cfg.effective_serve_ingress, state_dir=Path(cfg.state_dir).absolute())


def start_head(cfg: ClusterConfig, env: Mapping[str, str] | None = None, wait_s: float = 90.0) -> int | None:
    """Start the head unless a dashboard already answers there; return the new pid or None."""
    ensure_token(cfg)
    state = dashboard_state(cfg)
    if state == "unauthorized":
        raise RuntimeError(f"a Ray dashboard at {cfg.dashboard_url} refuses the token in {cfg.token_path}")
    if state == "up":
        return None
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    with open(cfg.log_file, "ab") as log:
        proc = subprocess.Popen(
            head_command(cfg, _ray_bin()), env=head_env(cfg, {**_ingress_env(cfg), **(env or {})}),
            stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    cfg.pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited with status {proc.returncode}; see {cfg.log_file}")
        if dashboard_up(cfg):
            return proc.pid
        time.sleep(0.5)
    stop_head(cfg)
    raise TimeoutError(f"ray head did not answer on {cfg.dashboard_url} within {wait_s}s; see {cfg.log_file}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def session_processes(leader_pid: int) -> list[int]:
    """Every process in the session `start_head` opened for the head (its pid leads it).

    Not just the head's process group: Ray's HAProxy manager starts HAProxy in a group of its
    own, so a group kill leaves it holding the Serve port and the next head's ingress cannot bind.
    """
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == leader_pid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def kill_session(leader_pid: int) -> None:
    """SIGKILL the whole session of the head: its group and every group inside (HAProxy's too)."""
    for pid in session_processes(leader_pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_head(cfg: ClusterConfig, timeout_s: float = 30.0) -> bool:
    """Stop the head this module started (by its pid file); False when there was none."""
    return _stop_started(cfg.pid_file, timeout_s)


def _stop_started(pid_file: Path, timeout_s: float) -> bool:
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().strip())
    if _alive(pid):
        # SIGTERM to `ray start --block` shuts down the node it started; SIGKILL the group after.
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.25)
            try:
                os.waitpid(pid, os.WNOHANG)  # reap when it is our child (tests)
            except ChildProcessError:
                pass
        kill_session(pid)  # whatever of that session is left
    pid_file.unlink(missing_ok=True)
    return True


# --- worker nodes ---------------------------------------------------------------------------------

WORKER_HOST = "127.0.0.3"
DEFAULT_WORKER_METRICS_PORT = 8081  # not the head's 8080: both listen on the same machine by default
_SELF_ADDRESSES = {"127.0.0.1", "localhost", "::1"}  # the names Ray swaps for the machine's address


@dataclass(frozen=True)
class WorkerConfig:
    """A worker node of `head`'s cluster: its own address and ports, the head's token and state folder.

    Ports left None are Ray's choice (free ones); give them when a firewall must know them.
    """

    head: ClusterConfig
    host: str = WORKER_HOST
    num_cpus: int = 2
    metrics_export_port: int = DEFAULT_WORKER_METRICS_PORT
    node_manager_port: int | None = None
    object_manager_port: int | None = None
    dashboard_agent_port: int | None = None
    dashboard_agent_grpc_port: int | None = None
    runtime_env_agent_port: int | None = None
    object_store_memory: int | None = None  # bytes; None: Ray's share of the machine's memory
    resources: Mapping[str, float] = field(default_factory=dict)  # custom resources replicas can ask for

    @property
    def name(self) -> str:
        return f"worker-{self.host}-{self.metrics_export_port}"

    @property
    def pid_file(self) -> Path:
        return Path(self.head.state_dir) / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return Path(self.head.state_dir) / f"{self.name}.log"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_export_port}/metrics"


def worker_from_env(env: Mapping[str, str] | None = None, head: ClusterConfig | None = None) -> WorkerConfig:
    """MLOPS_RAY_WORKER_HOST, MLOPS_RAY_WORKER_NUM_CPUS, MLOPS_RAY_WORKER_METRICS_PORT,
    MLOPS_RAY_WORKER_OBJECT_STORE_BYTES; the head from `config_from_env` (MLOPS_RAY_HOST, MLOPS_RAY_PORT,
    MLOPS_RAY_TOKEN_FILE)."""
    env = os.environ if env is None else env
    store = env.get("MLOPS_RAY_WORKER_OBJECT_STORE_BYTES")
    return WorkerConfig(
        head=head or config_from_env(env), host=env.get("MLOPS_RAY_WORKER_HOST") or WORKER_HOST,
        num_cpus=int(env.get("MLOPS_RAY_WORKER_NUM_CPUS") or 2),
        metrics_export_port=int(env.get("MLOPS_RAY_WORKER_METRICS_PORT") or DEFAULT_WORKER_METRICS_PORT),
        object_store_memory=int(store) if store else None,
    )


def worker_command(cfg: WorkerConfig, ray_bin: str) -> list[str]:
    """`ray start --address=<head> --block` on the worker's own address; ValueError when either
    address is one Ray would replace with the machine's (then the worker could not find the head)."""
    for role, address in (("head", cfg.head.host), ("worker", cfg.host)):
        if address in _SELF_ADDRESSES:
            raise ValueError(
                f"a worker cannot join a cluster whose {role} address is {address}: Ray replaces it with this "
                f"machine's network address. Start the head with MLOPS_RAY_HOST set to another loopback address "
                f"(127.0.0.2) or a network address, and give the worker its own (MLOPS_RAY_WORKER_HOST)")
    if cfg.host == cfg.head.host:
        raise ValueError(f"the worker needs an address of its own, not the head's {cfg.host}")
    cmd = [
        ray_bin, "start", "--block", "--disable-usage-stats", f"--address={cfg.head.address}",
        f"--node-ip-address={cfg.host}", f"--num-cpus={cfg.num_cpus}",
        f"--metrics-export-port={cfg.metrics_export_port}",
    ]
    optional = {"node-manager-port": cfg.node_manager_port, "object-manager-port": cfg.object_manager_port,
                "dashboard-agent-listen-port": cfg.dashboard_agent_port,
                "dashboard-agent-grpc-port": cfg.dashboard_agent_grpc_port,
                "runtime-env-agent-port": cfg.runtime_env_agent_port,
                "object-store-memory": cfg.object_store_memory}
    cmd += [f"--{flag}={value}" for flag, value in optional.items() if value]
    if cfg.resources:
        import json

        cmd.append(f"--resources={json.dumps(dict(cfg.resources), sort_keys=True)}")
    return cmd


def worker_env(cfg: WorkerConfig, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's environment (its replicas inherit it): the head's, but allowed to join a cluster."""
    full = head_env(cfg.head, env)
    # `ray start --address` refuses in single-node mode; both addresses are explicit, so none is replaced.
    full["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    return full


def cluster_nodes(cfg: ClusterConfig, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """The nodes the head's dashboard lists (its `nodes?view=summary`): raylet fields per node."""
    response = httpx.get(f"{cfg.dashboard_url}/nodes", params={"view": "summary"}, headers=auth_headers(cfg),
                         timeout=timeout_s, trust_env=False)
    response.raise_for_status()
    return [node.get("raylet") or {} for node in (response.json().get("data") or {}).get("summary") or []]


def worker_joined(cfg: WorkerConfig) -> bool:
    try:
        nodes = cluster_nodes(cfg.head)
    except (httpx.HTTPError, ValueError):
        return False
    return any(n.get("nodeManagerAddress") == cfg.host and n.get("state") == "ALIVE" for n in nodes)


def start_worker(cfg: WorkerConfig, env: Mapping[str, str] | None = None, wait_s: float = 120.0) -> int | None:
    """Start a worker node and wait until the head lists it ALIVE; the new pid, or None when it already is."""
    if not cfg.head.token_path.exists():
        raise FileNotFoundError(f"no token at {cfg.head.token_path}: start the head first, or copy its token file there")
    if dashboard_state(cfg.head) != "up":
        raise RuntimeError(f"no Ray head accepting the token in {cfg.head.token_path} at {cfg.head.dashboard_url}")
    if worker_joined(cfg):
        return None
    command = worker_command(cfg, _ray_bin())
    Path(cfg.head.state_dir).mkdir(parents=True, exist_ok=True)
    with open(cfg.log_file, "ab") as log:
        proc = subprocess.Popen(command, env=worker_env(cfg, env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    cfg.pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            cfg.pid_file.unlink(missing_ok=True)
            raise RuntimeError(f"ray worker exited with status {proc.returncode}; see {cfg.log_file}")
        if worker_joined(cfg):
            return proc.pid
        time.sleep(1.0)
    stop_worker(cfg)
    raise TimeoutError(f"ray worker {cfg.host} not listed by {cfg.head.dashboard_url} within {wait_s}s; see {cfg.log_file}")


def stop_worker(cfg: WorkerConfig, timeout_s: float = 30.0) -> bool:
    """Stop the worker this module started (its pid file): it drains, then its group is killed."""
    return _stop_started(cfg.pid_file, timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlops_assets.tools.ray_cluster", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status", "token", "worker", "worker-down"],
                        help="worker / worker-down: start / stop a worker node joining the head (MLOPS_RAY_WORKER_*)")
    args = parser.parse_args(argv)
    cfg = config_from_env()
    if args.action in ("worker", "worker-down"):
        worker = worker_from_env(head=cfg)
        if args.action == "worker-down":
            print("ray worker stopped" if stop_worker(worker) else f"no ray worker started from {worker.pid_file}")
            return 0
        try:
            pid = start_worker(worker)
        except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
            print(f"ray worker not started: {exc}", file=sys.stderr)
            return 1
        print(f"ray worker {'started (pid ' + str(pid) + ')' if pid else 'already in the cluster'}: node {worker.host}, "
              f"{worker.num_cpus} CPUs, head {cfg.address}, metrics {worker.metrics_url}")
        return 0
    if args.action == "up":
        pid = start_head(cfg)
        print(f"ray head {'started (pid ' + str(pid) + ')' if pid else 'already running'}: "
              f"address {cfg.address}, dashboard {cfg.dashboard_url}, metrics {cfg.metrics_url}, "
              f"token auth (token file {cfg.token_path})")
    elif args.action == "down":
        print("ray head stopped" if stop_head(cfg) else f"no ray head started from {cfg.pid_file}")
    elif args.action == "token":
        print(ensure_token(cfg))  # the path, never the token: for compose secrets and Ray clients
    else:
        state = dashboard_state(cfg)
        detail = f" (it refuses the token in {cfg.token_path})" if state == "unauthorized" else ""
        print(f"ray head at {cfg.dashboard_url}: {state}{detail}")
        if state == "up":
            try:
                for node in cluster_nodes(cfg):
                    role = "head" if node.get("isHeadNode") else "worker"
                    cpus = (node.get("resourcesTotal") or {}).get("CPU", 0)
                    print(f"  {role} {node.get('nodeManagerAddress')}: {node.get('state')}, {cpus:g} CPUs, "
                          f"metrics :{node.get('metricsExportPort')}")
            except (httpx.HTTPError, ValueError):
                pass  # the head answers but lists no nodes yet
        return 0 if state == "up" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
