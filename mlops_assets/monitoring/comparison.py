"""Live comparison of a release's candidate with the champion, and the release decision.

Pure pandas over the prediction log (both versions' rows, shadow rows marked `shadow`), the
delayed labels, the label-free estimates (`estimation.py`) and the ingress's per-version
counters; no Dagster. `release_comparison` (an hourly asset) and the release sensor call these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from mlops_assets.monitoring import estimation as est
from mlops_assets.monitoring import live as mon
from mlops_assets.serving.config import APP_NAME

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


@dataclass(frozen=True)
class SideStats:
    """One side of a release on a window: its rows, realized metrics where labels arrived, estimates."""

    version: str
    requests: int
    rows: int
    labelled: int
    realized: dict[str, float]  # accuracy, precision, recall, f1, roc_auc (NaN when not computable)
    estimated: dict[str, float]
    positive_share: float
    probability_mean: float

    def flat(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_requests": float(self.requests), f"{prefix}_rows": float(self.rows),
               f"{prefix}_labelled": float(self.labelled), f"{prefix}_positive_share": self.positive_share,
               f"{prefix}_probability_mean": self.probability_mean}
        out.update({f"{prefix}_{k}": v for k, v in self.realized.items() if k in est.ESTIMATED_METRICS})
        out.update({f"{prefix}_estimated_{k}": v for k, v in self.estimated.items() if k in est.ESTIMATED_METRICS})
        return out


@dataclass(frozen=True)
class ServedCounts:
    """The ingress's answers per role since a baseline: answered and failed (5xx or no replica)."""

    answered: int = 0
    failed: int = 0
    latency_p95_ms: float | None = None

    @property
    def error_rate(self) -> float | None:
        total = self.answered + self.failed
        return self.failed / total if total else None


