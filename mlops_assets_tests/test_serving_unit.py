"""The serving logic without Ray: request model, auth, limits, scoring, prediction log, FastAPI app."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.registry.model_store import ModelIntegrityError
from mlops_assets.serving import app as app_module
from mlops_assets.serving.config import ModelRef, ServiceOptions
from mlops_assets.serving.metrics import InMemoryMetrics
from mlops_assets.serving.prediction_log import PredictionLogWriter, read_prediction_log
from mlops_assets.serving.request import (
    RequestError,
    build_request_model,
    parse_predict_body,
    records_to_frame,
)
from mlops_assets.serving.scoring import (
    Scorer,
    decision_threshold,
    positive_column,
    prediction_items,
    score_many,
)
from mlops_assets.serving.service import ServiceCore, bearer_token_ok, is_json_content_type, read_limited

TOKEN = "s3cret-token"


class LinearModel:
    """A stand-in with CatBoost's predict_proba shape: p(positive) from the first feature."""

    classes_ = np.array([0, 1])

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        p = np.clip(0.5 + 0.3 * frame.iloc[:, 0].to_numpy(dtype=float) + self.shift, 0, 1)
        return np.column_stack([1 - p, p])


def _scorer(spec: DatasetSpec, version: str, shift: float = 0.0, threshold: float = 0.5) -> Scorer:
    return Scorer(LinearModel(shift), spec, version, threshold, {"model_name": "m", "version": version})


def _records(spec: DatasetSpec, n: int, first: int = 1) -> list[dict[str, int]]:
    record = {f.name: f.values[0] for f in spec.features}
    record[spec.feature_names[0]] = first
    return [dict(record) for _ in range(n)]


# --- request model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def request_model(spec: DatasetSpec):
    return build_request_model(spec, max_records=3)


def _reject(raw: Any, request_model) -> RequestError:
    body = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    with pytest.raises(RequestError) as info:
        parse_predict_body(body, request_model)
    return info.value


def test_valid_body_is_returned_as_records(spec: DatasetSpec, request_model) -> None:
    records = _records(spec, 2)
    assert parse_predict_body(json.dumps({"records": records}).encode(), request_model) == records
    frame = records_to_frame(records, spec)
    assert list(frame.columns) == spec.feature_names and frame.dtypes.unique().tolist() == [np.dtype("int64")]


@pytest.mark.parametrize(("change", "status", "words"), [
    (lambda r: r.pop("URL_Length"), 422, ["records[0].URL_Length", "missing", "[-1, 0, 1]"]),
    (lambda r: r.update(colour=1), 422, ["records[0].colour", "unknown field"]),
    (lambda r: r.update(URL_Length="1"), 422, ["records[0].URL_Length", "integer"]),
    (lambda r: r.update(URL_Length=1.0), 422, ["records[0].URL_Length", "integer"]),
    (lambda r: r.update(URL_Length=False), 422, ["records[0].URL_Length", "integer"]),
    (lambda r: r.update(URL_Length=None), 422, ["records[0].URL_Length"]),
    (lambda r: r.update(having_IP_Address=0), 422, ["having_IP_Address", "value 0 is not allowed", "[-1, 1]"]),
])
def test_each_bad_record_names_field_and_allowed_values(spec, request_model, change, status, words) -> None:
    record = _records(spec, 1)[0]
    change(record)
    error = _reject({"records": [record]}, request_model)
    assert error.status_code == status
    text = json.dumps(error.body())
    for word in words:
        assert word in text, text


def test_body_level_errors(spec: DatasetSpec, request_model) -> None:
    assert _reject(b"{not json", request_model).status_code == 400
    assert _reject(b"\xff\xfe", request_model).status_code == 400
    assert "JSON object" in _reject([1], request_model).message
    assert "empty" in _reject({"records": []}, request_model).message
    too_many = _reject({"records": _records(spec, 4)}, request_model)
    assert too_many.status_code == 422 and "at most 3" in too_many.message
    extra = _reject({"records": _records(spec, 1), "debug": True}, request_model)
    assert "unknown field 'debug'" in extra.message


def test_many_bad_records_report_a_bounded_list(spec: DatasetSpec) -> None:
    model = build_request_model(spec, max_records=500)
    bad = [{**r, "URL_Length": 7} for r in _records(spec, 500)]
    error = _reject({"records": bad}, model)
    assert len(error.errors) == 20 and "(and 499 more)" in error.message


