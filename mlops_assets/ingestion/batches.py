"""Content-addressed ingestion of landed raw files, with quarantine for files that break the contract.

Accepted files are copied, once, to `<batches>/<sha256>/` (the original bytes and a typed
Parquet copy, plus `batch.json`); nothing there is ever overwritten or removed. A bad file is
moved from the landing folder to `<quarantine>/<UTC time>-<name>` beside a `.reason.json`.
All paths are fsspec URLs, read and written through `core.storage`, so the same code runs on a
local folder, memory:// or s3://.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import fsspec
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.core import storage
from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.core.schema import ContractViolation, check_contract, typed_frame
from mlops_assets.settings import join_url


class UnreadableFileError(ValueError):
    """A landed file is not a table this platform can read."""


@dataclass(frozen=True)
class LandedFile:
    url: str
    name: str
    size: int
    modified: str  # a fingerprint of the file's state, not a parsed time

    @property
    def fingerprint(self) -> str:
        return f"{self.size}:{self.modified}"


@dataclass(frozen=True)
class BatchRecord:
    batch_id: str  # the content hash (sha256 of the file's bytes)
    source: str
    file_name: str
    file_format: str
    rows: int
    columns: list[str]
    accepted_at: str
    stored_at: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class QuarantineRecord:
    source: str
    file_name: str
    sha256: str
    moved_to: str
    quarantined_at: str
    violations: list[dict[str, object]]

    @property
    def reason(self) -> str:
        return "; ".join(str(v["message"]) for v in self.violations)


@dataclass
class IngestResult:
    accepted: list[BatchRecord] = field(default_factory=list)
    quarantined: list[QuarantineRecord] = field(default_factory=list)
    already_accepted: list[str] = field(default_factory=list)  # landed files whose content is stored


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return storage.filesystem(url)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def list_landed_files(landing_url: str) -> list[LandedFile]:
    """Files in the landing folder, by name; hidden and temporary files are not landed yet."""
    fs, root = _fs(landing_url)
    if not fs.exists(root):
        return []
    out = []
    for info in fs.ls(root, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") != "file" or name.startswith(".") or name.endswith(".tmp"):
            continue
        modified = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
        out.append(LandedFile(url=join_url(landing_url, name), name=name, size=int(info.get("size") or 0),
                              modified=str(modified)))
    return sorted(out, key=lambda f: f.name)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_format(name: str) -> str:
    lower = name.lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    return "unknown"


def read_table(name: str, data: bytes) -> pd.DataFrame:
    """Parse landed bytes by suffix; raise UnreadableFileError with what went wrong."""
    fmt = file_format(name)
    if fmt == "unknown":
        raise UnreadableFileError(
            f"{name}: not a table: unsupported file type (accepted: {', '.join(c.RAW_FILE_SUFFIXES)})")
    if not data.strip():
        raise UnreadableFileError(f"{name}: the file is empty")
    try:
        if fmt == "csv":
            return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=True, skipinitialspace=True)
        return pd.read_parquet(io.BytesIO(data))
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnreadableFileError(f"{name}: cannot be read as {fmt}: {first_line}") from exc


def _typed(frame: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """A conforming frame, each column as its feature kind's dtype, in the spec's column order."""
    return typed_frame(frame, spec)


def accepted_batches(batches_url: str) -> list[BatchRecord]:
    """Every accepted batch, oldest first (read from the write-once `batch.json` files)."""
    fs, root = _fs(batches_url)
    if not fs.exists(root):
        return []
    records = []
    for path in fs.glob(f"{root}/*/batch.json"):
        with fs.open(path, "r") as handle:
            records.append(BatchRecord(**json.load(handle)))
    return sorted(records, key=lambda r: (r.accepted_at, r.batch_id))


def _store_batch(data: bytes, typed: pd.DataFrame, landed: LandedFile, sha: str, batches_url: str) -> BatchRecord:
    folder = join_url(batches_url, sha)
    fmt = file_format(landed.name)
    record = BatchRecord(
        batch_id=sha, source=landed.url, file_name=landed.name, file_format=fmt, rows=len(typed),
        columns=list(typed.columns), accepted_at=_now(), stored_at=folder,
    )
    # Each file written whole; batch.json last: a batch exists only once all its files are written.
    storage.write_bytes(join_url(folder, f"source.{fmt}"), data)
    with storage.atomic_writer(join_url(folder, "data.parquet")) as handle:
        typed.to_parquet(handle, index=False)
    storage.write_json(join_url(folder, "batch.json"), record.as_dict())
    return record


def _quarantine(landed: LandedFile, sha: str, violations: list[ContractViolation], quarantine_url: str) -> QuarantineRecord:
    storage.makedirs(quarantine_url)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = join_url(quarantine_url, f"{stamp}-{landed.name}")
    record = QuarantineRecord(
        source=landed.url, file_name=landed.name, sha256=sha, moved_to=target, quarantined_at=_now(),
        violations=[v.as_dict() for v in violations],
    )
    storage.write_json(f"{target}.reason.json", {**asdict(record), "reason": record.reason})
    storage.move(landed.url, target)
    return record


def _read_landed(landed: LandedFile) -> bytes:
    return storage.read_bytes(landed.url)


def _accept_or_quarantine(landed: LandedFile, data: bytes, sha: str, batches_url: str, quarantine_url: str,
                          spec: DatasetSpec) -> BatchRecord | QuarantineRecord:
    try:
        frame = read_table(landed.name, data)
        violations = check_contract(frame, spec)
    except UnreadableFileError as exc:
        violations = [ContractViolation("unreadable", str(exc))]
    if violations:
        return _quarantine(landed, sha, violations, quarantine_url)
    return _store_batch(data, _typed(frame, spec), landed, sha, batches_url)


def ingest_landed_files(landing_url: str, batches_url: str, quarantine_url: str, spec: DatasetSpec) -> IngestResult:
    """Accept each new conforming file once; quarantine the rest. Never touches accepted batches."""
    result = IngestResult()
    known = {record.batch_id for record in accepted_batches(batches_url)}
    for landed in list_landed_files(landing_url):
        data = _read_landed(landed)
        sha = sha256_bytes(data)
        if sha in known:
            result.already_accepted.append(landed.name)
            continue
        outcome = _accept_or_quarantine(landed, data, sha, batches_url, quarantine_url, spec)
        if isinstance(outcome, QuarantineRecord):
            result.quarantined.append(outcome)
            continue
        result.accepted.append(outcome)
        known.add(sha)
    return result


# One landed file at a time, by content hash: what a partition of raw_batches ingests.


def hash_landed_files(landing_url: str, files: list[LandedFile] | None = None) -> dict[str, LandedFile]:
    """Content hash -> landed file (of several files with the same bytes, the first by name)."""
    out: dict[str, LandedFile] = {}
    for landed in list_landed_files(landing_url) if files is None else files:
        out.setdefault(sha256_bytes(_read_landed(landed)), landed)
    return out


def batch_record(batches_url: str, sha: str) -> BatchRecord | None:
    """The accepted batch with this content hash, if there is one."""
    url = join_url(join_url(batches_url, sha), "batch.json")
    fs, path = _fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as handle:
        return BatchRecord(**json.load(handle))


def quarantine_record(quarantine_url: str, sha: str) -> QuarantineRecord | None:
    """The latest quarantine of a file with this content hash, if there was one."""
    fs, root = _fs(quarantine_url)
    if not fs.exists(root):
        return None
    found: QuarantineRecord | None = None
    for path in sorted(fs.glob(f"{root}/*.reason.json")):
        with fs.open(path, "r") as handle:
            raw = json.load(handle)
        if raw.get("sha256") == sha:
            found = QuarantineRecord(**{k: raw[k] for k in QuarantineRecord.__dataclass_fields__})
    return found


class LandedFileNotFoundError(LookupError):
    """No landed, accepted or quarantined file has the requested content hash."""


@dataclass(frozen=True)
class BatchOutcome:
    """What became of one landed file: `accepted` now, `already_accepted` earlier, or `quarantined`."""

    sha256: str
    status: str
    batch: BatchRecord | None = None
    quarantine: QuarantineRecord | None = None

    @property
    def file_name(self) -> str:
        record = self.batch or self.quarantine
        return record.file_name if record else ""

    @property
    def source(self) -> str:
        record = self.batch or self.quarantine
        return record.source if record else ""


def ingest_batch(sha: str, landing_url: str, batches_url: str, quarantine_url: str, spec: DatasetSpec,
                 hint_url: str | None = None) -> BatchOutcome:
    """Ingest the landed file whose content hash is `sha` (idempotent: a stored batch or an earlier
    quarantine is reported again). `hint_url` names the file to try first, saving a scan of the folder."""
    stored = batch_record(batches_url, sha)
    if stored is not None:
        return BatchOutcome(sha, "already_accepted", batch=stored)
    files = list_landed_files(landing_url)
    hinted = [f for f in files if f.url == hint_url]
    for landed in [*hinted, *(f for f in files if f.url != hint_url)]:
        data = _read_landed(landed)
        if sha256_bytes(data) != sha:
            continue
        outcome = _accept_or_quarantine(landed, data, sha, batches_url, quarantine_url, spec)
        if isinstance(outcome, QuarantineRecord):
            return BatchOutcome(sha, "quarantined", quarantine=outcome)
        return BatchOutcome(sha, "accepted", batch=outcome)
    earlier = quarantine_record(quarantine_url, sha)
    if earlier is not None:
        return BatchOutcome(sha, "quarantined", quarantine=earlier)
    raise LandedFileNotFoundError(
        f"no file with content hash {sha[:16]} in {landing_url}, the batch store or quarantine; "
        "land the file again or delete this partition")


def dataset_version(batch_ids: list[str]) -> str:
    """A short version derived from the batches' content hashes (order does not matter)."""
    joined = "\n".join(sorted(batch_ids))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def load_raw_dataset(batches: list[BatchRecord], spec: DatasetSpec) -> pd.DataFrame:
    """The union of accepted batches, in acceptance order, with the spec's columns."""
    frames = []
    for record in batches:
        with storage.open_url(join_url(record.stored_at, "data.parquet"), "rb") as handle:
            frames.append(pd.read_parquet(handle))
    if not frames:
        return typed_frame(pd.DataFrame({col: pd.Series(dtype="object") for col in spec.columns}), spec)
    return typed_frame(pd.concat(frames, ignore_index=True), spec)