@dataclass(frozen=True)
class ReleaseComparison:
    strategy: str
    champion: SideStats
    candidate: SideStats
    paired_rows: int  # rows both versions answered (shadow): agreement and deltas stand on these
    agreement: float | None
    mean_abs_delta: float | None
    probability_ks: float | None
    counts: dict[str, ServedCounts] = field(default_factory=dict)  # role -> counts

    def numbers(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {**self.champion.flat("champion"), **self.candidate.flat("candidate"),
                                        "paired_rows": float(self.paired_rows), "agreement_rate": self.agreement,
                                        "mean_abs_probability_delta": self.mean_abs_delta,
                                        "probability_ks": self.probability_ks}
        for role, counts in self.counts.items():
            out[f"{role}_error_rate"] = counts.error_rate
            out[f"{role}_latency_p95_ms"] = counts.latency_p95_ms
        return out


def _side(rows: pd.DataFrame, labels: pd.DataFrame, version: str, positive_class: int | str,
          label_values: Sequence[Any], calibrator: est.Calibrator) -> SideStats:
    join = mon.join_labels(rows, labels, label_values=list(label_values)) if not rows.empty else None
    joined = join.joined if join is not None else rows.iloc[:0]
    realized = mon.online_metrics(joined, positive_class)
    if rows.empty or mon.PROBABILITY not in rows:
        estimated = est.estimate_performance([], [], calibrator)
        share, mean = math.nan, math.nan
    else:
        p = rows[mon.PROBABILITY].to_numpy(dtype=float)
        predicted = rows[mon.PREDICTED_LABEL].to_numpy() == positive_class
        estimated = est.estimate_performance(p, predicted, calibrator)
        share, mean = float(predicted.mean()), float(np.nanmean(p))
    return SideStats(version, int(rows[mon.REQUEST_ID].nunique()) if not rows.empty else 0, len(rows),
                     len(joined), realized, estimated, share, mean)


def compare_release(
    log: pd.DataFrame, labels: pd.DataFrame, *, strategy: str, champion_version: str, candidate_version: str,
    positive_class: int | str, label_values: Sequence[Any],
    calibrators: Mapping[str, est.Calibrator] | None = None, counts: Mapping[str, ServedCounts] | None = None,
) -> ReleaseComparison:
    """Champion and candidate on the same live window: each side's rows (the candidate's are its
    shadow answers or the canary requests it answered), realized metrics on the rows whose labels
    arrived, label-free estimates, and for a shadow, agreement on the very same rows."""
    calibrators = calibrators or {}
    if log.empty or mon.MODEL_VERSION not in log:
        log = pd.DataFrame({mon.MODEL_VERSION: pd.Series([], dtype=str), mon.REQUEST_ID: pd.Series([], dtype=str)})
    versions = log[mon.MODEL_VERSION].astype(str)
    champion_rows = served_rows(log[versions == str(champion_version)])
    candidate_rows = log[versions == str(candidate_version)]
    if strategy == "shadow":
        candidate_rows = shadow_rows(candidate_rows)
    champion = _side(champion_rows, labels, str(champion_version), positive_class, label_values,
                     calibrators.get(str(champion_version), est.IDENTITY))
    candidate = _side(candidate_rows, labels, str(candidate_version), positive_class, label_values,
                      calibrators.get(str(candidate_version), est.IDENTITY))
    paired, agreement, delta, ks = 0, None, None, None
    key = [mon.REQUEST_ID, mon.RECORD_INDEX]
    if not champion_rows.empty and not candidate_rows.empty and mon.PROBABILITY in log:
        both = champion_rows[[*key, mon.PREDICTED_LABEL, mon.PROBABILITY]].drop_duplicates(key).merge(
            candidate_rows[[*key, mon.PREDICTED_LABEL, mon.PROBABILITY]].drop_duplicates(key), on=key,
            suffixes=("_champion", "_candidate"))
        if len(both):
            shift = mon.prediction_shift(both[f"{mon.PREDICTED_LABEL}_candidate"], both[f"{mon.PROBABILITY}_candidate"],
                                         both[f"{mon.PREDICTED_LABEL}_champion"], both[f"{mon.PROBABILITY}_champion"],
                                         positive_class)
            paired, delta, ks = shift.rows, shift.mean_abs_delta, shift.probability_ks
            agreement = None if shift.flip_share is None else 1.0 - shift.flip_share
    return ReleaseComparison(strategy, champion, candidate, paired, agreement, delta, ks, dict(counts or {}))


@dataclass(frozen=True)
class ReleaseTerms:
    """When a candidate has shown enough, and by how much it may trail the champion."""

    min_requests: int  # requests the candidate answered (canary) or mirrored (shadow)
    min_duration_s: float  # since the release started
    max_metric_drop: float  # realized (or, without enough labels, estimated) accuracy / ROC-AUC below the champion's
    max_error_rate_delta: float  # candidate error rate above the champion's
    min_labelled: int  # labelled rows per side before the realized metrics decide


@dataclass(frozen=True)
class ReleaseDecision:
    action: str  # "promote", "abort" or "wait"
    reasons: tuple[str, ...]
    evidence: str  # "labels", "estimate" or "none"


DECIDING_METRICS = ("accuracy", "roc_auc")


def release_decision(comparison: ReleaseComparison, terms: ReleaseTerms, started_at: datetime | pd.Timestamp,
                     now: datetime | pd.Timestamp) -> ReleaseDecision:
    """Abort as soon as the candidate has `min_requests` behind it and trails the champion (errors,
    realized metrics once both sides have `min_labelled` labels, else the estimates); promote once
    it also has `min_duration_s` behind it and matched or beat the champion; else wait."""
    cand, champ = comparison.candidate, comparison.champion
    reasons: list[str] = []
    rates = {role: counts.error_rate for role, counts in comparison.counts.items()}
    cand_rate = rates.get("shadow" if comparison.strategy == "shadow" else "candidate")
    champ_rate = rates.get("champion")
    if cand_rate is not None and cand_rate - (champ_rate or 0.0) > terms.max_error_rate_delta:
        reasons.append(f"candidate error rate {cand_rate:.3f} exceeds the champion's {champ_rate or 0.0:.3f} "
                       f"by more than {terms.max_error_rate_delta}")
    labelled = cand.labelled >= terms.min_labelled and champ.labelled >= terms.min_labelled
    evidence = "labels" if labelled else "estimate"
    source_c, source_h = (cand.realized, champ.realized) if labelled else (cand.estimated, champ.estimated)
    compared = []
    for name in DECIDING_METRICS:
        a, b = source_c.get(name, math.nan), source_h.get(name, math.nan)
        if a is None or b is None or math.isnan(a) or math.isnan(b):
            continue
        compared.append(f"{name} {a:.3f} vs {b:.3f}")
        if b - a > terms.max_metric_drop:
            reasons.append(f"candidate {'' if labelled else 'estimated '}{name} {a:.3f} trails the champion's "
                           f"{b:.3f} by more than {terms.max_metric_drop} ({cand.labelled} and {champ.labelled} "
                           f"labelled rows)")
    if not compared:
        evidence = "none"
    if cand.requests < terms.min_requests:
        return ReleaseDecision("wait", (f"{cand.requests} of {terms.min_requests} candidate requests so far",), evidence)
    if reasons:
        return ReleaseDecision("abort", tuple(reasons), evidence)
    elapsed = (pd.Timestamp(now) - pd.Timestamp(started_at)).total_seconds()
    if elapsed < terms.min_duration_s:
        return ReleaseDecision("wait", (f"{elapsed:.0f} of {terms.min_duration_s:.0f} s; "
                                        f"so far {', '.join(compared) or 'nothing comparable'}",), evidence)
    if not compared:
        return ReleaseDecision("wait", ("no metric comparable yet (no labels and no scores)",), evidence)
    return ReleaseDecision("promote", (f"matched or beat the champion over {cand.requests} requests and "
                                       f"{elapsed:.0f} s on {evidence}: {', '.join(compared)}",), evidence)


def parse_release_counters(text: str, prefix: str = "mlops_serving_", application: str | None = APP_NAME,
                           ) -> dict[str, tuple[int, int, dict[float, float]]]:
    """role -> (answered, failed, latency buckets) from the release metrics of the Serve `application`'s
    ingress (None: every application's; Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("ray_")
            role = sample.labels.get("role")
            if role is None or not mon.of_application(sample.labels, application):
                continue
            entry = out.setdefault(role, [0.0, 0.0, {}])
            if name == f"{prefix}release_answers_total":
                entry[1 if str(sample.labels.get("status", "")).startswith("5") else 0] += sample.value
            elif name == f"{prefix}release_latency_ms_bucket":
                le = float(sample.labels["le"])
                entry[2][le] = entry[2].get(le, 0.0) + sample.value
    return {role: (int(a), int(f), b) for role, (a, f, b) in out.items()}


def counts_since(now: Mapping[str, tuple[int, int, dict[float, float]]],
                 base: Mapping[str, tuple[int, int, dict[float, float]]]) -> dict[str, ServedCounts]:
    """Per-role answers, failures and the p95 bucket bound between two scrapes (a reset counts from zero)."""
    out = {}
    for role, (answered, failed, buckets) in now.items():
        b_answered, b_failed, b_buckets = base.get(role, (0, 0, {}))
        if answered < b_answered:
            b_answered, b_failed, b_buckets = 0, 0, {}
        delta = sorted((le, count - b_buckets.get(le, 0.0)) for le, count in buckets.items())
        total = max((count for _, count in delta), default=0.0)
        p95 = next((le for le, count in delta if count >= 0.95 * total), None) if total > 0 else None
        out[role] = ServedCounts(answered - b_answered, max(0, failed - b_failed),
                                 p95 if p95 is None or math.isfinite(p95) else math.inf)
    return out
