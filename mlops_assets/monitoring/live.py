"""Monitoring rules on the prediction log: windows, freshness, delayed labels, live metrics,
degradation, the post-deployment watch and the retraining request of a drift event.

Pure pandas (no whylogs, no Dagster): the assets and sensors call these and attach what they
return as metadata. Drift statistics themselves live in `drift.py`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mlops_assets import constants as c
from mlops_assets.core import storage
from mlops_assets.serving.config import APP_NAME
from mlops_assets.serving.prediction_log import hour_folder

logger = logging.getLogger(__name__)

# Prediction log columns, as monitoring names them; features sit between meta and outputs.
TIMESTAMP = "timestamp"
REQUEST_ID = "request_id"
MODEL_VERSION = "model_version"
RECORD_INDEX = "record_index"  # position of the record in its request (0 for one-record requests)
PREDICTED_LABEL = "label"
PROBABILITY = "phishing_probability"
# Names other writers use for the same thing (the serving log writes `logged_at`, `probability`).
COLUMN_ALIASES = {"logged_at": TIMESTAMP, "probability": PROBABILITY}
LOG_SUFFIXES = (".parquet", ".jsonl")

# Delayed labels.
TRUE_LABEL = "true_label"  # the joined column (the log's `label` is the prediction)
LABELLED_AT = "labelled_at"
LABEL_SUFFIXES = (".csv", ".parquet", ".pq")


class MonitoringError(ValueError):
    """Bad input to a monitoring rule (an unparseable window, a log without timestamps)."""


def to_timedelta(value: str | timedelta | float | int, what: str = "duration") -> timedelta:
    """'1h', '15min', a timedelta, or seconds; must be positive."""
    try:
        out = pd.to_timedelta(value, unit="s") if isinstance(value, int | float) else pd.to_timedelta(value)
    except (ValueError, TypeError) as exc:
        raise MonitoringError(f"{what} {value!r} is not a duration like '1h' or '15min'") from exc
    if out <= pd.Timedelta(0):
        raise MonitoringError(f"{what} must be positive, got {value!r}")
    return out.to_pytimedelta()


def _utc(at: datetime | pd.Timestamp | str) -> pd.Timestamp:
    ts = pd.Timestamp(at)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


# ---------------------------------------------------------------------------------------------
# Reading files


@dataclass(frozen=True)
class FilesRead:
    """A frame read from many files, and the files that could not be read (with why)."""

    frame: pd.DataFrame
    files: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()


def _list_files(url: str, suffixes: Sequence[str]) -> tuple[Any, list[str]]:
    fs, root = storage.filesystem(url)
    if not fs.exists(root):
        return fs, []
    # Hidden names are files being written (write-then-rename), never data.
    paths = [p for p in fs.find(root) if p.endswith(tuple(suffixes)) and not p.rsplit("/", 1)[-1].startswith(".")]
    return fs, sorted(paths)


def _read_file(fs: Any, path: str) -> pd.DataFrame:
    with fs.open(path, "rb") as handle:
        if path.endswith((".parquet", ".pq")):
            return pd.read_parquet(handle)
        if path.endswith(".jsonl"):
            return pd.read_json(handle, lines=True, dtype=False, precise_float=True)
        return pd.read_csv(handle, dtype={REQUEST_ID: str})  # "1e5" is an id, not a number


def _read_all(
    url: str, suffixes: Sequence[str], per_file: Callable[[pd.DataFrame], pd.DataFrame] | None = None
) -> FilesRead:
    fs, paths = _list_files(url, suffixes)
    frames, read, skipped = [], [], []
    for path in paths:
        try:
            frame = _read_file(fs, path)
            frames.append(per_file(frame) if per_file else frame)
            read.append(path)
        except Exception as exc:  # one corrupt file must not stop monitoring; it is reported
            skipped.append((path, f"{type(exc).__name__}: {exc}"))
            logger.warning("skipping unreadable file %s: %s", path, exc)
    frames = [f for f in frames if len(f.columns)]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return FilesRead(frame, tuple(read), tuple(skipped))


def _canonical_names(frame: pd.DataFrame) -> pd.DataFrame:
    # Per file, before concatenation: files written under either name must line up.
    out = frame.rename(columns={k: v for k, v in COLUMN_ALIASES.items() if k in frame and v not in frame})
    if TIMESTAMP in out:
        out[TIMESTAMP] = pd.to_datetime(out[TIMESTAMP], utc=True, errors="coerce", format="mixed")
    return out


def normalize_prediction_log(frame: pd.DataFrame) -> pd.DataFrame:
    """Canonical names and types: UTC timestamps, str ids, int record index; oldest first.

    Rows whose timestamp cannot be parsed are dropped (they cannot be windowed).
    """
    out = _canonical_names(frame)
    if out.empty and TIMESTAMP not in out:
        return pd.DataFrame({TIMESTAMP: pd.Series([], dtype="datetime64[ns, UTC]"),
                             REQUEST_ID: pd.Series([], dtype=str), MODEL_VERSION: pd.Series([], dtype=str),
                             RECORD_INDEX: pd.Series([], dtype="int64")})
    if TIMESTAMP not in out:
        raise MonitoringError(f"prediction log has no {TIMESTAMP!r} column; columns: {list(out.columns)}")
    out = out.copy()
    out[TIMESTAMP] = pd.to_datetime(out[TIMESTAMP], utc=True, errors="coerce", format="mixed")
    bad = int(out[TIMESTAMP].isna().sum())
    if bad:
        logger.warning("dropping %d prediction log rows without a readable timestamp", bad)
        out = out[out[TIMESTAMP].notna()]
    for name in (REQUEST_ID, MODEL_VERSION):
        if name in out:
            out[name] = out[name].astype(str)
    out[RECORD_INDEX] = out[RECORD_INDEX].fillna(0).astype("int64") if RECORD_INDEX in out else 0
    sort_by = [c for c in (TIMESTAMP, REQUEST_ID, RECORD_INDEX) if c in out]
    return out.sort_values(sort_by, kind="stable").reset_index(drop=True)


def read_prediction_log_files(url: str) -> FilesRead:
    """Every *.parquet and *.jsonl under `url` (recursively), normalized; unreadable files skipped."""
    raw = _read_all(url, LOG_SUFFIXES, per_file=_canonical_names)
    return FilesRead(normalize_prediction_log(raw.frame), raw.files, raw.skipped)


def read_prediction_log(url: str) -> pd.DataFrame:
    """The prediction log under an fsspec URL as one frame, oldest first (empty if none)."""
    return read_prediction_log_files(url).frame


# ---------------------------------------------------------------------------------------------
# The log by time: one folder per hour (`date=YYYY-MM-DD/hour=HH/`, see serving/prediction_log.py)
#
# A window reads the folders of its hours only, so its cost does not grow with the history. Parts
# of the older layouts (flat under the root, or under `date=YYYY-MM-DD/` only) are still read:
# the root's files and the date folders of the window's days and the day before (a date-only part
# was filed by its first row), their rows filtered by time.


def _ls_files(fs: Any, folder: str) -> list[str]:
    try:
        entries = fs.ls(folder, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e["name"] for e in entries if e.get("type") == "file" and e["name"].endswith(LOG_SUFFIXES)
                  and not e["name"].rsplit("/", 1)[-1].startswith("."))


def _hour_starts(start: pd.Timestamp, end: pd.Timestamp) -> list[pd.Timestamp]:
    return list(pd.date_range(_utc(start).floor("h"), _utc(end) - pd.Timedelta(1, "ns"), freq="h"))


def list_log_parts(url: str, start: datetime | pd.Timestamp, end: datetime | pd.Timestamp) -> tuple[list[str], list[str]]:
    """(parts in the hour folders of [start, end), parts of the older layouts that may hold rows of it)."""
    fs, root = storage.filesystem(url)
    start, end = _utc(start), _utc(end)
    hourly = [p for hour in _hour_starts(start, end) for p in _ls_files(fs, f"{root}/{hour_folder(hour)}")]
    days = pd.date_range((start - pd.Timedelta(days=1)).floor("D"), (end - pd.Timedelta(1, "ns")).floor("D"), freq="D")
    legacy = _ls_files(fs, root) + [p for day in days for p in _ls_files(fs, f"{root}/date={day:%Y-%m-%d}")]
    return hourly, legacy


def read_log_parts(url: str, paths: Sequence[str], start: datetime | pd.Timestamp | None = None,
                   end: datetime | pd.Timestamp | None = None) -> FilesRead:
    """These parts of the log (paths as `list_log_parts` gives them), normalized, rows in [start, end)."""
    fs, _ = storage.filesystem(url)
    frames, read, skipped = [], [], []
    for path in paths:
        try:
            frames.append(_canonical_names(_read_file(fs, path)))
            read.append(path)
        except Exception as exc:  # one corrupt file must not stop monitoring; it is reported
            skipped.append((path, f"{type(exc).__name__}: {exc}"))
            logger.warning("skipping unreadable file %s: %s", path, exc)
    frames = [f for f in frames if len(f.columns)]
    frame = normalize_prediction_log(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
    if start is not None:
        frame = frame[frame[TIMESTAMP] >= _utc(start)]
    if end is not None:
        frame = frame[frame[TIMESTAMP] < _utc(end)]
    return FilesRead(frame.reset_index(drop=True), tuple(read), tuple(skipped))


def read_window(url: str, start: datetime | pd.Timestamp, end: datetime | pd.Timestamp) -> FilesRead:
    """The rows logged in [start, end): only the folders of those hours (and older-layout parts)."""
    hourly, legacy = list_log_parts(url, start, end)
    return read_log_parts(url, [*hourly, *legacy], start, end)


def newest_record(url: str) -> pd.Timestamp | None:
    """The newest timestamp in the log, from its newest non-empty hour folder (or older-layout parts)."""
    fs, root = storage.filesystem(url)
    try:
        days = sorted((e for e in fs.ls(root, detail=False) if e.rsplit("/", 1)[-1].startswith("date=")), reverse=True)
    except FileNotFoundError:
        return None
    for day in days:
        hours = sorted((e for e in fs.ls(day, detail=False) if e.rsplit("/", 1)[-1].startswith("hour=")), reverse=True)
        paths = next((found for hour in hours if (found := _ls_files(fs, hour))), [])
        newest = _newest_in(fs, [*paths, *_ls_files(fs, day)])
        if newest is not None:
            return newest
    return _newest_in(fs, _ls_files(fs, root))


def _newest_in(fs: Any, paths: Sequence[str]) -> pd.Timestamp | None:
    """The newest timestamp in these parts, reading only the time column of Parquet parts."""
    stamps = []
    for path in paths:
        try:
            if path.endswith(".parquet"):
                with fs.open(path, "rb") as handle:
                    names = pq.read_schema(handle).names
                    column = next((n for n in ("logged_at", TIMESTAMP) if n in names), None)
                    if column is None:
                        continue
                    handle.seek(0)
                    frame = pd.read_parquet(handle, columns=[column]).rename(columns={column: TIMESTAMP})
            else:
                frame = _canonical_names(_read_file(fs, path))
        except Exception as exc:  # unreadable parts are reported by the readers; here they only do not count
            logger.warning("skipping unreadable file %s: %s", path, exc)
            continue
        if TIMESTAMP in frame and len(frame):
            stamps.append(pd.to_datetime(frame[TIMESTAMP], utc=True, errors="coerce", format="mixed").max())
    stamps = [t for t in stamps if not pd.isna(t)]
    return pd.Timestamp(max(stamps)) if stamps else None


# Retention: hours older than the retention are compacted (their parts merged into one) or deleted.
RETENTION_ACTIONS = ("compact", "delete")
COMPACTED_PART = "part-compacted.parquet"
COMPACTED_DAY_MARKER = "_compacted"  # in a date folder whose every hour is compacted: not listed again


@dataclass(frozen=True)
class RetentionResult:
    action: str
    cutoff: pd.Timestamp | None  # hours that ended at or before it were acted on; None: retention off
    hours: tuple[str, ...] = ()  # the hour folders acted on
    parts_removed: int = 0

    def metadata(self) -> dict[str, Any]:
        return {"retention_action": self.action, "retention_cutoff": self.cutoff.isoformat() if self.cutoff else "none",
                "retention_hours": len(self.hours), "retention_parts_removed": self.parts_removed}


def apply_retention(url: str, keep_days: float | None, now: datetime | pd.Timestamp,
                    action: str = "compact") -> RetentionResult:
    """Compact or delete the hour folders of the log that ended more than `keep_days` before the
    current hour; the current hour is never touched, whatever `keep_days` says. None: keep all."""
    if action not in RETENTION_ACTIONS:
        raise MonitoringError(f"retention action {action!r} is not one of {RETENTION_ACTIONS}")
    if keep_days is None:
        return RetentionResult(action, None)
    if keep_days <= 0:
        raise MonitoringError(f"retention must be a positive number of days (or None to keep all), got {keep_days}")
    current = _utc(now).floor("h")
    cutoff = min(current, current - pd.Timedelta(days=keep_days))
    fs, root = storage.filesystem(url)
    try:
        days = sorted(e for e in fs.ls(root, detail=False) if e.rsplit("/", 1)[-1].startswith("date="))
    except FileNotFoundError:
        return RetentionResult(action, cutoff)
    acted, removed = [], 0
    for day in days:
        day_start = _utc(pd.Timestamp(day.rsplit("date=", 1)[-1]))
        if day_start >= cutoff or fs.exists(f"{day}/{COMPACTED_DAY_MARKER}"):
            continue
        for hour in sorted(e for e in fs.ls(day, detail=False) if e.rsplit("/", 1)[-1].startswith("hour=")):
            start = day_start + pd.Timedelta(hours=int(hour.rsplit("hour=", 1)[-1]))
            if start + pd.Timedelta(hours=1) > cutoff:
                continue
            parts = _ls_files(fs, hour)
            if action == "delete":
                fs.rm(hour, recursive=True)
            elif parts and [p.rsplit("/", 1)[-1] for p in parts] != [COMPACTED_PART]:
                _compact(fs, url, hour, parts)
            else:
                continue
            acted.append(hour.removeprefix(f"{root}/"))
            removed += len(parts)
        if action == "delete" and day_start + pd.Timedelta(days=2) <= cutoff:
            legacy = _ls_files(fs, day)  # date-only parts: their rows end by the next day
            for path in legacy:
                fs.rm(path)
            removed += len(legacy)
            if fs.exists(day) and not fs.ls(day, detail=False):  # (object stores drop empty folders)
                fs.rm(day, recursive=True)
        elif action == "compact" and day_start + pd.Timedelta(days=1) <= cutoff:
            with fs.open(f"{day}/{COMPACTED_DAY_MARKER}", "w") as handle:
                handle.write(f"hours before {cutoff.isoformat()} compacted\n")
    if acted:
        logger.info("prediction log retention: %s %d hour folders (%d parts) before %s", action, len(acted),
                    removed, cutoff.isoformat())
    return RetentionResult(action, cutoff, tuple(acted), removed)


def _compact(fs: Any, url: str, folder: str, parts: Sequence[str]) -> None:
    frames = [_read_file(fs, path) for path in parts]
    merged = pd.concat([f for f in frames if len(f.columns)], ignore_index=True)
    sort_by = [c for c in ("logged_at", TIMESTAMP, REQUEST_ID, RECORD_INDEX) if c in merged]
    merged = merged.sort_values(sort_by, kind="stable").reset_index(drop=True)
    target = f"{folder}/{COMPACTED_PART}"
    with storage.atomic_writer(storage.url_of(url, target)) as handle:  # readers see old parts or the new one
        merged.to_parquet(handle, index=False)
    for path in parts:
        if path != target:
            fs.rm(path)


def monitored_columns(feature_names: Sequence[str], probability_column: str = PROBABILITY) -> list[str]:
    """What a production profile holds: the inputs and the outputs, not the ids."""
    return [*feature_names, PREDICTED_LABEL, probability_column]


# ---------------------------------------------------------------------------------------------
# Windows and freshness


@dataclass(frozen=True)
class Window:
    """A half-open time window [start, end) of the prediction log."""

    start: pd.Timestamp
    end: pd.Timestamp
    rows: int
    newest: pd.Timestamp | None  # the latest record in it

    @property
    def key(self) -> str:
        """Stable name, usable as a partition key, file name or run key part."""
        return self.start.strftime("%Y-%m-%dT%H:%M:%SZ")

    def complete(self, now: datetime | pd.Timestamp) -> bool:
        """No more records can land in it (the window has ended)."""
        return _utc(now) >= self.end


def split_windows(log: pd.DataFrame, window: str | timedelta = c.MONITORING_WINDOW) -> list[tuple[Window, pd.DataFrame]]:
    """Cut the log into epoch-aligned windows (empty windows are skipped), oldest first."""
    width = pd.Timedelta(to_timedelta(window, "window"))
    if log.empty:
        return []
    times = pd.to_datetime(log[TIMESTAMP], utc=True)
    # Align on the epoch rather than the first record so every run cuts the same windows.
    starts = times.dt.floor(width)
    out = []
    for start, part in log.groupby(starts, sort=True):
        start = pd.Timestamp(start)
        newest = pd.Timestamp(pd.to_datetime(part[TIMESTAMP], utc=True).max())
        out.append((Window(start, start + width, len(part), newest), part.reset_index(drop=True)))
    return out


@dataclass(frozen=True)
class Freshness:
    fresh: bool
    newest: pd.Timestamp | None
    age_seconds: float | None
    max_age_seconds: float
    reason: str


def freshness(
    newest: datetime | pd.Timestamp | None, now: datetime | pd.Timestamp, max_age: str | timedelta = c.MAX_PROFILE_AGE
) -> Freshness:
    """Is the newest data younger than `max_age`? No data at all is stale."""
    limit = to_timedelta(max_age, "max_age").total_seconds()
    if newest is None or pd.isna(newest):
        return Freshness(False, None, None, limit, "no data yet")
    at = _utc(newest)
    age = (_utc(now) - at).total_seconds()
    if age > limit:
        return Freshness(False, at, age, limit, f"newest data is {age:.0f}s old (> {limit:.0f}s)")
    return Freshness(True, at, age, limit, f"newest data is {max(age, 0.0):.0f}s old")


def window_freshness(
    windows: Sequence[Window], now: datetime | pd.Timestamp, max_age: str | timedelta = c.MAX_PROFILE_AGE
) -> Freshness:
    """Freshness of the newest window, judged by its newest record (not its end, which would
    call an hour-old record fresh just because its window is long)."""
    stamps = [w.newest if w.newest is not None else w.start for w in windows]
    return freshness(max(stamps) if stamps else None, now, max_age)


# ---------------------------------------------------------------------------------------------
# Delayed labels


def read_labels(url: str) -> FilesRead:
    """Every label file (CSV or Parquet) under the landing URL; unreadable files skipped."""
    raw = _read_all(url, LABEL_SUFFIXES)
    frame = raw.frame
    if not frame.empty:
        missing = [c for c in (REQUEST_ID, PREDICTED_LABEL) if c not in frame]
        if missing:
            raise MonitoringError(f"label files lack columns {missing}; need request_id, label, labelled_at")
    return FilesRead(frame, raw.files, raw.skipped)


@dataclass(frozen=True)
class LabelJoin:
    """The log's rows with their true label where one arrived, and what did not fit."""

    joined: pd.DataFrame  # labelled predictions only, with TRUE_LABEL and LABELLED_AT
    n_predictions: int
    n_labels: int  # label rows read
    n_matched: int  # predictions that got a label
    n_unknown: int  # labels for no logged prediction (not yet flushed, or wrong ids)
    n_duplicates: int  # extra label rows for a key already labelled (the latest one wins)
    n_conflicting: int  # keys whose duplicate labels disagree
    n_invalid: int  # labels outside the data set's label values, or unparseable
    unknown_ids: tuple[str, ...] = field(default=())

    def metadata(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in (
            "n_predictions", "n_labels", "n_matched", "n_unknown", "n_duplicates", "n_conflicting", "n_invalid")}


