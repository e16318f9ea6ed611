"""Unit tests of training/train.py on small simulated frames (no MLflow, no Dagster)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets.training import train as tr

FAST = {"iterations": 120, "thread_count": 2}


def _frame(spec: DatasetSpec, n_rows: int = 800, seed: int = 5) -> pd.DataFrame:
    raw = simulate_records(spec, SimulationConfig(n_rows=n_rows, seed=seed))
    out = raw[spec.feature_names].copy()
    out[tr.TARGET_COLUMN] = (raw[spec.label] == spec.positive_class).astype(np.int64)
    return out


def test_grouped_split_keeps_identical_vectors_on_one_side_and_is_stratified(spec):
    frame = _frame(spec)  # about half the rows are duplicates of others
    X, y = tr.features_and_target(frame, spec.feature_names)
    fit, hold = tr.grouped_stratified_split(X, y, 0.2, seed=3)
    assert len(fit) + len(hold) == len(frame) and not set(fit) & set(hold)
    keys = tr.vector_keys(X)
    assert not set(keys[fit]) & set(keys[hold])
    assert abs(y[fit].mean() - y[hold].mean()) < 0.06
    assert 0.1 < len(hold) / len(frame) < 0.3
    again = tr.grouped_stratified_split(X, y, 0.2, seed=3)
    assert np.array_equal(again[1], hold)


def test_grouped_split_handles_missing_values(spec):
    frame = _frame(spec, 300).astype({spec.feature_names[0]: float})
    frame.iloc[:40, 0] = np.nan
    X, y = tr.features_and_target(frame, spec.feature_names)
    fit, hold = tr.grouped_stratified_split(X, y, 0.2, seed=1)
    assert not set(tr.vector_keys(X)[fit]) & set(tr.vector_keys(X)[hold])


def test_training_is_seeded_and_uses_only_the_train_side(spec, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written to the working directory
    frame = _frame(spec)
    params = tr.TrainingParams(**FAST)
    first = tr.train_model(frame, spec.feature_names, params)
    second = tr.train_model(frame, spec.feature_names, params)
    X = frame[spec.feature_names]
    assert np.array_equal(tr.predict_positive(first.model, X), tr.predict_positive(second.model, X))
    assert first.n_fit + first.n_validation == len(frame)
    assert first.tree_count == first.best_iteration + 1  # use_best_model trims to the stopping point
    assert first.tree_count <= params.iterations
    validation_curve = first.curves["validation"]["Logloss"]
    assert len(validation_curve) >= first.tree_count
    assert set(first.curves) == {"learn", "validation"}
    assert first.validation_metrics["best_validation_logloss"] == pytest.approx(min(validation_curve))
    assert list(first.model.feature_names_) == spec.feature_names
    assert list(tmp_path.iterdir()) == []


def test_a_different_seed_gives_a_different_model(spec):
    frame = _frame(spec)
    a = tr.train_model(frame, spec.feature_names, tr.TrainingParams(**FAST, random_seed=1))
    b = tr.train_model(frame, spec.feature_names, tr.TrainingParams(**FAST, random_seed=2))
    X = frame[spec.feature_names]
    assert not np.array_equal(tr.predict_positive(a.model, X), tr.predict_positive(b.model, X))


def test_catboost_logs_go_to_the_given_train_dir(spec, tmp_path: Path):
    tr.train_model(_frame(spec, 300), spec.feature_names, tr.TrainingParams(**FAST), train_dir=tmp_path / "cb")
    assert (tmp_path / "cb").is_dir() and any((tmp_path / "cb").iterdir())


def test_probability_is_of_the_positive_class(spec):
    frame = _frame(spec)
    result = tr.train_model(frame, spec.feature_names, tr.TrainingParams(**FAST))
    proba = tr.predict_positive(result.model, frame[spec.feature_names])
    y = frame[tr.TARGET_COLUMN].to_numpy()
    assert proba[y == 1].mean() > 0.7 > 0.3 > proba[y == 0].mean()


def test_tuning_is_bounded_and_picks_a_grid_point(spec):
    frame = _frame(spec, 500)
    params = tr.TrainingParams(iterations=60, thread_count=2, tune=True, tuning_max_trials=2, tuning_cv_folds=2,
                               tuning_iterations=40)
    grid = {"depth": (3, 5), "learning_rate": (0.1, 0.3)}
    result = tr.tune(frame, spec.feature_names, params, grid=grid)
    assert len(result.trials) == 2
    assert result.best["depth"] in grid["depth"] and result.best["learning_rate"] in grid["learning_rate"]
    best = min(result.trials, key=lambda t: t["cv_log_loss"])
    assert result.best == {"depth": best["depth"], "learning_rate": best["learning_rate"]}
    trained = tr.train_model(frame, spec.feature_names, params)
    assert trained.tuning is not None and len(trained.tuning.trials) == 2
    assert trained.params.depth == trained.tuning.best["depth"]


@pytest.mark.parametrize("bad", [{"iterations": 0}, {"learning_rate": 0}, {"depth": 0},
                                 {"validation_fraction": 0.6}, {"thread_count": 0}, {"tuning_cv_folds": 1}])
def test_bad_params_are_rejected_with_the_name(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        tr.TrainingParams(**bad)


def test_bad_frames_are_rejected(spec):
    frame = _frame(spec, 200)
    with pytest.raises(ValueError, match="feature columns"):
        tr.train_model(frame.drop(columns=[spec.feature_names[0]]), spec.feature_names)
    with pytest.raises(ValueError, match="one class"):
        tr.train_model(frame.assign(target=1), spec.feature_names)
    with pytest.raises(ValueError, match="0/1"):
        tr.train_model(frame.assign(target=-1), spec.feature_names)
    with pytest.raises(ValueError, match="non-empty"):
        tr.split_frame(frame.assign(split="train"))
