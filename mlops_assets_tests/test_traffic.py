"""Traffic generator against a real HTTP server on 127.0.0.1 that answers like /predict:
bounds (rate, concurrency, duration cap), bearer token, drift, and the delayed labels it writes."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.monitoring import live as mon
from mlops_assets.tools import traffic
from mlops_assets.tools.cli import main

TOKEN = "traffic-test-token"


class FakeEndpoint:
    """Answers POST /predict like the service (label = -1 when SSLfinal_State == -1); records what it saw."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.times: list[float] = []
        lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                with lock:
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                    endpoint.times.append(time.monotonic())
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(delay_s)
                endpoint.bodies.append(body)
                endpoint.auth.append(self.headers.get("Authorization"))
                answer = {"request_id": uuid.uuid4().hex, "model_version": "5", "predictions": [
                    {"label": -1 if r["SSLfinal_State"] == -1 else 1, "phishing_probability": 0.5}
                    for r in body["records"]]}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with lock:
                    endpoint.in_flight -= 1

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def endpoint() -> Iterator[FakeEndpoint]:
    server = FakeEndpoint(delay_s=0.05)
    yield server
    server.close()


def test_rate_concurrency_and_batches_are_bounded(spec: DatasetSpec, endpoint: FakeEndpoint) -> None:
    config = traffic.TrafficConfig(endpoint=f"{endpoint.url}/predict", token=TOKEN, records=95, batch_size=10,
                                   rate=25.0, concurrency=3, max_duration_s=30)
    result = traffic.send_traffic(spec, config)
    assert (result.requests_sent, result.requests_ok, result.records_answered) == (10, 10, 95)
    assert sorted(len(b["records"]) for b in endpoint.bodies) == [5] + [10] * 9
    assert set(endpoint.auth) == {f"Bearer {TOKEN}"}
    assert endpoint.max_in_flight <= 3
    # 10 requests at 25/s: the last one is sent no earlier than 9 gaps of 40 ms after the start.
    # Judged on the client's clock: arrival times at the server compress when the machine is busy.
    assert result.seconds >= 9 / 25
    assert len({(a["request_id"], a["record_index"]) for a in result.answered}) == 95


def test_the_duration_cap_stops_sending(spec: DatasetSpec, endpoint: FakeEndpoint) -> None:
    config = traffic.TrafficConfig(endpoint=f"{endpoint.url}/predict", token=TOKEN, records=1000, batch_size=1,
                                   rate=20.0, concurrency=2, max_duration_s=1.0)
    start = time.monotonic()
    result = traffic.send_traffic(spec, config)
    assert time.monotonic() - start < 2.5
    assert result.stopped_by_duration_cap and 15 <= result.requests_sent <= 21


def test_drifted_traffic_moves_the_drifted_feature(spec: DatasetSpec) -> None:
    base = dict(endpoint="http://127.0.0.1:1/predict", token=TOKEN, records=2000, seed=3)
    normal = traffic.traffic_records(spec, traffic.TrafficConfig(**base))
    drifted = traffic.traffic_records(spec, traffic.TrafficConfig(**base, drift={"SSLfinal_State": 0.5}))
    rare_normal = (normal["SSLfinal_State"] == 0).mean()  # the rarest value (given the label) gains share
    assert (drifted["SSLfinal_State"] == 0).mean() > rare_normal + 0.15


def test_cli_sends_traffic_and_writes_delayed_labels_that_join(spec: DatasetSpec, endpoint: FakeEndpoint,
                                                                data_root: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MLOPS_API_TOKEN", TOKEN)
    code = main(["simulate", "traffic", "--endpoint", endpoint.url, "--records", "60", "--batch-size", "6",
                 "--rate", "50", "--labels", "--label-share", "0.5", "--seed", "9"])
    assert code == 0
    out = capsys.readouterr().out
    assert "10/10 requests answered (60 records)" in out and "wrote 30 delayed labels" in out
    labels = mon.read_labels(str(data_root / "labels")).frame
    assert list(labels.columns) == ["request_id", "record_index", "label", "labelled_at"] and len(labels) == 30
    # The labels are the simulator's true labels of exactly the records sent.
    sent = pd.DataFrame([r for b in endpoint.bodies for r in b["records"]])
    truth = traffic.traffic_records(spec, traffic.TrafficConfig(endpoint=endpoint.url, token=TOKEN, records=60, seed=9))
    assert sorted(map(tuple, sent.to_numpy().tolist())) == sorted(map(tuple, truth[spec.feature_names].to_numpy().tolist()))
    assert set(labels["label"]) <= {-1, 1}


@pytest.mark.parametrize("argv", [
    ["--rate", "0"], ["--records", "0"], ["--concurrency", "100"], ["--drift", "nope"], ["--drift", "nope=0.2"],
    ["--label-share", "1.5"], ["--rate", "5000"],
])
def test_cli_bad_input_exits_2_with_one_line(argv: list[str], monkeypatch, capsys) -> None:
    monkeypatch.setenv("MLOPS_API_TOKEN", TOKEN)
    with pytest.raises(SystemExit) as raised:
        code = main(["simulate", "traffic", "--endpoint", "http://127.0.0.1:9", *argv])
        raise SystemExit(code)
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)


def test_cli_without_a_token_exits_2(monkeypatch, capsys) -> None:
    monkeypatch.delenv("MLOPS_API_TOKEN", raising=False)
    assert main(["simulate", "traffic", "--endpoint", "http://127.0.0.1:9"]) == 2
    assert "MLOPS_API_TOKEN" in capsys.readouterr().err
