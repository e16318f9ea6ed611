from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlops_assets.ingestion.batches import read_table
from mlops_assets.tools.simulator import (
    SimulationConfig,
    drifted_shares,
    parse_drift,
    simulate_records,
    write_batch,
)
from mlops_assets.validation.report import conflicting_vector_count


@pytest.fixture(scope="module")
def large(spec):
    return simulate_records(spec, SimulationConfig(n_rows=20000, seed=3))


def test_label_balance_within_two_points(spec, large):
    shares = large[spec.label].value_counts(normalize=True)
    for label, expected in spec.calibration.label_share.items():
        assert shares[label] == pytest.approx(expected, abs=0.02)


def test_each_value_share_given_label_within_three_points(spec, large):
    worst = 0.0
    for feature, by_label in spec.calibration.share_given_label.items():
        for label, shares in by_label.items():
            observed = large.loc[large[spec.label] == label, feature].value_counts(normalize=True)
            for value, expected in shares.items():
                worst = max(worst, abs(observed.get(value, 0.0) - expected))
    assert worst < 0.03, f"largest deviation from the figures: {worst:.4f}"


def test_duplicate_and_conflict_shares_follow_the_figures(spec, large):
    assert large.duplicated().mean() == pytest.approx(spec.calibration.exact_duplicate_row_share, abs=0.02)
    distinct = len(large[spec.feature_names].drop_duplicates())
    conflicts = conflicting_vector_count(large, spec)
    assert conflicts / distinct == pytest.approx(spec.calibration.conflicting_vector_share, abs=0.005)


def test_duplicate_and_conflict_shares_are_configurable(spec):
    frame = simulate_records(spec, SimulationConfig(n_rows=2000, seed=5, duplicate_share=0.0, conflict_share=0.0))
    assert frame.duplicated().sum() == 0
    assert conflicting_vector_count(frame, spec) == 0
    frame = simulate_records(spec, SimulationConfig(n_rows=2000, seed=5, duplicate_share=0.3, conflict_share=0.1))
    assert frame.duplicated().mean() == pytest.approx(0.3, abs=0.03)
    assert conflicting_vector_count(frame, spec) > 50


def test_same_seed_same_records_other_seed_other_records(spec):
    a = simulate_records(spec, SimulationConfig(n_rows=500, seed=9))
    b = simulate_records(spec, SimulationConfig(n_rows=500, seed=9))
    c = simulate_records(spec, SimulationConfig(n_rows=500, seed=10))
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    assert list(a.columns) == spec.columns and len(a) == 500


def test_drift_moves_the_named_feature_only(spec, large):
    drifted = simulate_records(spec, SimulationConfig(n_rows=20000, seed=3, drift={"URL_Length": 0.3}))
    rarest = 0  # URL_Length's rarest value given either label is 0
    before = (large["URL_Length"] == rarest).mean()
    after = (drifted["URL_Length"] == rarest).mean()
    assert after - before == pytest.approx(0.3, abs=0.03)
    assert (drifted["SSLfinal_State"] == 1).mean() == pytest.approx((large["SSLfinal_State"] == 1).mean(), abs=0.02)


def test_drifted_shares_keep_a_distribution():
    out = drifted_shares({-1: 0.7, 0: 0.1, 1: 0.2}, 0.25)
    assert sum(out.values()) == pytest.approx(1.0)
    assert out[0] == pytest.approx(0.35)
    assert drifted_shares({-1: 0.5, 1: 0.5}, 0.0) == {-1: 0.5, 1: 0.5}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_written_batches_read_back_as_the_same_table(spec, tmp_path: Path, fmt):
    frame = simulate_records(spec, SimulationConfig(n_rows=50, seed=1))
    url = write_batch(frame, str(tmp_path / "raw"), fmt=fmt)
    assert url.endswith(f".{fmt}")
    assert [p.name for p in (tmp_path / "raw").iterdir()] == [Path(url).name]  # no temp file left
    back = read_table(Path(url).name, Path(url).read_bytes())
    assert np.array_equal(back.astype(int).to_numpy(), frame.to_numpy())


def test_bad_simulation_arguments_are_refused(spec):
    with pytest.raises(ValueError, match="n_rows"):
        SimulationConfig(n_rows=0, seed=1)
    with pytest.raises(ValueError, match="duplicate_share"):
        SimulationConfig(n_rows=10, seed=1, duplicate_share=1.5)
    with pytest.raises(ValueError, match="unknown features"):
        simulate_records(spec, SimulationConfig(n_rows=10, seed=1, drift={"nope": 0.1}))
    with pytest.raises(ValueError, match="FEATURE=AMOUNT"):
        parse_drift(["URL_Length"])
    assert parse_drift(["URL_Length=0.2", "port=0.1"]) == {"URL_Length": 0.2, "port": 0.1}
