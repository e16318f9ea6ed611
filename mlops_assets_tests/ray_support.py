"""A Ray head of a test's own: every port free and on loopback, so modules never collide
with each other or with a `make demo` head on the default ports.

The head runs with token authentication (see mlops_assets.tools.ray_cluster). `isolated_cluster`
creates the cluster's token and points this test process's Ray clients at it (the variables of
`auth_env` in `os.environ`), so the project's dashboard client, `ray://` and the job SDK in
this process authenticate as a `make` client does with data/ray/auth_token.

`isolated_two_nodes` is the same for a cluster of two nodes on one machine: the head on 127.0.0.2
with no CPUs (the Serve controller and proxy only), a worker on 127.0.0.3 that runs every replica.
Two loopback addresses because Ray lets no worker join a head on 127.0.0.1 (tools/ray_cluster.py).
"""

import os
import socket
from dataclasses import replace
from pathlib import Path

from mlops_assets.tools.ray_cluster import ClusterConfig, WorkerConfig, auth_env, ensure_token, stop_head

MULTI_NODE_HEAD = "127.0.0.2"
MULTI_NODE_WORKER = "127.0.0.3"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def isolated_cluster(root: Path) -> ClusterConfig:
    """A cluster config on free loopback ports, its pid file, log and token under `root/ray`."""
    cfg = ClusterConfig(
        port=free_port(), dashboard_port=free_port(), metrics_export_port=free_port(),
        serve_http_port=free_port(), state_dir=str(root / "ray"),
        client_server_port=free_port(), dashboard_agent_port=free_port(),
        dashboard_agent_grpc_port=free_port(), runtime_env_agent_port=free_port(),
        dashboard_metrics_port=free_port(), autoscaler_metrics_port=free_port(),
    )
    ensure_token(cfg)
    os.environ.update(auth_env(cfg))
    return cfg


def distinct_free_ports(host: str, count: int) -> list[int]:
    """`count` free ports, no two alike: the OS can hand the same free port out twice in a row, and
    Ray refuses a node whose components share one (a fresh-clone CI run failed on exactly that)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def isolated_two_nodes(root: Path, worker_cpus: int = 2) -> tuple[ClusterConfig, WorkerConfig]:
    """A head (no CPUs, on MULTI_NODE_HEAD) and a worker (on MULTI_NODE_WORKER) on free ports; the
    head's token created and this process's Ray clients pointed at it. Start the head, then the worker."""
    head = isolated_cluster(root)
    names = ("port", "dashboard_port", "metrics_export_port", "serve_http_port", "client_server_port",
             "dashboard_agent_port", "dashboard_agent_grpc_port", "runtime_env_agent_port", "dashboard_metrics_port",
             "autoscaler_metrics_port")
    ports = dict(zip(names, distinct_free_ports(MULTI_NODE_HEAD, len(names)), strict=True))
    head = replace(head, host=MULTI_NODE_HEAD, num_cpus=0, **ports)
    metrics, node, objects, agent, agent_grpc, runtime_env = distinct_free_ports(MULTI_NODE_WORKER, 6)
    worker = WorkerConfig(
        head=head, host=MULTI_NODE_WORKER, num_cpus=worker_cpus,
        metrics_export_port=metrics, node_manager_port=node, object_manager_port=objects, dashboard_agent_port=agent,
        dashboard_agent_grpc_port=agent_grpc, runtime_env_agent_port=runtime_env,
        object_store_memory=200 * 1024 * 1024,  # replicas pass small requests: keep the node's memory for models
    )
    return head, worker


# Tests end their heads without waiting out Ray's graceful shutdown: nothing they check happens
# after it, and it cost about 30 s a module (a running app's replicas drain for up to 25 s,
# whether the apps are deleted first or the head is sent SIGTERM). The whole session is killed.
TEARDOWN_STOP_S = 3.0


def end_test_head(cfg: ClusterConfig) -> None:
    """Teardown of a head a test started: SIGTERM, then after a moment every process of its session."""
    stop_head(cfg, timeout_s=TEARDOWN_STOP_S)
