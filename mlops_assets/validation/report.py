"""Dataset-level validation: the contract on the union of batches plus the figures that tell
whether the data is usable (nulls, duplicates, conflicting labels, label balance, size)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from mlops_assets import constants as c
from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.core.schema import check_contract


@dataclass(frozen=True)
class ValidationThresholds:
    min_rows: int = c.MIN_ROWS
    max_null_share: float = c.MAX_NULL_SHARE
    min_minority_class_share: float = c.MIN_MINORITY_CLASS_SHARE
    warn_duplicate_share: float = c.WARN_DUPLICATE_SHARE


def conflicting_vector_count(frame: pd.DataFrame, spec: DatasetSpec) -> int:
    """Distinct feature vectors seen with more than one label."""
    labelled = frame.dropna(subset=[spec.label])
    if labelled.empty:
        return 0
    per_vector = labelled.groupby(spec.feature_names, dropna=False)[spec.label].nunique()
    return int((per_vector > 1).sum())


def build_report(frame: pd.DataFrame, spec: DatasetSpec, thresholds: ValidationThresholds,
                 data_version: str, violations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A machine-readable validation report; every figure a check needs is in it.

    `violations`: the contract's findings when they are known already (each batch is checked once,
    when it lands); None checks `frame` against the contract here."""
    rows = len(frame)
    if violations is None:
        violations = [v.as_dict() for v in check_contract(frame, spec)] if rows else []
    feature_nulls = frame[spec.feature_names].isna() if rows else pd.DataFrame()
    label_counts = frame[spec.label].value_counts(dropna=True)
    labelled = int(label_counts.sum())
    label_share = {_key(k): round(float(v) / labelled, 4) for k, v in label_counts.items()} if labelled else {}
    minority = min((label_share.get(str(k), 0.0) for k in spec.label_values), default=0.0)
    # Categorical features: value counts; numeric ones: summary statistics.
    summary = {
        col: {_key(k): int(v) for k, v in frame[col].value_counts(dropna=True).sort_index().items()}
        for col in spec.categorical_features
    } if rows else {}
    numeric_summary = {col: _numeric_summary(frame[col]) for col in spec.numeric_features} if rows else {}
    return {
        "dataset": spec.name,
        "data_version": data_version,
        "thresholds": asdict(thresholds),
        "row_count": rows,
        "schema": {"valid": not violations, "violations": violations},
        "null_share": round(float(feature_nulls.to_numpy().mean()), 6) if rows else 0.0,
        "rows_with_missing_features": int(feature_nulls.any(axis=1).sum()) if rows else 0,
        "null_share_by_column": {
            col: round(float(share), 6) for col, share in frame[spec.columns].isna().mean().items() if share > 0
        } if rows else {},
        "unlabelled_rows": int(frame[spec.label].isna().sum()),
        "duplicate_share": round(float(frame.duplicated().mean()), 6) if rows else 0.0,
        "distinct_feature_vectors": int(len(frame[spec.feature_names].drop_duplicates())) if rows else 0,
        "conflicting_label_vectors": conflicting_vector_count(frame, spec),
        "label_share": label_share,
        "minority_class_share": round(float(minority), 6),
        "value_counts": summary,
        "numeric_summary": numeric_summary,
    }


def _key(value: Any) -> str:
    """A value as a report key: integer codes without a decimal point, strings as they are."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(int(number)) if number.is_integer() else str(value)


def _numeric_summary(column: pd.Series) -> dict[str, float]:
    values = pd.to_numeric(column, errors="coerce").dropna().astype("float64")
    if values.empty:
        return {}
    q = values.quantile([0.05, 0.5, 0.95])
    return {"min": float(values.min()), "q05": float(q.iloc[0]), "median": float(q.iloc[1]),
            "q95": float(q.iloc[2]), "max": float(values.max()), "mean": float(values.mean())}


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable form of the report."""
    t = report["thresholds"]
    schema = report["schema"]
    lines = [
        f"# Validation report: {report['dataset']} (data version {report['data_version']})",
        "",
        "| figure | value | limit |",
        "|---|---|---|",
        f"| rows | {report['row_count']} | at least {t['min_rows']} |",
        f"| schema | {'valid' if schema['valid'] else 'INVALID'} | no violation |",
        f"| null share (features) | {report['null_share']:.4f} | at most {t['max_null_share']} |",
        f"| unlabelled rows | {report['unlabelled_rows']} | dropped by feature cleaning |",
        f"| exact duplicate share | {report['duplicate_share']:.4f} | warn above {t['warn_duplicate_share']} |",
        f"| distinct feature vectors | {report['distinct_feature_vectors']} | |",
        f"| vectors with conflicting labels | {report['conflicting_label_vectors']} | reported, resolved by cleaning |",
        f"| label share | {report['label_share']} | minority at least {t['min_minority_class_share']} |",
        "",
    ]
    if schema["violations"]:
        lines += ["## Contract violations", ""]
        lines += [f"- {v['message']}" for v in schema["violations"]]
        lines.append("")
    lines += ["## Value counts", "", "| column | counts |", "|---|---|"]
    lines += [f"| {col} | {counts} |" for col, counts in report["value_counts"].items()]
    return "\n".join(lines) + "\n"
