"""The local Ray head lets no one in: every listener on loopback, every entry point refuses a
request without the cluster's token and accepts it with the token.

One real head for the module (isolated_cluster), with a one-line Serve app deployed, so the
Serve controller, proxy and a replica worker are among the processes whose sockets are listed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil
import pytest

from mlops_assets.tools.ray_cluster import (
    ClusterConfig,
    auth_env,
    auth_headers,
    config_from_env,
    ensure_token,
    head_command,
    head_env,
    read_token,
    start_head,
)
from mlops_assets_tests.ray_support import end_test_head, isolated_cluster

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
APP = "auth_probe"

APP_SOURCE = '''
from ray import serve


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Hello:
    async def __call__(self, request) -> str:
        return "hello"


app = Hello.bind()
'''

# A Ray client process: `job` submits a job with the SDK and waits for its output, `client`
# runs a task over ray://. Its environment decides whether it holds the token.
CLIENT_SOURCE = '''
import sys, time

mode, address = sys.argv[1], sys.argv[2]
if mode == "job":
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job = client.submit_job(entrypoint="python -c 'print(6 * 7)'")
    deadline = time.monotonic() + 120
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            sys.exit("job did not finish")
        time.sleep(0.5)
    print(client.get_job_status(job), client.get_job_logs(job).strip())
else:
    import ray

    ray.init(address)
    print("task answered", ray.get(ray.remote(lambda: 6 * 7).remote()))
'''


@dataclass(frozen=True)
class Head:
    cluster: ClusterConfig
    pid: int
    root: Path
    serve_config: dict

    @property
    def token(self) -> str:
        token = read_token(self.cluster)
        assert token
        return token


def _serve_config(cfg: ClusterConfig) -> dict:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": cfg.serve_http_port},
        "applications": [{"name": APP, "route_prefix": "/hello", "import_path": "auth_probe_app:app"}],
    }


def _wait_for_app(cfg: ClusterConfig, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{cfg.serve_url}/hello", timeout=2, trust_env=False).text == "hello":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"Serve app did not answer at {cfg.serve_url}/hello within {timeout_s}s")


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    root = tmp_path_factory.mktemp("ray_auth")
    (root / "app").mkdir()
    (root / "app" / "auth_probe_app.py").write_text(APP_SOURCE)
    (root / "client.py").write_text(CLIENT_SOURCE)
    cfg = isolated_cluster(root)
    pythonpath = os.pathsep.join(p for p in (str(root / "app"), os.environ.get("PYTHONPATH", "")) if p)
    pid = start_head(cfg, env={"PYTHONPATH": pythonpath})
    assert pid is not None, "a head already answered on the isolated ports"
    try:
        config = _serve_config(cfg)
        response = httpx.put(f"{cfg.dashboard_url}/api/serve/applications/", json=config,
                             headers=auth_headers(cfg), timeout=120, trust_env=False)
        assert response.status_code == 200, response.text
        _wait_for_app(cfg)
        yield Head(cfg, pid, root, config)
    finally:
        end_test_head(cfg)


def _cluster_processes(pid: int) -> list[psutil.Process]:
    """The head and everything it started: its children, and whatever runs in its session."""
    head = psutil.Process(pid)
    found = {head.pid: head, **{p.pid: p for p in head.children(recursive=True)}}
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == pid:
                found.setdefault(proc.pid, proc)
        except (ProcessLookupError, PermissionError):
            continue
    return list(found.values())


def _listeners(pid: int) -> list[tuple[str, str, int]]:
    out = []
    for proc in _cluster_processes(pid):
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    out.append((name, conn.laddr.ip, conn.laddr.port))
        except psutil.NoSuchProcess:
            continue
    return out


def _client_env(head: Head, with_token: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    # A HOME of its own, so no ~/.ray/auth_token of the user's is picked up either.
    env["HOME"] = str(head.root / "home")
    if with_token:
        env.update(auth_env(head.cluster))
    return env


def _run_client(head: Head, mode: str, address: str, with_token: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(head.root / "client.py"), mode, address],
                          env=_client_env(head, with_token), capture_output=True, text=True, timeout=180)


def _client_server_logs() -> str:
    """The tails of the Ray client's per-client server logs of the latest session (why one did not start)."""
    logs = sorted(Path(tempfile.gettempdir(), "ray", "session_latest", "logs").glob("ray_client_server_*.err"))
    return "".join(f"\n--- {log.name}:\n{log.read_text(errors='replace')[-1500:]}" for log in logs)


