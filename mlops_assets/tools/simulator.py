"""Seeded simulator of raw records, calibrated on the figures in the dataset spec.

Each categorical feature is drawn from its value shares given the label, each numeric one from
its distribution given the label (`numeric_given_label` in the spec's calibration: lognormal,
normal, uniform or poisson, with an optional share of exact zeros), rounded to its type and kept
in its range; features are independent given the label, which is what the figures pin down. Exact duplicate rows and feature
vectors with both labels are then added in the configured shares, and drift moves named
features: a categorical one's value shares, a numeric one's scale. It writes the demo's data and the tests' data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from mlops_assets.core import storage
from mlops_assets.core.dataset_spec import DatasetSpec, FeatureSpec, LabelValue, NumericCalibration, Value
from mlops_assets.core.schema import json_records  # noqa: F401  (request builders import it from here)
from mlops_assets.settings import join_url


@dataclass(frozen=True)
class SimulationConfig:
    n_rows: int
    seed: int
    duplicate_share: float | None = None  # None: the calibrated share
    conflict_share: float | None = None  # share of distinct vectors seen with both labels
    drift: Mapping[str, float] = field(default_factory=dict)  # feature -> share moved

    def __post_init__(self) -> None:
        if self.n_rows < 1:
            raise ValueError(f"n_rows must be at least 1, got {self.n_rows}")
        for name, value in (("duplicate_share", self.duplicate_share), ("conflict_share", self.conflict_share)):
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        for feature, amount in self.drift.items():
            if not 0.0 <= amount <= 1.0:
                raise ValueError(f"drift amount for {feature!r} must be in [0, 1], got {amount}")


def drifted_shares(shares: Mapping[Value, float], amount: float) -> dict[Value, float]:
    """Move `amount` of probability mass onto the rarest value, taken pro rata from the others.

    The rarest value is where drift shows most; amount 0 leaves the shares as they are.
    """
    target = min(shares, key=lambda v: (shares[v], str(v)))
    room = 1.0 - shares[target]
    moved = min(amount, room)
    out = {}
    for value, share in shares.items():
        if value == target:
            out[value] = share + moved
        else:
            out[value] = share - moved * (share / room if room > 0 else 0.0)
    return out


NUMERIC_DRIFT_SCALE = 3.0  # a numeric feature's draws are multiplied by 1 + NUMERIC_DRIFT_SCALE * amount


def _shares_for(spec: DatasetSpec, feature: str, label: LabelValue) -> dict[Value, float]:
    values = spec.feature(feature).values
    if spec.calibration and feature in spec.calibration.share_given_label:
        shares = spec.calibration.share_given_label[feature][label]
        return {v: float(shares.get(v, 0.0)) for v in values}
    return {v: 1.0 / len(values) for v in values}


def _numeric_draw(feature: FeatureSpec, how: NumericCalibration | None, rng: np.random.Generator, n: int,
                  ) -> np.ndarray:
    """n draws of a numeric feature from its calibrated distribution (uniform on its range without one)."""
    if how is None:
        low = feature.minimum if feature.minimum is not None else 0.0
        high = feature.maximum if feature.maximum is not None else low + 100.0
        values = rng.uniform(low, high, size=n)
    else:
        p = how.params
        if how.distribution == "lognormal":
            values = rng.lognormal(p.get("mean", 0.0), p.get("sigma", 1.0), size=n)
        elif how.distribution == "normal":
            values = rng.normal(p.get("mean", 0.0), p.get("sigma", 1.0), size=n)
        elif how.distribution == "poisson":
            values = rng.poisson(p.get("lam", 1.0), size=n).astype(float)
        else:
            values = rng.uniform(p.get("low", 0.0), p.get("high", 1.0), size=n)
        if how.zero_share:
            values = np.where(rng.random(n) < how.zero_share, 0.0, values)
    return values


def _finish_numeric(feature: FeatureSpec, values: np.ndarray) -> np.ndarray:
    """Round to the feature's type and keep the draws inside its range."""
    values = np.round(values) if feature.type == "int" else np.round(values, 6)
    low = -np.inf if feature.minimum is None else feature.minimum
    high = np.inf if feature.maximum is None else feature.maximum
    values = np.clip(values, low, high)
    return values.astype(np.int64) if feature.type == "int" else values


