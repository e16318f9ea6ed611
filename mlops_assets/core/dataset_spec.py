"""The dataset specification: columns, value domains, label and positive class.

One specification drives the pandera schema, the simulator and (later) the serving request
model, so another tabular binary-classification data set is plugged in by pointing
`MLOPS_DATASET_SPEC` at a JSON file of the same shape as `datasets/phishing_websites.json`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_SPEC_RESOURCE = "phishing_websites.json"


class DatasetSpecError(ValueError):
    """A dataset specification file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class FeatureSpec:
    """One feature column and the integer values it may take."""

    name: str
    values: tuple[int, ...]


@dataclass(frozen=True)
class Calibration:
    """Figures about the real data that the simulator reproduces (optional per data set)."""

    label_share: dict[int, float]
    share_given_label: dict[str, dict[int, dict[int, float]]]
    exact_duplicate_row_share: float = 0.0
    conflicting_vector_share: float = 0.0


@dataclass(frozen=True)
class DatasetSpec:
    """A tabular binary-classification data set with categorical integer features."""

    name: str
    label: str
    label_values: dict[int, str]
    positive_class: int
    features: tuple[FeatureSpec, ...]
    calibration: Calibration | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def columns(self) -> list[str]:
        return [*self.feature_names, self.label]

    @property
    def negative_class(self) -> int:
        return next(v for v in self.label_values if v != self.positive_class)

    @property
    def positive_name(self) -> str:
        return self.label_values[self.positive_class]

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r} in dataset spec {self.name!r}")


def _int_keys(mapping: Mapping[str, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in mapping.items()}


def spec_from_dict(raw: Mapping[str, Any], origin: str = "<dict>") -> DatasetSpec:
    """Build and check a spec from its JSON form; errors name the origin and the key."""
    try:
        label = str(raw["label"])
        label_values = {int(k): str(v) for k, v in raw["label_values"].items()}
        positive = int(raw["positive_class"])
        features = tuple(
            FeatureSpec(name=str(name), values=tuple(int(v) for v in body["values"]))
            for name, body in raw["features"].items()
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DatasetSpecError(f"{origin}: bad or missing key in dataset spec: {exc!r}") from exc
    if len(label_values) != 2:
        raise DatasetSpecError(f"{origin}: label_values must have exactly two classes, got {sorted(label_values)}")
    if positive not in label_values:
        raise DatasetSpecError(f"{origin}: positive_class {positive} is not one of label_values {sorted(label_values)}")
    if not features:
        raise DatasetSpecError(f"{origin}: features is empty")
    for f in features:
        if len(f.values) < 1:
            raise DatasetSpecError(f"{origin}: feature {f.name!r} has no allowed values")
    if label in {f.name for f in features}:
        raise DatasetSpecError(f"{origin}: label {label!r} is also listed as a feature")

    calibration = None
    cal = raw.get("calibration")
    if cal:
        distinct = float(cal.get("distinct_feature_vectors") or 0)
        conflicts = float(cal.get("feature_vectors_with_conflicting_labels") or 0)
        calibration = Calibration(
            label_share=_int_keys(cal["label_share"]),
            share_given_label={
                name: {int(lbl): _int_keys(shares) for lbl, shares in by_label.items()}
                for name, by_label in cal["share_given_label"].items()
            },
            exact_duplicate_row_share=float(cal.get("exact_duplicate_row_share", 0.0)),
            conflicting_vector_share=conflicts / distinct if distinct else 0.0,
        )
    return DatasetSpec(
        name=str(raw.get("name", "dataset")),
        label=label,
        label_values=label_values,
        positive_class=positive,
        features=features,
        calibration=calibration,
        description=str(raw.get("description", "")),
    )


def load_spec(path: str | Path | None = None) -> DatasetSpec:
    """Load a spec from a JSON file, or the packaged phishing-website spec when path is None."""
    if path is None or str(path) == "":
        text = resources.files("mlops_assets.core.datasets").joinpath(DEFAULT_SPEC_RESOURCE).read_text()
        return spec_from_dict(json.loads(text), origin=f"package:{DEFAULT_SPEC_RESOURCE}")
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise DatasetSpecError(f"{p}: dataset spec file not found (MLOPS_DATASET_SPEC)") from exc
    except json.JSONDecodeError as exc:
        raise DatasetSpecError(f"{p}: dataset spec is not valid JSON: line {exc.lineno}: {exc.msg}") from exc
    return spec_from_dict(raw, origin=str(p))


def default_spec() -> DatasetSpec:
    return load_spec(None)
