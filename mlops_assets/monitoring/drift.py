"""Data profiles and drift scores: the one module that imports whylogs.

whylogs is no longer maintained (DESIGN.md), so nothing else in the package touches it:
profiles leave this module as opaque, mergeable `bytes`, and everything the rest of the
platform needs (counts, value shares, quantiles, drift scores) comes back as plain Python.
Swapping the backend means rewriting this file only.

Drift statistics, computed here from the profiles' sketches rather than with
`whylogs.viz.drift.calculate_drift_scores`, because its defaults do not suit this data:
it applies KS to integer columns (KS p-values are invalid for a 3-valued variable with ties)
and its chi-squared treats the reference as exact and truncates expected counts to integers.

- Categorical (integer) columns: Hellinger distance between the two value distributions
  (from the exact frequent-items counts) as the statistic, plus a chi-squared test of
  homogeneity on the 2 x k count table for the p-value. Drift needs BOTH a significant
  p-value and a Hellinger distance above a threshold: the p-value alone flags trivial shifts
  once windows hold many rows (and duplicate rows, which real traffic has, make it
  over-confident); the distance alone is noisy on small windows. Hellinger is bounded in
  [0, 1] and independent of sample size, so one threshold fits every window size.
- Continuous columns (the dataset spec's `numeric` features, integer or float, and the
  predicted probability): two-sample Kolmogorov-Smirnov statistic from the two KLL sketches'
  CDFs, asymptotic p-value; same "significant and large" rule, with the KS statistic (the
  largest gap between the two CDFs) at or above `DRIFT_KS_STATISTIC` (0.1: ten percentage
  points of the distribution moved past some value). KS rather than Wasserstein because it is
  scale-free: one threshold fits byte counts and rates alike.

The spec's kind picks the statistic (`feature_drift`): categorical features (integer codes or
strings) get Hellinger + chi-squared, numeric ones KS; each feature's score is recorded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.core import storage
from mlops_assets.core.dataset_spec import DatasetSpec

# whylogs POSTs a usage event to its vendor at import unless this is set (checked in 1.6.4:
# whylogs/api/usage_stats). Set before the import so the platform never phones home;
# setdefault keeps an operator's own value.
os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "True")

if TYPE_CHECKING:  # whylogs and SciPy load where profiles are made or compared (definitions load cheaply)
    from whylogs.core import DatasetProfileView
    from whylogs.core.view.column_profile_view import ColumnProfileView

BACKEND = "whylogs"
PROFILE_SUFFIX = ".bin"  # whylogs' own binary format (delimited protobuf)


METHOD_CATEGORICAL = "hellinger+chi2"
METHOD_CONTINUOUS = "ks"
OTHER_VALUES = "__other__"  # mass a frequent-items sketch did not keep itemised
_KS_GRID = 200  # quantile levels per sketch at which the CDFs are compared


@dataclass(frozen=True)
class DriftThresholds:
    """When a column counts as drifted; all of p-value, distance and sample size must agree."""

    p_value: float = c.DRIFT_P_VALUE
    hellinger: float = c.DRIFT_HELLINGER
    ks_statistic: float = c.DRIFT_KS_STATISTIC
    min_rows: int = c.DRIFT_MIN_ROWS

    def __post_init__(self) -> None:
        if not 0.0 < self.p_value < 1.0:
            raise ValueError(f"p_value must be in (0, 1), got {self.p_value}")
        for name in ("hellinger", "ks_statistic"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.min_rows < 1:
            raise ValueError(f"min_rows must be at least 1, got {self.min_rows}")


@dataclass(frozen=True)
class DriftScore:
    """One column's drift: statistic (Hellinger or KS), p-value, sizes, verdict and why."""

    column: str
    method: str
    statistic: float
    p_value: float
    n_reference: int
    n_current: int
    drift: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Profiles


