"""The scoring replica's direct `POST /predict` path answers exactly what the FastAPI route answers,
the prediction log can be turned off (the benchmark's lever), and the HAProxy ingress's loopback
wrapper pins only HAProxy's side listeners to 127.0.0.1.

No Ray here: `predict_direct` and the app run over a `ServiceCore` in this process (the same
fixtures as test_serving_unit); the wrapper runs on a config file with a stand-in binary.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mlops_assets.serving import app as app_module
from mlops_assets.serving.config import ModelRef, ServiceOptions
from mlops_assets.serving.ingress import ForwardedRequest
from mlops_assets.serving.metrics import InMemoryMetrics
from mlops_assets.serving.service import ServiceCore
from mlops_assets.tools import serve_ingress
from mlops_assets.tools.ray_cluster import ClusterConfig
from mlops_assets_tests.test_serving_unit import AUTH, TOKEN, _records, _scorer, core  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]


def _forwarded(body: bytes, headers: dict[str, str]) -> ForwardedRequest:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return ForwardedRequest("POST", "/predict", b"", raw, body, request_id="rid-1")


def _direct(core: ServiceCore, body: bytes, headers: dict[str, str]) -> tuple[int, dict, dict, list]:  # noqa: F811
    lines: list = []
    answer = asyncio.run(app_module.predict_direct(core, _forwarded(body, headers),
                                                   lambda line, rows: lines.append((line, rows))))
    head = {k.decode(): v.decode() for k, v in answer.headers}
    assert head["content-length"] == str(len(answer.body))
    return answer.status, json.loads(answer.body), head, lines


def _cases(spec) -> list[tuple[str, bytes, dict[str, str]]]:
    good = json.dumps({"records": _records(spec, 2)}).encode()
    bad_value = dict(_records(spec, 1)[0])
    bad_value[spec.feature_names[3]] = 7
    json_ct = {"Content-Type": "application/json"}
    return [
        ("valid", good, {**AUTH, **json_ct}),
        ("no token", good, json_ct),
        ("wrong token", good, {"Authorization": "Bearer nope", **json_ct}),
        ("wrong content type", good, {**AUTH, "Content-Type": "text/plain"}),
        ("too large", b"{" + b" " * 5000 + b"}", {**AUTH, **json_ct}),
        ("not JSON", b'{"records": [', {**AUTH, **json_ct}),
        ("value out of its domain", json.dumps({"records": [bad_value]}).encode(), {**AUTH, **json_ct}),
        ("too many records", json.dumps({"records": _records(spec, 6)}).encode(), {**AUTH, **json_ct}),
        ("not an object", b"[1, 2]", {**AUTH, **json_ct}),
    ]


def test_the_direct_path_answers_what_the_fastapi_route_answers(core: ServiceCore, spec) -> None:  # noqa: F811
    asyncio.run(core.reconfigure(ModelRef(model_name="m", version="1")))
    client = TestClient(app_module.api, raise_server_exceptions=False)
    for name, body, headers in _cases(spec):
        status, answer, head, lines = _direct(core, body, headers)
        via_app = client.post("/predict", content=body, headers=headers)
        assert status == via_app.status_code, name
        expected = via_app.json()
        if status == 200:
            assert answer["request_id"] == "rid-1" and len(lines) == 1 and lines[0][1] == 2, name
            answer.pop("request_id"), expected.pop("request_id")
        else:
            assert lines == [], name
        assert answer == expected, name
        assert head["content-type"] == "application/json", name
        assert head.get("www-authenticate") == via_app.headers.get("www-authenticate"), name
    assert isinstance(core.metrics, InMemoryMetrics)
    counted = {status: n for (route, status), n in core.metrics.requests.items() if route == "/predict"}
    assert counted[200] == 2 and counted[401] == 4 and counted[422] == 6  # each case twice: direct and app


def test_the_ingress_forwards_the_path_below_the_route_prefix() -> None:
    assert app_module._app_path({"path": "/predict", "root_path": ""}) == "/predict"
    assert app_module._app_path({"path": "/phishing/predict", "root_path": "/phishing"}) == "/predict"
    assert app_module._app_path({"path": "/phishing", "root_path": "/phishing/"}) == "/"
    assert app_module._app_path({"path": "/phishing2/predict", "root_path": "/phishing"}) == "/phishing2/predict"


def test_without_the_prediction_log_nothing_is_encoded_or_spooled(spec, tmp_path: Path) -> None:
    options = ServiceOptions(prediction_log=False)
    core_without = ServiceCore(spec=spec, options=options, token=TOKEN, metrics=InMemoryMetrics(), log_writer=None,
                               loader=lambda ref: _scorer(spec, "1"))
    asyncio.run(core_without.reconfigure(ModelRef(model_name="m", version="1")))
    body = json.dumps({"records": _records(spec, 3)}).encode()
    status, answer, _, lines = _direct(core_without, body, {**AUTH, "Content-Type": "application/json"})
    assert status == 200 and len(answer["predictions"]) == 3 and lines == []
    assert ServiceOptions().prediction_log is True  # the shipped default logs
    with pytest.raises(ValueError, match="unknown serving option"):
        ServiceOptions.from_args({"prediction_logging": False})


RAY_LIKE_CONFIG = """global
    stats socket /tmp/x mode 666 level admin
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind {frontend}:8000
backend app
    server r1 127.0.0.1:30000