def _draw(spec: DatasetSpec, config: SimulationConfig, rng: np.random.Generator, n: int) -> pd.DataFrame:
    classes = list(spec.label_values)
    if not spec.label_is_string:
        classes = sorted(classes, key=int)
    cal = spec.calibration
    label_p = np.array([cal.label_share.get(k, 0.0) if cal else 1.0 / len(classes) for k in classes])
    labels = np.array(classes, dtype=object)[rng.choice(len(classes), size=n, p=label_p / label_p.sum())]
    data: dict[str, np.ndarray] = {}
    for feature in spec.features:
        if feature.is_numeric:
            numeric = np.empty(n, dtype=float)
            for label in classes:
                mask = labels == label
                how = cal.numeric_given_label.get(feature.name, {}).get(label) if cal else None
                numeric[mask] = _numeric_draw(feature, how, rng, int(mask.sum()))
            if feature.name in config.drift:
                numeric = numeric * (1.0 + NUMERIC_DRIFT_SCALE * config.drift[feature.name])
            data[feature.name] = _finish_numeric(feature, numeric)
            continue
        column = np.empty(n, dtype=object if feature.is_string else np.int64)
        for label in classes:
            shares = _shares_for(spec, feature.name, label)
            if feature.name in config.drift:
                shares = drifted_shares(shares, config.drift[feature.name])
            mask = labels == label
            p = np.array([shares[v] for v in feature.values], dtype=float)
            picks = rng.choice(len(feature.values), size=int(mask.sum()), p=p / p.sum())
            column[mask] = np.array(feature.values, dtype=object if feature.is_string else np.int64)[picks]
        data[feature.name] = column
    data[spec.label] = labels if spec.label_is_string else labels.astype(np.int64)
    return pd.DataFrame(data, columns=spec.columns)


def _distinct_draws(spec: DatasetSpec, config: SimulationConfig, rng: np.random.Generator, n: int) -> pd.DataFrame:
    """n records with pairwise distinct feature vectors, so duplicates and conflicts are only
    the ones configured (independent draws collide now and then)."""
    frame = _draw(spec, config, rng, n)
    for _ in range(50):
        frame = frame.drop_duplicates(subset=spec.feature_names, ignore_index=True)
        if len(frame) >= n:
            break
        frame = pd.concat([frame, _draw(spec, config, rng, n - len(frame) + 16)], ignore_index=True)
    return frame.head(n)


def simulate_records(spec: DatasetSpec, config: SimulationConfig) -> pd.DataFrame:
    """Return `config.n_rows` records with the spec's columns, in the spec's order."""
    unknown = sorted(set(config.drift) - set(spec.feature_names))
    if unknown:
        raise ValueError(f"drift names unknown features {unknown}; known: {spec.feature_names}")
    rng = np.random.default_rng(config.seed)
    cal = spec.calibration
    dup_share = config.duplicate_share if config.duplicate_share is not None else (
        cal.exact_duplicate_row_share if cal else 0.0
    )
    conflict_share = config.conflict_share if config.conflict_share is not None else (
        cal.conflicting_vector_share if cal else 0.0
    )

    n_distinct = max(1, round(config.n_rows * (1.0 - dup_share)))
    n_conflicts = min(round(n_distinct * conflict_share), n_distinct // 2)
    n_base = n_distinct - n_conflicts

    base = _distinct_draws(spec, config, rng, n_base)

    # Conflicting labels: copies of some vectors with the other label.
    conflict_rows = base.sample(n=n_conflicts, random_state=int(rng.integers(2**31))) if n_conflicts else base.iloc[:0]
    flipped = conflict_rows.copy()
    flipped[spec.label] = np.where(
        flipped[spec.label] == spec.positive_class, spec.negative_class, spec.positive_class
    )
    distinct = pd.concat([base, flipped], ignore_index=True)

    # Exact duplicates: resampled copies of rows already drawn, so marginals hold.
    n_dups = config.n_rows - len(distinct)
    dups = distinct.sample(n=n_dups, replace=True, random_state=int(rng.integers(2**31))) if n_dups > 0 else distinct.iloc[:0]
    out = pd.concat([distinct, dups], ignore_index=True)
    out = out.sample(frac=1.0, random_state=int(rng.integers(2**31))).reset_index(drop=True)
    return out.head(config.n_rows)


def write_batch(frame: pd.DataFrame, landing_url: str, fmt: str = "csv", name: str | None = None) -> str:
    """Write one batch file into the landing folder (any fsspec URL); return its URL.

    The file appears whole (a hidden temporary name and a rename, or one object-store put), so a
    watching sensor never sees half a file.
    """
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"format must be 'csv' or 'parquet', got {fmt!r}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = name or f"batch-{stamp}.{fmt}"
    target = join_url(landing_url, name)
    with storage.atomic_writer(target) as handle:
        if fmt == "csv":
            handle.write(frame.to_csv(index=False).encode())
        else:
            frame.to_parquet(handle, index=False)
    return target


def parse_drift(items: Sequence[str]) -> dict[str, float]:
    """Parse `FEATURE=AMOUNT` pairs from the command line."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, amount = item.partition("=")
        if not sep or not name:
            raise ValueError(f"drift must look like FEATURE=AMOUNT, got {item!r}")
        try:
            out[name] = float(amount)
        except ValueError as exc:
            raise ValueError(f"drift amount for {name!r} is not a number: {amount!r}") from exc
    return out