def join_labels(
    log: pd.DataFrame, labels: pd.DataFrame, label_values: Collection[int | str] | None = None,
    max_unknown_ids: int = 20,
) -> LabelJoin:
    """Join delayed labels onto predictions by (request_id, record_index).

    Labels without a record_index mean record 0 (one-record requests). Duplicates keep the
    latest `labelled_at` (a correction supersedes); nothing here raises on bad rows, it counts.
    """
    key = [REQUEST_ID, RECORD_INDEX]
    preds = log.copy()
    if RECORD_INDEX not in preds:
        preds[RECORD_INDEX] = 0
    preds[REQUEST_ID] = preds[REQUEST_ID].astype(str)
    preds = preds.drop_duplicates(subset=key, keep="first")  # a retried flush may log a row twice

    lab = labels.copy()
    n_labels = len(lab)
    if n_labels == 0:
        empty = preds.iloc[:0].assign(**{TRUE_LABEL: pd.Series([], dtype="int64"), LABELLED_AT: pd.NaT})
        return LabelJoin(empty, len(preds), 0, 0, 0, 0, 0, 0)
    lab[REQUEST_ID] = lab[REQUEST_ID].astype(str)
    lab[RECORD_INDEX] = pd.to_numeric(lab[RECORD_INDEX], errors="coerce").fillna(0).astype("int64") \
        if RECORD_INDEX in lab else 0
    lab[LABELLED_AT] = pd.to_datetime(lab[LABELLED_AT], utc=True, errors="coerce", format="mixed") \
        if LABELLED_AT in lab else pd.NaT
    string_labels = label_values is not None and any(isinstance(v, str) for v in label_values)
    if string_labels:  # e.g. normal / attack: compared as text
        lab[TRUE_LABEL] = lab[PREDICTED_LABEL].astype("object").where(lab[PREDICTED_LABEL].notna(), None)
        valid = lab[TRUE_LABEL].notna()
        lab.loc[valid, TRUE_LABEL] = lab.loc[valid, TRUE_LABEL].astype(str)
    else:
        lab[TRUE_LABEL] = pd.to_numeric(lab[PREDICTED_LABEL], errors="coerce")
        valid = lab[TRUE_LABEL].notna() & (lab[TRUE_LABEL] % 1 == 0)
    if label_values is not None:
        valid &= lab[TRUE_LABEL].isin(list(label_values))
    n_invalid = int((~valid).sum())
    lab = lab[valid].copy()
    if not string_labels:
        lab[TRUE_LABEL] = lab[TRUE_LABEL].astype("int64")

    distinct_per_key = lab.groupby(key)[TRUE_LABEL].nunique()
    n_conflicting = int((distinct_per_key > 1).sum())
    # Latest labelled_at wins; ties and missing times keep file order (stable sort, NaT first).
    lab = lab.sort_values(LABELLED_AT, kind="stable", na_position="first")
    deduped = lab.drop_duplicates(subset=key, keep="last")
    n_duplicates = len(lab) - len(deduped)

    merged = deduped[[*key, TRUE_LABEL, LABELLED_AT]].merge(
        preds[key].assign(_known=True), on=key, how="left")
    unknown = merged[merged["_known"].isna()]
    joined = preds.drop(columns=[TRUE_LABEL, LABELLED_AT], errors="ignore").merge(
        deduped[[*key, TRUE_LABEL, LABELLED_AT]], on=key, how="inner")
    return LabelJoin(
        joined=joined.reset_index(drop=True),
        n_predictions=len(preds),
        n_labels=n_labels,
        n_matched=len(joined),
        n_unknown=len(unknown),
        n_duplicates=n_duplicates,
        n_conflicting=n_conflicting,
        n_invalid=n_invalid,
        unknown_ids=tuple(unknown[REQUEST_ID].astype(str).head(max_unknown_ids)),
    )


