"""The promotion gate: absolute floors on hold-out metrics, and no regression against the champion.

A candidate passes only when every check passes. A metric that is missing or NaN fails its
check (an undefined ROC-AUC is not a good ROC-AUC). Against the champion, each compared
metric may be worse by at most `max_regression` (absolute); lower-is-better metrics (log
loss, Brier) are compared the other way round. Both models are scored on the same test rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mlops_assets.evaluation.metrics import LOWER_IS_BETTER


@dataclass(frozen=True)
class GateCriteria:
    """Defaults suit the phishing data (simulated: ROC-AUC about 0.97, accuracy about 0.94)."""

    min_roc_auc: float = 0.90
    min_accuracy: float = 0.85
    min_f1: float = 0.80
    min_recall: float = 0.75  # of the positive class (phishing): missed phishing is the costly error
    max_log_loss: float = 0.45
    max_regression: float = 0.01
    compared_metrics: tuple[str, ...] = ("roc_auc", "pr_auc", "accuracy", "f1", "log_loss")

    def __post_init__(self) -> None:
        for name in ("min_roc_auc", "min_accuracy", "min_f1", "min_recall"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.max_log_loss <= 0:
            raise ValueError(f"max_log_loss must be positive, got {self.max_log_loss}")
        if self.max_regression < 0:
            raise ValueError(f"max_regression must be at least 0, got {self.max_regression}")

    def floors(self) -> dict[str, tuple[str, float]]:
        """metric -> (">=" or "<=", bound)."""
        return {
            "roc_auc": (">=", self.min_roc_auc),
            "accuracy": (">=", self.min_accuracy),
            "f1": (">=", self.min_f1),
            "recall": (">=", self.min_recall),
            "log_loss": ("<=", self.max_log_loss),
        }

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compared_metrics": list(self.compared_metrics)}


@dataclass(frozen=True)
class GateCheck:
    metric: str
    kind: str  # "absolute" or "vs_champion"
    value: float
    bound: float
    op: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str]  # one line per check, failures first
    checks: list[GateCheck] = field(default_factory=list)
    compared_to_champion: bool = False
    champion_version: str | None = None

    @property
    def failures(self) -> list[str]:
        return [c.reason for c in self.checks if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            "failures": self.failures,  # derived from checks; kept for readers of the stored dict
            "checks": [asdict(c) for c in self.checks],
            "compared_to_champion": self.compared_to_champion,
            "champion_version": self.champion_version,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> GateDecision:
        return cls(
            passed=bool(raw["passed"]),
            reasons=list(raw.get("reasons", [])),
            checks=[GateCheck(**c) for c in raw.get("checks", [])],
            compared_to_champion=bool(raw.get("compared_to_champion", False)),
            champion_version=raw.get("champion_version"),
        )


def _ok(value: float, op: str, bound: float) -> bool:
    if value is None or math.isnan(value):
        return False
    return value >= bound if op == ">=" else value <= bound


def decide(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None = None,
    criteria: GateCriteria | None = None,
    champion_version: str | None = None,
) -> GateDecision:
    """Apply the criteria; every check yields a reason line, whether it passed or not."""
    criteria = criteria or GateCriteria()
    checks: list[GateCheck] = []
    for metric, (op, bound) in criteria.floors().items():
        value = float(candidate.get(metric, math.nan))
        ok = _ok(value, op, bound)
        checks.append(GateCheck(metric, "absolute", value, bound, op, ok,
                                f"{'ok' if ok else 'FAIL'}: {metric} {value:.4f} {op} {bound:.4f} (absolute)"))
    if champion is not None:
        for metric in criteria.compared_metrics:
            theirs = float(champion.get(metric, math.nan))
            value = float(candidate.get(metric, math.nan))
            if math.isnan(theirs):
                checks.append(GateCheck(metric, "vs_champion", value, theirs, "n/a", True,
                                        f"ok: {metric} not defined for the champion; not compared"))
                continue
            lower = metric in LOWER_IS_BETTER
            op, bound = ("<=", theirs + criteria.max_regression) if lower else (">=", theirs - criteria.max_regression)
            ok = _ok(value, op, bound)
            who = f"champion v{champion_version}" if champion_version else "champion"
            checks.append(GateCheck(
                metric, "vs_champion", value, bound, op, ok,
                f"{'ok' if ok else 'FAIL'}: {metric} {value:.4f} vs {who} {theirs:.4f} "
                f"({op} {bound:.4f}, tolerance {criteria.max_regression})",
            ))
    else:
        checks.append(GateCheck("champion", "vs_champion", math.nan, math.nan, "n/a", True,
                                "ok: no champion yet; absolute thresholds only"))
    passed = all(ch.passed for ch in checks)
    ordered = [ch.reason for ch in checks if not ch.passed] + [ch.reason for ch in checks if ch.passed]
    return GateDecision(passed=passed, reasons=ordered, checks=checks,
                        compared_to_champion=champion is not None, champion_version=champion_version)
