"""The prediction log: every answered record, spooled locally before the answer, shipped as Parquet parts.

`PredictionLogWriter.append` writes one line to a local spool file (one frame, one `write` to a file opened
with O_APPEND: the bytes are in the page cache when it returns, so they outlive a SIGKILL of the
process; no fsync, which only matters for a crash of the machine). A background thread ships the
spool as Parquet parts (on a timer, when enough rows wait, and on close) to any fsspec URL
(through `core.storage`: a local folder or s3://):
object stores cannot append to a file, so each spool segment becomes one immutable part under
`date=YYYY-MM-DD/hour=HH/` of its rows' time (two parts of one name when it spans an hour), and
is deleted once shipped; monitoring reads one hour's folder per window. A failed ship keeps the segment for the next
attempt (up to a bound, then the oldest segments are dropped) and is reported through
`on_failure`, which the service counts in a metric.

Crash replay, exactly once: every writer holds an flock on its own `<writer>.lock` in the spool
directory. The kernel releases it when the process dies, so any writer that can take the lock of
another has found an orphan: it ships the orphan's segments, then deletes them and the lock. A
segment's part name derives from the segment's name, so shipping a segment twice (the owner
died after the part landed but before deleting the segment) rewrites the same part with the
same rows instead of adding a duplicate; readers need no dedupe.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlops_assets.core import storage
from mlops_assets.settings import join_url

logger = logging.getLogger(__name__)

# Columns before the features; the features follow in the spec's order, then the outputs.
META_COLUMNS = ("logged_at", "request_id", "model_version", "record_index")
OUTPUT_COLUMNS = ("label", "probability")


def prediction_rows(
    *,
    request_id: str,
    model_version: str,
    records: Sequence[Mapping[str, Any]],
    labels: Sequence[Any],
    probabilities: Sequence[float],
    logged_at: datetime | None = None,
) -> list[dict[str, Any]]:
    """One flat row per record: when, which request and version, the inputs and the outputs."""
    at = logged_at or datetime.now(UTC)
    return [
        {"logged_at": at, "request_id": request_id, "model_version": model_version, "record_index": i,
         **record, "label": label, "probability": float(p)}
        for i, (record, label, p) in enumerate(zip(records, labels, probabilities, strict=True))
    ]


SPOOL_DIR_ENV = "MLOPS_PREDICTION_SPOOL_DIR"
SPOOL_SUFFIX = ".spool"
LOCK_SUFFIX = ".lock"


def default_spool_dir(log_url: str, root: str | None = None) -> str:
    """A node-local directory per log URL: `root` (the replica's MLOPS_PREDICTION_SPOOL_DIR, else the
    temp dir)/<url hash>.

    Keyed by the URL, so a replica replays only spools bound for the log it writes to.
    """
    root = root or os.path.join(tempfile.gettempdir(), "mlops_assets-prediction-spool")
    return os.path.join(root, hashlib.sha256(log_url.encode()).hexdigest()[:16])


# A spool segment is a sequence of frames: 1 byte kind, 4 bytes payload length (big-endian), payload.
# The length tells a frame a crash cut short (its request was never answered) from a whole one.
_FRAME = struct.Struct(">cI")
_MATRIX, _ROWS = b"M", b"J"
_HEADER_LEN = struct.Struct(">I")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_SHADOW_HEADER = ',"shadow":true'  # in a raw-array frame's header: its rows are a shadow's (mark_shadow_frame)


@functools.lru_cache(maxsize=8)
def _columns_json(columns: tuple[str, ...]) -> str:
    return json.dumps(list(columns))


def encode_request(
    *,
    request_id: str,
    model_version: str,
    columns: Sequence[str],
    matrix: np.ndarray,
    labels: Sequence[int],
    probabilities: Sequence[float],
    logged_at: datetime | None = None,
    shadow: bool = False,
) -> bytes:
    """One answered request as one spool frame: a small JSON header, then the matrix and outputs as raw arrays.

    This runs on the request path, so it copies arrays instead of encoding one value at a time
    (a tenth of the cost of JSON for 10 records of 30 features). `shadow` marks a candidate's
    mirrored answer (the log's `shadow` column, serving/release.py).
    """
    at_ns = time.time_ns() if logged_at is None else (logged_at - _EPOCH) // _MICROSECOND * 1000
    values = np.ascontiguousarray(matrix, dtype=np.int64)
    header = (f'{{"t":{at_ns},"request_id":{json.dumps(request_id)},"model_version":{json.dumps(model_version)},'
              f'"n":{values.shape[0]},"columns":{_columns_json(tuple(columns))}'
              f'{_SHADOW_HEADER if shadow else ""}}}').encode()
    return _matrix_frame(header, values.tobytes(), np.asarray(labels, dtype=np.int64).tobytes(),
                         np.asarray(probabilities, dtype=np.float64).tobytes())



def _matrix_frame(header: bytes, *arrays: bytes) -> bytes:
    payload = b"".join((_HEADER_LEN.pack(len(header)), header, *arrays))
    return _FRAME.pack(_MATRIX, len(payload)) + payload


def mark_shadow_frame(frame: bytes) -> tuple[bytes, int]:
    """One spool frame with its rows marked `shadow = true`, and its row count.

    A raw-array frame gets the mark in its header (its arrays are copied as they are); a JSON-rows
    frame is decoded and encoded again with the field on every row."""
    out, rows = [], 0
    for kind, payload in _frames(frame):
        if kind == _MATRIX:
            (size,) = _HEADER_LEN.unpack_from(payload)
            header = json.loads(payload[4:4 + size])
            header["shadow"] = True
            out.append(_matrix_frame(json.dumps(header, separators=(",", ":")).encode(), payload[4 + size:]))
            rows += int(header["n"])
        else:
            marked = json.loads(payload)
            for row in marked:
                row["shadow"] = True
            out.append(encode_rows(marked))
            rows += len(marked)
    return b"".join(out), rows


def frame_matrix(frame: bytes, columns: Sequence[str]) -> np.ndarray | None:
    """The features of a one-frame raw-array line with these columns (no copy), else None."""
    if len(frame) < _FRAME.size:
        return None
    kind, size = _FRAME.unpack_from(frame)
    if kind != _MATRIX or _FRAME.size + size != len(frame):
        return None
    header, values, _, _ = _matrix_parts(frame[_FRAME.size:])
    return values if header["columns"] == list(columns) else None


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} in the prediction spool")


def encode_rows(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Ready-made rows (see `prediction_rows`) as one spool frame."""
    payload = json.dumps(list(rows), separators=(",", ":"), default=_json_default).encode()
    return _FRAME.pack(_ROWS, len(payload)) + payload


def _matrix_rows(payload: bytes) -> list[dict[str, Any]]:
    header, values, labels, probabilities = _matrix_parts(payload)
    at = _EPOCH + timedelta(microseconds=header["t"] // 1000)  # whole microseconds, as a datetime holds
    marks = {"shadow": True} if header.get("shadow") else {}
    return [{"logged_at": at, "request_id": header["request_id"], "model_version": header["model_version"],
             "record_index": i, **dict(zip(header["columns"], row, strict=True)), "label": int(label),
             "probability": float(p), **marks}
            for i, (row, label, p) in enumerate(zip(values.tolist(), labels.tolist(), probabilities.tolist(),
                                                    strict=True))]


def _frames(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(kind, payload) of each whole frame of a spool segment. A last frame shorter than its length
    is a write the crash cut short: its request was never answered (the answer waits for the
    write), so it is skipped."""
    offset = 0
    while offset + _FRAME.size <= len(data):
        kind, size = _FRAME.unpack_from(data, offset)
        start, end = offset + _FRAME.size, offset + _FRAME.size + size
        if end > len(data):
            break
        if kind not in (_MATRIX, _ROWS):
            raise ValueError(f"prediction spool: unknown frame kind {kind!r} at byte {offset}")
        yield kind, data[start:end]
        offset = end
    if offset != len(data):
        logger.warning("prediction spool: skipping a torn last frame (a write cut by a crash)")


def decode_spool_table(data: bytes) -> pa.Table:
    """The rows of a spool segment as one Arrow table, the schema `rows_to_table` gives.

    This runs in the answering replica's process for every row of the log (on the shipping thread,
    which holds the GIL while it works): a run of raw-array frames becomes columns from one buffer
    per array kind, with no Python object per row (a dict per row made the log cost half of the
    throughput at 100 records a request) and next to nothing per frame (three arrays and a JSON
    header per frame made single-record requests cost 15 us a row to ship)."""
    tables: list[pa.Table] = []
    run = _MatrixRun()
    for kind, payload in _frames(data):
        if kind == _MATRIX:
            header, offset = _matrix_header(payload)
            if not run.takes(header):
                tables += run.close()
            run.add(header, payload, offset)
        else:
            tables += run.close()
            rows = json.loads(payload)
            for row in rows:
                row["logged_at"] = datetime.fromisoformat(row["logged_at"])
            tables.append(rows_to_table(rows))
    tables += run.close()
    if not tables:
        return pa.table({})
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")


_COLUMNS_KEY = b',"columns":'


def _matrix_header(payload: bytes) -> tuple[dict[str, Any], int]:
    """A raw-array frame's header, and the offset of its arrays in the payload.

    The column names, the same in every frame of a replica, are parsed once (`_column_list`): a
    header's 30 names as new strings each time were most of a single-record frame's decode.
    """
    (size,) = _HEADER_LEN.unpack_from(payload)
    raw = payload[4:4 + size]
    cut = raw.find(_COLUMNS_KEY)
    if cut < 0:
        return orjson.loads(raw), 4 + size
    header = orjson.loads(raw[:cut] + b"}")
    listed = raw[cut + len(_COLUMNS_KEY):-1]  # the list, then any later fields (`"shadow":true`)
    end = listed.rfind(b"]") + 1
    header["columns"] = _column_list(listed[:end])
    if listed[end:]:
        header.update(orjson.loads(b"{" + listed[end + 1:] + b"}"))
    return header, 4 + size


@functools.lru_cache(maxsize=32)
def _column_list(raw: bytes) -> list[str]:
    """Column names from their JSON list, parsed once per distinct list (shared: never mutated)."""
    return orjson.loads(raw)


def _matrix_parts(payload: bytes) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    header, offset = _matrix_header(payload)
    n, columns = int(header["n"]), header["columns"]
    values = np.frombuffer(payload, dtype=np.int64, count=n * len(columns), offset=offset).reshape(n, len(columns))
    offset += values.nbytes
    labels = np.frombuffer(payload, dtype=np.int64, count=n, offset=offset)
    probabilities = np.frombuffer(payload, dtype=np.float64, count=n, offset=offset + labels.nbytes)
    return header, values, labels, probabilities


class _MatrixRun:
    """Consecutive raw-array frames with the same columns and marks: their headers, and their
    arrays' bytes gathered per kind, to become one table (`close`)."""

    def __init__(self) -> None:
        self.headers: list[dict[str, Any]] = []
        self.values: list[bytes] = []
        self.labels: list[bytes] = []
        self.probabilities: list[bytes] = []

    def takes(self, header: Mapping[str, Any]) -> bool:
        if not self.headers:
            return True
        first = self.headers[0]
        return first["columns"] == header["columns"] and first.get("shadow") == header.get("shadow")

    def add(self, header: dict[str, Any], payload: bytes, offset: int) -> None:
        n = int(header["n"])
        values_end = offset + 8 * n * len(header["columns"])
        self.headers.append(header)
        self.values.append(payload[offset:values_end])
        self.labels.append(payload[values_end:values_end + 8 * n])
        self.probabilities.append(payload[values_end + 8 * n:values_end + 16 * n])

    def close(self) -> list[pa.Table]:
        """The run as one table (none when empty), and the run emptied."""
        if not self.headers:
            return []
        headers, columns = self.headers, self.headers[0]["columns"]
        counts = np.fromiter((h["n"] for h in headers), dtype=np.int64, count=len(headers))
        total = int(counts.sum())
        frame_of_row = np.repeat(np.arange(len(headers), dtype=np.int32), counts)
        # Column-major in one transpose: each feature column is then a contiguous row, which Arrow
        # takes without a copy.
        by_column = np.frombuffer(b"".join(self.values), dtype=np.int64).reshape(total, len(columns)).T.copy()
        sent_ns = np.fromiter((h["t"] for h in headers), dtype=np.int64, count=len(headers))
        arrays = {
            # Whole microseconds, as the row path's datetime holds them.
            "logged_at": pa.array((sent_ns // 1000 * 1000)[frame_of_row], type=pa.timestamp("ns", tz="UTC")),
            "request_id": pa.DictionaryArray.from_arrays(
                frame_of_row, pa.array([h["request_id"] for h in headers], pa.string())).cast(pa.string()),
            "model_version": pa.DictionaryArray.from_arrays(
                frame_of_row, pa.array([h["model_version"] for h in headers], pa.string())).cast(pa.string()),
            "record_index": pa.array(np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)),
            **{name: pa.array(by_column[j]) for j, name in enumerate(columns)},
            "label": pa.array(np.frombuffer(b"".join(self.labels), dtype=np.int64)),
            "probability": pa.array(np.frombuffer(b"".join(self.probabilities), dtype=np.float64)),
        }
        if headers[0].get("shadow"):
            arrays["shadow"] = pa.array(np.ones(total, dtype=bool))
        self.headers, self.values, self.labels, self.probabilities = [], [], [], []
        return [pa.table(arrays)]


def decode_spool(data: bytes) -> list[dict[str, Any]]:
    """The rows of a spool segment as dicts (a torn last frame skipped, as `_frames` says)."""
    rows: list[dict[str, Any]] = []
    for kind, payload in _frames(data):
        if kind == _MATRIX:
            rows += _matrix_rows(payload)
        else:
            for row in json.loads(payload):
                row["logged_at"] = datetime.fromisoformat(row["logged_at"])
                rows.append(row)
    return rows


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows as an Arrow table, timestamps in ns as pandas would write them.

    Arrow converts the row dicts in C++, 2-3x faster than a DataFrame from records, and this runs
    in the replica's process: every row of the log passes through here.
    """
    table = pa.Table.from_pylist(list(rows))
    fields = [pa.field(f.name, pa.timestamp("ns", tz=f.type.tz)) if pa.types.is_timestamp(f.type) else f
              for f in table.schema]
    return table.cast(pa.schema(fields))


HOUR_NS = 3_600 * 10**9


def hour_folder(at: datetime | pd.Timestamp) -> str:
    """The folder of an hour's rows under the log URL: `date=YYYY-MM-DD/hour=HH` (UTC)."""
    ts = pd.Timestamp(at)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return f"date={ts:%Y-%m-%d}/hour={ts:%H}"


def write_part(rows: Sequence[Mapping[str, Any]] | pa.Table, log_url: str, part_name: str) -> str:
    """Write rows (or their table) as Parquet parts named `part_name`, one under each
    `<log_url>/date=D/hour=H/` their `logged_at` falls in (a segment spanning an hour boundary
    splits); return the URL of the last part.

    The split is a function of the rows, so shipping a segment again rewrites the same parts.
    """
    table = rows if isinstance(rows, pa.Table) else rows_to_table(rows)
    # The hour of each row from its ns count, not a string per row (this runs for every logged row).
    at = table.column("logged_at").cast(pa.timestamp("ns", tz="UTC")).cast(pa.int64()).to_numpy()
    hours = at // HOUR_NS
    distinct, target = np.unique(hours), ""
    for hour in distinct:
        part = table if len(distinct) == 1 else table.filter(pa.array(hours == hour))
        folder = hour_folder(pd.Timestamp(int(hour) * HOUR_NS, unit="ns", tz="UTC"))
        target = join_url(log_url, *folder.split("/"), part_name)
        # Encoded into Arrow's own buffer, then written whole in one call (a hidden temporary name
        # and a rename, or one object-store put), so a reader never sees half a part. Encoding
        # straight into a Python file object made Arrow take the GIL back for every page it wrote,
        # which stalled the answering event loop of the same process (a fifth of the ingress's
        # time at 100 records a request, measured with py-spy).
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink)
        storage.write_bytes(target, sink.getvalue().to_pybytes())
    return target


def ship_segment(path: str, log_url: str, part_name: str,
                 writer: Callable[[pa.Table, str, str], str] = write_part) -> int:
    """Ship one closed spool segment as its part(s), then delete it; its rows.

    A segment that is gone was shipped already (by another writer's replay of the same orphan:
    the part is written before the segment is deleted): 0 rows, not a failure to retry forever.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return 0
    table = decode_spool_table(data)
    if table.num_rows:
        writer(table, log_url, part_name)
    _unlink(path)
    return table.num_rows


def read_prediction_log(log_url: str, request_id: str | None = None) -> pd.DataFrame:
    """All parts of the log (or one request's rows), oldest first; empty frame when there is none."""
    fs, _ = storage.filesystem(log_url)
    paths = storage.list_files(log_url, (".parquet",), recursive=True)
    frames = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            frames.append(pd.read_parquet(handle))
    if not frames:
        return pd.DataFrame(columns=[*META_COLUMNS, *OUTPUT_COLUMNS])
    out = pd.concat(frames, ignore_index=True)
    if request_id is not None:
        out = out[out["request_id"] == request_id]
    return out.sort_values(["logged_at", "request_id", "record_index"], kind="stable").reset_index(drop=True)


class PredictionLogWriter:
    """Spooled, thread-shipped writer; safe to call from the event loop (append is one local write)."""

    def __init__(
        self,
        log_url: str,
        *,
        flush_interval_s: float,
        flush_rows: int,
        max_buffer_rows: int,
        on_failure: Callable[[str, int], None] | None = None,  # (kind, rows)
        on_flush: Callable[[int], None] | None = None,
        writer: Callable[[pa.Table, str, str], str] = write_part,
        name_prefix: str | None = None,
        spool_dir: str | None = None,
        replay_orphans: bool = True,
    ) -> None:
        self.log_url = log_url
        self.spool_dir = spool_dir or default_spool_dir(log_url)
        self._interval = flush_interval_s
        self._flush_rows = flush_rows
        self._max_buffer = max_buffer_rows
        self._on_failure = on_failure or (lambda kind, n: None)
        self._on_flush = on_flush or (lambda n: None)
        self._writer = writer
        # Sortable and unique: part names (derived from segment names) stay in write order.
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self._prefix = f"{stamp}-{name_prefix or uuid.uuid4().hex[:12]}"
        self._replay = replay_orphans
        self._seq = 0
        self._fd: int | None = None  # the open segment, created on the first append after a rotation
        self._open_rows = 0
        self._closed: list[tuple[str, int]] = []  # (segment path, rows), oldest first
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one ship at a time (timer, size and close)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.dropped_rows = 0
        self.failed_flushes = 0
        self.written_rows = 0
        self.replayed_rows = 0
        os.makedirs(self.spool_dir, exist_ok=True)
        self._lock_fd = self._acquire_own_lock()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    # --- the request path ------------------------------------------------------------------

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Spool ready-made rows; never raises on account of the sink."""
        if rows:
            self.append_encoded(encode_rows(rows), len(rows))

    def append_encoded(self, line: bytes, rows: int) -> None:
        """Spool one encoded frame (`encode_request`) of `rows` rows; when it returns, a crash keeps it."""
        dropped = 0
        with self._lock:
            try:
                if self._fd is None:
                    self._seq += 1
                    self._fd = os.open(self._segment_path(self._prefix, self._seq),
                                       os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.write(self._fd, line)
            except OSError as exc:  # a full or broken local disk: count it, never fail the answer
                logger.warning("prediction spool write to %s failed: %s", self.spool_dir, exc)
                spool_failed = True
            else:
                spool_failed = False
                self._open_rows += rows
                # The sink has been failing for long: keep the disk bounded, newest segments win.
                while self._closed and self._pending_locked() > self._max_buffer:
                    path, n = self._closed.pop(0)
                    _unlink(path)
                    dropped += n
                self.dropped_rows += dropped
            size = self._pending_locked()
        if spool_failed:
            self._on_failure("spool_failed", rows)
        if dropped:
            self._on_failure("dropped", dropped)
        if size >= self._flush_rows:
            self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return self._pending_locked()

    def _pending_locked(self) -> int:
        return self._open_rows + sum(n for _, n in self._closed)

    # --- shipping ----------------------------------------------------------------------------

    def _segment_path(self, prefix: str, seq: int) -> str:
        return os.path.join(self.spool_dir, f"{prefix}-{seq:06d}{SPOOL_SUFFIX}")

    @staticmethod
    def part_name(segment_path: str) -> str:
        """The part a segment ships as: the same name every time, so a re-ship overwrites."""
        return f"part-{os.path.basename(segment_path).removesuffix(SPOOL_SUFFIX)}.parquet"

    def _ship_segment(self, path: str) -> int:
        return ship_segment(path, self.log_url, self.part_name(path), self._writer)

    def flush(self) -> int:
        """Ship what is spooled, one part per segment; return rows written (0 on failure or nothing to do)."""
        with self._flush_lock:
            with self._lock:
                if self._fd is not None:  # rotate: appends go to a new segment from here on
                    os.close(self._fd)
                    self._fd = None
                    self._closed.append((self._segment_path(self._prefix, self._seq), self._open_rows))
                    self._open_rows = 0
                segments = list(self._closed)
            written = 0
            for path, n in segments:
                try:
                    shipped = self._ship_segment(path)
                except Exception as exc:  # any sink error: keep the segment, count, never propagate
                    self.failed_flushes += 1
                    left = sum(m for p, m in segments if p >= path)
                    logger.warning("prediction log flush of %d rows to %s failed: %s: %s",
                                   left, self.log_url, type(exc).__name__, exc)
                    self._on_failure("flush_failed", left)
                    break
                with self._lock:
                    if (path, n) in self._closed:
                        self._closed.remove((path, n))
                written += shipped
            if written:
                self.written_rows += written
                self._on_flush(written)
            return written

    # --- crash replay ------------------------------------------------------------------------

    def _acquire_own_lock(self) -> int:
        # Locked before it gets its name, so no other writer ever sees it unlocked and takes it for an orphan.
        final = os.path.join(self.spool_dir, f"{self._prefix}{LOCK_SUFFIX}")
        tmp = os.path.join(self.spool_dir, f".{self._prefix}{LOCK_SUFFIX}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(tmp, final)
        return fd

    def replay_orphans(self) -> int:
        """Ship the segments of writers whose process is gone; return rows shipped."""
        shipped = 0
        try:
            names = os.listdir(self.spool_dir)
        except FileNotFoundError:
            return 0
        for name in sorted(names):
            if not name.endswith(LOCK_SUFFIX) or name == f"{self._prefix}{LOCK_SUFFIX}":
                continue
            lock_path = os.path.join(self.spool_dir, name)
            try:
                fd = os.open(lock_path, os.O_RDWR)
            except FileNotFoundError:
                continue  # another writer replayed it just now
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EACCES):
                        continue  # its owner is alive
                    raise
                shipped += self._replay_owner(name.removesuffix(LOCK_SUFFIX), lock_path)
            except Exception as exc:  # keep the orphan for the next round
                logger.warning("prediction spool replay of %s failed: %s: %s", name, type(exc).__name__, exc)
                self._on_failure("replay_failed", 0)
            finally:
                os.close(fd)
        if shipped:
            self.replayed_rows += shipped
            self.written_rows += shipped
            self._on_flush(shipped)
        return shipped

    def _replay_owner(self, prefix: str, lock_path: str) -> int:
        segments = sorted(n for n in os.listdir(self.spool_dir)
                          if n.startswith(f"{prefix}-") and n.endswith(SPOOL_SUFFIX))
        shipped = sum(self._ship_segment(os.path.join(self.spool_dir, n)) for n in segments)
        _unlink(lock_path)  # last: while a segment is left, the lock file marks it as someone's
        if shipped:
            logger.info("prediction spool: replayed %d rows of a writer that died (%s)", shipped, prefix)
        return shipped

    # --- lifecycle ---------------------------------------------------------------------------

    def _run(self) -> None:
        if self._replay:
            self.replay_orphans()
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.flush()
            if self._replay:
                self.replay_orphans()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the timer thread and ship what is left (called on replica shutdown).

        If the sink is down, the spool stays on disk with this writer's lock file; once this
        process is gone, the next writer on the node replays it.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        self.flush()
        with self._lock:
            left = self._pending_locked()
        if not left:
            _unlink(os.path.join(self.spool_dir, f"{self._prefix}{LOCK_SUFFIX}"))
        os.close(self._lock_fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