def profile_frame(frame: pd.DataFrame, dataset_timestamp: datetime | None = None) -> bytes:
    """Profile a frame into a serialized, mergeable profile.

    Pass only the columns worth monitoring (features and outputs): an id column would cost a
    cardinality sketch and frequent items for nothing. `dataset_timestamp` (e.g. the window's
    start; naive means UTC) is kept in the profile, and a merge keeps the earliest.
    """
    stamp = None
    if dataset_timestamp is not None:
        at = pd.Timestamp(dataset_timestamp)
        stamp = (at.tz_localize("UTC") if at.tzinfo is None else at.tz_convert("UTC")).to_pydatetime()
    from whylogs.core import DatasetProfile

    profile = DatasetProfile(dataset_timestamp=stamp)
    profile.track(pandas=_integral_floats_as_int(frame))
    return profile.view().serialize()


def _integral_floats_as_int(frame: pd.DataFrame) -> pd.DataFrame:
    """An integer column with a missing value arrives as float64, and whylogs keeps no
    frequent items (hence no value counts) for floats: turn it back into nullable Int64."""
    out = frame
    for name in frame.columns:
        column = frame[name]
        if column.dtype.kind == "f" and column.isna().any():
            present = column.dropna()
            if len(present) and bool(np.all(np.mod(present.to_numpy(), 1.0) == 0.0)):
                if out is frame:
                    out = frame.copy()
                out[name] = column.astype("Int64")
    return out


def merge_profiles(blobs: Iterable[bytes]) -> bytes:
    """Merge profiles (e.g. time windows) into one; no profiles give an empty profile."""
    merged: DatasetProfileView | None = None
    for blob in blobs:
        view = _view(blob)
        merged = view if merged is None else merged.merge(view)
    # DatasetProfileView.zero() has no timestamp and cannot be serialized: use an empty profile.
    from whylogs.core import DatasetProfile

    return (merged or DatasetProfile().view()).serialize()


def save_profile(blob: bytes, url: str) -> str:
    """Write a profile, whole, to any fsspec URL (parent folders created); return the URL."""
    return storage.write_bytes(url, blob)


def load_profile(url: str) -> bytes:
    data = storage.read_bytes(url)
    _view(data)  # fail here, naming nothing downstream, if the file is not a profile
    return data


def _view(blob: bytes) -> DatasetProfileView:
    from whylogs.core import DatasetProfileView

    return DatasetProfileView.deserialize(blob)


def profile_rows(blob: bytes) -> int:
    """Rows a profile holds (its largest column count), without summarizing every column."""
    return max((_counts(column)[0] for column in _view(blob).get_columns().values()), default=0)


def profile_summary(blob: bytes) -> dict[str, Any]:
    """Plain-Python summary: rows, and per column counts, nulls and its distribution.

    Discrete columns get `values` (value -> count, exact while a column has fewer distinct
    values than the sketch keeps); every numeric column gets mean, stddev, min, max, quantiles.
    """
    view = _view(blob)
    columns: dict[str, dict[str, Any]] = {}
    for name, column in sorted(view.get_columns().items()):
        n, nulls = _counts(column)
        entry: dict[str, Any] = {"n": n, "null": nulls}
        values = _value_counts(column)
        if values is not None:
            entry["values"] = values
        dist = column.get_metric("distribution")
        if dist is not None and not dist.kll.value.is_empty():
            summary = dist.to_summary_dict()
            entry.update({
                "mean": float(summary["mean"]),
                "stddev": float(summary["stddev"]),
                "min": float(summary["min"]),
                "max": float(summary["max"]),
                "quantiles": {q: float(summary[q]) for q in ("q_05", "q_25", "median", "q_75", "q_95")},
            })
        columns[name] = entry
    stamp = view.dataset_timestamp
    return {
        "backend": BACKEND,
        "n_rows": max((c["n"] for c in columns.values()), default=0),
        "dataset_timestamp": stamp.isoformat() if stamp else None,
        "columns": columns,
    }


def _counts(column: ColumnProfileView) -> tuple[int, int]:
    counts = column.get_metric("counts")
    if counts is None:
        return 0, 0
    return int(counts.n.value), int(counts.null.value)


def _value_key(text: str) -> Any:
    """whylogs keeps frequent items as strings; give integers back as int."""
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else number