# ---------------------------------------------------------------------------------------------
# Live performance and its degradation


def online_metrics(
    joined: pd.DataFrame, positive_class: int | str, probability_column: str = PROBABILITY
) -> dict[str, float]:
    """Live metrics of labelled predictions; the positive class is the spec's (phishing = -1).

    ROC-AUC needs both true classes present and is NaN otherwise; every metric is NaN when
    nothing is labelled (n_labelled says how many rows stand behind the numbers).
    """
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    n = len(joined)
    out: dict[str, float] = {"n_labelled": float(n)}
    names = ("accuracy", "precision", "recall", "f1", "roc_auc", "positive_share_true", "positive_share_predicted")
    if n == 0:
        return {**out, **dict.fromkeys(names, math.nan)}
    y_true = (joined[TRUE_LABEL].to_numpy() == positive_class).astype(np.int64)
    y_pred = (joined[PREDICTED_LABEL].to_numpy() == positive_class).astype(np.int64)
    out.update({
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "positive_share_true": float(y_true.mean()),
        "positive_share_predicted": float(y_pred.mean()),
    })
    both = len(np.unique(y_true)) == 2
    has_proba = probability_column in joined and joined[probability_column].notna().all()
    out["roc_auc"] = float(roc_auc_score(y_true, joined[probability_column].to_numpy(dtype=float))) \
        if both and has_proba else math.nan
    return out


