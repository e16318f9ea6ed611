"""The prediction log's shipper process (serving/log_shipper.py): a real child process, real files."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlops_assets.serving.config import ServiceOptions
from mlops_assets.serving.log_shipper import ShipFailed, ShipperProcess
from mlops_assets.serving.prediction_log import (
    PredictionLogWriter,
    encode_request,
    read_prediction_log,
    ship_segment,
)


def _frame(request_id: str, n: int, first: int = 0) -> bytes:
    matrix = np.arange(first, first + 2 * n).reshape(n, 2)
    return encode_request(request_id=request_id, model_version="7", columns=["a", "b"], matrix=matrix,
                          labels=[1] * n, probabilities=[0.75] * n)


def _writer(tmp_path: Path, shipper: str, **kwargs: Any) -> PredictionLogWriter:
    return PredictionLogWriter(str(tmp_path / shipper / "log"), spool_dir=str(tmp_path / shipper / "spool"),
                               flush_interval_s=3600, flush_rows=10**6, max_buffer_rows=10**6,
                               replay_orphans=False, shipper=shipper, **kwargs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_shipper_process_writes_the_same_log_as_the_thread(tmp_path: Path) -> None:
    logs = {}
    for shipper in ("thread", "process"):
        writer = _writer(tmp_path, shipper)
        for i in range(5):
            writer.append_encoded(_frame(f"r{i}", 3, first=10 * i), 3)
        assert writer.flush() == 15
        if shipper == "process":
            pid = writer._process.pid  # type: ignore[union-attr]
            assert pid is not None and pid != os.getpid()  # the parts were written by another process
        writer.append_encoded(_frame("last", 2), 2)
        writer.close()  # ships the rest, then the child exits
        if shipper == "process":
            assert not _alive(pid)
        logs[shipper] = read_prediction_log(str(tmp_path / shipper / "log")).drop(columns="logged_at")
        assert list((tmp_path / shipper / "spool").iterdir()) == []
    assert len(logs["process"]) == 17
    assert logs["process"].equals(logs["thread"])


def test_a_killed_shipper_is_started_again_and_no_row_is_lost(tmp_path: Path) -> None:
    writer = _writer(tmp_path, "process")
    writer.append_encoded(_frame("a", 4), 4)
    assert writer.flush() == 4
    first = writer._process.pid  # type: ignore[union-attr]
    os.kill(first, signal.SIGKILL)
    writer.append_encoded(_frame("b", 3), 3)
    assert writer.flush() == 3
    assert writer._process.starts == 2 and writer._process.pid != first  # type: ignore[union-attr]
    writer.close()
    log = read_prediction_log(str(tmp_path / "process" / "log"))
    assert list(log["request_id"]) == ["a"] * 4 + ["b"] * 3


def test_a_sink_error_in_the_shipper_keeps_the_segment_and_counts_it(tmp_path: Path) -> None:
    failures: list[tuple[str, int]] = []
    blocker = tmp_path / "process" / "log"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the log's folder should be")
    writer = _writer(tmp_path, "process", on_failure=lambda kind, n: failures.append((kind, n)))
    writer.append_encoded(_frame("kept", 3), 3)
    assert writer.flush() == 0 and writer.pending() == 3 and failures == [("flush_failed", 3)]
    blocker.unlink()  # the sink is back: the same child ships the kept segment
    assert writer.flush() == 3
    assert writer._process.starts == 1  # type: ignore[union-attr]
    writer.close()
    assert list(read_prediction_log(str(blocker))["request_id"]) == ["kept"] * 3


def test_the_shipper_reports_an_error_and_a_dead_child_as_ship_failed(tmp_path: Path) -> None:
    segment = tmp_path / "x.spool"
    segment.write_bytes(b"Z\x00\x00\x00\x01!")  # an unknown frame kind
    shipper = ShipperProcess()
    with pytest.raises(ShipFailed, match="unknown frame kind"):
        shipper.ship(str(segment), str(tmp_path / "log"), "part-x.parquet")
    assert segment.exists()  # a failed ship never deletes the segment
    shipper.close()
    broken = ShipperProcess(python="/bin/false")  # a child that exits at once
    with pytest.raises(ShipFailed, match="exited with code 1"):
        broken.ship(str(segment), str(tmp_path / "log"), "part-x.parquet")


def test_a_segment_already_gone_was_shipped_before(tmp_path: Path) -> None:
    assert ship_segment(str(tmp_path / "gone.spool"), str(tmp_path / "log"), "part-gone.parquet") == 0


def test_the_shipper_option_is_checked() -> None:
    assert ServiceOptions().log_shipper == "process"
    with pytest.raises(ValueError, match="log_shipper must be 'process' or 'thread'"):
        ServiceOptions(log_shipper="fork")
    with pytest.raises(ValueError, match="custom writer needs shipper='thread'"):
        PredictionLogWriter("memory://x", flush_interval_s=1, flush_rows=1, max_buffer_rows=1, shipper="process",
                            writer=lambda table, url, name: url)
