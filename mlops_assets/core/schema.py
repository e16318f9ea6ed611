"""The data contract: a pandera schema built from the dataset spec, and readable violations.

Each column follows its feature's kind (`core/dataset_spec.py`):
- categorical integer codes: whole numbers (nullable Int64), in the value set when it is closed;
- categorical strings: text, in the value set when it is closed;
- numeric: whole numbers (`int`) or numbers (`float`), within `min`/`max` when given;
- the label: one of its two values (integers or strings).
A value may be missing only where the feature is `nullable` (the default; validation reports
the share and the cleaning policy handles them); the label may be missing (cleaning drops the row).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mlops_assets.core.dataset_spec import DatasetSpec, FeatureSpec

if TYPE_CHECKING:  # pandera is imported where a contract is checked: loading the definitions skips it
    import pandera.pandas as pa


@dataclass(frozen=True)
class ContractViolation:
    """One way a table breaks the contract, with a column and an example where there is one."""

    # missing_column | unexpected_column | wrong_type | out_of_domain | out_of_range | missing_value
    # | empty | unreadable
    kind: str
    message: str
    column: str | None = None
    example: str | None = None
    row: int | None = None  # 1-based data row (the header is not counted)
    count: int = 1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def column_dtype(feature: FeatureSpec) -> str:
    """The pandas dtype a feature's column has once typed (nullable)."""
    if feature.is_string:
        return "object"
    return "Int64" if feature.type == "int" else "float64"


def _feature_column(feature: FeatureSpec) -> pa.Column:
    import pandera.pandas as pa

    checks = []
    if feature.is_categorical and feature.closed:
        checks.append(pa.Check.isin(list(feature.values)))
    if feature.is_numeric:
        if feature.minimum is not None:
            checks.append(pa.Check.ge(feature.minimum))
        if feature.maximum is not None:
            checks.append(pa.Check.le(feature.maximum))
    dtype: object = str if feature.is_string else column_dtype(feature)
    return pa.Column(dtype, checks, nullable=feature.nullable, coerce=not feature.is_string)


def build_schema(spec: DatasetSpec) -> pa.DataFrameSchema:
    """Every spec column typed by its kind, with its value set or range; no other column allowed."""
    import pandera.pandas as pa

    columns = {f.name: _feature_column(f) for f in spec.features}
    label_values = list(spec.label_values)
    columns[spec.label] = pa.Column(str if spec.label_is_string else "Int64", pa.Check.isin(label_values),
                                    nullable=True, coerce=not spec.label_is_string)
    return pa.DataFrameSchema(columns, strict=True, ordered=False, name=spec.name)


def _non_integer_mask(series: pd.Series) -> pd.Series:
    """Values that are present but not whole numbers ('abc', 0.5)."""
    numeric = pd.to_numeric(series, errors="coerce")
    return series.notna() & (numeric.isna() | (numeric % 1 != 0))


def _non_number_mask(series: pd.Series) -> pd.Series:
    """Values that are present but not numbers ('abc', 'inf' counts as a number only if finite)."""
    numeric = pd.to_numeric(series, errors="coerce")
    finite = np.isfinite(numeric.astype("float64").to_numpy(na_value=np.nan))
    return series.notna() & ~pd.Series(finite, index=series.index)


def _as_text(series: pd.Series) -> pd.Series:
    """Present values as str (a parquet int in a string column becomes its text), missing as None."""
    out = series.astype("object")
    present = out.notna()
    out[present] = out[present].map(_text)
    return out.where(present, None)