@dataclass(frozen=True)
class DegradationRule:
    """Degraded when a live metric falls more than `tolerance` (absolute) below its offline value."""

    tolerance: float = c.DEGRADATION_TOLERANCE
    metrics: tuple[str, ...] = c.DEGRADATION_METRICS
    min_labelled: int = c.MIN_LABELLED


@dataclass(frozen=True)
class Degradation:
    degraded: bool
    judged: bool  # False when too few labels to say anything
    reasons: tuple[str, ...]
    deltas: dict[str, float]  # live - offline, per metric compared


def degradation(
    live: Mapping[str, float], offline: Mapping[str, float], rule: DegradationRule | None = None
) -> Degradation:
    """Compare live metrics (from `online_metrics`) with the serving model's hold-out metrics."""
    rule = rule or DegradationRule()
    n = int(live.get("n_labelled", 0) or 0)
    if n < rule.min_labelled:
        return Degradation(False, False, (f"only {n} labelled predictions (< {rule.min_labelled})",), {})
    deltas: dict[str, float] = {}
    reasons: list[str] = []
    for name in rule.metrics:
        now, before = live.get(name, math.nan), offline.get(name, math.nan)
        if now is None or before is None or math.isnan(now) or math.isnan(before):
            continue  # e.g. ROC-AUC with one class among the labels
        deltas[name] = now - before
        if before - now > rule.tolerance:
            reasons.append(f"{name} {now:.3f} is {before - now:.3f} below offline {before:.3f} (> {rule.tolerance})")
    if not deltas:
        return Degradation(False, False, ("no metric comparable with the offline metrics",), {})
    return Degradation(bool(reasons), True, tuple(reasons) or ("within tolerance",), deltas)


