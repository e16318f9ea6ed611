"""The cleaning policy and the leakage-free split, on tiny frames and on calibrated data."""

import numpy as np
import pandas as pd
import pytest

from mlops_assets.core.dataset_spec import spec_from_dict
from mlops_assets.features.cleaning import (
    SPLIT,
    TARGET,
    clean_features,
    feature_version,
    shared_vectors,
    split_train_test,
)
from mlops_assets.tools.simulator import SimulationConfig, simulate_records


@pytest.fixture(scope="module")
def tiny_spec():
    return spec_from_dict({
        "label": "y", "label_values": {"-1": "bad", "1": "good"}, "positive_class": -1,
        "features": {"a": {"values": [-1, 0, 1]}, "b": {"values": [-1, 1]}},
    })


def test_cleaning_policy_counts_every_step(tiny_spec):
    raw = pd.DataFrame({
        "a": [1, 1, 1, 0, 0, 0, -1, -1, 1, pd.NA],
        "b": [1, 1, 1, -1, -1, -1, 1, 1, -1, 1],
        "y": [1, 1, -1, -1, -1, 1, 1, -1, pd.NA, 1],
    }, dtype="Int64")
    features, stats = clean_features(raw, tiny_spec)
    assert stats.rows_in == 10
    assert stats.unlabelled_dropped == 1
    assert stats.missing_feature_rows_dropped == 1
    assert stats.conflicting_vectors == 3  # (1,1), (0,-1), (-1,1) appear with both labels
    assert stats.exact_duplicates_removed == 2  # one extra (1,1,1), one extra (0,-1,-1)
    assert stats.rows_out == 3
    rows = {(int(r.a), int(r.b)): int(r.target) for r in features.itertuples()}
    # (1,1): 2x good, 1x bad -> majority good (0); (0,-1): 2x bad -> 1; (-1,1): tie -> positive class (1)
    assert rows == {(1, 1): 0, (0, -1): 1, (-1, 1): 1}
    assert stats.rows_relabelled == 1 + 1 + 1


def test_keep_nan_policy_keeps_rows_with_missing_features(tiny_spec):
    raw = pd.DataFrame({"a": [1, pd.NA, pd.NA], "b": [1, 1, 1], "y": [1, -1, -1]}, dtype="Int64")
    features, stats = clean_features(raw, tiny_spec, missing_policy="keep_nan")
    assert stats.missing_feature_rows_dropped == 0 and len(features) == 2
    assert features["a"].isna().sum() == 1
    with pytest.raises(ValueError, match="missing feature policy"):
        clean_features(raw, tiny_spec, missing_policy="mean")  # type: ignore[arg-type]


def test_split_on_half_duplicates_shares_no_vector_and_is_stratified(spec):
    raw = simulate_records(spec, SimulationConfig(n_rows=6000, seed=21, duplicate_share=0.5))
    assert raw.duplicated().mean() == pytest.approx(0.5, abs=0.03)
    # Split the raw rows themselves (duplicates included): grouping by vector must keep copies together.
    rows = raw.rename(columns={spec.label: "label"})
    rows[TARGET] = (rows["label"] == spec.positive_class).astype(int)
    split = split_train_test(rows, spec.feature_names, test_fraction=0.2, seed=1)
    assert shared_vectors(split, spec.feature_names) == 0
    test_share = (split[SPLIT] == "test").mean()
    assert test_share == pytest.approx(0.2, abs=0.03)
    rates = split.groupby(SPLIT)[TARGET].mean()
    assert rates["train"] == pytest.approx(rates["test"], abs=0.03)


def test_naive_row_split_would_leak_which_is_why_we_group(spec):
    raw = simulate_records(spec, SimulationConfig(n_rows=4000, seed=2, duplicate_share=0.5))
    rng = np.random.default_rng(0)
    naive = raw.assign(target=0, split=np.where(rng.random(len(raw)) < 0.2, "test", "train"))
    assert shared_vectors(naive, spec.feature_names) > 100


def test_split_is_seeded(spec):
    features, _ = clean_features(simulate_records(spec, SimulationConfig(n_rows=2000, seed=4)), spec)
    a = split_train_test(features, spec.feature_names, 0.25, seed=8)
    b = split_train_test(features, spec.feature_names, 0.25, seed=8)
    c = split_train_test(features, spec.feature_names, 0.25, seed=9)
    assert a[SPLIT].tolist() == b[SPLIT].tolist()
    assert a[SPLIT].tolist() != c[SPLIT].tolist()
    with pytest.raises(ValueError, match="test_fraction"):
        split_train_test(features, spec.feature_names, 1.0, seed=8)


def test_feature_version_follows_content_and_transformation(spec):
    features, _ = clean_features(simulate_records(spec, SimulationConfig(n_rows=500, seed=4)), spec)
    v = feature_version(features, "clean-v1")
    assert v == feature_version(features.copy(), "clean-v1")
    assert v != feature_version(features, "clean-v2")
    assert v != feature_version(features.iloc[1:], "clean-v1")
