"""Training a seeded CatBoost classifier, with early stopping and optional bounded tuning.

Pure functions on DataFrames, no Dagster. The early-stopping part is carved from the training
side only, grouped by feature vector so one vector never sits on both the fitting and the
stopping side (a duplicate there would make early stopping optimistic).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.monitoring.estimation import Calibrator, fit_calibrator

if TYPE_CHECKING:  # CatBoost and scikit-learn load when a model is fit: loading the definitions stays cheap
    from catboost import CatBoostClassifier

TARGET_COLUMN = "target"
SPLIT_COLUMN = "split"
DECISION_THRESHOLD = 0.5

# A small, bounded grid for the optional tuning (at most len(depth) * len(learning_rate) trials).
DEFAULT_TUNING_GRID: dict[str, tuple[Any, ...]] = {
    "depth": (4, 6, 8),
    "learning_rate": (0.03, 0.08, 0.15),
}


@dataclass(frozen=True)
class TrainingParams:
    """CatBoost hyperparameters and the training protocol; the defaults are the platform's."""

    iterations: int = 600
    learning_rate: float = 0.08
    depth: int = 6
    l2_leaf_reg: float = 3.0
    early_stopping_rounds: int = 50
    validation_fraction: float = c.VALIDATION_FRACTION
    random_seed: int = c.TRAINING_SEED
    thread_count: int = -1  # -1: all cores; results are the same for a fixed seed and thread count
    tune: bool = False
    tuning_max_trials: int = 9
    tuning_cv_folds: int = 3
    tuning_iterations: int = 300

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if not 0.0 < self.learning_rate <= 1.0:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate}")
        if not 1 <= self.depth <= 16:
            raise ValueError(f"depth must be in [1, 16], got {self.depth}")
        if not 0.0 < self.validation_fraction < 0.5:
            raise ValueError(f"validation_fraction must be in (0, 0.5), got {self.validation_fraction}")
        if self.early_stopping_rounds < 1:
            raise ValueError(f"early_stopping_rounds must be at least 1, got {self.early_stopping_rounds}")
        if self.thread_count == 0 or self.thread_count < -1:
            raise ValueError(f"thread_count must be -1 or a positive number, got {self.thread_count}")
        if self.tuning_cv_folds < 2:
            raise ValueError(f"tuning_cv_folds must be at least 2, got {self.tuning_cv_folds}")
        if self.tuning_max_trials < 1:
            raise ValueError(f"tuning_max_trials must be at least 1, got {self.tuning_max_trials}")

    def catboost_params(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "learning_rate": self.learning_rate,
            "depth": self.depth,
            "l2_leaf_reg": self.l2_leaf_reg,
            "random_seed": self.random_seed,
            "thread_count": self.thread_count,
            "loss_function": "Logloss",
            "eval_metric": "Logloss",
            "custom_metric": ["AUC", "Accuracy"],
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TuningResult:
    best: dict[str, Any]
    trials: list[dict[str, Any]]  # params, mean CV log loss and ROC-AUC per trial
    cv_folds: int


@dataclass
class TrainingResult:
    model: CatBoostClassifier
    params: TrainingParams
    feature_names: list[str]
    best_iteration: int
    tree_count: int
    curves: dict[str, dict[str, list[float]]]  # {"learn"|"validation": {metric: values by iteration}}
    validation_metrics: dict[str, float]
    n_fit: int
    n_validation: int
    tuning: TuningResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Fitted on the early-stopping part (held out from fitting, never the test split): maps the
    # model's score to a calibrated probability for label-free estimates (monitoring/estimation.py).
    calibrator: Calibrator | None = None


def split_frame(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train and test parts of a `train_test_split` frame."""
    if SPLIT_COLUMN not in frame.columns or TARGET_COLUMN not in frame.columns:
        raise ValueError(f"frame needs columns {SPLIT_COLUMN!r} and {TARGET_COLUMN!r}, got {list(frame.columns)}")
    train = frame[frame[SPLIT_COLUMN] == "train"]
    test = frame[frame[SPLIT_COLUMN] == "test"]
    if train.empty or test.empty:
        raise ValueError(f"both splits must be non-empty: train={len(train)} test={len(test)}")
    return train, test


def features_and_target(frame: pd.DataFrame, feature_names: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray]:
    missing = [f for f in feature_names if f not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks feature columns {missing}")
    y = frame[TARGET_COLUMN].to_numpy()
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{TARGET_COLUMN!r} must be 0/1, got values {sorted(set(y.tolist()))[:5]}")
    return frame[list(feature_names)], y.astype(np.int64)


def vector_keys(X: pd.DataFrame) -> np.ndarray:
    """One hash per row of feature values (NaN-aware), to group identical feature vectors."""
    return pd.util.hash_pandas_object(X, index=False).to_numpy()


def grouped_stratified_split(
    X: pd.DataFrame, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (fit, holdout): stratified by label, identical vectors kept on one side."""
    keys = vector_keys(X)
    groups = pd.DataFrame({"key": keys, "y": y}).groupby("key", sort=True)["y"].max()
    strat = groups.to_numpy() if groups.value_counts().min() >= 2 else None
    from sklearn.model_selection import train_test_split

    fit_keys, hold_keys = train_test_split(
        groups.index.to_numpy(), test_size=fraction, random_state=seed, stratify=strat
    )
    hold = np.isin(keys, hold_keys)
    return np.flatnonzero(~hold), np.flatnonzero(hold)


def _grouped_folds(X: pd.DataFrame, y: np.ndarray, folds: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    keys = vector_keys(X)
    groups = pd.DataFrame({"key": keys, "y": y}).groupby("key", sort=True)["y"].max()
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for _, hold_idx in splitter.split(groups.index.to_numpy(), groups.to_numpy()):
        hold = np.isin(keys, groups.index.to_numpy()[hold_idx])
        yield np.flatnonzero(~hold), np.flatnonzero(hold)


def _fit(
    params: TrainingParams, X_fit: pd.DataFrame, y_fit: np.ndarray, X_val: pd.DataFrame, y_val: np.ndarray,
    train_dir: str | Path | None, cat_features: Sequence[str] = (),
) -> CatBoostClassifier:
    from catboost import CatBoostClassifier

    model = CatBoostClassifier(
        **params.catboost_params(),
        **({"cat_features": list(cat_features)} if cat_features else {}),
        verbose=False,
        allow_writing_files=train_dir is not None,
        **({"train_dir": str(train_dir)} if train_dir is not None else {}),
    )
    model.fit(
        X_fit, y_fit,
        eval_set=(X_val, y_val),
        early_stopping_rounds=params.early_stopping_rounds,
        use_best_model=True,
    )
    return model


def tune(
    train: pd.DataFrame, feature_names: Sequence[str], params: TrainingParams,
    grid: Mapping[str, Sequence[Any]] | None = None, train_dir: str | Path | None = None,
    cat_features: Sequence[str] = (),
) -> TuningResult:
    """Grouped, stratified K-fold CV over a small grid; best = lowest mean log loss.

    Bounded: at most `params.tuning_max_trials` grid points (taken in a seeded order), each
    with at most `params.tuning_iterations` trees, so the search cannot run away.
    """
    X, y = features_and_target(train, feature_names)
    grid = dict(grid or DEFAULT_TUNING_GRID)
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    order = np.random.default_rng(params.random_seed).permutation(len(points))
    points = [points[i] for i in order[: params.tuning_max_trials]]
    trials: list[dict[str, Any]] = []
    from sklearn.metrics import log_loss, roc_auc_score

    for point in points:
        trial_params = replace(params, iterations=min(params.iterations, params.tuning_iterations), **point)
        losses, aucs = [], []
        for fit_idx, hold_idx in _grouped_folds(X, y, params.tuning_cv_folds, params.random_seed):
            X_fit, y_fit = X.iloc[fit_idx], y[fit_idx]
            # Early stopping inside each fold uses a part of that fold's training side.
            inner_fit, inner_val = grouped_stratified_split(X_fit, y_fit, params.validation_fraction, params.random_seed)
            model = _fit(trial_params, X_fit.iloc[inner_fit], y_fit[inner_fit],
                         X_fit.iloc[inner_val], y_fit[inner_val], train_dir, cat_features)
            proba = model.predict_proba(X.iloc[hold_idx])[:, 1]
            losses.append(log_loss(y[hold_idx], proba, labels=[0, 1]))
            aucs.append(roc_auc_score(y[hold_idx], proba) if len(set(y[hold_idx])) == 2 else math.nan)
        trials.append({**point, "cv_log_loss": float(np.mean(losses)), "cv_roc_auc": float(np.nanmean(aucs))})
    best_trial = min(trials, key=lambda t: (t["cv_log_loss"], -t["cv_roc_auc"]))
    best = {k: best_trial[k] for k in grid}
    return TuningResult(best=best, trials=trials, cv_folds=params.tuning_cv_folds)


def train_model(
    train: pd.DataFrame, feature_names: Sequence[str], params: TrainingParams | None = None,
    train_dir: str | Path | None = None, cat_features: Sequence[str] = (),
) -> TrainingResult:
    """Fit CatBoost on the train split: early stopping on a grouped, stratified, seeded part of it.

    `train` holds the feature columns and `target` (1 = positive class). `cat_features` are
    declared to CatBoost as categorical (the spec's `catboost_cat_features`: string and open
    categories; CatBoost encodes them itself, no one-hot here). `train_dir` is where CatBoost
    may write its logs; None writes nothing.
    """
    unknown = [name for name in cat_features if name not in feature_names]
    if unknown:
        raise ValueError(f"cat_features {unknown} are not among the feature columns")
    params = params or TrainingParams()
    X, y = features_and_target(train, feature_names)
    if len(set(y.tolist())) < 2:
        raise ValueError("the training data holds only one class")
    tuning = None
    if params.tune:
        tuning = tune(train, feature_names, params, train_dir=train_dir, cat_features=cat_features)
        params = replace(params, **tuning.best)
    fit_idx, val_idx = grouped_stratified_split(X, y, params.validation_fraction, params.random_seed)
    model = _fit(params, X.iloc[fit_idx], y[fit_idx], X.iloc[val_idx], y[val_idx], train_dir, cat_features)
    evals = model.get_evals_result()
    curves = {
        ("validation" if part.startswith("validation") else part): {m: [float(v) for v in vals] for m, vals in metrics.items()}
        for part, metrics in evals.items()
    }
    best_iteration = int(model.get_best_iteration() or 0)
    at_best = {m: vals[min(best_iteration, len(vals) - 1)] for m, vals in curves.get("validation", {}).items()}
    return TrainingResult(
        model=model,
        params=params,
        feature_names=list(feature_names),
        best_iteration=best_iteration,
        tree_count=int(model.tree_count_),
        curves=curves,
        validation_metrics={f"best_validation_{k.lower()}": float(v) for k, v in at_best.items()},
        n_fit=len(fit_idx),
        n_validation=len(val_idx),
        tuning=tuning,
        calibrator=fit_calibrator(model.predict_proba(X.iloc[val_idx])[:, 1], y[val_idx]),
    )


def predict_positive(model: CatBoostClassifier, X: pd.DataFrame) -> np.ndarray:
    """Probability of the positive class (column 1: the model is fit on 0/1 targets)."""
    return model.predict_proba(X)[:, 1]
