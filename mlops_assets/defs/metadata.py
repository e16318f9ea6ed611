"""Small helpers for metadata: paths and URIs without their credentials, and tables the UI shows inline.

Versions do not travel through metadata: each asset's value is a record carrying its own version
and lineage (mlops_assets.core.records), loaded from exactly what the run's upstream produced."""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import pandas as pd

from mlops_assets.core.redaction import redact_text, redact_uri

__all__ = ["confusion_table", "frame_table", "gate_table", "path_value", "redact_text", "redact_uri",
           "table_value", "url_value"]


def path_value(uri: str) -> dg.MetadataValue:
    """A path or fsspec URL as Dagster metadata, credentials redacted (metadata is shown to every UI user)."""
    return dg.MetadataValue.path(redact_uri(uri))


def url_value(url: str) -> dg.MetadataValue:
    """A clickable URL as Dagster metadata, credentials redacted."""
    return dg.MetadataValue.url(redact_uri(url))


# --- tables: what the UI shows inline, without a "Show Markdown/JSON" modal -----------------------

_TYPES = {bool: "bool", int: "int", float: "float"}


def _cell(value: Any) -> Any:
    """A table cell Dagster can show: finite numbers and booleans as they are, anything else as text
    (NaN and None as an empty cell's word, 'n/a')."""
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return "n/a" if math.isnan(value) or math.isinf(value) else round(value, 6)
    return "n/a" if value is None else str(value)


def table_value(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> dg.MetadataValue:
    """Rows (dicts) as a Dagster table, columns in the given order (else the first row's keys).

    A column's type is the one all its cells share (int, float, bool), else string; a numeric
    column with a 'n/a' cell becomes string so the table stays valid."""
    names = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    cells = [{name: _cell(row.get(name)) for name in names} for row in rows]
    schema = []
    for name in names:
        kinds = {type(r[name]) for r in cells}
        kind = _TYPES[kinds.pop()] if len(kinds) == 1 and next(iter(kinds)) in _TYPES else "string"
        if kind == "string":
            for r in cells:
                r[name] = str(r[name])
        schema.append(dg.TableColumn(name, kind))
    return dg.MetadataValue.table(records=[dg.TableRecord(r) for r in cells],
                                  schema=dg.TableSchema(columns=schema))


def frame_table(frame: pd.DataFrame) -> dg.MetadataValue:
    """A DataFrame as a Dagster table (index dropped)."""
    return table_value(frame.to_dict(orient="records"), [str(c) for c in frame.columns])


def gate_table(decision: Mapping[str, Any]) -> dg.MetadataValue:
    """The promotion gate as one row per check, failures first: check, value, bound, verdict, reason."""
    def value(v: Any) -> Any:
        return round(v, 4) if isinstance(v, float) and not math.isnan(v) else v

    checks = sorted(decision.get("checks") or [], key=lambda ch: bool(ch.get("passed")))
    rows = [{"check": ch.get("metric") if ch.get("kind") == "absolute" else f"{ch.get('metric')} ({ch.get('kind')})",
             "value": value(ch.get("value")),
             "bound": f"{ch.get('op')} {_cell(value(ch.get('bound')))}" if ch.get("op") not in (None, "n/a") else "n/a",
             "verdict": "pass" if ch.get("passed") else "FAIL",
             # A passed threshold says all in its value and bound; a failure or a comparison says why.
             "reason": "" if ch.get("passed") and ch.get("kind") == "absolute" else str(ch.get("reason") or "")}
            for ch in checks]
    if not rows:  # a stored decision of an older format: its reasons only
        rows = [{"check": "gate", "value": None, "bound": "n/a",
                 "verdict": "pass" if decision.get("passed") else "FAIL", "reason": r}
                for r in decision.get("reasons") or []]
    return table_value(rows, ["check", "value", "bound", "verdict", "reason"])


def confusion_table(counts: Mapping[str, int], negative: str, positive: str) -> dg.MetadataValue:
    """A 2x2 confusion matrix: one row per true class, one column per predicted class."""
    return table_value([
        {"actual \\ predicted": f"{positive} (positive)", f"predicted {positive}": int(counts.get("tp", 0)),
         f"predicted {negative}": int(counts.get("fn", 0))},
        {"actual \\ predicted": f"{negative} (negative)", f"predicted {positive}": int(counts.get("fp", 0)),
         f"predicted {negative}": int(counts.get("tn", 0))},
    ], ["actual \\ predicted", f"predicted {positive}", f"predicted {negative}"])


def drift_table(scores: Sequence[Any], *, ks_statistic: float, hellinger: float, p_value: float) -> dg.MetadataValue:
    """One drift report as a table, drifted rows first: feature, statistic, score, p-value,
    threshold, verdict, rows, reason (scores are `monitoring.drift.DriftScore`s)."""
    def verdict(s: Any) -> str:
        if s.drift:
            return "DRIFT"
        return "not judged" if isinstance(s.statistic, float) and math.isnan(s.statistic) else "ok"

    def key(s: Any) -> tuple[bool, float]:
        value = s.statistic if isinstance(s.statistic, float) and not math.isnan(s.statistic) else -1.0
        return (not s.drift, -value)

    rows = []
    for s in sorted(scores, key=key):
        ks = str(s.method).startswith("ks")
        rows.append({"feature": s.column, "statistic": "KS" if ks else "Hellinger (+chi2 p)", "score": s.statistic,
                     "p_value": s.p_value,
                     "threshold": f">= {ks_statistic if ks else hellinger} and p < {p_value}",
                     "verdict": verdict(s), "rows": int(s.n_current), "reason": s.reason})
    return table_value(rows, ["feature", "statistic", "score", "p_value", "threshold", "verdict", "rows", "reason"])