# ---------------------------------------------------------------------------------------------
# After a deployment


@dataclass(frozen=True)
class WatchLimits:
    window: str = c.WATCH_WINDOW
    max_error_rate: float = c.WATCH_MAX_ERROR_RATE
    max_latency_p95_s: float = c.WATCH_MAX_LATENCY_P95_S
    max_positive_share_delta: float = c.WATCH_MAX_POSITIVE_SHARE_DELTA
    max_probability_ks: float = c.WATCH_MAX_PROBABILITY_KS
    min_requests: int = c.WATCH_MIN_REQUESTS
    max_flip_share: float = c.WATCH_MAX_FLIP_SHARE
    max_mean_abs_delta: float = c.WATCH_MAX_MEAN_ABS_DELTA
    min_compared_rows: int = c.WATCH_MIN_COMPARED_ROWS


@dataclass(frozen=True)
class WatchObservation:
    """What was seen of the new version since it was deployed (from metrics and the log).

    The prediction fields compare the new version's logged answers with the replaced version's
    answers on the same rows (see `compare_on_same_rows`); `compared_rows` stand behind them.
    """

    requests: int
    errors: int
    latency_p95_s: float | None = None
    positive_share_delta: float | None = None
    probability_ks: float | None = None
    compared_rows: int = 0
    flip_share: float | None = None
    mean_abs_delta: float | None = None