def _value_counts(column: ColumnProfileView) -> dict[Any, int] | None:
    """Value -> count from the frequent-items sketch; None for columns without one (floats).

    When the sketch could not keep every value itemised, the rest is lumped under
    OTHER_VALUES so that counts still add up to the non-null rows.
    """
    items = column.get_metric("frequent_items")
    if items is None:
        return None
    n, nulls = _counts(column)
    out: dict[Any, int] = {}
    for item in items.to_summary_dict()["frequent_strings"]:
        key = _value_key(item.value)
        out[key] = out.get(key, 0) + int(item.est)
    rest = (n - nulls) - sum(out.values())
    if rest > 0:
        out[OTHER_VALUES] = rest
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


# ---------------------------------------------------------------------------------------------
# Drift


def hellinger(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Hellinger distance of two discrete distributions on the same support, in [0, 1]."""
    a, b = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    a, b = a / a.sum(), b / b.sum()
    return float(min(1.0, math.sqrt(0.5 * float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)))))


def categorical_drift(
    column: str, reference: Mapping[Any, int], current: Mapping[Any, int], thresholds: DriftThresholds
) -> DriftScore:
    """Drift of one categorical column from its value counts (see the module docstring)."""
    support = sorted(set(reference) | set(current), key=str)
    ref = np.array([reference.get(v, 0) for v in support], dtype=float)
    cur = np.array([current.get(v, 0) for v in support], dtype=float)
    n_ref, n_cur = int(ref.sum()), int(cur.sum())
    if n_ref == 0 or n_cur == 0:
        return DriftScore(column, METHOD_CATEGORICAL, math.nan, math.nan, n_ref, n_cur, False,
                          "no data in the reference" if n_ref == 0 else "no data in the current window")
    distance = hellinger(ref, cur)
    if len(support) < 2:
        p_value = 1.0  # one value on both sides: nothing can have moved
    else:
        # correction=False: Yates' correction is for 2x2 tables with tiny counts and makes the
        # test conservative; the min_rows guard handles small samples instead.
        from scipy import stats

        p_value = float(stats.chi2_contingency(np.vstack([ref, cur]), correction=False).pvalue)
    return _verdict(column, METHOD_CATEGORICAL, distance, thresholds.hellinger, p_value, n_ref, n_cur, thresholds)


def _ks_from_sketches(ref: Any, cur: Any) -> tuple[float, float]:
    """KS statistic and asymptotic two-sample p-value from two KLL sketches."""
    levels = np.linspace(0.0, 1.0, _KS_GRID + 1)
    points = np.unique(np.concatenate([ref.get_quantiles(levels), cur.get_quantiles(levels)]))
    # get_cdf(points) gives P(X < point) for each point (+1.0 at the end); compare both sides.
    gap = np.abs(np.asarray(ref.get_cdf(points.tolist()))[:-1] - np.asarray(cur.get_cdf(points.tolist()))[:-1])
    statistic = float(gap.max()) if len(gap) else 0.0
    n, m = ref.get_n(), cur.get_n()
    effective = round(n * m / (n + m))
    # Same distribution scipy's ks_2samp uses in its asymptotic mode.
    from scipy import stats

    p_value = float(stats.kstwo.sf(statistic, max(1, effective)))
    return statistic, p_value


def _verdict(
    column: str, method: str, statistic: float, limit: float, p_value: float, n_ref: int, n_cur: int,
    thresholds: DriftThresholds,
) -> DriftScore:
    significant = p_value < thresholds.p_value
    large = statistic >= limit
    if n_cur < thresholds.min_rows:
        drift, reason = False, f"only {n_cur} rows (< {thresholds.min_rows}): not judged"
    elif significant and large:
        drift, reason = True, f"{method} {statistic:.3f} >= {limit} and p {p_value:.2g} < {thresholds.p_value}"
    elif large:
        drift, reason = False, f"{method} {statistic:.3f} >= {limit} but p {p_value:.2g} not significant"
    elif significant:
        drift, reason = False, f"significant (p {p_value:.2g}) but {method} {statistic:.3f} < {limit}"
    else:
        drift, reason = False, "no drift"
    return DriftScore(column, method, statistic, p_value, n_ref, n_cur, drift, reason)


def _column_score(
    name: str, ref: ColumnProfileView | None, cur: ColumnProfileView | None, continuous: bool,
    thresholds: DriftThresholds,
) -> DriftScore:
    method = METHOD_CONTINUOUS if continuous else METHOD_CATEGORICAL
    if ref is None or cur is None:
        where = "reference" if ref is None else "current"
        return DriftScore(name, method, math.nan, math.nan, 0, 0, False, f"column missing from the {where} profile")
    if not continuous:
        ref_counts, cur_counts = _value_counts(ref), _value_counts(cur)
        if ref_counts is None or cur_counts is None:
            return DriftScore(name, method, math.nan, math.nan, 0, 0, False,
                              "no value counts (not an integer or string column?): list it as continuous")
        return categorical_drift(name, ref_counts, cur_counts, thresholds)
    ref_dist, cur_dist = ref.get_metric("distribution"), cur.get_metric("distribution")
    n_ref = 0 if ref_dist is None else int(ref_dist.kll.value.get_n())
    n_cur = 0 if cur_dist is None else int(cur_dist.kll.value.get_n())
    if ref_dist is None or cur_dist is None or n_ref == 0 or n_cur == 0:
        return DriftScore(name, method, math.nan, math.nan, n_ref, n_cur, False, "no numeric data on one side")
    statistic, p_value = _ks_from_sketches(ref_dist.kll.value, cur_dist.kll.value)
    return _verdict(name, method, statistic, thresholds.ks_statistic, p_value, n_ref, n_cur, thresholds)


def drift_scores(
    reference: bytes,
    current: bytes,
    columns: Sequence[str],
    *,
    continuous: Collection[str] = (),
    thresholds: DriftThresholds | None = None,
) -> dict[str, DriftScore]:
    """Per-column drift of `current` against `reference`; columns in `continuous` use KS,
    the others are categorical."""
    thresholds = thresholds or DriftThresholds()
    ref_view, cur_view = _view(reference), _view(current)
    return {
        name: _column_score(name, ref_view.get_column(name), cur_view.get_column(name), name in continuous, thresholds)
        for name in columns
    }


def feature_drift(
    reference: bytes, current: bytes, spec: DatasetSpec, *, thresholds: DriftThresholds | None = None,
) -> dict[str, DriftScore]:
    """Per-feature drift with the statistic the spec's kind picks: numeric features KS, the others
    Hellinger + chi-squared."""
    return drift_scores(reference, current, spec.feature_names, continuous=spec.numeric_features,
                        thresholds=thresholds)


def prediction_drift(
    reference: bytes,
    current: bytes,
    *,
    probability_column: str = "phishing_probability",
    label_column: str = "label",
    thresholds: DriftThresholds | None = None,
) -> dict[str, DriftScore]:
    """Drift of the model's outputs: the probability (KS) and the predicted label (categorical)."""
    return drift_scores(reference, current, [probability_column, label_column],
                        continuous={probability_column}, thresholds=thresholds)


def drift_summary(scores: Mapping[str, DriftScore]) -> dict[str, Any]:
    """Numbers worth plotting per run: how many columns drifted, which, and the worst statistic."""
    drifted = sorted(name for name, s in scores.items() if s.drift)
    finite = [s.statistic for s in scores.values() if not math.isnan(s.statistic)]
    return {
        "n_columns": len(scores),
        "n_drifted": len(drifted),
        "drift_share": len(drifted) / len(scores) if scores else 0.0,
        "drifted_columns": drifted,
        "max_statistic": max(finite) if finite else math.nan,
    }


def drift_between_frames(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: Sequence[str],
    *,
    continuous: Collection[str] = (),
    thresholds: DriftThresholds | None = None,
) -> dict[str, DriftScore]:
    """Profile two frames and score them: the whole path in one call (handy for benchmarks)."""
    wanted = list(columns)
    return drift_scores(profile_frame(reference[wanted]), profile_frame(current[wanted]), wanted,
                        continuous=continuous, thresholds=thresholds)
