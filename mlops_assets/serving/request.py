"""The `/predict` request model, built from the dataset spec, and client-facing error messages.

Each record is a pydantic model with one strict-int field per feature (`extra="forbid"`), so a
wrong column, a string or float or bool where an int belongs, or a value outside the feature's
domain is rejected before scoring, and the message names the field and its allowed values.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Annotated, Any

import numpy as np
import pandas as pd
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError, create_model
from pydantic_core import PydanticCustomError

from mlops_assets.core.dataset_spec import DatasetSpec

MAX_REPORTED_ERRORS = 20  # a 1000-record batch of bad rows should not produce a megabyte of errors


class RequestError(Exception):
    """A client error with an HTTP status and a message safe to return (no internals)."""

    def __init__(self, status_code: int, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.errors = errors or []

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.errors:
            out["errors"] = self.errors
        return out


def _domain_check(allowed: tuple[int, ...]) -> Callable[[int], int]:
    allowed_set = frozenset(allowed)
    shown = sorted(allowed)

    def check(value: int) -> int:
        if value not in allowed_set:
            raise PydanticCustomError(
                "value_not_allowed",
                "value {value} is not allowed; allowed values: {allowed}",
                {"value": value, "allowed": str(shown)},
            )
        return value

    return check


@dataclass(frozen=True)
class RequestModel:
    """The pydantic model of a `/predict` body for one dataset spec and batch limit.

    `fast_matrix` accepts exactly the bodies the pydantic model accepts, in a few vectorised
    steps instead of one Python validator call per value; anything it does not accept goes to
    the pydantic model, which either accepts it too or produces the error message. So messages
    come from one place and the fast path can only ever be stricter, never looser.
    """

    spec: DatasetSpec
    max_records: int
    model: type[BaseModel]
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _row: Callable[[dict[str, Any]], tuple[Any, ...]] = field(init=False, repr=False, compare=False)
    _low: int = field(init=False, repr=False, compare=False)
    _allowed: np.ndarray = field(init=False, repr=False, compare=False)  # [feature, value - low] -> bool

    def __post_init__(self) -> None:
        names = tuple(self.spec.feature_names)
        low = min(min(f.values) for f in self.spec.features)
        high = max(max(f.values) for f in self.spec.features)
        allowed = np.zeros((len(names), high - low + 1), dtype=bool)
        for i, feature in enumerate(self.spec.features):
            allowed[i, [v - low for v in feature.values]] = True
        object.__setattr__(self, "_names", names)
        getter = itemgetter(*names)
        object.__setattr__(self, "_row", getter if len(names) > 1 else (lambda r: (getter(r),)))
        object.__setattr__(self, "_low", low)
        object.__setattr__(self, "_allowed", allowed)

    def json_schema(self) -> dict[str, Any]:
        return self.model.model_json_schema(by_alias=True)

    def fast_matrix(self, payload: Any) -> np.ndarray | None:
        """The records as an int64 matrix in the spec's column order, or None when not plainly valid."""
        if type(payload) is not dict or len(payload) != 1:
            return None
        records = payload.get("records")
        if type(records) is not list or not 1 <= len(records) <= self.max_records:
            return None
        width = len(self._names)
        # Exactly the spec's keys: each record a dict with every name present and no other (same count).
        if set(map(type, records)) != {dict} or set(map(len, records)) != {width}:
            return None
        try:
            rows = list(map(self._row, records))
        except KeyError:
            return None
        if set(map(type, chain.from_iterable(rows))) != {int}:  # StrictInt: no bool, float, str or None
            return None
        try:
            matrix = np.array(rows, dtype=np.int64)
        except OverflowError:
            return None
        shifted = matrix - self._low
        if shifted.min() < 0 or shifted.max() >= self._allowed.shape[1]:
            return None
        if not self._allowed[np.arange(width), shifted].all():
            return None
        return matrix


