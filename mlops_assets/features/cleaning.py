"""Feature cleaning and the leakage-free train/test split.

Cleaning policy (in this order, each step counted):
1. rows without a label are dropped;
2. rows with a missing feature value are dropped (policy "drop_row", the default) or kept with
   NaN, which CatBoost treats as a value of its own (policy "keep_nan");
3. rows are grouped by feature vector: each vector is kept once (exact duplicates removed) with
   the majority label of its rows; a tie goes to the positive class (phishing), because missing
   a phishing site costs more than a false alarm.
The target is 1 for the positive class and 0 otherwise (labels may be integers or strings; the
spec maps them). Feature vectors are compared whole, floats and strings included: numbers as
float64, text as text. Integer columns stay int64 and string columns str, as the model takes them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from mlops_assets.core.dataset_spec import DatasetSpec

TARGET = "target"
SPLIT = "split"
MissingPolicy = Literal["drop_row", "keep_nan"]


@dataclass(frozen=True)
class CleaningStats:
    rows_in: int
    unlabelled_dropped: int
    missing_feature_rows_dropped: int
    exact_duplicates_removed: int
    conflicting_vectors: int
    conflicting_rows_merged: int  # rows folded into a vector's majority label
    rows_relabelled: int
    rows_out: int


def clean_features(raw: pd.DataFrame, spec: DatasetSpec, missing_policy: MissingPolicy = "drop_row",
                   ) -> tuple[pd.DataFrame, CleaningStats]:
    """Apply the cleaning policy; return the features with `target`, one row per feature vector."""
    if missing_policy not in ("drop_row", "keep_nan"):
        raise ValueError(f"missing feature policy must be 'drop_row' or 'keep_nan', got {missing_policy!r}")
    rows_in = len(raw)
    labelled = raw.dropna(subset=[spec.label])
    unlabelled = rows_in - len(labelled)
    if missing_policy == "drop_row":
        complete = labelled.dropna(subset=spec.feature_names)
    else:
        complete = labelled
    missing_dropped = len(labelled) - len(complete)

    features = model_frame(complete, spec)
    target = (complete[spec.label].astype("object") == spec.positive_class).astype("int64").to_numpy()
    keys = vector_keys(features, spec.feature_names)
    grouped = (
        pd.DataFrame({"_key": keys.to_numpy(), "_pos": target, "_n": 1})
        .groupby("_key", sort=False)
        .agg(_pos=("_pos", "sum"), _n=("_n", "sum"))
    )
    first_rows = features.assign(_key=keys.to_numpy()).drop_duplicates("_key").set_index("_key")
    grouped = first_rows.join(grouped[["_pos", "_n"]]).reset_index(drop=True)
    negatives = grouped["_n"] - grouped["_pos"]
    grouped[TARGET] = (grouped["_pos"] >= negatives).astype("int64")  # tie -> positive class
    conflicting = int(((grouped["_pos"] > 0) & (negatives > 0)).sum())
    relabelled = int(np.where(grouped[TARGET] == 1, negatives, grouped["_pos"]).sum())
    distinct_rows = len(pd.DataFrame({"_key": keys.to_numpy(), "_pos": target}).drop_duplicates())
    out = grouped[[*spec.feature_names, TARGET]]
    if missing_policy == "drop_row":
        out = out.astype({f.name: "int64" for f in spec.features if f.type == "int"})
    stats = CleaningStats(
        rows_in=rows_in,
        unlabelled_dropped=unlabelled,
        missing_feature_rows_dropped=missing_dropped,
        exact_duplicates_removed=len(complete) - distinct_rows,
        conflicting_vectors=conflicting,
        conflicting_rows_merged=distinct_rows - len(out),
        rows_relabelled=relabelled,
        rows_out=len(out),
    )
    return out.reset_index(drop=True), stats


def feature_version(frame: pd.DataFrame, transformation_version: str) -> str:
    """A short version of the feature table's content and the code that made it."""
    digest = hashlib.sha256(transformation_version.encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    digest.update(",".join(map(str, frame.columns)).encode())
    return digest.hexdigest()[:16]


def model_frame(frame: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """The features as the model takes them: numbers as float64 (NaN for missing), strings as
    str (missing as the text "nan", which CatBoost takes as a category of its own)."""
    out = {}
    for f in spec.features:
        column = frame[f.name]
        out[f.name] = column.astype("object").where(column.notna(), "nan").astype(str) if f.is_string \
            else pd.to_numeric(column, errors="coerce").astype("float64")
    return pd.DataFrame(out, index=frame.index)


def vector_keys(frame: pd.DataFrame, feature_names: list[str]) -> pd.Series:
    """One hashable key per row's feature vector (NaN-safe; numbers compared as float64 so 1 and
    1.0 are one vector, strings as text)."""
    part = frame[feature_names]
    numeric = [n for n in feature_names if part[n].dtype.kind in "biuf" or str(part[n].dtype) in ("Int64", "Float64")]
    if len(numeric) == len(feature_names):
        return pd.util.hash_pandas_object(part.astype("float64"), index=False)
    normal = part.astype({n: "float64" for n in numeric}).astype("object")
    return pd.util.hash_pandas_object(normal.astype(str), index=False)


def split_train_test(features: pd.DataFrame, feature_names: list[str], test_fraction: float, seed: int,
                     ) -> pd.DataFrame:
    """Stratified, seeded split by feature vector: rows sharing a vector land on the same side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    keys = vector_keys(features, feature_names)
    groups = pd.DataFrame({"key": keys, TARGET: features[TARGET].to_numpy()})
    # A group's stratum is its majority target (cleaned data has one row per vector anyway).
    strata = groups.groupby("key")[TARGET].mean().round().astype(int)
    test_keys: set[int] = set()
    for _, members in strata.groupby(strata):
        ordered = members.index.to_numpy()
        ordered = ordered[rng.permutation(len(ordered))]
        n_test = int(round(len(ordered) * test_fraction))
        test_keys.update(ordered[:n_test].tolist())
    out = features.copy()
    out[SPLIT] = np.where(keys.isin(test_keys), "test", "train")
    return out


def shared_vectors(split: pd.DataFrame, feature_names: list[str]) -> int:
    """How many distinct feature vectors appear on both sides of the split (must be 0)."""
    keys = vector_keys(split, feature_names)
    train = set(keys[split[SPLIT] == "train"])
    test = set(keys[split[SPLIT] == "test"])
    return len(train & test)
