"""Scoring with a loaded registry model, exactly as the model contract says.

predict_proba's positive-class column is the probability of the spec's positive class; the
label is the positive class when that probability reaches the version's `decision_threshold`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import pandas as pd

from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.serving.config import DEFAULT_DECISION_THRESHOLD

THRESHOLD_TAG = "decision_threshold"


def decision_threshold(tags: Mapping[str, str]) -> float:
    """The version's threshold tag, or 0.5; a malformed tag is an error, not a silent default."""
    raw = tags.get(THRESHOLD_TAG)
    if raw in (None, ""):
        return DEFAULT_DECISION_THRESHOLD
    value = float(raw)  # ValueError names the bad text
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{THRESHOLD_TAG} tag must be in [0, 1], got {raw!r}")
    return value


def positive_column(classes: Sequence[Any] | None, positive_class: int | str) -> int:
    """Which predict_proba column is the positive class.

    Models trained on the spec's own labels (e.g. [-1, 1]) have the positive class somewhere in
    `classes_`; models trained on a 0/1 target follow the contract that column 1 is positive.
    """
    if classes is not None:
        values = [v.item() if hasattr(v, "item") else v for v in classes]
        if positive_class in values and sorted(values) != [0, 1]:
            return values.index(positive_class)
    return 1


@dataclass(frozen=True)
class ScoredRecords:
    version: str
    probabilities: list[float]
    labels: list[Any]  # the spec's label values (integers or strings)


Features: TypeAlias = pd.DataFrame | np.ndarray  # a frame with the spec's columns, or a matrix in the spec's column order


def takes_arrays(model: Any, spec: DatasetSpec) -> bool:
    """True for a CatBoost model trained on exactly the spec's columns in the spec's order.

    Such a model scores a numeric matrix directly, with the same answers as from a DataFrame
    (CatBoost computes on float32 either way) and without pandas' per-call cost.
    """
    try:
        from catboost import CatBoost
    except ImportError:  # pragma: no cover - catboost is a dependency
        return False
    return (isinstance(model, CatBoost) and list(getattr(model, "feature_names_", None) or []) == spec.feature_names
            and not model.get_cat_feature_indices())  # categorical (string) features need a frame


@dataclass(frozen=True)
class Scorer:
    """A loaded model bound to its spec and threshold; immutable, so swapping it is atomic."""

    model: Any  # CatBoostClassifier or anything with predict_proba and classes_
    spec: DatasetSpec
    version: str
    threshold: float
    info: Mapping[str, Any]
    array_input: bool = False  # the model takes a float32 matrix in spec order (see `takes_arrays`)

    def score(self, features: Features) -> ScoredRecords:
        p = self.positive_probabilities(features)
        labels = np.where(p >= self.threshold, self.spec.positive_class, self.spec.negative_class)
        return ScoredRecords(self.version, p.tolist(), labels.tolist())

    def positive_probabilities(self, features: Features) -> np.ndarray:
        if self.array_input:
            x = features[self.spec.feature_names].to_numpy() if isinstance(features, pd.DataFrame) else features
            # FeaturesData is CatBoost's cheapest input to build; one thread per call: replicas are
            # processes, and a request's rows gain nothing from more.
            from catboost import FeaturesData

            data = FeaturesData(num_feature_data=np.ascontiguousarray(x, dtype=np.float32))
            proba = self.model.predict_proba(data, thread_count=1)
        else:
            frame = features if isinstance(features, pd.DataFrame) else pd.DataFrame(
                features, columns=self.spec.feature_names)
            proba = np.asarray(self.model.predict_proba(frame[self.spec.feature_names]))
        column = positive_column(getattr(self.model, "classes_", None), self.spec.positive_class)
        return np.asarray(proba[:, column], dtype=float)


def scorer_from_loaded(loaded: Any, spec: DatasetSpec) -> Scorer:
    """Build a Scorer from model_store.LoadedModel, with the facts `GET /model` reports."""
    tags = dict(loaded.tags)
    info = {
        "model_name": loaded.model_name,
        "version": loaded.version,
        "run_id": loaded.run_id,
        "sha256": loaded.sha256,
        "decision_threshold": decision_threshold(tags),
        "feature_version": tags.get("feature_version"),
        "data_version": tags.get("data_version"),
        "trained_at": tags.get("trained_at"),
        "dataset": spec.name,
    }
    return Scorer(loaded.model, spec, loaded.version, info["decision_threshold"], info,
                  array_input=takes_arrays(loaded.model, spec))


def prediction_items(scored: ScoredRecords, spec: DatasetSpec) -> list[dict[str, Any]]:
    """The response's `predictions`: label (the data set's class value), its name, probability."""
    key = f"{spec.positive_name}_probability"
    return [
        {"label": label, "label_name": spec.label_values[label], key: p}
        for p, label in zip(scored.probabilities, scored.labels, strict=True)
    ]


def score_many(scorer: Scorer, frames: Sequence[Features]) -> list[ScoredRecords]:
    """Score several requests in one model call (dynamic batching), then split per request."""
    if len(frames) == 1:
        return [scorer.score(frames[0])]
    if all(isinstance(f, np.ndarray) for f in frames):
        joined = scorer.score(np.concatenate(frames))
    else:
        joined = scorer.score(pd.concat([f if isinstance(f, pd.DataFrame) else pd.DataFrame(
            f, columns=scorer.spec.feature_names) for f in frames], ignore_index=True))
    out, start = [], 0
    for frame in frames:
        end = start + len(frame)
        out.append(ScoredRecords(joined.version, joined.probabilities[start:end], joined.labels[start:end]))
        start = end
    return out