listen stats
  bind *:8404
  stats enable
"""


@pytest.mark.parametrize("frontend", ["127.0.0.1", "*"])
def test_the_haproxy_wrapper_pins_stats_and_exporter_to_loopback_and_keeps_the_frontend(
        tmp_path: Path, frontend: str) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_LIKE_CONFIG.format(frontend=frontend))
    argv_file = tmp_path / "argv"
    stand_in = tmp_path / "real-haproxy"
    stand_in.write_text(f'#!/bin/sh\necho "$@" > {argv_file}\n')
    stand_in.chmod(0o755)
    wrapper = serve_ingress.write_wrapper(tmp_path / "bin", real=str(stand_in))
    subprocess.run([str(wrapper), "-db", "-f", str(config), "-sf", "123"], check=True, timeout=10)
    text = config.read_text()
    assert "bind 127.0.0.1:9101" in text and "bind 127.0.0.1:8404" in text
    assert f"bind {frontend}:8000" in text  # the serve config's host: loopback locally, every interface in pods
    assert argv_file.read_text().split() == ["-db", "-f", str(config), "-sf", "123"]  # the real binary got them all


def test_the_images_wrapper_is_the_generated_one() -> None:
    shipped = REPO / serve_ingress.CONTAINER_WRAPPER
    assert shipped.read_text() == serve_ingress.wrapper_text(serve_ingress.CONTAINER_REAL), (
        "regenerate it: python -m mlops_assets.tools.serve_ingress write-container-wrapper")
    assert shipped.stat().st_mode & 0o111, "deploy/haproxy-loopback must be executable"


def test_a_single_loopback_head_gets_haproxy_and_a_multi_node_head_the_proxy(tmp_path: Path) -> None:
    assert ClusterConfig().effective_serve_ingress == "haproxy"
    assert ClusterConfig(host="127.0.0.2").effective_serve_ingress == "proxy"
    assert ClusterConfig(serve_ingress="proxy").effective_serve_ingress == "proxy"
    env = serve_ingress.head_env("haproxy", state_dir=tmp_path)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert {k: env[k] for k in serve_ingress.HAPROXY_SETTINGS} == serve_ingress.HAPROXY_SETTINGS
    assert Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"]).parent == tmp_path
    assert len(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]) + 65 <= 97  # HAProxy's limit on unix socket paths
    ports = {env[k] for k in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                              "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")}
    assert len(ports) == 3
    assert serve_ingress.head_env("proxy", state_dir=tmp_path) == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    with pytest.raises(ValueError, match="haproxy, proxy"):
        serve_ingress.head_env("nginx", state_dir=tmp_path)
