"""The prediction log's shipper process: spool segments become Parquet parts in a process of their own.

Shipping a segment (decoding it, encoding Parquet, writing the part) is CPU work that holds the
GIL for stretches. On the answering replica's shipping thread it shared the GIL with the event
loop that answers, which cost a quarter of the throughput at 100 records a request
(bench/serving.py, the "no prediction log" lever). A child process has its own interpreter: the
replica's shipping thread only sends it a segment's path and waits for the row count, with the
GIL released.

The protocol is one JSON line each way per segment over the child's stdin and stdout:
`{"segment": path, "log_url": url, "part": name}` in, `{"rows": n}` or `{"error": "..."}` out.
The child ships and deletes the segment as the thread would (`prediction_log.ship_segment`), so
crash replay and idempotent part names are unchanged. A child that dies is a failed ship (the
segment stays for the next attempt) and is started again on the next one; it exits when its
stdin closes, which is also what happens when the replica dies.

Run as `python -m mlops_assets.serving.log_shipper [--niceness N]` (the writer starts it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
from typing import IO, Any

logger = logging.getLogger(__name__)

# Added to the child's niceness: on a loaded machine the answering processes get the cores first.
# Moderate, not 19: the child still needs a few percent of a core to keep up at full load, else the
# spool grows to its bound and rows are dropped.
SHIPPER_NICENESS = 5
SHIPPER_CLOSE_TIMEOUT_S = 10.0


class ShipFailed(RuntimeError):
    """The shipper process could not ship a segment (a sink error, or the process died)."""


class ShipperProcess:
    """A child process that ships segments, one at a time, started on the first ship."""

    def __init__(self, *, niceness: int = SHIPPER_NICENESS, python: str = sys.executable) -> None:
        self._command = [python, "-m", "mlops_assets.serving.log_shipper", "--niceness", str(niceness)]
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one request on the pipe at a time
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _start(self) -> subprocess.Popen[bytes]:
        # stderr is inherited: the child's warnings land in the replica's log file.
        proc = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self.starts += 1
        if self.starts > 1:
            logger.warning("prediction log: shipper process started again (start %d)", self.starts)
        return proc

    def ship(self, segment: str, log_url: str, part_name: str) -> int:
        """Ship `segment` as `part_name` under `log_url` in the child; the rows shipped. Raises ShipFailed.

        A child found dead (killed, out of memory) is started again and asked once more: shipping
        a segment twice rewrites the same part, so the second ask is safe.
        """
        request = json.dumps({"segment": segment, "log_url": log_url, "part": part_name}).encode() + b"\n"
        with self._lock:
            try:
                reply = self._ask_locked(request)
            except ShipFailed as first:
                logger.warning("prediction log: %s; asking a new shipper process", first)
                reply = self._ask_locked(request)
        answer = json.loads(reply)
        if "error" in answer:
            raise ShipFailed(str(answer["error"]))
        return int(answer["rows"])

    def _ask_locked(self, request: bytes) -> bytes:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(request)
            proc.stdin.flush()
            reply = proc.stdout.readline()
        except OSError as exc:  # a broken pipe: the child is gone
            self._stop_locked()
            raise ShipFailed(f"the shipper process died ({type(exc).__name__})") from exc
        if not reply:
            code = proc.wait()
            self._proc = None
            raise ShipFailed(f"the shipper process exited with code {code}")
        return reply

    def close(self, timeout_s: float = SHIPPER_CLOSE_TIMEOUT_S) -> None:
        """Let the child finish and exit (its stdin closes), killing it after `timeout_s`."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    def _stop_locked(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()


def serve(requests: IO[bytes], replies: IO[bytes]) -> int:
    """The child's loop: ship each requested segment, reply with its rows or the error; segments served."""
    from mlops_assets.serving.prediction_log import ship_segment

    served = 0
    for line in requests:
        reply: dict[str, Any]
        try:
            request = json.loads(line)
            reply = {"rows": ship_segment(request["segment"], request["log_url"], request["part"])}
        except Exception as exc:  # a sink error: reported to the writer, which keeps the segment
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply).encode() + b"\n")
        replies.flush()
        served += 1
    return served


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--niceness", type=int, default=SHIPPER_NICENESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s prediction-log-shipper %(levelname)s %(message)s")
    if args.niceness > 0:
        try:
            os.nice(args.niceness)
        except OSError:
            pass
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # the protocol owns stdout: a stray print must not corrupt it
    serve(sys.stdin.buffer, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