def _text(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def type_column(series: pd.Series, feature: FeatureSpec) -> pd.Series:
    """A column already known to conform to its type, as its dtype (see `column_dtype`)."""
    if feature.is_string:
        return _as_text(series)
    numeric = pd.to_numeric(series, errors="coerce")
    return numeric.astype("Int64") if feature.type == "int" else numeric.astype("float64")


def typed_frame(frame: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """A conforming frame, each column as its kind's dtype, in the spec's column order."""
    out = pd.DataFrame({f.name: type_column(frame[f.name], f) for f in spec.features}, index=frame.index)
    out[spec.label] = type_label(frame[spec.label], spec)
    return out[spec.columns]


def json_records(frame: pd.DataFrame, spec: DatasetSpec) -> list[dict[str, Any]]:
    """Feature rows as JSON-ready dicts (a `/predict` body's records): each value as its kind's
    Python type (int, float or str), in the spec's column order."""
    casts: dict[str, Any] = {f.name: (str if f.is_string else int if f.type == "int" else float) for f in spec.features}
    return [{k: casts[k](v) for k, v in row.items()} for row in frame[spec.feature_names].to_dict("records")]


def type_label(series: pd.Series, spec: DatasetSpec) -> pd.Series:
    if spec.label_is_string:
        return _as_text(series)
    return pd.to_numeric(series, errors="coerce").astype("Int64")


def _plain(value: object) -> object:
    return value.item() if hasattr(value, "item") else value


def _first_bad(col: str, bad: pd.Series, values: pd.Series) -> tuple[str, int, int]:
    pos = int(bad.to_numpy().nonzero()[0][0])
    return repr(_plain(values.iloc[pos])), int(bad.sum()), pos + 1


def check_contract(frame: pd.DataFrame, spec: DatasetSpec) -> list[ContractViolation]:
    """All contract violations of `frame` (empty list: it conforms). Reports every column, not just the first."""
    if frame.shape[1] == 0 or len(frame) == 0:
        return [ContractViolation("empty", "the table has no rows" if frame.shape[1] else "the table has no columns")]
    violations: list[ContractViolation] = []
    expected = set(spec.columns)
    present = [str(col) for col in frame.columns]
    for col in spec.columns:
        if col not in present:
            violations.append(ContractViolation("missing_column", f"missing column {col!r}", column=col))
    for col in present:
        if col not in expected:
            violations.append(ContractViolation("unexpected_column", f"unexpected column {col!r}", column=col))
    if len(set(present)) != len(present):
        dup = next(col for col in present if present.count(col) > 1)
        violations.append(ContractViolation("unexpected_column", f"column {dup!r} appears twice", column=dup))
        return violations

    # Types first, with an example; pandera's coercion error does not always carry one.
    raw = frame[[col for col in present if col in expected]].reset_index(drop=True)
    typed = pd.DataFrame(index=raw.index)
    wrong: dict[str, set[int]] = {}  # rows already reported as wrong_type, per column
    for col in raw.columns:
        feature = spec.feature(col) if col != spec.label else None
        whole = (feature.type == "int") if feature is not None else not spec.label_is_string
        text = feature.is_string if feature is not None else spec.label_is_string
        series = raw[col]
        if not text:
            bad = _non_integer_mask(series) if whole else _non_number_mask(series)
            if bad.any():
                example, count, row = _first_bad(col, bad, series)
                what = "whole numbers" if whole else "numbers"
                violations.append(ContractViolation(
                    "wrong_type", f"column {col!r} must hold {what}; found {example} at data row {row}",
                    column=col, example=example, row=row, count=count,
                ))
                series = series.where(~bad, None)
                wrong[col] = set(bad.to_numpy().nonzero()[0].tolist())
        typed[col] = type_column(series, feature) if feature is not None else type_label(series, spec)

    import pandera.pandas as pa

    schema = build_schema(spec)
    try:
        schema.validate(typed.reindex(columns=[c for c in spec.columns if c in typed.columns]), lazy=True)
    except pa.errors.SchemaErrors as exc:
        violations.extend(_from_failure_cases(exc.failure_cases, spec, wrong))
    return violations


def _from_failure_cases(cases: pd.DataFrame, spec: DatasetSpec, wrong: dict[str, set[int]],
                        ) -> list[ContractViolation]:
    out: list[ContractViolation] = []
    check = cases["check"].astype(str)
    for (col, kind_check), group in cases.assign(_check=check).groupby(["column", "_check"], sort=False):
        col = str(col)
        if col not in spec.columns:
            continue  # a table-level check (a missing column): reported above by name
        if kind_check == "not_nullable" and col in wrong:
            group = group[~group["index"].isin(wrong[col])]  # the wrong-typed values, reported above
            if group.empty:
                continue
        first = group.iloc[0]
        data_row = None if pd.isna(first["index"]) else int(first["index"]) + 1
        example = repr(_plain(first["failure_case"]))
        feature = spec.feature(col) if col != spec.label else None
        if kind_check.startswith("isin"):
            allowed = list(feature.values) if feature is not None else (
                list(spec.label_values) if spec.label_is_string else sorted(spec.label_values))
            out.append(ContractViolation(
                "out_of_domain", f"column {col!r} has values outside {allowed}; found {example} at data row {data_row}",
                column=col, example=example, row=data_row, count=len(group)))
        elif kind_check.startswith(("greater_than_or_equal_to", "less_than_or_equal_to")) and feature is not None:
            side = "below min" if kind_check.startswith("greater") else "above max"
            out.append(ContractViolation(
                "out_of_range", f"column {col!r} has values {side}: must be {feature.rule()}; found {example} "
                f"at data row {data_row}", column=col, example=example, row=data_row, count=len(group)))
        elif kind_check == "not_nullable":
            out.append(ContractViolation(
                "missing_value", f"column {col!r} must not be missing (nullable: false); missing at data row "
                f"{data_row}", column=col, row=data_row, count=len(group)))
        elif kind_check.startswith("coerce_dtype") or kind_check.startswith("dtype"):
            continue  # reported above as wrong_type, with an example
        else:
            out.append(ContractViolation("wrong_type", f"column {col!r} fails {kind_check}; found {example}",
                                         column=col, example=example, row=data_row, count=len(group)))
    return out
