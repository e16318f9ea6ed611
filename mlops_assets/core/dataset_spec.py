"""The dataset specification: feature kinds, value domains, label and positive class.

One specification drives the pandera schema, the serving request model, the drift statistics
and the simulator, so another tabular binary-classification data set is plugged in by pointing
`MLOPS_DATASET_SPEC` at a JSON file of the shape `datasets/dataset_spec.schema.json` describes
(`datasets/phishing_websites.json` and `datasets/network_flows.json` are examples).

A feature is
- `categorical`: integer codes or strings (`type`), either closed (`values` lists every allowed
  value; anything else is refused) or open (`unseen: "keep"`: values outside `values`, or any
  value when `values` is absent, are accepted and the model sees them as a category of their own);
- `numeric`: `int` or `float`, with an optional `min` and `max` (inclusive).
Every feature says whether a missing value is allowed in raw data (`nullable`, default true:
validation reports the share and the cleaning policy handles them); serving always needs a value.

The label has exactly two values (integers or strings) and a named `positive_class`; the model
works on a 0/1 target internally (1 = the positive class) and the spec maps it back.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

DEFAULT_SPEC_RESOURCE = "phishing_websites.json"
SCHEMA_RESOURCE = "dataset_spec.schema.json"
PACKAGED_SPECS = {"phishing_websites": "phishing_websites.json", "network_flows": "network_flows.json"}

CATEGORICAL = "categorical"
NUMERIC = "numeric"
FeatureKind = Literal["categorical", "numeric"]
ValueType = Literal["int", "float", "string"]
Unseen = Literal["reject", "keep"]
Value = int | str
LabelValue = int | str

_FEATURE_KEYS = {"kind", "type", "values", "unseen", "min", "max", "nullable", "description"}
_TOP_KEYS = {"name", "description", "source", "label", "label_values", "label_type", "positive_class",
             "features", "calibration"}


class DatasetSpecError(ValueError):
    """A dataset specification file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class FeatureSpec:
    """One feature column: its kind, value type and what values it may take."""

    name: str
    values: tuple[Value, ...] = ()  # categorical: the known (closed: the only allowed) values
    kind: FeatureKind = "categorical"
    type: ValueType = "int"
    unseen: Unseen = "reject"  # categorical: what a value outside `values` gets
    minimum: float | None = None  # numeric, inclusive
    maximum: float | None = None
    nullable: bool = True  # may a raw row lack this value

    @property
    def is_categorical(self) -> bool:
        return self.kind == CATEGORICAL

    @property
    def is_numeric(self) -> bool:
        return self.kind == NUMERIC

    @property
    def closed(self) -> bool:
        """Categorical with a fixed value set: anything outside `values` is refused."""
        return self.is_categorical and self.unseen == "reject"

    @property
    def is_string(self) -> bool:
        return self.type == "string"

    def rule(self) -> str:
        """The rule a value of this feature must follow, in words (for error messages)."""
        if self.is_categorical:
            if self.closed:
                return f"one of {list(self.values)}"
            return "any " + ("string" if self.is_string else "integer")
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {_num(self.minimum)}")
        if self.maximum is not None:
            bounds.append(f"<= {_num(self.maximum)}")
        what = "an integer" if self.type == "int" else "a number"
        return what + (" " + " and ".join(bounds) if bounds else "")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class NumericCalibration:
    """How the simulator draws a numeric feature given the label."""

    distribution: Literal["lognormal", "normal", "uniform", "poisson"]
    params: dict[str, float]
    zero_share: float = 0.0  # share of exact zeros mixed in (flows with no payload, say)


