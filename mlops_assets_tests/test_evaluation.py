"""Unit tests of evaluation/metrics.py: metrics on hand-checked numbers, slices, plots, the whole evaluation."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlops_assets.evaluation import metrics as ev
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets.training import train as tr

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_metrics_on_a_hand_checked_example():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.4, 0.6, 0.3, 0.2, 0.1, 0.1])
    m = ev.binary_metrics(y, p, threshold=0.5)
    # predictions 1,1,0,1,0,0,0,0 -> tp 2, fn 1, fp 1, tn 4
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["roc_auc"] == pytest.approx(14 / 15)  # one of 15 positive/negative pairs is misordered
    expected_logloss = -np.mean(np.where(y == 1, np.log(p), np.log(1 - p)))
    assert m["log_loss"] == pytest.approx(expected_logloss)
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert set(m) == set(ev.METRIC_NAMES)
    assert ev.confusion(y, p) == {"tp": 2, "fp": 1, "tn": 4, "fn": 1}


def test_threshold_moves_the_threshold_metrics_only():
    y = np.array([1, 1, 0, 0])
    p = np.array([0.9, 0.4, 0.35, 0.1])
    low, high = ev.binary_metrics(y, p, 0.3), ev.binary_metrics(y, p, 0.5)
    assert low["recall"] == 1.0 and high["recall"] == 0.5
    assert low["roc_auc"] == high["roc_auc"] == 1.0


def test_undefined_ranking_metrics_are_nan_not_an_error():
    m = ev.binary_metrics(np.array([1, 1, 1]), np.array([0.9, 0.8, 0.7]))
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
    assert m["accuracy"] == 1.0
    with pytest.raises(ValueError, match="empty"):
        ev.binary_metrics(np.array([]), np.array([]))


def test_slices_count_every_value_and_missing_separately():
    X = pd.DataFrame({"a": [1, 1, -1, -1, np.nan, np.nan], "b": [0, 0, 0, 1, 1, 1]})
    y = np.array([1, 0, 1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.4, 0.3, 0.8, 0.7])
    table = ev.slice_metrics(X, y, p, ["a", "b"])
    a = table[table.feature == "a"].set_index("value")
    assert set(a.index) == {-1, 1, "missing"}
    assert a.loc["missing", "n"] == 2 and a.loc[1, "accuracy"] == 1.0 and a.loc[-1, "accuracy"] == 0.5
    assert a["n"].sum() == len(X)
    assert table[table.feature == "b"]["n"].sum() == len(X)


def test_plots_are_png_files(tmp_path: Path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.6 + rng.random(200) * 0.5, 0, 1)
    paths = [
        ev.plot_roc(y, {"candidate": p, "champion": 1 - p}, tmp_path / "roc.png"),
        ev.plot_pr(y, {"candidate": p}, tmp_path / "pr.png"),
        ev.plot_calibration(y, {"candidate": p}, tmp_path / "cal.png"),
        ev.plot_confusion(ev.confusion(y, p), tmp_path / "cm.png"),
        ev.plot_importance([("a", 3.0), ("b", 1.0)], tmp_path / "imp.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_evaluate_scores_candidate_and_champion_on_the_same_rows(spec, tmp_path: Path):
    raw = simulate_records(spec, SimulationConfig(n_rows=1500, seed=8)).drop_duplicates(spec.feature_names)
    frame = raw[spec.feature_names].assign(target=(raw[spec.label] == spec.positive_class).astype(int))
    cut = int(len(frame) * 0.7)
    train, test = frame.iloc[:cut], frame.iloc[cut:]
    good = tr.train_model(train, spec.feature_names, tr.TrainingParams(iterations=80, thread_count=2)).model
    X_test, y_test = tr.features_and_target(test, spec.feature_names)
    result = ev.evaluate(good, X_test, y_test, tmp_path, champion=good, slice_top_k=2)
    assert result.champion_metrics == result.metrics  # same model, same rows
    assert result.n_test == len(test)
    assert sum(result.confusion.values()) == len(test)
    assert set(result.plots) == {"confusion_matrix", "feature_importance", "roc", "pr", "calibration"}
    top_two = [name for name, _ in result.importance[:2]]
    assert sorted(result.slices.feature.unique()) == sorted(top_two)
    values = [v for _, v in result.importance]
    assert values == sorted(values, reverse=True) and sum(values) == pytest.approx(100.0)
    assert result.metrics["roc_auc"] > 0.9