def build_request_model(spec: DatasetSpec, max_records: int) -> RequestModel:
    """Build the request model; field names are aliases, so any column name works."""
    record_fields: dict[str, Any] = {}
    for i, feature in enumerate(spec.features):
        field_type = Annotated[StrictInt, AfterValidator(_domain_check(feature.values))]
        record_fields[f"f{i}"] = (
            field_type,
            Field(alias=feature.name, json_schema_extra={"enum": list(sorted(feature.values))}),
        )
    record = create_model(
        "Record",
        __config__=ConfigDict(extra="forbid", strict=True, populate_by_name=False),
        **record_fields,
    )
    body = create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        records=(list[record], Field(min_length=1, max_length=max_records)),  # type: ignore[valid-type]
    )
    return RequestModel(spec=spec, max_records=max_records, model=body)


def _field_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe_validation_errors(exc: ValidationError, request_model: RequestModel) -> list[dict[str, Any]]:
    """Turn pydantic errors into `{field, problem, allowed?}` entries that echo no internals."""
    spec = request_model.spec
    domains = {f.name: sorted(f.values) for f in spec.features}
    out: list[dict[str, Any]] = []
    for err in exc.errors(include_url=False, include_context=False, include_input=False):
        loc = list(err["loc"])
        field = _field_path(loc) or "body"
        name = loc[-1] if loc else None
        kind = err["type"]
        entry: dict[str, Any] = {"field": field}
        if kind == "extra_forbidden":
            entry["problem"] = (
                f"unknown field {name!r}: not a feature of data set {spec.name!r} (GET /model lists the features)"
                if len(loc) > 2 else f"unknown field {name!r}; the body has one field, 'records'"
            )
        elif kind == "missing":
            entry["problem"] = "required field is missing"
        elif kind == "too_short" and loc == ["records"]:
            entry["problem"] = f"records is empty; send 1 to {request_model.max_records} records"
        elif kind == "too_long" and loc == ["records"]:
            entry["problem"] = (
                f"too many records; at most {request_model.max_records} per request (split the batch)"
            )
        elif kind in ("int_type", "int_parsing"):
            entry["problem"] = "expected an integer (not a string, float or boolean)"
        else:
            entry["problem"] = str(err["msg"])
        if isinstance(name, str) and name in domains and kind != "extra_forbidden":
            entry["allowed"] = domains[name]
        out.append(entry)
    return out


def parse_predict_body(raw: bytes, request_model: RequestModel) -> list[dict[str, int]]:
    """Parse and validate a `/predict` body; raise RequestError (400/422) naming the problem."""
    return parse_predict_matrix(raw, request_model)[0]


def parse_predict_matrix(raw: bytes, request_model: RequestModel) -> tuple[list[dict[str, int]], np.ndarray]:
    """Parse and validate a `/predict` body: (records, int64 matrix in the spec's column order).

    Raises RequestError (400/422) naming the problem. Valid bodies take the vectorised path;
    the pydantic model sees only bodies that path does not accept.
    """
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise RequestError(400, f"request body is not valid JSON{where}") from None
    if not isinstance(payload, dict):
        raise RequestError(422, 'request body must be a JSON object like {"records": [{...}, ...]}')
    matrix = request_model.fast_matrix(payload)
    if matrix is not None:
        return payload["records"], matrix
    try:
        request_model.model.model_validate(payload)
    except ValidationError as exc:
        errors = describe_validation_errors(exc, request_model)
        shown = errors[:MAX_REPORTED_ERRORS]
        first = shown[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        allowed = f"; allowed values: {first['allowed']}" if "allowed" in first else ""
        raise RequestError(422, f"invalid request: {first['field']}: {first['problem']}{allowed}{more}", shown) from None
    # Validated: every record has exactly the spec's features with in-domain ints.
    records = payload["records"]
    return records, records_to_matrix(records, request_model.spec)


def records_to_matrix(records: Sequence[dict[str, int]], spec: DatasetSpec) -> np.ndarray:
    """Validated records as an int64 matrix in the spec's column order (the model's training order)."""
    names = spec.feature_names
    return np.array([[r[n] for n in names] for r in records], dtype=np.int64).reshape(len(records), len(names))


def records_to_frame(records: Sequence[dict[str, int]], spec: DatasetSpec) -> pd.DataFrame:
    """Feature matrix in the spec's column order (the order the model was trained on)."""
    return pd.DataFrame.from_records(list(records), columns=spec.feature_names).astype("int64")
