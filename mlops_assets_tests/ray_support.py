"""A Ray head of a test's own: every port free and on loopback, so modules never collide
with each other or with a `make demo` head on the default ports.

The head runs with token authentication (see mlops_assets.tools.ray_cluster). `isolated_cluster`
creates the cluster's token and points this test process's Ray clients at it (the variables of
`auth_env` in `os.environ`), so the project's dashboard client, `ray://` and the job SDK in
this process authenticate as a `make` client does with data/ray/auth_token.
"""

import os
import socket
from pathlib import Path

from mlops_assets.tools.ray_cluster import ClusterConfig, auth_env, ensure_token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
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
