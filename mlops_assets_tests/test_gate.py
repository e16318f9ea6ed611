"""Unit tests of the promotion gate: floors, regression against the champion, reasons."""

import math

import pytest

from mlops_assets.evaluation.gate import GateCriteria, GateDecision, decide

GOOD = {"roc_auc": 0.97, "pr_auc": 0.96, "accuracy": 0.93, "f1": 0.92, "recall": 0.91, "log_loss": 0.2,
        "precision": 0.93, "brier": 0.05}


def test_a_good_candidate_without_champion_passes_with_a_reason_per_check():
    decision = decide(GOOD)
    assert decision.passed and not decision.failures
    assert len(decision.reasons) == len(GateCriteria().floors()) + 1
    assert any("no champion" in r for r in decision.reasons)
    assert not decision.compared_to_champion


@pytest.mark.parametrize("metric, value", [("roc_auc", 0.85), ("accuracy", 0.80), ("f1", 0.5),
                                           ("recall", 0.6), ("log_loss", 0.7)])
def test_each_floor_fails_alone_and_names_its_metric(metric, value):
    decision = decide({**GOOD, metric: value})
    assert not decision.passed
    assert len(decision.failures) == 1 and metric in decision.failures[0]
    assert decision.reasons[0] == decision.failures[0]  # failures come first


def test_missing_or_nan_metrics_fail():
    assert not decide({**GOOD, "roc_auc": math.nan}).passed
    without = dict(GOOD)
    del without["f1"]
    assert not decide(without).passed


def test_regression_against_the_champion_beyond_tolerance_fails():
    champion = {**GOOD, "roc_auc": 0.99}
    decision = decide(GOOD, champion, GateCriteria(max_regression=0.01), champion_version="4")
    assert not decision.passed
    assert decision.compared_to_champion and decision.champion_version == "4"
    assert any("roc_auc" in f and "v4" in f for f in decision.failures)


def test_regression_within_tolerance_passes_and_lower_is_better_metrics_compare_the_other_way():
    champion = {**GOOD, "roc_auc": 0.975, "log_loss": 0.195}
    assert decide(GOOD, champion, GateCriteria(max_regression=0.01)).passed
    worse_loss = decide({**GOOD, "log_loss": 0.25}, {**GOOD, "log_loss": 0.2}, GateCriteria(max_regression=0.01))
    assert not worse_loss.passed and "log_loss" in worse_loss.failures[0]
    better_loss = decide({**GOOD, "log_loss": 0.1}, {**GOOD, "log_loss": 0.2}, GateCriteria(max_regression=0.0))
    assert better_loss.passed


def test_a_metric_the_champion_lacks_is_not_compared():
    decision = decide(GOOD, {**GOOD, "pr_auc": math.nan})
    assert decision.passed
    assert any("pr_auc not defined for the champion" in r for r in decision.reasons)


def test_decision_round_trips_through_a_dict():
    decision = decide(GOOD, {**GOOD, "roc_auc": 0.999}, champion_version="2")
    again = GateDecision.from_dict(decision.as_dict())
    assert again.passed == decision.passed and again.reasons == decision.reasons
    assert again.failures == decision.failures and again.champion_version == "2"
    assert decision.as_dict()["failures"] == decision.failures and decision.failures  # stored for readers


@pytest.mark.parametrize("bad", [{"min_roc_auc": 1.5}, {"max_regression": -0.1}, {"max_log_loss": 0}])
def test_bad_criteria_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GateCriteria(**bad)