@dataclass(frozen=True)
class Calibration:
    """Figures about the real data that the simulator reproduces (optional per data set)."""

    label_share: dict[LabelValue, float]
    share_given_label: dict[str, dict[LabelValue, dict[Value, float]]]
    exact_duplicate_row_share: float = 0.0
    conflicting_vector_share: float = 0.0
    numeric_given_label: dict[str, dict[LabelValue, NumericCalibration]] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """A tabular binary-classification data set with categorical and numeric features."""

    name: str
    label: str
    label_values: dict[LabelValue, str]  # label value -> display name
    positive_class: LabelValue
    features: tuple[FeatureSpec, ...]
    calibration: Calibration | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        # A copy of the names collected once: this runs several times per served request.
        return list(self._feature_names)

    @functools.cached_property
    def _feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def columns(self) -> list[str]:
        return [*self.feature_names, self.label]

    @property
    def negative_class(self) -> LabelValue:
        return next(v for v in self.label_values if v != self.positive_class)

    @property
    def positive_name(self) -> str:
        return self.label_values[self.positive_class]

    @property
    def label_is_string(self) -> bool:
        return isinstance(self.positive_class, str)

    @property
    def numeric_features(self) -> list[str]:
        return [f.name for f in self.features if f.is_numeric]

    @property
    def categorical_features(self) -> list[str]:
        return [f.name for f in self.features if f.is_categorical]

    @property
    def catboost_cat_features(self) -> list[str]:
        """Features CatBoost is told are categorical: string ones and open integer codes.

        Closed integer codes (the phishing data set's {-1, 0, 1}) stay numbers to CatBoost: the
        codes are ordered, trees split on them exactly, and the model stays what it was.
        """
        return [f.name for f in self.features if f.is_categorical and (f.is_string or not f.closed)]

    @property
    def integer_coded(self) -> bool:
        """Every feature is a closed integer category and the label an integer (the fast paths)."""
        return all(f.is_categorical and f.closed and f.type == "int" for f in self.features) \
            and not self.label_is_string

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r} in dataset spec {self.name!r}")

    def label_code(self, value: Any) -> LabelValue:
        """A raw label cell as the spec's label value (e.g. '-1' -> -1); ValueError when it is none of them."""
        return coerce_label(value, self.label_values)


def coerce_label(value: Any, label_values: Mapping[LabelValue, str]) -> LabelValue:
    for known in label_values:
        if isinstance(known, str):
            if str(value) == known:
                return known
        else:
            try:
                if float(value) == known:
                    return known
            except (TypeError, ValueError):
                continue
    raise ValueError(f"label {value!r} is not one of {list(label_values)}")


# ---------------------------------------------------------------------------------------------
# Reading and checking


