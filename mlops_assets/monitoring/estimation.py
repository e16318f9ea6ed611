"""Label-free performance estimation: what a version's accuracy, precision, recall, F1 and ROC-AUC
are expected to be on a window of traffic, from its scores alone (confidence-based performance
estimation, CBPE).

The version's probability of the positive class is first mapped through a calibrator fitted at
training time on a held-out part of the training side (never the test split): isotonic
regression when that part has at least `ISOTONIC_MIN_ROWS` rows, else Platt scaling (a logistic
fit on the score's logit). A calibrated probability `q` of a row is then read as the chance that
its true label is positive, so every confusion-matrix cell has an expected count:

    E[TP] = sum q over rows predicted positive     E[FP] = sum (1 - q) over the same rows
    E[FN] = sum q over rows predicted negative     E[TN] = sum (1 - q) over the same rows

and ROC-AUC is estimated by weighting each row as a positive with `q` and as a negative with
`1 - q` (pairs ranked by the served score). The assumption: P(label | features) is what it was at
training time (covariate shift is allowed, concept shift is not), and the held-out part is
large enough for the calibrator. Pure numpy, no Dagster, nothing read from the environment.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CALIBRATOR_ARTIFACT_DIR = "calibration"
CALIBRATOR_FILE = "calibrator.json"
CALIBRATOR_ARTIFACT = f"{CALIBRATOR_ARTIFACT_DIR}/{CALIBRATOR_FILE}"  # on the version's MLflow run
ISOTONIC_MIN_ROWS = 1000  # fewer held-out rows: Platt scaling (two parameters) instead of isotonic
METHODS = ("isotonic", "platt", "identity")
ESTIMATED_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")
_EPS = 1e-6


class EstimationError(ValueError):
    """Bad input to estimation or calibration (mismatched lengths, an unknown method)."""


@dataclass(frozen=True)
class Calibrator:
    """A monotone map from a model's positive-class score to a calibrated probability.

    isotonic: piecewise-linear through (`x`, `y`); platt: 1 / (1 + exp(-(a * logit(p) + b)));
    identity: the score as it is (a version trained before calibration existed).
    """

    method: str
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    a: float = 1.0
    b: float = 0.0
    rows: int = 0  # held-out rows it was fitted on
    positive_share: float | None = None  # share of positives among them

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EstimationError(f"calibration method {self.method!r} is not one of {METHODS}")
        if self.method == "isotonic" and (len(self.x) != len(self.y) or not self.x):
            raise EstimationError("an isotonic calibrator needs as many y as x values, at least one")

    def apply(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(scores, dtype=float), 0.0, 1.0)
        if self.method == "identity":
            return p
        if self.method == "isotonic":
            return np.clip(np.interp(p, np.asarray(self.x), np.asarray(self.y)), 0.0, 1.0)
        z = self.a * _logit(p) + self.b
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "x": list(self.x), "y": list(self.y), "a": self.a, "b": self.b,
                "rows": self.rows, "positive_share": self.positive_share}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Calibrator:
        try:
            return cls(method=str(raw["method"]), x=tuple(float(v) for v in raw.get("x") or ()),
                       y=tuple(float(v) for v in raw.get("y") or ()), a=float(raw.get("a", 1.0)),
                       b=float(raw.get("b", 0.0)), rows=int(raw.get("rows", 0)),
                       positive_share=None if raw.get("positive_share") is None else float(raw["positive_share"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise EstimationError(f"unreadable calibrator: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> Calibrator:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise EstimationError(f"calibrator is not JSON: {exc}") from None


IDENTITY = Calibrator("identity")


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(q / (1.0 - q))


def fit_calibrator(scores: Sequence[float] | np.ndarray, y_true: Sequence[int] | np.ndarray,
                   method: str = "auto") -> Calibrator:
    """Fit a calibrator on held-out scores and their 0/1 labels (1 = positive class).

    "auto": isotonic with at least ISOTONIC_MIN_ROWS rows, else Platt. One class only: identity
    (nothing to learn a map from).
    """
    p = np.asarray(scores, dtype=float)
    y = np.asarray(y_true).astype(int)
    if len(p) != len(y):
        raise EstimationError(f"{len(p)} scores but {len(y)} labels")
    if len(p) == 0:
        raise EstimationError("no held-out rows to calibrate on")
    if not np.isin(y, (0, 1)).all():
        raise EstimationError("calibration labels must be 0/1 (1 = positive class)")
    share = float(y.mean())
    if len(np.unique(y)) < 2:
        return Calibrator("identity", rows=len(p), positive_share=share)
    if method == "auto":
        method = "isotonic" if len(p) >= ISOTONIC_MIN_ROWS else "platt"
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        return Calibrator("isotonic", tuple(float(v) for v in iso.X_thresholds_),
                          tuple(float(v) for v in iso.y_thresholds_), rows=len(p), positive_share=share)
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        fit = LogisticRegression(C=1e4, max_iter=1000).fit(_logit(p).reshape(-1, 1), y)
        return Calibrator("platt", a=float(fit.coef_[0, 0]), b=float(fit.intercept_[0]), rows=len(p),
                          positive_share=share)
    if method == "identity":
        return Calibrator("identity", rows=len(p), positive_share=share)
    raise EstimationError(f"calibration method {method!r} is not one of auto, {', '.join(METHODS)}")


def expected_roc_auc(scores: np.ndarray, q: np.ndarray) -> float:
    """ROC-AUC expected when row i is positive with probability q_i, ranked by `scores`.

    Each pair (i, j), i != j, counts with weight q_i * (1 - q_j): 1 when i outranks j, 1/2 on a tie.
    O(n log n): rows grouped by distinct score, negative weight accumulated from the bottom.
    """
    n = len(scores)
    if n < 2:
        return math.nan
    order = np.argsort(scores, kind="stable")
    s, pos, neg = scores[order], q[order], 1.0 - q[order]
    distinct, start = np.unique(s, return_index=True)
    pos_g = np.add.reduceat(pos, start)
    neg_g = np.add.reduceat(neg, start)
    self_g = np.add.reduceat(pos * neg, start)  # i == j pairs inside a tie group, not real pairs
    below = np.concatenate(([0.0], np.cumsum(neg_g)[:-1]))
    numerator = float(np.sum(pos_g * below) + 0.5 * np.sum(pos_g * neg_g - self_g))
    denominator = float(pos.sum() * neg.sum() - np.sum(pos * neg))
    return numerator / denominator if denominator > 0 else math.nan


def estimate_performance(
    scores: Sequence[float] | np.ndarray,
    predicted_positive: Sequence[bool] | np.ndarray,
    calibrator: Calibrator = IDENTITY,
) -> dict[str, float]:
    """Expected accuracy, precision, recall, F1 and ROC-AUC of one window, without labels.

    `scores`: the served positive-class probabilities; `predicted_positive`: whether each row was
    answered with the positive class (the version's own threshold decided). NaN where a metric is
    undefined (no rows; no expected positives); `n_estimated` says how many rows stand behind it.
    """
    p = np.asarray(scores, dtype=float)
    pred = np.asarray(predicted_positive, dtype=bool)
    if len(p) != len(pred):
        raise EstimationError(f"{len(p)} scores but {len(pred)} predicted labels")
    keep = ~np.isnan(p)
    p, pred = p[keep], pred[keep]
    out: dict[str, float] = {"n_estimated": float(len(p))}
    if len(p) == 0:
        return {**out, **dict.fromkeys(ESTIMATED_METRICS, math.nan), "positive_share_expected": math.nan}
    q = calibrator.apply(p)
    tp, fp = float(q[pred].sum()), float((1.0 - q[pred]).sum())
    fn, tn = float(q[~pred].sum()), float((1.0 - q[~pred]).sum())
    out.update({
        "accuracy": (tp + tn) / len(p),
        "precision": tp / (tp + fp) if tp + fp > 0 else math.nan,
        "recall": tp / (tp + fn) if tp + fn > 0 else math.nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else math.nan,
        "roc_auc": expected_roc_auc(p, q),
        "positive_share_expected": float(q.mean()),
    })
    return out


@dataclass(frozen=True)
class EstimatedDegradation:
    degraded: bool
    judged: bool
    reasons: tuple[str, ...]
    deltas: dict[str, float]


def estimated_degradation(
    estimate: Mapping[str, float], offline: Mapping[str, float], *, tolerance: float,
    metrics: Sequence[str] = ("accuracy", "f1", "roc_auc"), min_rows: int = 200,
) -> EstimatedDegradation:
    """Degraded when an estimated metric falls more than `tolerance` below the hold-out value."""
    n = int(estimate.get("n_estimated", 0) or 0)
    if n < min_rows:
        return EstimatedDegradation(False, False, (f"only {n} scored rows (< {min_rows}) behind the estimate",), {})
    deltas, reasons = {}, []
    for name in metrics:
        now, before = estimate.get(name, math.nan), offline.get(name, math.nan)
        if now is None or before is None or math.isnan(now) or math.isnan(before):
            continue
        deltas[name] = now - before
        if before - now > tolerance:
            reasons.append(f"estimated {name} {now:.3f} is {before - now:.3f} below offline {before:.3f} "
                           f"(> {tolerance}, no labels needed)")
    if not deltas:
        return EstimatedDegradation(False, False, ("no estimated metric comparable with the offline metrics",), {})
    return EstimatedDegradation(bool(reasons), True, tuple(reasons) or ("estimate within tolerance",), deltas)