# --- auth, content type, size --------------------------------------------------------------------


def test_bearer_token_check() -> None:
    assert bearer_token_ok(f"Bearer {TOKEN}", TOKEN)
    assert bearer_token_ok(f"bearer {TOKEN}", TOKEN)
    assert not bearer_token_ok(None, TOKEN)
    assert not bearer_token_ok(TOKEN, TOKEN)  # no scheme
    assert not bearer_token_ok(f"Basic {TOKEN}", TOKEN)
    assert not bearer_token_ok(f"Bearer {TOKEN}x", TOKEN)
    assert not bearer_token_ok("Bearer ", "")  # an empty configured token never authenticates


def test_content_type_check() -> None:
    assert is_json_content_type("application/json; charset=utf-8")
    assert is_json_content_type("application/problem+json")
    assert not is_json_content_type("text/plain")
    assert not is_json_content_type(None)


async def _chunks(*parts: bytes):
    for part in parts:
        yield part


def test_read_limited_rejects_by_header_and_by_stream() -> None:
    assert asyncio.run(read_limited(_chunks(b"ab", b"cd"), "4", 4)) == b"abcd"
    with pytest.raises(RequestError) as by_header:
        asyncio.run(read_limited(_chunks(b""), "5", 4))
    assert by_header.value.status_code == 413
    with pytest.raises(RequestError) as by_stream:  # a lying or absent Content-Length
        asyncio.run(read_limited(_chunks(b"abc", b"de"), None, 4))
    assert by_stream.value.status_code == 413
    with pytest.raises(RequestError) as bad_header:
        asyncio.run(read_limited(_chunks(b""), "lots", 4))
    assert bad_header.value.status_code == 400


# --- scoring ------------------------------------------------------------------------------------


def test_positive_column_follows_the_contract() -> None:
    assert positive_column(np.array([0, 1]), -1) == 1  # 0/1 target: column 1 is the positive class
    assert positive_column(np.array([-1, 1]), -1) == 0  # trained on the spec's own labels
    assert positive_column(np.array([-1, 1]), 1) == 1
    assert positive_column(None, -1) == 1


def test_decision_threshold_tag() -> None:
    assert decision_threshold({}) == 0.5
    assert decision_threshold({"decision_threshold": "0.3"}) == 0.3
    with pytest.raises(ValueError):
        decision_threshold({"decision_threshold": "1.5"})
    with pytest.raises(ValueError):
        decision_threshold({"decision_threshold": "high"})


def test_labels_use_the_threshold_and_batches_split_back(spec: DatasetSpec) -> None:
    scorer = _scorer(spec, "7", threshold=0.75)
    frame = records_to_frame(_records(spec, 2, first=1) + _records(spec, 1, first=-1), spec)
    scored = scorer.score(frame)
    assert scored.probabilities == pytest.approx([0.8, 0.8, 0.2])
    assert scored.labels == [spec.positive_class, spec.positive_class, spec.negative_class]
    items = prediction_items(scored, spec)
    assert items[0] == {"label": -1, "label_name": "phishing", "phishing_probability": pytest.approx(0.8)}
    parts = score_many(scorer, [frame.iloc[:1], frame.iloc[1:]])
    assert [len(p.labels) for p in parts] == [1, 2] and parts[1].probabilities == scored.probabilities[1:]


def test_model_ref_from_user_config() -> None:
    assert ModelRef.from_user_config(None) == ModelRef(alias="champion")
    assert ModelRef.from_user_config({"version": 3}).version == "3"
    with pytest.raises(ValueError, match="both"):
        ModelRef.from_user_config({"version": "3", "alias": "champion"})
    with pytest.raises(ValueError, match="unknown"):
        ModelRef.from_user_config({"verison": "3"})
    with pytest.raises(ValueError, match="max_records"):
        ServiceOptions(max_records=0)


# --- prediction log -----------------------------------------------------------------------------


def _rows(n: int, request_id: str = "r") -> list[dict[str, Any]]:
    from mlops_assets.serving.prediction_log import prediction_rows

    return prediction_rows(request_id=request_id, model_version="1", records=[{"a": 1}] * n,
                           labels=[1] * n, probabilities=[0.25] * n)


def _writer(tmp_path: Path, **kwargs: Any) -> PredictionLogWriter:
    options: dict[str, Any] = {"flush_interval_s": 3600, "flush_rows": 1000, "max_buffer_rows": 1000}
    return PredictionLogWriter(str(tmp_path / "log"), spool_dir=str(tmp_path / "spool"), **{**options, **kwargs})


