"""Hold-out evaluation of a binary classifier: metrics, confusion matrix, plots, slices, importance.

Pure functions; plots are PNG files drawn on bare matplotlib `Figure`s (the Agg canvas, no
pyplot global state and no display), so they are safe in Dagster workers and CI.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # scikit-learn, matplotlib and CatBoost load when a model is evaluated
    from catboost import CatBoostClassifier
    from matplotlib.figure import Figure

METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "log_loss", "brier")
LOWER_IS_BETTER = frozenset({"log_loss", "brier"})
MISSING_VALUE = "missing"


def binary_metrics(y_true: Sequence[int] | np.ndarray, proba: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Threshold metrics at `threshold` and ranking/probability metrics; NaN when undefined."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        brier_score_loss,
        f1_score,
        log_loss,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    y = np.asarray(y_true, dtype=np.int64)
    p = np.clip(np.asarray(proba, dtype=float), 0.0, 1.0)
    if len(y) == 0:
        raise ValueError("cannot evaluate on an empty set")
    pred = (p >= threshold).astype(np.int64)
    both = len(np.unique(y)) == 2
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "roc_auc": float(roc_auc_score(y, p)) if both else math.nan,
        "pr_auc": float(average_precision_score(y, p)) if both else math.nan,
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "brier": float(brier_score_loss(y, p, pos_label=1)),
    }


def confusion(y_true: Sequence[int] | np.ndarray, proba: np.ndarray, threshold: float = 0.5) -> dict[str, int]:
    """Counts with 1 = positive class: tp, fp, tn, fn."""
    from sklearn.metrics import confusion_matrix

    pred = (np.asarray(proba) >= threshold).astype(np.int64)
    tn, fp, fn, tp = confusion_matrix(np.asarray(y_true, dtype=np.int64), pred, labels=[0, 1]).ravel()
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def feature_importance(model: CatBoostClassifier, feature_names: Sequence[str]) -> list[tuple[str, float]]:
    """CatBoost's prediction-value-change importance, highest first."""
    values = model.get_feature_importance()
    pairs = [(name, float(v)) for name, v in zip(feature_names, values, strict=True)]
    return sorted(pairs, key=lambda kv: (-kv[1], kv[0]))


def _slice_values(column: pd.Series, binned: bool, bins: int) -> pd.Series:
    """Each row's slice: its value (categorical), or its quantile bin as text "[low, high]" (numeric)."""
    if not binned:
        plain = column.astype("object").map(lambda v: v.item() if hasattr(v, "item") else v)
        plain = plain.map(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)
        return plain.where(column.notna(), MISSING_VALUE)
    numbers = pd.to_numeric(column, errors="coerce").astype("float64")
    present = numbers.dropna()
    out = pd.Series(MISSING_VALUE, index=column.index, dtype="object")
    if present.empty:
        return out
    edges = np.unique(np.quantile(present.to_numpy(), np.linspace(0.0, 1.0, bins + 1)))
    if len(edges) < 2:
        out[numbers.notna()] = f"[{_edge(edges[0])}, {_edge(edges[0])}]"
        return out
    codes = np.clip(np.searchsorted(edges, present.to_numpy(), side="right") - 1, 0, len(edges) - 2)
    names = [f"[{_edge(edges[i])}, {_edge(edges[i + 1])}{']' if i == len(edges) - 2 else ')'}"
             for i in range(len(edges) - 1)]
    out[present.index] = [names[c] for c in codes]
    return out


def _edge(value: float) -> str:
    return f"{value:.4g}"


def slice_metrics(
    X: pd.DataFrame, y_true: np.ndarray, proba: np.ndarray, features: Sequence[str], threshold: float = 0.5,
    min_rows: int = 1, numeric: Collection[str] = (), bins: int = 4,
) -> pd.DataFrame:
    """Metrics per value of each named categorical feature, and per quantile bin (`bins` of them,
    edges from the test rows) of each one in `numeric`; missing values form their own slice."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=float)
    rows = []
    for feature in features:
        values = _slice_values(X[feature], feature in numeric, bins)
        order = values.unique().tolist()
        if feature not in numeric:
            order = sorted(order, key=str)
        for value in order:
            mask = (values == value).to_numpy()
            n = int(mask.sum())
            if n < min_rows:
                continue
            ys, ps = y[mask], p[mask]
            both = len(np.unique(ys)) == 2
            rows.append({
                "feature": feature,
                "value": value,
                "n": n,
                "positive_share": float(ys.mean()),
                "mean_probability": float(ps.mean()),
                "accuracy": float(((ps >= threshold).astype(np.int64) == ys).mean()),
                "roc_auc": float(roc_auc_score(ys, ps)) if both else math.nan,
            })
    return pd.DataFrame(rows, columns=["feature", "value", "n", "positive_share", "mean_probability", "accuracy", "roc_auc"])


# --- plots ---------------------------------------------------------------------------------


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    return path


def plot_roc(y_true: np.ndarray, probas: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """ROC curves of one or more models (e.g. candidate and champion) on the same labels."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = _figure(4.5, 4.5)
    for name, p in probas.items():
        fpr, tpr, _ = roc_curve(y_true, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y_true, p):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, Path(path))


