"""A dataset spec suggested from a user's table (CSV or Parquet), for review before use.

Like TFX's SchemaGen or SageMaker Model Monitor's baseline suggestion: each column's kind and
type, the value sets of low-cardinality columns, numeric ranges, whether values may be missing,
and the label's two values. What it cannot type is reported (`InferredSpec.untyped`), never
guessed: a column mixing numbers and text, an empty column, an id-like text column.

Rules, per feature column (the CSV read as text, as ingestion reads it):
- every present value a number: whole numbers with at most `max_int_categories` distinct values
  are `categorical` integer codes (closed, the values seen); other whole numbers `numeric` int,
  anything else `numeric` float. Ranges: `min: 0` when no value is negative and `max: 1` when
  every value is in [0, 1] (a share or rate); `observed_ranges=True` writes the observed min and
  max instead (stricter: a later, larger value is then quarantined).
  Mostly numbers with some text, or consecutive distinct integers (a row id), are not typed.
- otherwise text (numbers among text are text): at most `max_string_categories` distinct values give a closed `categorical`
  string; more give an open one (`unseen: "keep"`) unless nearly every value is distinct (an id).
- `nullable` is true when the column has a missing value.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mlops_assets.core.dataset_spec import DatasetSpec, spec_from_dict, spec_to_dict

MAX_INT_CATEGORIES = 10
MAX_STRING_CATEGORIES = 50
ID_DISTINCT_SHARE = 0.95  # text with this share of distinct values (and > MAX_STRING_CATEGORIES) is an id


class SpecInferenceError(ValueError):
    """The file cannot give a spec at all (unreadable, no label column, not two label values)."""


@dataclass(frozen=True)
class InferredSpec:
    spec: DatasetSpec
    untyped: dict[str, str] = field(default_factory=dict)  # column -> why it was left out
    notes: dict[str, str] = field(default_factory=dict)  # column -> what was inferred, in words

    def as_dict(self) -> dict[str, Any]:
        return spec_to_dict(self.spec)


def read_table_file(path: str | Path) -> pd.DataFrame:
    """A CSV (read as text, like ingestion) or Parquet file."""
    p = Path(path)
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(p)
        return pd.read_csv(io.BytesIO(p.read_bytes()), dtype=str, keep_default_na=True, skipinitialspace=True)
    except FileNotFoundError as exc:
        raise SpecInferenceError(f"{p}: no such file") from exc
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError) as exc:
        raise SpecInferenceError(f"{p}: cannot be read as a table: {str(exc).splitlines()[0] if str(exc) else exc}") \
            from exc


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _infer_column(name: str, column: pd.Series, max_int: int, max_str: int, observed: bool,
                  ) -> tuple[dict[str, Any] | None, str]:
    present = column.dropna()
    nullable = bool(column.isna().any())
    if present.empty:
        return None, "no values: every row is missing"
    if present.map(lambda v: isinstance(v, bool)).all():
        return {"kind": "categorical", "type": "int", "values": [0, 1], "nullable": nullable}, "boolean as 0/1"
    numbers = pd.to_numeric(present, errors="coerce")
    not_numbers = present[numbers.isna()]
    if not_numbers.empty:
        whole = bool((numbers % 1 == 0).all())
        distinct = sorted(numbers.unique().tolist())
        if whole and len(distinct) <= max_int:
            values = [int(v) for v in distinct]
            return ({"kind": "categorical", "type": "int", "values": values, "nullable": nullable},
                    f"{len(values)} integer codes")
        if whole and len(distinct) == len(present) and len(distinct) > 2 and \
                bool((pd.Series(distinct).diff().dropna() == 1).all()):
            return None, f"consecutive distinct integers {_number(distinct[0])}..{_number(distinct[-1])}: a row id, " \
                "not a feature (drop the column)"
        body: dict[str, Any] = {"kind": "numeric", "type": "int" if whole else "float", "nullable": nullable}
        low, high = float(numbers.min()), float(numbers.max())
        if observed:
            body.update({"min": _number(low), "max": _number(high)})
        else:
            if low >= 0:
                body["min"] = 0
            if low >= 0 and high <= 1 and not whole:
                body["max"] = 1
        return body, f"{body['type']} in [{_number(low)}, {_number(high)}] as seen"
    if len(not_numbers) <= len(present) / 2:  # mostly numbers, some text: which is the mistake?
        example = not_numbers.iloc[0]
        return None, (f"mixes numbers and text ({len(present) - len(not_numbers)} numbers, {len(not_numbers)} "
                      f"other values such as {example!r}): fix the values or say its kind in the spec")
    text = present.astype(str)
    distinct = text.unique().tolist()
    if len(distinct) <= max_str:
        return ({"kind": "categorical", "type": "string", "values": sorted(distinct), "nullable": nullable},
                f"{len(distinct)} categories")
    if len(distinct) >= ID_DISTINCT_SHARE * len(text):
        return None, f"{len(distinct)} distinct values in {len(text)} rows: an id, not a feature (drop the column)"
    return ({"kind": "categorical", "type": "string", "unseen": "keep", "nullable": nullable},
            f"open category ({len(distinct)} distinct values > {max_str})")


def infer_spec(frame: pd.DataFrame, label: str, positive: str, *, name: str = "dataset",
               max_int_categories: int = MAX_INT_CATEGORIES, max_string_categories: int = MAX_STRING_CATEGORIES,
               observed_ranges: bool = False) -> InferredSpec:
    """Suggest a spec for `frame` with `label` as the label column and `positive` its positive class."""
    if label not in frame.columns:
        raise SpecInferenceError(f"no label column {label!r}; columns: {[str(c) for c in frame.columns]}")
    labels = frame[label].dropna()
    values = sorted({str(_number(float(v))) if _is_number_text(v) else str(v) for v in labels})
    if len(values) != 2:
        raise SpecInferenceError(f"label {label!r} must have exactly two values, found {len(values)}: {values[:10]}")
    if str(positive) not in values:
        raise SpecInferenceError(f"--positive {positive!r} is not a value of {label!r}: {values}")
    features: dict[str, Any] = {}
    untyped: dict[str, str] = {}
    notes: dict[str, str] = {}
    for column in frame.columns:
        if column == label:
            continue
        body, why = _infer_column(str(column), frame[column], max_int_categories, max_string_categories,
                                  observed_ranges)
        if body is None:
            untyped[str(column)] = why
        else:
            features[str(column)] = body
            notes[str(column)] = why
    if not features:
        raise SpecInferenceError(f"no column could be typed: {untyped}")
    raw = {"name": name, "label": label, "label_values": {v: v for v in values}, "positive_class": str(positive),
           "features": features}
    return InferredSpec(spec_from_dict(raw, origin="inferred spec"), untyped, notes)


def _is_number_text(value: object) -> bool:
    try:
        float(str(value))
    except ValueError:
        return False
    return True
