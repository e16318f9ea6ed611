"""Scoring with a loaded registry model, exactly as the model contract says.

predict_proba's positive-class column is the probability of the spec's positive class; the
label is the positive class when that probability reaches the version's `decision_threshold`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlops_assets.lib.dataset_spec import DatasetSpec
from mlops_assets.lib.serving.config import DEFAULT_DECISION_THRESHOLD

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


def positive_column(classes: Sequence[Any] | None, positive_class: int) -> int:
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
    labels: list[int]


@dataclass(frozen=True)
class Scorer:
    """A loaded model bound to its spec and threshold; immutable, so swapping it is atomic."""

    model: Any  # CatBoostClassifier or anything with predict_proba and classes_
    spec: DatasetSpec
    version: str
    threshold: float
    info: Mapping[str, Any]

    def score(self, frame: pd.DataFrame) -> ScoredRecords:
        proba = np.asarray(self.model.predict_proba(frame[self.spec.feature_names]))
        column = positive_column(getattr(self.model, "classes_", None), self.spec.positive_class)
        p = proba[:, column].astype(float)
        labels = np.where(p >= self.threshold, self.spec.positive_class, self.spec.negative_class)
        return ScoredRecords(self.version, p.tolist(), labels.astype(int).tolist())


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
    return Scorer(loaded.model, spec, loaded.version, info["decision_threshold"], info)


def prediction_items(scored: ScoredRecords, spec: DatasetSpec) -> list[dict[str, Any]]:
    """The response's `predictions`: label (the data set's class value), its name, probability."""
    key = f"{spec.positive_name}_probability"
    return [
        {"label": label, "label_name": spec.label_values[label], key: p}
        for p, label in zip(scored.probabilities, scored.labels, strict=True)
    ]


def score_many(scorer: Scorer, frames: Sequence[pd.DataFrame]) -> list[ScoredRecords]:
    """Score several requests in one model call (dynamic batching), then split per request."""
    if len(frames) == 1:
        return [scorer.score(frames[0])]
    joined = scorer.score(pd.concat(frames, ignore_index=True))
    out, start = [], 0
    for frame in frames:
        end = start + len(frame)
        out.append(ScoredRecords(joined.version, joined.probabilities[start:end], joined.labels[start:end]))
        start = end
    return out
