"""The data contract: a pandera schema built from the dataset spec, and readable violations.

Features and label may be missing in raw data (validation reports the share, the feature
cleaning policy handles them); anything present must be a whole number in its domain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd
import pandera.pandas as pa

from mlops_assets.core.dataset_spec import DatasetSpec


@dataclass(frozen=True)
class ContractViolation:
    """One way a table breaks the contract, with a column and an example where there is one."""

    kind: str  # missing_column | unexpected_column | wrong_type | out_of_domain | empty | unreadable
    message: str
    column: str | None = None
    example: str | None = None
    row: int | None = None  # 1-based data row (the header is not counted)
    count: int = 1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def build_schema(spec: DatasetSpec) -> pa.DataFrameSchema:
    """Every spec column, nullable whole numbers in its domain; no other column allowed."""
    columns = {
        f.name: pa.Column("Int64", pa.Check.isin(list(f.values)), nullable=True, coerce=True)
        for f in spec.features
    }
    columns[spec.label] = pa.Column("Int64", pa.Check.isin(sorted(spec.label_values)), nullable=True, coerce=True)
    return pa.DataFrameSchema(columns, strict=True, ordered=False, name=spec.name)


def _non_integer_mask(series: pd.Series) -> pd.Series:
    """Values that are present but not whole numbers ('abc', 0.5)."""
    numeric = pd.to_numeric(series, errors="coerce")
    return series.notna() & (numeric.isna() | (numeric % 1 != 0))


def _plain(value: object) -> object:
    return value.item() if hasattr(value, "item") else value


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
    typed = frame[[col for col in present if col in expected]].copy()
    for col in typed.columns:
        bad = _non_integer_mask(typed[col])
        if bad.any():
            pos = int(bad.to_numpy().nonzero()[0][0])
            example, count, row = repr(_plain(typed[col].iloc[pos])), int(bad.sum()), pos + 1
            violations.append(ContractViolation(
                "wrong_type", f"column {col!r} must hold whole numbers; found {example} at data row {row}",
                column=col, example=example, row=row, count=count,
            ))
            typed[col] = pd.NA
    typed = typed.apply(lambda s: pd.to_numeric(s, errors="coerce")).astype("Int64")

    schema = build_schema(spec)
    try:
        schema.validate(typed.reindex(columns=[c for c in spec.columns if c in typed.columns]), lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        domain = cases[cases["check"].astype(str).str.startswith("isin")]
        for col, group in domain.groupby("column", sort=False):
            first = group.iloc[0]
            example = repr(_plain(first["failure_case"]))
            allowed = (spec.feature(str(col)).values if col != spec.label else sorted(spec.label_values))
            data_row = None if pd.isna(first["index"]) else int(first["index"]) + 1
            violations.append(ContractViolation(
                "out_of_domain",
                f"column {col!r} has values outside {list(allowed)}; found {example} at data row {data_row}",
                column=str(col), example=example, row=data_row, count=len(group),
            ))
    return violations
