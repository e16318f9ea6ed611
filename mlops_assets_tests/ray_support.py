"""A Ray head of a test's own: every port free and on loopback, so modules never collide
with each other or with a `make demo` head on the default ports."""

import socket
from pathlib import Path

from mlops_assets.lib.ray_cluster import ClusterConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_cluster(root: Path) -> ClusterConfig:
    """A cluster config on free loopback ports, its pid file and log under `root/ray`."""
    return ClusterConfig(
        port=free_port(), dashboard_port=free_port(), metrics_export_port=free_port(),
        serve_http_port=free_port(), state_dir=str(root / "ray"),
        extra_ports={"ray-client-server-port": free_port(), "dashboard-agent-listen-port": free_port(),
                     "dashboard-agent-grpc-port": free_port(), "runtime-env-agent-port": free_port()},
    )