@dataclass(frozen=True)
class WatchDecision:
    verdict: str  # "rollback", "watching" (window open, nothing wrong yet) or "passed"
    reasons: tuple[str, ...]

    @property
    def rollback(self) -> bool:
        return self.verdict == "rollback"


@dataclass(frozen=True)
class VersionComparison:
    """Two versions' answers on identical rows: how much they disagree (None when no rows)."""

    rows: int
    flip_share: float | None = None  # share of rows with a different predicted label
    mean_abs_delta: float | None = None  # mean |probability(new) - probability(old)|
    probability_ks: float | None = None  # KS between the two probability lists
    positive_share_delta: float | None = None  # share predicted positive, new - old

    def to_dict(self) -> dict[str, Any]:
        return {"compared_rows": self.rows, "flip_share": self.flip_share, "mean_abs_delta": self.mean_abs_delta,
                "probability_ks": self.probability_ks, "positive_share_delta": self.positive_share_delta}


def prediction_shift(
    new_labels: Sequence[int] | np.ndarray,
    new_probabilities: Sequence[float] | np.ndarray,
    old_labels: Sequence[int] | np.ndarray,
    old_probabilities: Sequence[float] | np.ndarray,
    positive_class: int | str,
) -> VersionComparison:
    """How two versions' answers differ on the SAME rows (position i of each list is one row).

    Identical inputs on both sides: whatever moved is the model, never the traffic.
    """
    new_l, old_l = np.asarray(new_labels), np.asarray(old_labels)
    new_p, old_p = np.asarray(new_probabilities, dtype=float), np.asarray(old_probabilities, dtype=float)
    if not (len(new_l) == len(old_l) == len(new_p) == len(old_p)):
        raise MonitoringError(f"answers of different rows: {len(new_l)}, {len(old_l)}, {len(new_p)}, {len(old_p)}")
    n = len(new_l)
    if n == 0:
        return VersionComparison(0)
    both = ~(np.isnan(new_p) | np.isnan(old_p))
    from scipy import stats

    ks = float(stats.ks_2samp(new_p[both], old_p[both]).statistic) if both.any() else None
    return VersionComparison(
        rows=n,
        flip_share=float((new_l != old_l).mean()),
        mean_abs_delta=float(np.abs(new_p[both] - old_p[both]).mean()) if both.any() else None,
        probability_ks=ks,
        positive_share_delta=float((new_l == positive_class).mean() - (old_l == positive_class).mean()),
    )