def plot_pr(y_true: np.ndarray, probas: Mapping[str, np.ndarray], path: str | Path) -> Path:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig, ax = _figure(4.5, 4.5)
    for name, p in probas.items():
        precision, recall, _ = precision_recall_curve(y_true, p)
        ax.plot(recall, precision, label=f"{name} (AP {average_precision_score(y_true, p):.3f})")
    ax.axhline(float(np.mean(y_true)), linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, Path(path))


def plot_calibration(y_true: np.ndarray, probas: Mapping[str, np.ndarray], path: str | Path, bins: int = 10) -> Path:
    from sklearn.calibration import calibration_curve

    fig, ax = _figure(4.5, 4.5)
    for name, p in probas.items():
        frac_pos, mean_pred = calibration_curve(y_true, p, n_bins=bins, strategy="quantile")
        ax.plot(mean_pred, frac_pos, marker="o", markersize=3, label=name)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed positive share", title="Calibration")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, Path(path))


def plot_confusion(counts: Mapping[str, int], path: str | Path, labels: tuple[str, str] = ("negative", "positive")) -> Path:
    matrix = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    fig, ax = _figure(3.8, 3.4)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set_xticks([0, 1], [f"pred {labels[0]}", f"pred {labels[1]}"])
    ax.set_yticks([0, 1], [f"true {labels[0]}", f"true {labels[1]}"])
    ax.set_title("Confusion matrix")
    return _save(fig, Path(path))


def plot_importance(importance: Sequence[tuple[str, float]], path: str | Path, top: int = 15) -> Path:
    items = list(importance)[:top][::-1]
    fig, ax = _figure(5.5, 0.28 * len(items) + 1.0)
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set(xlabel="importance", title="Feature importance")
    ax.tick_params(axis="y", labelsize=7)
    return _save(fig, Path(path))


# --- the whole evaluation ------------------------------------------------------------------


@dataclass
class Evaluation:
    metrics: dict[str, float]
    confusion: dict[str, int]
    importance: list[tuple[str, float]]
    slices: pd.DataFrame
    plots: dict[str, Path]
    n_test: int
    positive_share: float
    champion_metrics: dict[str, float] | None = None
    champion_confusion: dict[str, int] | None = None
    probabilities: np.ndarray = field(default_factory=lambda: np.empty(0))


def evaluate(
    model: CatBoostClassifier, X_test: pd.DataFrame, y_test: np.ndarray, out_dir: str | Path, *,
    threshold: float = 0.5, champion: CatBoostClassifier | None = None, slice_top_k: int = 3,
    class_names: tuple[str, str] = ("negative", "positive"), numeric_features: Collection[str] = (),
) -> Evaluation:
    """Evaluate a model (and, when given, the champion on the same rows) and draw the plots."""
    out = Path(out_dir)
    proba = model.predict_proba(X_test)[:, 1]
    probas = {"candidate": proba}
    champion_metrics = champion_confusion = None
    if champion is not None:
        champion_proba = champion.predict_proba(X_test[list(champion.feature_names_)])[:, 1]
        probas["champion"] = champion_proba
        champion_metrics = binary_metrics(y_test, champion_proba, threshold)
        champion_confusion = confusion(y_test, champion_proba, threshold)
    metrics = binary_metrics(y_test, proba, threshold)
    counts = confusion(y_test, proba, threshold)
    importance = feature_importance(model, list(X_test.columns))
    top = [name for name, _ in importance[:slice_top_k]]
    plots: dict[str, Path] = {"confusion_matrix": plot_confusion(counts, out / "confusion_matrix.png", class_names),
                              "feature_importance": plot_importance(importance, out / "feature_importance.png")}
    if len(np.unique(y_test)) == 2:
        plots["roc"] = plot_roc(y_test, probas, out / "roc.png")
        plots["pr"] = plot_pr(y_test, probas, out / "pr.png")
        plots["calibration"] = plot_calibration(y_test, probas, out / "calibration.png")
    return Evaluation(
        metrics=metrics,
        confusion=counts,
        importance=importance,
        slices=slice_metrics(X_test, y_test, proba, top, threshold, numeric=numeric_features),
        plots=plots,
        n_test=len(y_test),
        positive_share=float(np.mean(y_test)),
        champion_metrics=champion_metrics,
        champion_confusion=champion_confusion,
        probabilities=proba,
    )