def _machine_address() -> str:
    """An address of this machine other than loopback (what a neighbour would connect to)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return "127.0.0.1"


def _grpc_status(address: str, method: str, token: str | None) -> grpc.StatusCode:
    """The status of one empty unary call to `method` (through Ray's auth interceptor, when there is one)."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(b"", timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


# Listeners Ray binds to every interface whatever the node IP, and a gRPC method of each that
# must refuse a caller without the token. Serve 2.60 binds the replica's inter-deployment gRPC
# server to [::]:0 (serve/_private/replica.py), with Ray's auth interceptor in token mode.
UNAVOIDABLE = {"ray::ServeReplica": "/ray.serve.ASGIService/HandleRequest"}


@pytest.mark.integration
def test_every_listener_of_the_cluster_is_on_loopback_or_refuses_a_caller_without_the_token(head: Head) -> None:
    cfg = head.cluster
    # The list really covers the cluster: GCS, dashboard, client server, agent, metrics, Serve ingress.
    expected = {cfg.port, cfg.dashboard_port, cfg.client_server_port, cfg.dashboard_agent_port,
                cfg.metrics_export_port, cfg.serve_http_port}
    # Ray's HAProxy manager reloads HAProxy (a new process takes the sockets over, the old one
    # exits) when the routes change, so one listing can fall between the two: list again briefly.
    deadline = time.monotonic() + 30
    listeners = _listeners(head.pid)
    while not expected <= {port for _, _, port in listeners} and time.monotonic() < deadline:
        time.sleep(0.5)
        listeners = _listeners(head.pid)
    ports = {port for _, _, port in listeners}
    for port in sorted(expected):
        assert port in ports, f"nothing of the cluster listens on {port}: {sorted(listeners)}"
    assert any(name == "raylet" for name, _, _ in listeners), listeners
    exposed = [entry for entry in listeners if entry[1] not in LOOPBACK]
    unexplained = [e for e in exposed if not any(e[0].startswith(prefix) for prefix in UNAVOIDABLE)]
    assert not unexplained, f"listeners not on loopback: {unexplained}"
    for name, _, port in exposed:
        method = next(m for prefix, m in UNAVOIDABLE.items() if name.startswith(prefix))
        address = f"{_machine_address()}:{port}"
        assert _grpc_status(address, method, None) == grpc.StatusCode.UNAUTHENTICATED, (name, address)
        # With the token the same call gets past authentication (and fails on its empty request).
        assert _grpc_status(address, method, head.token) != grpc.StatusCode.UNAUTHENTICATED, (name, address)


@pytest.mark.integration
def test_the_dashboard_refuses_a_request_without_the_token(head: Head) -> None:
    url = f"{head.cluster.dashboard_url}/api/version"
    assert httpx.get(url, trust_env=False).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer not-the-token"}, trust_env=False).status_code == 403
    assert httpx.get(url, headers=auth_headers(head.cluster), trust_env=False).status_code == 200


@pytest.mark.integration
def test_a_job_submission_without_the_token_is_refused_and_with_it_runs(head: Head) -> None:
    jobs = f"{head.cluster.dashboard_url}/api/jobs/"
    body = {"entrypoint": "python -c 'print(1)'", "submission_id": "no-token-job"}
    assert httpx.post(jobs, json=body, trust_env=False).status_code == 401
    assert httpx.post(jobs, json=body, headers={"Authorization": "Bearer wrong"}, trust_env=False).status_code == 403
    listed = httpx.get(jobs, headers=auth_headers(head.cluster), trust_env=False).json()
    assert "no-token-job" not in {job.get("submission_id") for job in listed}

    refused = _run_client(head, "job", head.cluster.dashboard_url, with_token=False)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stderr, refused.stderr[-2000:]
    done = _run_client(head, "job", head.cluster.dashboard_url, with_token=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SUCCEEDED" in done.stdout and "42" in done.stdout, done.stdout


@pytest.mark.integration
def test_a_ray_client_connection_without_the_token_is_refused_and_with_it_runs_a_task(head: Head) -> None:
    # The client server answers a call without the token UNAUTHENTICATED; Ray's client takes that
    # for "not ready yet" and gives up with a connection timeout.
    server = f"127.0.0.1:{head.cluster.client_server_port}"
    assert _grpc_status(server, "/ray.rpc.RayletDriver/ClusterInfo", None) == grpc.StatusCode.UNAUTHENTICATED
    address = f"ray://{server}"
    refused = _run_client(head, "client", address, with_token=False)
    assert refused.returncode != 0 and "task answered" not in refused.stdout, refused.stdout
    assert "connection timeout" in refused.stderr, refused.stderr[-2000:]
    done = _run_client(head, "client", address, with_token=True)
    if done.returncode != 0 and "Starting Ray client server failed" in done.stderr:
        # The proxier's per-client server process exited while starting (seen once in CI under
        # load, not an auth answer): say what its log held, then try once more.
        print(_client_server_logs())
        done = _run_client(head, "client", address, with_token=True)
    assert done.returncode == 0, done.stderr[-2000:] + _client_server_logs()
    assert "task answered 42" in done.stdout


@pytest.mark.integration
def test_the_gcs_refuses_a_grpc_call_without_the_token(head: Head) -> None:
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(head.cluster.address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10,
                                    metadata=[("authorization", f"Bearer {head.token}")])
        assert len(reply.node_info_list) == 1


@pytest.mark.integration
def test_a_serve_deploy_without_the_token_is_refused_and_with_it_applies(head: Head) -> None:
    url = f"{head.cluster.dashboard_url}/api/serve/applications/"
    changed = {**head.serve_config,
               "applications": [{**head.serve_config["applications"][0], "route_prefix": "/taken-over"}]}
    assert httpx.put(url, json=changed, timeout=30, trust_env=False).status_code == 401
    assert httpx.put(url, json=changed, headers={"Authorization": "Bearer wrong"}, timeout=30,
                     trust_env=False).status_code == 403
    assert httpx.get(url, timeout=10, trust_env=False).status_code == 401  # the config is not readable either
    live = httpx.get(url, headers=auth_headers(head.cluster), timeout=10, trust_env=False).json()
    assert live["applications"][APP]["route_prefix"] == "/hello"

    response = httpx.put(url, json=changed, headers=auth_headers(head.cluster), timeout=30, trust_env=False)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = httpx.get(url, headers=auth_headers(head.cluster), timeout=10, trust_env=False).json()
        if live["applications"][APP]["route_prefix"] == "/taken-over":
            break
        time.sleep(0.5)
    assert live["applications"][APP]["route_prefix"] == "/taken-over"


@pytest.mark.integration
def test_status_reports_a_head_it_cannot_authenticate_to(head: Head, tmp_path: Path) -> None:
    from dataclasses import replace

    from mlops_assets.tools.ray_cluster import dashboard_state, ensure_token

    stranger = replace(head.cluster, token_file=str(tmp_path / "other_token"))
    ensure_token(stranger)
    assert dashboard_state(head.cluster) == "up"
    assert dashboard_state(stranger) == "unauthorized"
    with pytest.raises(RuntimeError, match="refuses the token"):
        start_head(stranger)


# --- without a head -----------------------------------------------------------------------------


def test_the_token_is_created_once_private_and_given_to_ray_as_a_path(tmp_path: Path) -> None:
    cfg = ClusterConfig(state_dir=str(tmp_path / "ray"))
    path = ensure_token(cfg)
    token = path.read_text()
    assert path == tmp_path / "ray" / "auth_token" and len(token) >= 40
    assert path.stat().st_mode & 0o777 == 0o600
    assert ensure_token(cfg).read_text() == token  # never regenerated under a running head
    env = head_env(cfg, {"RAY_AUTH_TOKEN": "leaked", "MLOPS_API_TOKEN": "t"})
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(path)
    assert "RAY_AUTH_TOKEN" not in env and token not in env.values()
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # keeps the loopback node IP
    assert auth_headers(cfg) == {"Authorization": f"Bearer {token}"}
    assert auth_env(cfg)["RAY_AUTH_TOKEN_PATH"] == str(path)


def test_clients_find_the_token_from_ray_variables_or_the_configured_cluster(tmp_path: Path) -> None:
    file = tmp_path / "t"
    file.write_text("from-path\n")
    assert read_token(env={"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(file)}) == "from-env"
    assert read_token(env={"RAY_AUTH_TOKEN_PATH": str(file)}) == "from-path"
    env = {"MLOPS_DATA_URL": str(tmp_path / "data")}
    assert read_token(env=env) is None and auth_headers(env=env) == {}
    ensure_token(config_from_env(env))
    assert read_token(env=env) == (tmp_path / "data" / "ray" / "auth_token").read_text()


def test_every_port_of_the_head_is_configurable_and_on_loopback() -> None:
    env = {"MLOPS_RAY_CLIENT_PORT": "7101", "MLOPS_RAY_AGENT_PORT": "7102", "MLOPS_RAY_AGENT_GRPC_PORT": "7103",
           "MLOPS_RAY_RUNTIME_ENV_AGENT_PORT": "7104", "MLOPS_RAY_DASHBOARD_METRICS_PORT": "7105",
           "MLOPS_RAY_AUTOSCALER_METRICS_PORT": "7106"}
    cfg = config_from_env(env)
    cmd = head_command(cfg, "ray")
    for flag in ("--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--ray-client-server-port=7101",
                 "--dashboard-agent-listen-port=7102", "--dashboard-agent-grpc-port=7103",
                 "--runtime-env-agent-port=7104"):
        assert flag in cmd
    env_of_head = head_env(cfg)
    assert (env_of_head["DASHBOARD_METRIC_PORT"], env_of_head["AUTOSCALER_METRIC_PORT"]) == ("7105", "7106")