def compare_on_same_rows(
    rows: pd.DataFrame,
    feature_names: Sequence[str],
    score_old: Callable[[pd.DataFrame], tuple[Sequence[int], Sequence[float]]],
    positive_class: int | str,
    max_rows: int = c.WATCH_MAX_COMPARED_ROWS,
    probability_column: str = PROBABILITY,
) -> VersionComparison:
    """Score the replaced version (`score_old`: features -> labels, probabilities) on the logged
    inputs of the new one and compare with what the new one answered on them.

    Rows lacking a feature or an answer are left out; the newest `max_rows` are compared.
    """
    needed = [*feature_names, PREDICTED_LABEL, probability_column]
    if rows.empty or any(col not in rows for col in needed):
        return VersionComparison(0)
    usable = rows.dropna(subset=needed).tail(max_rows)
    if usable.empty:
        return VersionComparison(0)
    old_labels, old_probabilities = score_old(usable[list(feature_names)].reset_index(drop=True))
    return prediction_shift(usable[PREDICTED_LABEL].to_numpy(), usable[probability_column].to_numpy(dtype=float),
                            old_labels, old_probabilities, positive_class)


def watch_decision(
    observation: WatchObservation,
    deployed_at: datetime | pd.Timestamp,
    now: datetime | pd.Timestamp,
    limits: WatchLimits | None = None,
) -> WatchDecision:
    """Roll back when any limit is broken. Error rate and p95 need `min_requests` behind them
    (a cold replica's first requests are slow and few), except an error count that already
    dooms the first `min_requests`; the two versions' disagreement needs `min_compared_rows`
    rows scored by both. Below a minimum the watch keeps watching until its window ends."""
    limits = limits or WatchLimits()
    window = to_timedelta(limits.window, "watch window")
    reasons: list[str] = []
    obs = observation
    if obs.requests >= limits.min_requests:
        rate = obs.errors / obs.requests
        if rate > limits.max_error_rate:
            reasons.append(f"error rate {rate:.3f} > {limits.max_error_rate} ({obs.errors}/{obs.requests})")
        if obs.latency_p95_s is not None and obs.latency_p95_s > limits.max_latency_p95_s:
            reasons.append(f"latency p95 {obs.latency_p95_s:.3f}s > {limits.max_latency_p95_s}s")
    elif obs.errors > limits.max_error_rate * limits.min_requests:
        # The first min_requests cannot come in under the limit any more: waiting for more
        # traffic would only prolong an outage.
        reasons.append(f"{obs.errors} errors in {obs.requests} requests: the error rate over the first "
                       f"{limits.min_requests} will exceed {limits.max_error_rate}")
    if obs.compared_rows >= limits.min_compared_rows:
        same = f"on the same {obs.compared_rows} rows"
        if obs.flip_share is not None and obs.flip_share > limits.max_flip_share:
            reasons.append(f"{obs.flip_share:.3f} of answers differ from the previous version {same} "
                           f"(limit {limits.max_flip_share})")
        if obs.mean_abs_delta is not None and obs.mean_abs_delta > limits.max_mean_abs_delta:
            reasons.append(f"probabilities differ by {obs.mean_abs_delta:.3f} on average {same} "
                           f"(limit {limits.max_mean_abs_delta})")
        if obs.positive_share_delta is not None and abs(obs.positive_share_delta) > limits.max_positive_share_delta:
            reasons.append(f"share predicted positive moved {obs.positive_share_delta:+.3f} {same} "
                           f"(limit {limits.max_positive_share_delta})")
        if obs.probability_ks is not None and obs.probability_ks > limits.max_probability_ks:
            reasons.append(f"probability distribution moved: KS {obs.probability_ks:.3f} > "
                           f"{limits.max_probability_ks} {same}")
    if reasons:
        return WatchDecision("rollback", tuple(reasons))
    waiting = [f"{obs.requests} of {limits.min_requests} requests"] if obs.requests < limits.min_requests else []
    if obs.compared_rows < limits.min_compared_rows:
        waiting.append(f"{obs.compared_rows} of {limits.min_compared_rows} rows compared")
    if _utc(now) < _utc(deployed_at) + window:
        return WatchDecision("watching", ("; ".join(["within limits so far", *waiting]),))
    if waiting:
        return WatchDecision("passed", (f"window over with only {', '.join(waiting)}: those not judged",))
    return WatchDecision("passed", ("within limits for the whole window",))


# ---------------------------------------------------------------------------------------------
# Retraining requests of drift events


def drift_event_key(model_version: str, window_key: str) -> str:
    """One drift event per (serving version, window): the sensor's run key."""
    return f"drift-{model_version}-{window_key}"


@dataclass(frozen=True)
class RetrainCursor:
    """What a drift sensor remembers between ticks (stored as its cursor string)."""

    last_requested_at: str | None = None  # ISO UTC
    keys: tuple[str, ...] = ()  # recent event keys already handled, newest last

    def to_json(self) -> str:
        return json.dumps({"last_requested_at": self.last_requested_at, "keys": list(self.keys)})

    @classmethod
    def from_json(cls, text: str | None) -> RetrainCursor:
        if not text:
            return cls()
        try:
            raw = json.loads(text)
            return cls(raw.get("last_requested_at"), tuple(str(k) for k in raw.get("keys", [])))
        except (ValueError, AttributeError, TypeError):
            logger.warning("unreadable retrain cursor %r: starting afresh", text[:80])
            return cls()


@dataclass(frozen=True)
class RetrainDecision:
    request: bool
    run_key: str | None
    reason: str
    cursor: RetrainCursor  # store this whatever the decision