def test_log_flushes_on_size_and_on_close(tmp_path: Path) -> None:
    writer = _writer(tmp_path, flush_rows=5, max_buffer_rows=100)
    log_url = str(tmp_path / "log")
    writer.append(_rows(3, "a"))
    time.sleep(0.2)
    assert read_prediction_log(log_url).empty  # below size, timer far away
    writer.append(_rows(3, "b"))  # reaches 5: the thread flushes
    deadline = time.monotonic() + 5
    while len(read_prediction_log(log_url)) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(read_prediction_log(log_url)) == 6
    writer.append(_rows(1, "c"))
    writer.close()
    log = read_prediction_log(log_url)
    assert len(log) == 7 and set(log["request_id"]) == {"a", "b", "c"}
    assert list(read_prediction_log(log_url, request_id="c")["record_index"]) == [0]
    assert list((tmp_path / "spool").iterdir()) == []  # shipped segments and the lock are gone


def test_log_flushes_on_timer(tmp_path: Path) -> None:
    writer = _writer(tmp_path, flush_interval_s=0.1)
    writer.append(_rows(2))
    deadline = time.monotonic() + 5
    while read_prediction_log(str(tmp_path / "log")).empty and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.close()
    assert len(read_prediction_log(str(tmp_path / "log"))) == 2


def test_a_failing_sink_never_raises_counts_and_retries(tmp_path: Path) -> None:
    failures: list[tuple[str, int]] = []
    broken = threading.Event()
    broken.set()

    def flaky(rows, url, name):
        if broken.is_set():
            raise OSError("bucket unreachable")
        from mlops_assets.serving.prediction_log import write_part

        return write_part(rows, url, name)

    writer = _writer(tmp_path, max_buffer_rows=4, on_failure=lambda kind, n: failures.append((kind, n)),
                     writer=flaky)
    writer.append(_rows(3))
    assert writer.flush() == 0 and writer.pending() == 3 and failures == [("flush_failed", 3)]
    writer.append(_rows(3))  # over the bound of 4: the oldest segment (3 rows) is dropped, counted
    assert writer.pending() == 3 and writer.dropped_rows == 3 and ("dropped", 3) in failures
    broken.clear()
    assert writer.flush() == 3  # the sink is back: kept rows are written
    writer.close()
    assert len(read_prediction_log(str(tmp_path / "log"))) == 3


