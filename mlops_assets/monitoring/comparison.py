"""Live comparison of a release's candidate with the champion, and the release decision.

Pure pandas over the prediction log (both versions' rows, shadow rows marked `shadow`), the
delayed labels, the label-free estimates (`estimation.py`) and the ingress's per-version
counters; no Dagster. `release_comparison` (an hourly asset) and the release sensor call these.
"""

from __future__ import annotations

import pandas as pd

SHADOW = "shadow"  # prediction-log column: True for a candidate's answer nobody received


def served_rows(log: pd.DataFrame) -> pd.DataFrame:
    """The rows whose answer went back to a client (shadow answers left out)."""
    if log.empty or SHADOW not in log:
        return log
    return log[~log[SHADOW].fillna(False).astype(bool)]


def shadow_rows(log: pd.DataFrame) -> pd.DataFrame:
    if log.empty or SHADOW not in log:
        return log.iloc[:0]
    return log[log[SHADOW].fillna(False).astype(bool)]