def retrain_decision(
    event_key: str | None,
    cursor: RetrainCursor,
    now: datetime | pd.Timestamp,
    *,
    run_in_progress: bool,
    cooldown_s: float = c.RETRAIN_COOLDOWN_S,
    keys_kept: int = c.RETRAIN_KEYS_KEPT,
) -> RetrainDecision:
    """Request a retraining run for a drift event, at most once per event, never while one runs,
    and not again within `cooldown_s` of the last request (drift lasting many windows is one
    problem, not one per window)."""
    if event_key is None:
        return RetrainDecision(False, None, "no drift", cursor)
    if event_key in cursor.keys:
        return RetrainDecision(False, None, f"event {event_key} already handled", cursor)
    if run_in_progress:
        # Not remembered: once that run ends the event is judged again (cooldown permitting).
        return RetrainDecision(False, None, "a retraining run is in progress", cursor)
    if cursor.last_requested_at is not None:
        since = (_utc(now) - _utc(cursor.last_requested_at)).total_seconds()
        if since < cooldown_s:
            # Not remembered either: drift still reported once the cooldown is over asks again.
            return RetrainDecision(False, None, f"cooldown: {cooldown_s - since:.0f}s left", cursor)
    new = RetrainCursor(_utc(now).isoformat(), (*cursor.keys, event_key)[-keys_kept:])
    return RetrainDecision(True, event_key, "drift event: retraining requested", new)


# ---------------------------------------------------------------------------------------------
# Serving counters for the watch, from the Prometheus text the Ray metrics agent exports


@dataclass(frozen=True)
class ServingCounters:
    """Cumulative counts of one route, summed over replicas (Ray prefixes names with `ray_`)."""

    requests: int = 0
    server_errors: int = 0  # 5xx: the service's fault (4xx are the client's)
    latency_buckets: tuple[tuple[float, float], ...] = ()  # (upper bound in ms, cumulative count)

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "server_errors": self.server_errors,
                "latency_buckets": [list(b) for b in self.latency_buckets]}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> ServingCounters:
        raw = raw or {}
        return cls(int(raw.get("requests", 0)), int(raw.get("server_errors", 0)),
                   tuple((float(a), float(b)) for a, b in raw.get("latency_buckets", [])))


def of_application(labels: Mapping[str, str], application: str | None) -> bool:
    """Is a series the application's? Ray Serve labels replicas' metrics with `application`; one
    without the label (an exporter of one application) counts, and so does every one for None."""
    return application is None or labels.get("application", application) == application


def parse_serving_metrics(text: str, route: str = "/predict", prefix: str = "mlops_serving_",
                          application: str | None = APP_NAME) -> ServingCounters:
    """Requests, 5xx and the latency histogram of `route` of the Serve `application` (None: every
    application's) from a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    requests = errors = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("ray_")
            if sample.labels.get("route") != route or not of_application(sample.labels, application):
                continue
            if name == f"{prefix}requests_total":
                requests += sample.value
                if str(sample.labels.get("status", "")).startswith("5"):
                    errors += sample.value
            elif name == f"{prefix}request_latency_ms_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return ServingCounters(int(requests), int(errors), tuple(sorted(buckets.items())))


def counters_since(now: ServingCounters, base: ServingCounters) -> tuple[int, int, float | None]:
    """(requests, 5xx, latency p95 in s) between two scrapes; a counter reset starts from zero.

    The p95 is the upper bound of the histogram bucket holding the 95th percentile: it can
    overstate latency by one bucket, never understate it.
    """
    delta = _counters_delta(now, base)
    return delta.requests, delta.server_errors, _latency_p95_s(delta.latency_buckets)


def counters_since_by_node(
    now: Mapping[str, ServingCounters], base: Mapping[str, ServingCounters]
) -> tuple[int, int, float | None]:
    """`counters_since` over a cluster: each node's metrics endpoint (key) against its own baseline,
    summed. A node with no baseline (it joined after it) or whose counters went down (restarted)
    counts from zero; a node gone since the baseline adds nothing."""
    deltas = [_counters_delta(counters, base.get(node, ServingCounters())) for node, counters in now.items()]
    total = merge_counters(deltas)
    return total.requests, total.server_errors, _latency_p95_s(total.latency_buckets)


def merge_counters(parts: Iterable[ServingCounters]) -> ServingCounters:
    """The sum of several endpoints' counters (each node exports only its own replicas)."""
    requests = errors = 0
    buckets: dict[float, float] = {}
    for part in parts:
        requests += part.requests
        errors += part.server_errors
        for le, count in part.latency_buckets:
            buckets[le] = buckets.get(le, 0.0) + count
    return ServingCounters(requests, errors, tuple(sorted(buckets.items())))


def _counters_delta(now: ServingCounters, base: ServingCounters) -> ServingCounters:
    if now.requests < base.requests:
        base = ServingCounters()
    before = dict(base.latency_buckets)
    return ServingCounters(now.requests - base.requests, max(0, now.server_errors - base.server_errors),
                           tuple((le, count - before.get(le, 0.0)) for le, count in now.latency_buckets))


def _latency_p95_s(delta: Sequence[tuple[float, float]]) -> float | None:
    total = max((count for _, count in delta), default=0.0)
    if total <= 0:
        return None
    p95_ms = next(le for le, count in delta if count >= 0.95 * total)
    return p95_ms / 1000.0 if math.isfinite(p95_ms) else math.inf