def test_parts_are_filed_by_the_hour_of_their_rows_and_a_segment_across_an_hour_splits(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from mlops_assets.serving.prediction_log import prediction_rows, write_part

    at = datetime(2026, 1, 5, 10, 59, 59, tzinfo=UTC)
    writer = _writer(tmp_path, replay_orphans=False)
    for i, when in enumerate((at, at + timedelta(seconds=2), at + timedelta(seconds=3))):
        writer.append(prediction_rows(request_id=f"r{i}", model_version="1", records=[{"a": i}] * 2,
                                      labels=[1, 1], probabilities=[0.5, 0.5], logged_at=when))
    assert writer.flush() == 6
    writer.close()
    log_dir = tmp_path / "log"
    parts = sorted(p.relative_to(log_dir).as_posix() for p in log_dir.rglob("*.parquet"))
    [name] = {p.rsplit("/", 1)[-1] for p in parts}  # one segment: the same part name in both hours
    assert parts == [f"date=2026-01-05/hour=10/{name}", f"date=2026-01-05/hour=11/{name}"]
    assert pd.read_parquet(log_dir / parts[0])["request_id"].tolist() == ["r0", "r0"]
    assert pd.read_parquet(log_dir / parts[1])["request_id"].tolist() == ["r1", "r1", "r2", "r2"]
    # Shipping the same segment again (a replay after a crash) rewrites the same two parts.
    write_part(read_prediction_log(str(log_dir)).to_dict("records"), str(log_dir), name)
    assert sorted(p.relative_to(log_dir).as_posix() for p in log_dir.rglob("*.parquet")) == parts
    assert len(read_prediction_log(str(log_dir))) == 6


def _encoded(request_id: str, n: int) -> bytes:
    from mlops_assets.serving.prediction_log import encode_request

    return encode_request(request_id=request_id, model_version="1", columns=["a", "b"],
                          matrix=np.arange(2 * n).reshape(n, 2), labels=[1] * n, probabilities=[0.5] * n)


_KILLED_WRITER = r"""
import os, signal, sys
import numpy as np
from mlops_assets.serving.prediction_log import PredictionLogWriter, encode_request, write_part

log_url, spool, mode = sys.argv[1:4]

def ship_then_die(rows, url, name):
    write_part(rows, url, name)  # the part lands, then the process dies before deleting the segment
    os.kill(os.getpid(), signal.SIGKILL)

writer = PredictionLogWriter(log_url, spool_dir=spool, flush_interval_s=3600, flush_rows=10**6,
                             max_buffer_rows=10**6, writer=ship_then_die if mode == "ship" else write_part)
for i in range(20):
    writer.append_encoded(encode_request(request_id=f"r{i}", model_version="1", columns=["a", "b"],
                                         matrix=np.array([[i, 1], [i, 2]]), labels=[1, -1],
                                         probabilities=[0.9, 0.1]), 2)
# A write that a crash cut short: never answered, so never logged.
os.write(writer._fd, b'M\x00\x00\x10\x00partial')
if mode == "ship":
    writer.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("mode", ["buffered", "ship"])
def test_rows_spooled_by_a_killed_writer_are_replayed_exactly_once(tmp_path: Path, mode: str) -> None:
    import signal
    import subprocess
    import sys

    log_url, spool = str(tmp_path / "log"), str(tmp_path / "spool")
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, log_url, spool, mode], timeout=120)
    assert done.returncode == -signal.SIGKILL
    before = read_prediction_log(log_url)
    assert len(before) == (40 if mode == "ship" else 0)

    live = PredictionLogWriter(log_url, spool_dir=spool, flush_interval_s=3600, flush_rows=10**6,
                               max_buffer_rows=10**6, replay_orphans=False)  # this one must not take itself
    other = _writer(tmp_path, replay_orphans=False)
    assert other.replay_orphans() == 40  # the dead writer's rows; the live writer's lock is respected
    assert other.replay_orphans() == 0
    log = read_prediction_log(log_url)
    assert len(log) == 40 and not log.duplicated(["request_id", "record_index"]).any()
    assert set(log["request_id"]) == {f"r{i}" for i in range(20)}
    assert list(log[log["request_id"] == "r3"]["a"]) == [3, 3] and list(log["label"][:2]) == [1, -1]
    live.close()
    other.close()
    assert list(Path(spool).iterdir()) == []


def test_a_segment_already_gone_was_shipped_by_another_writer(tmp_path: Path) -> None:
    from mlops_assets.serving.prediction_log import ship_segment

    assert ship_segment(str(tmp_path / "gone.spool"), str(tmp_path / "log"), "part-gone.parquet") == 0


def test_the_spool_outlives_a_sink_that_is_down_at_close(tmp_path: Path) -> None:
    def down(rows, url, name):
        raise OSError("bucket unreachable")

    first = _writer(tmp_path, writer=down, replay_orphans=False)
    first.append_encoded(_encoded("x", 3), 3)
    first.close()  # nothing shipped: the segment stays, and its lock is released with the handle
    assert read_prediction_log(str(tmp_path / "log")).empty
    second = _writer(tmp_path, replay_orphans=False)
    assert second.replay_orphans() == 3
    second.close()
    assert list(read_prediction_log(str(tmp_path / "log"))["request_id"]) == ["x"] * 3


# --- the FastAPI app, with a core but no Ray ------------------------------------------------------


@pytest.fixture()
def core(spec: DatasetSpec, tmp_path: Path) -> Iterator[ServiceCore]:
    options = ServiceOptions(max_records=5, max_body_bytes=4000, predict_timeout_s=0.5)
    log = PredictionLogWriter(str(tmp_path / "log"), flush_interval_s=3600, flush_rows=10_000, max_buffer_rows=10_000,
                              spool_dir=str(tmp_path / "spool"))
    scorers = {"1": _scorer(spec, "1"), "2": _scorer(spec, "2", shift=0.1)}

    def loader(ref: ModelRef) -> Scorer:
        if ref.version not in scorers:
            raise LookupError(f"no version {ref.version}")
        return scorers[ref.version]

    service = ServiceCore(spec=spec, options=options, token=TOKEN, metrics=InMemoryMetrics(), log_writer=log,
                          loader=loader)
    app_module.set_core(service)
    yield service
    app_module.set_core(None)
    service.close()


@pytest.fixture()
def client(core: ServiceCore) -> TestClient:
    return TestClient(app_module.api, raise_server_exceptions=False)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_without_a_model_health_fails_and_predict_is_503(core: ServiceCore, client: TestClient, spec) -> None:
    assert client.get("/healthz").status_code == 503
    with pytest.raises(RuntimeError, match="no model"):
        core.check_health()
    response = client.post("/predict", json={"records": _records(spec, 1)}, headers=AUTH)
    assert response.status_code == 503 and "no model loaded" in response.json()["error"]


def test_health_without_a_model_reports_a_code_not_an_exception(core: ServiceCore, client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_model_configured"
    assert client.get("/model").status_code == 503 and "no_model_configured" in client.get("/model").json()["error"]


@pytest.mark.parametrize(("error", "code"), [
    (ModelIntegrityError("/srv/store/m.cb sha256 abc does not match def"), "artifact_integrity_failed"),
    (LookupError("sqlite:////home/u/mlflow.db: no version 7"), "model_version_not_found"),
    (OSError("postgresql+psycopg2://user:secret@db/mlflow refused"), "model_load_failed"),
])
def test_a_failed_load_answers_a_stable_code_and_logs_the_exception(
    core: ServiceCore, client: TestClient, caplog: pytest.LogCaptureFixture, error: Exception, code: str
) -> None:
    def failing(ref: ModelRef) -> Scorer:
        raise error

    core._loader = failing
    with caplog.at_level(logging.ERROR, logger="mlops_assets.serving.service"):
        asyncio.run(core.reconfigure(ModelRef(version="7")))
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json()["error"]["code"] == code
    message = health.json()["error"]["message"]
    assert "\n" not in message and "version 7" in message
    for response in (health, client.get("/model")):
        text = response.text
        assert str(error) not in text and "/srv/" not in text and "secret" not in text and "Traceback" not in text
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and logged[-1].exc_info[1] is error  # the operator still gets the whole exception


def test_reconfigure_switches_and_a_failed_load_keeps_the_current_model(core, client, spec) -> None:
    asyncio.run(core.reconfigure(ModelRef(version="1")))
    assert client.get("/healthz").json() == {"status": "ok", "model_version": "1"}
    asyncio.run(core.reconfigure(ModelRef(version="9")))
    body = client.get("/model").json()
    assert body["version"] == "1"
    assert body["last_load_error"] == {"code": "model_version_not_found",
                                       "message": "phishing-classifier version 9 is not in the registry"}
    assert "no version 9" not in json.dumps(body)  # the exception's own text stays in the replica log
    core.check_health()  # still healthy: it serves version 1
    asyncio.run(core.reconfigure(ModelRef(version="2")))
    response = client.post("/predict", json={"records": _records(spec, 2)}, headers=AUTH)
    assert response.status_code == 200 and response.json()["model_version"] == "2"
    assert core.metrics.versions == ["1", "2"]


def test_predict_answers_logs_and_counts(core, client, spec) -> None:
    asyncio.run(core.reconfigure(ModelRef(version="1")))
    records = _records(spec, 2) + _records(spec, 1, first=-1)
    response = client.post("/predict", json={"records": records}, headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert [p["label"] for p in body["predictions"]] == [-1, -1, 1]
    core.log.flush()
    log = read_prediction_log(core.log.log_url, request_id=body["request_id"])
    assert len(log) == 3 and set(log["model_version"]) == {"1"}
    assert log[spec.feature_names[0]].tolist() == [1, 1, -1]
    assert core.metrics.by_label == {"phishing": 2, "legitimate": 1}
    assert core.metrics.requests[("/predict", 200)] == 1


@pytest.mark.parametrize(("kwargs", "status"), [
    ({"content": b"nope", "headers": {**AUTH, "Content-Type": "application/json"}}, 400),
    ({"content": b"{}", "headers": {**AUTH, "Content-Type": "text/csv"}}, 415),
    ({"json": {"records": []}, "headers": AUTH}, 422),
    ({"content": b"[" + b" " * 5000 + b"]", "headers": {**AUTH, "Content-Type": "application/json"}}, 413),
    ({"json": {"records": []}}, 401),
    ({"json": {"records": []}, "headers": {"Authorization": "Bearer wrong"}}, 401),
])
def test_errors_are_json_and_counted(core, client, kwargs, status) -> None:
    asyncio.run(core.reconfigure(ModelRef(version="1")))
    response = client.post("/predict", **kwargs)
    assert response.status_code == status
    assert set(response.json()) <= {"error", "errors"}
    assert core.metrics.requests[("/predict", status)] == 1


def test_unexpected_errors_are_500_without_internals(core, client, spec, monkeypatch) -> None:
    asyncio.run(core.reconfigure(ModelRef(version="1")))

    async def boom(frame):
        raise ZeroDivisionError("secret detail at /srv/app/model.py line 3")

    monkeypatch.setattr(core, "score_fn", boom)
    response = client.post("/predict", json={"records": _records(spec, 1)}, headers=AUTH)
    assert response.status_code == 500
    assert "secret" not in response.text and "model.py" not in response.text
    assert response.json() == {"error": "internal error; the server log has the details"}


def test_a_slow_prediction_times_out_with_504(core, client, spec, monkeypatch) -> None:
    asyncio.run(core.reconfigure(ModelRef(version="1")))

    async def slow(frame):
        await asyncio.sleep(5)

    monkeypatch.setattr(core, "score_fn", slow)
    started = time.monotonic()
    response = client.post("/predict", json={"records": _records(spec, 1)}, headers=AUTH)
    assert response.status_code == 504 and "longer than 0.5s" in response.json()["error"]
    assert time.monotonic() - started < 3


def test_missing_token_configuration_refuses_to_start(spec, tmp_path) -> None:
    log = PredictionLogWriter(str(tmp_path), flush_interval_s=3600, flush_rows=10, max_buffer_rows=10,
                              spool_dir=str(tmp_path / "spool"))
    with pytest.raises(ValueError, match="MLOPS_API_TOKEN"):
        ServiceCore(spec=spec, options=ServiceOptions(), token="", metrics=InMemoryMetrics(), log_writer=log,
                    loader=lambda ref: _scorer(spec, "1"))
    log.close()


def test_prediction_log_url_default_and_override(tmp_path) -> None:
    from mlops_assets.settings import load_settings

    settings = load_settings({"MLOPS_DATA_URL": str(tmp_path)})
    assert app_module.prediction_log_url(settings, ServiceOptions()) == f"{tmp_path}/predictions"
    configured = load_settings({"MLOPS_DATA_URL": str(tmp_path), "MLOPS_PREDICTION_LOG_URL": "s3://b/p"})
    assert app_module.prediction_log_url(configured, ServiceOptions()) == "s3://b/p"
    assert app_module.prediction_log_url(configured, ServiceOptions(prediction_log_url="memory://x")) \
        == "memory://x"


# --- the ingress's forwarding, without Ray --------------------------------------------------------


def test_a_forwarded_request_runs_the_app_in_process_and_returns_its_log_line(core, spec) -> None:
    from mlops_assets.serving.ingress import ForwardedRequest, call_asgi
    from mlops_assets.serving.prediction_log import decode_spool

    asyncio.run(core.reconfigure(ModelRef(version="1")))
    body = json.dumps({"records": _records(spec, 2)}).encode()
    headers = [(b"authorization", f"Bearer {TOKEN}".encode()), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    lines: list[tuple[bytes, int]] = []
    state = {"request_id": "fixed-id", "log_sink": lambda line, rows: lines.append((line, rows))}
    answer = asyncio.run(call_asgi(app_module.api, ForwardedRequest("POST", "/predict", b"", headers, body,
                                                                    "fixed-id"), state))
    assert answer.status == 200 and json.loads(answer.body)["request_id"] == "fixed-id"
    assert (b"content-type", b"application/json") in answer.headers
    assert len(lines) == 1 and lines[0][1] == 2
    rows = decode_spool(lines[0][0])
    assert [r["request_id"] for r in rows] == ["fixed-id"] * 2 and rows[0]["model_version"] == "1"
    assert core.log.pending() == 0  # logged by the sink (the ingress), not by this replica's own log


def test_retry_sends_again_only_when_the_replica_died() -> None:
    from ray.exceptions import ActorDiedError

    from mlops_assets.serving.ingress import call_with_retry

    calls: list[int] = []

    async def dies_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ActorDiedError()
        return "answer"

    assert asyncio.run(call_with_retry(dies_once, backoff_s=0)) == ("answer", 2) and len(calls) == 2

    async def broken() -> str:
        calls.append(1)
        raise ValueError("a bug, not a death")

    calls.clear()
    with pytest.raises(ValueError):
        asyncio.run(call_with_retry(broken, backoff_s=0))
    assert len(calls) == 1

    async def always_dies() -> str:
        calls.append(1)
        raise ActorDiedError()

    calls.clear()
    with pytest.raises(ActorDiedError):
        asyncio.run(call_with_retry(always_dies, attempts=3, backoff_s=0))
    assert len(calls) == 3


def test_a_segment_ships_as_the_same_table_column_wise_as_row_by_row() -> None:
    """The shipping thread builds a segment's table from the raw arrays (no dict per row): the
    same schema and values as the row path, JSON frames and a torn tail included."""
    import pyarrow as pa

    from mlops_assets.serving.prediction_log import (
        decode_spool,
        decode_spool_table,
        encode_request,
        encode_rows,
        prediction_rows,
        rows_to_table,
    )

    rng = np.random.default_rng(0)
    frames = [encode_request(request_id=f"r{i}", model_version=str(1 + i % 2), columns=["a", "b]", "c"],
                             matrix=rng.integers(-1, 2, (1 + i % 4, 3)), labels=rng.integers(0, 2, 1 + i % 4),
                             probabilities=rng.random(1 + i % 4), shadow=i >= 9) for i in range(12)]
    data = b"".join(frames[:9])
    assert decode_spool_table(data).equals(rows_to_table(decode_spool(data)))
    shadowed = b"".join(frames[9:])  # a shadow's frames (the shadow log's writer holds only those)
    assert decode_spool_table(shadowed).equals(rows_to_table(decode_spool(shadowed)))
    table = decode_spool_table(data + shadowed).to_pandas()  # a name with a bracket; `shadow` on its rows only
    assert list(table.columns[4:7]) == ["a", "b]", "c"]
    assert table["shadow"].fillna(False).tolist() == [False] * len(decode_spool(data)) + [True] * len(
        decode_spool(shadowed))
    torn = data + frames[0][:-3]
    assert decode_spool_table(torn).num_rows == decode_spool_table(data).num_rows
    rows = prediction_rows(request_id="j", model_version="1", records=[{"proto": "tcp", "bytes": 1.5}] * 2,
                           labels=["attack", "normal"], probabilities=[0.9, 0.2])
    assert decode_spool_table(encode_rows(rows)).equals(rows_to_table(decode_spool(encode_rows(rows))))
    assert decode_spool_table(b"").num_rows == 0 and isinstance(decode_spool_table(b""), pa.Table)


class _RecordingCounter:
    """A stand-in for a Ray counter: the calls it got, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str] | None]] = []

    def inc(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append((value, tags))


def test_a_buffered_counter_sums_on_the_loop_and_hands_over_once_per_interval() -> None:
    import asyncio

    from mlops_assets.serving.metrics import BufferedCounter

    ray_counter = _RecordingCounter()
    counter = BufferedCounter(ray_counter, ("route", "status"), interval_s=0.05)

    async def traffic() -> list[tuple[float, dict[str, str] | None]]:
        for _ in range(5):
            counter.inc(1, "/predict", "200")
        counter.inc(2, "/predict", "422")
        before = list(ray_counter.calls)
        await asyncio.sleep(0.2)
        assert before == [], "nothing reaches Ray before the interval"
        return list(ray_counter.calls)

    sent = asyncio.run(traffic())
    assert sorted(sent, key=lambda c: str(c[1])) == [(5.0, {"route": "/predict", "status": "200"}),
                                                       (2.0, {"route": "/predict", "status": "422"})]
    # Off the event loop (the log's shipping thread): straight to Ray.
    counter.inc(3, "/predict", "200")
    assert ray_counter.calls[-1] == (3, {"route": "/predict", "status": "200"})

    async def shutdown() -> None:
        counter.inc(7, "/healthz", "200")
        counter.flush()  # at once, and the timer it armed is cancelled
        assert ray_counter.calls[-1] == (7.0, {"route": "/healthz", "status": "200"})
        await asyncio.sleep(0.1)

    calls = len(ray_counter.calls) + 1
    asyncio.run(shutdown())
    assert len(ray_counter.calls) == calls, "a flushed sum is not sent twice"
    untagged = _RecordingCounter()
    BufferedCounter(untagged).inc(4)
    assert untagged.calls == [(4, None)]
