"""A local Ray head on loopback for `make up` / `make demo` / tests: start when none runs, stop.

The head runs as `ray start --head --block` in its own session, so stopping it is a signal to
that one process group (the one we started, found by its pid file), never `ray stop`, which
would end every Ray process of the user on the machine. Workers inherit the head's
environment: that is how `MLOPS_API_TOKEN` reaches replicas without being written into the
Serve config. Run as `python -m mlops_assets.lib.ray_cluster up|down|status`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mlops_assets.lib.serving.config import (
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_EXPORT_PORT,
    DEFAULT_RAY_PORT,
)
from mlops_assets.lib.settings import load_settings

HOST = "127.0.0.1"


@dataclass(frozen=True)
class ClusterConfig:
    """Where the local head listens. Every port is configurable so tests can run beside `make up`."""

    host: str = HOST
    port: int = DEFAULT_RAY_PORT
    dashboard_port: int = DEFAULT_DASHBOARD_PORT
    metrics_export_port: int = DEFAULT_METRICS_EXPORT_PORT
    serve_http_port: int = DEFAULT_HTTP_PORT
    num_cpus: int = 2
    extra_ports: Mapping[str, int] = field(default_factory=dict)  # e.g. ray-client-server-port
    temp_dir: str | None = None
    state_dir: str = "data/ray"  # pid file and head log

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


def config_from_env(env: Mapping[str, str] | None = None) -> ClusterConfig:
    """MLOPS_RAY_PORT, MLOPS_RAY_DASHBOARD_PORT, MLOPS_RAY_METRICS_PORT, MLOPS_SERVE_PORT, MLOPS_RAY_NUM_CPUS."""
    env = os.environ if env is None else env
    data_url = load_settings(env).data_url
    state = str(Path(data_url) / "ray") if "://" not in data_url else "data/ray"
    return ClusterConfig(
        port=int(env.get("MLOPS_RAY_PORT") or DEFAULT_RAY_PORT),
        dashboard_port=int(env.get("MLOPS_RAY_DASHBOARD_PORT") or DEFAULT_DASHBOARD_PORT),
        metrics_export_port=int(env.get("MLOPS_RAY_METRICS_PORT") or DEFAULT_METRICS_EXPORT_PORT),
        serve_http_port=int(env.get("MLOPS_SERVE_PORT") or DEFAULT_HTTP_PORT),
        num_cpus=int(env.get("MLOPS_RAY_NUM_CPUS") or 2),
        state_dir=state,
    )


def head_command(cfg: ClusterConfig, ray_bin: str) -> list[str]:
    cmd = [
        ray_bin, "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={cfg.host}", f"--port={cfg.port}",
        "--include-dashboard=true", f"--dashboard-host={cfg.host}", f"--dashboard-port={cfg.dashboard_port}",
        f"--metrics-export-port={cfg.metrics_export_port}", f"--num-cpus={cfg.num_cpus}",
    ]
    cmd += [f"--{name}={value}" for name, value in sorted(cfg.extra_ports.items())]
    if cfg.temp_dir:
        cmd.append(f"--temp-dir={cfg.temp_dir}")
    return cmd


def dashboard_up(cfg: ClusterConfig, timeout_s: float = 2.0) -> bool:
    """True when a Ray dashboard answers at the configured address."""
    try:
        return httpx.get(f"{cfg.dashboard_url}/api/version", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _ray_bin() -> str:
    # The venv's `ray`, so workers import the editable mlops_assets of this environment.
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def start_head(cfg: ClusterConfig, env: Mapping[str, str] | None = None, wait_s: float = 90.0) -> int | None:
    """Start the head unless a dashboard already answers there; return the new pid or None."""
    if dashboard_up(cfg):
        return None
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {}), "RAY_USAGE_STATS_ENABLED": "0"}
    with open(cfg.log_file, "ab") as log:
        proc = subprocess.Popen(
            head_command(cfg, _ray_bin()), env=full_env, stdout=log, stderr=subprocess.STDOUT,
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


def stop_head(cfg: ClusterConfig, timeout_s: float = 30.0) -> bool:
    """Stop the head this module started (by its pid file); False when there was none."""
    if not cfg.pid_file.exists():
        return False
    pid = int(cfg.pid_file.read_text().strip())
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
        try:
            os.killpg(pid, signal.SIGKILL)  # whatever of that group is left
        except ProcessLookupError:
            pass
    cfg.pid_file.unlink(missing_ok=True)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlops_assets.lib.ray_cluster", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    cfg = config_from_env()
    if args.action == "up":
        pid = start_head(cfg)
        print(f"ray head {'started (pid ' + str(pid) + ')' if pid else 'already running'}: "
              f"address {cfg.address}, dashboard {cfg.dashboard_url}, metrics {cfg.metrics_url}")
    elif args.action == "down":
        print("ray head stopped" if stop_head(cfg) else f"no ray head started from {cfg.pid_file}")
    else:
        up = dashboard_up(cfg)
        print(f"ray head at {cfg.dashboard_url}: {'up' if up else 'down'}")
        return 0 if up else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