def _fail(origin: str, where: str, problem: str) -> DatasetSpecError:
    return DatasetSpecError(f"{origin}: {where}: {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and not (isinstance(value, float) and math.isnan(value)))


def _int_text(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _feature(name: str, body: Any, origin: str) -> FeatureSpec:
    where = f"features.{name}"
    if not isinstance(body, Mapping):
        raise _fail(origin, where, f"must be an object like {{\"kind\": \"numeric\"}}, got {body!r}")
    unknown = sorted(set(body) - _FEATURE_KEYS)
    if unknown:
        raise _fail(origin, f"{where}.{unknown[0]}", f"unknown key (known: {sorted(_FEATURE_KEYS)})")
    kind = body.get("kind", CATEGORICAL)
    if kind not in (CATEGORICAL, NUMERIC):
        raise _fail(origin, f"{where}.kind", f"must be 'categorical' or 'numeric', got {kind!r}")
    nullable = body.get("nullable", True)
    if not isinstance(nullable, bool):
        raise _fail(origin, f"{where}.nullable", f"must be true or false, got {nullable!r}")
    if kind == CATEGORICAL:
        for key in ("min", "max"):
            if key in body:
                raise _fail(origin, f"{where}.{key}", "only numeric features have a range")
        raw_values = body.get("values")
        unseen = body.get("unseen", "reject")
        if unseen not in ("reject", "keep"):
            raise _fail(origin, f"{where}.unseen", f"must be 'reject' or 'keep', got {unseen!r}")
        if raw_values is None:
            if unseen == "reject":
                raise _fail(origin, f"{where}.values", "missing: list the allowed values, or set \"unseen\": \"keep\" "
                            "for an open category")
            raw_values = []
        if not isinstance(raw_values, list) or (not raw_values and unseen == "reject"):
            raise _fail(origin, f"{where}.values", f"must be a non-empty list, got {raw_values!r}")
        default_type = "string" if any(isinstance(v, str) for v in raw_values) else "int"
        vtype = body.get("type", default_type)
        if vtype not in ("int", "string"):
            raise _fail(origin, f"{where}.type", f"a categorical feature is 'int' or 'string', got {vtype!r}")
        for i, v in enumerate(raw_values):
            ok = _is_int(v) if vtype == "int" else isinstance(v, str)
            if not ok:
                raise _fail(origin, f"{where}.values[{i}]", f"must be {'an integer' if vtype == 'int' else 'a string'}"
                            f" (type {vtype!r}), got {v!r}")
        if len(set(raw_values)) != len(raw_values):
            raise _fail(origin, f"{where}.values", "lists a value twice")
        return FeatureSpec(name=name, values=tuple(raw_values), kind="categorical", type=vtype, unseen=unseen,
                           nullable=nullable)
    for key in ("values", "unseen"):
        if key in body:
            raise _fail(origin, f"{where}.{key}", "only categorical features have a value set")
    vtype = body.get("type", "float")
    if vtype not in ("int", "float"):
        raise _fail(origin, f"{where}.type", f"a numeric feature is 'int' or 'float', got {vtype!r}")
    bounds: dict[str, float | None] = {}
    for key in ("min", "max"):
        value = body.get(key)
        if value is not None and not _is_number(value):
            raise _fail(origin, f"{where}.{key}", f"must be a number, got {value!r}")
        bounds[key] = None if value is None else float(value)
    low, high = bounds["min"], bounds["max"]
    if low is not None and high is not None and low > high:
        raise _fail(origin, f"{where}.min", f"{_num(low)} is above max {_num(high)}")
    return FeatureSpec(name=name, kind="numeric", type=vtype, minimum=low, maximum=high, nullable=nullable)


def _labels(raw: Mapping[str, Any], origin: str) -> tuple[dict[LabelValue, str], LabelValue]:
    values = raw.get("label_values")
    if isinstance(values, list):
        values = {str(v): str(v) for v in values} if all(isinstance(v, (str, int)) for v in values) else None
    if not isinstance(values, Mapping):
        raise _fail(origin, "label_values", "must map each label value to a name, like {\"-1\": \"phishing\", "
                    "\"1\": \"legitimate\"}, or list the two values")
    if len(values) != 2:
        raise _fail(origin, "label_values", f"must have exactly two classes, got {sorted(map(str, values))}")
    label_type = raw.get("label_type")
    if label_type not in (None, "int", "string"):
        raise _fail(origin, "label_type", f"must be 'int' or 'string', got {label_type!r}")
    keys = [str(k) for k in values]
    as_int = label_type == "int" or (label_type is None and all(_int_text(k) for k in keys))
    if label_type == "int" and not all(_int_text(k) for k in keys):
        raise _fail(origin, "label_values", f"label_type is 'int' but the values are {keys}")
    mapping: dict[LabelValue, str] = {(int(k) if as_int else k): str(v) for k, v in zip(keys, values.values(),
                                                                                        strict=True)}
    if "positive_class" not in raw:
        raise _fail(origin, "positive_class", "missing: name which label value is the positive class")
    pos_raw = raw["positive_class"]
    positive: LabelValue | None = None
    for known in mapping:
        if str(known) == str(pos_raw) and not isinstance(pos_raw, bool):
            positive = known
    if positive is None:
        raise _fail(origin, "positive_class", f"positive_class {pos_raw} is not one of label_values "
                    f"{sorted(map(str, mapping))}")
    return mapping, positive


def _calibration(cal: Mapping[str, Any], features: tuple[FeatureSpec, ...],
                 labels: Mapping[LabelValue, str], origin: str) -> Calibration:
    by_name = {f.name: f for f in features}

    def label_key(text: str, where: str) -> LabelValue:
        try:
            return coerce_label(text, labels)
        except ValueError as exc:
            raise _fail(origin, where, str(exc)) from None

    def value_key(feature: FeatureSpec, text: str) -> Value:
        return int(text) if feature.type == "int" else text

    try:
        distinct = float(cal.get("distinct_feature_vectors") or 0)
        conflicts = float(cal.get("feature_vectors_with_conflicting_labels") or 0)
        label_share = {label_key(k, f"calibration.label_share.{k}"): float(v)
                       for k, v in cal.get("label_share", {}).items()}
        shares: dict[str, dict[LabelValue, dict[Value, float]]] = {}
        for name, by_label in cal.get("share_given_label", {}).items():
            if name not in by_name or not by_name[name].is_categorical:
                raise _fail(origin, f"calibration.share_given_label.{name}", "not a categorical feature of this spec")
            shares[name] = {label_key(lbl, f"calibration.share_given_label.{name}.{lbl}"):
                            {value_key(by_name[name], k): float(v) for k, v in s.items()}
                            for lbl, s in by_label.items()}
        numeric: dict[str, dict[LabelValue, NumericCalibration]] = {}
        for name, by_label in cal.get("numeric_given_label", {}).items():
            where = f"calibration.numeric_given_label.{name}"
            if name not in by_name or not by_name[name].is_numeric:
                raise _fail(origin, where, "not a numeric feature of this spec")
            numeric[name] = {}
            for lbl, body in by_label.items():
                dist = body.get("distribution")
                if dist not in ("lognormal", "normal", "uniform", "poisson"):
                    raise _fail(origin, f"{where}.{lbl}.distribution",
                                f"must be lognormal, normal, uniform or poisson, got {dist!r}")
                params = {k: float(v) for k, v in body.items() if k not in ("distribution", "zero_share")}
                numeric[name][label_key(lbl, f"{where}.{lbl}")] = NumericCalibration(
                    distribution=dist, params=params, zero_share=float(body.get("zero_share", 0.0)))
        return Calibration(
            label_share=label_share,
            share_given_label=shares,
            exact_duplicate_row_share=float(cal.get("exact_duplicate_row_share", 0.0)),
            conflicting_vector_share=conflicts / distinct if distinct else float(cal.get("conflicting_vector_share", 0.0)),
            numeric_given_label=numeric,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, DatasetSpecError):
            raise
        raise _fail(origin, "calibration", f"bad value: {exc}") from exc


def spec_from_dict(raw: Mapping[str, Any], origin: str = "<dict>") -> DatasetSpec:
    """Build and check a spec from its JSON form; errors name the origin, the key and what is wrong."""
    if not isinstance(raw, Mapping):
        raise DatasetSpecError(f"{origin}: a dataset spec is a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise _fail(origin, unknown[0], f"unknown key (known: {sorted(_TOP_KEYS)})")
    label = raw.get("label")
    if not isinstance(label, str) or not label:
        raise _fail(origin, "label", f"must name the label column, got {label!r}")
    label_values, positive = _labels(raw, origin)
    body = raw.get("features")
    if not isinstance(body, Mapping) or not body:
        raise _fail(origin, "features", "must be a non-empty object of feature name -> feature")
    features = tuple(_feature(str(name), f, origin) for name, f in body.items())
    if label in {f.name for f in features}:
        raise _fail(origin, "label", f"label {label!r} is also listed as a feature")
    cal = raw.get("calibration")
    calibration = _calibration(cal, features, label_values, origin) if cal else None
    return DatasetSpec(
        name=str(raw.get("name", "dataset")),
        label=label,
        label_values=label_values,
        positive_class=positive,
        features=features,
        calibration=calibration,
        description=str(raw.get("description", "")),
    )


def spec_to_dict(spec: DatasetSpec) -> dict[str, Any]:
    """The JSON form of a spec (without calibration): what `spec infer` writes."""
    features: dict[str, Any] = {}
    for f in spec.features:
        body: dict[str, Any] = {"kind": f.kind, "type": f.type}
        if f.is_categorical:
            if f.values:
                body["values"] = list(f.values)
            if f.unseen != "reject":
                body["unseen"] = f.unseen
        else:
            if f.minimum is not None:
                body["min"] = int(f.minimum) if f.type == "int" else f.minimum
            if f.maximum is not None:
                body["max"] = int(f.maximum) if f.type == "int" else f.maximum
        body["nullable"] = f.nullable
        features[f.name] = body
    out: dict[str, Any] = {"name": spec.name}
    if spec.description:
        out["description"] = spec.description
    out.update({
        "label": spec.label,
        "label_values": {str(k): v for k, v in spec.label_values.items()},
        "positive_class": spec.positive_class,
        "features": features,
    })
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a dataset spec file (shipped as `datasets/dataset_spec.schema.json`)."""
    text = resources.files("mlops_assets.core.datasets").joinpath(SCHEMA_RESOURCE).read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _packaged(resource: str) -> DatasetSpec:
    text = resources.files("mlops_assets.core.datasets").joinpath(resource).read_text()
    return spec_from_dict(json.loads(text), origin=f"package:{resource}")


def load_spec(path: str | Path | None = None) -> DatasetSpec:
    """Load a spec from a JSON file, a packaged spec by name (`network_flows`), or the packaged
    phishing-website spec when path is None."""
    if path is None or str(path) == "":
        return _packaged(DEFAULT_SPEC_RESOURCE)
    if str(path) in PACKAGED_SPECS:
        return _packaged(PACKAGED_SPECS[str(path)])
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise DatasetSpecError(f"{p}: dataset spec file not found (MLOPS_DATASET_SPEC); packaged specs: "
                               f"{sorted(PACKAGED_SPECS)}") from exc
    except json.JSONDecodeError as exc:
        raise DatasetSpecError(f"{p}: dataset spec is not valid JSON: line {exc.lineno}: {exc.msg}") from exc
    return spec_from_dict(raw, origin=str(p))


def default_spec() -> DatasetSpec:
    return load_spec(None)
