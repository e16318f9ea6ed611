"""Label-free performance estimation: the calibrator, the expected confusion matrix, the expected
ROC-AUC, and the estimate against the realized accuracy on drifted simulated traffic."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.features.cleaning import clean_features, split_train_test
from mlops_assets.monitoring import estimation as est
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets.training import train as tr


def test_expected_metrics_equal_the_realized_ones_when_the_scores_are_certain() -> None:
    scores = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    predicted = np.array([False, True, True, True, False])  # one false positive, one false negative
    got = est.estimate_performance(scores, predicted)
    assert got["accuracy"] == pytest.approx(3 / 5) and got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 3) and got["f1"] == pytest.approx(2 / 3)
    assert got["roc_auc"] == pytest.approx(1.0) and got["n_estimated"] == 5


def test_expected_roc_auc_is_the_auc_averaged_over_labels_drawn_from_the_probabilities() -> None:
    rng = np.random.default_rng(3)
    q = rng.uniform(0, 1, 40)
    scores = np.round(q + rng.normal(0, 0.2, 40), 1)  # ties on purpose
    labels = rng.uniform(size=(20000, 40)) < q
    labels = labels[(labels.sum(axis=1) > 0) & (labels.sum(axis=1) < 40)]
    # Each draw's AUC by Mann-Whitney on tie-averaged ranks, all draws at once (roc_auc_score one
    # draw at a time took a minute); the identity is checked against roc_auc_score on some draws.
    ranks, positives = rankdata(scores), labels.sum(axis=1)
    draws = (labels @ ranks - positives * (positives + 1) / 2) / (positives * (40 - positives))
    assert draws[:200] == pytest.approx([roc_auc_score(y, scores) for y in labels[:200]], abs=1e-12)
    assert est.expected_roc_auc(scores, q) == pytest.approx(np.mean(draws), abs=0.005)


def test_a_calibrator_round_trips_through_json_and_maps_monotonically() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(size=3000)
    y = (rng.uniform(size=3000) < p ** 2).astype(int)  # over-confident scores
    for method in ("isotonic", "platt"):
        cal = est.fit_calibrator(p, y, method)
        again = est.Calibrator.from_json(cal.to_json())
        grid = np.linspace(0, 1, 11)
        assert np.allclose(cal.apply(grid), again.apply(grid))
        assert np.all(np.diff(again.apply(grid)) >= -1e-12) and abs(again.apply([0.5])[0] - 0.25) < 0.08
    assert est.fit_calibrator(p[:500], y[:500]).method == "platt"  # few rows: two parameters only
    assert est.fit_calibrator(p, y).method == "isotonic"


def test_bad_calibration_input_is_named() -> None:
    with pytest.raises(est.EstimationError, match="3 scores but 2 labels"):
        est.fit_calibrator([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(est.EstimationError, match="not one of"):
        est.Calibrator("magic")
    with pytest.raises(est.EstimationError, match="unreadable calibrator"):
        est.Calibrator.from_dict({"x": []})
    assert math.isnan(est.estimate_performance([], [])["accuracy"])


def test_an_estimated_drop_is_judged_only_with_enough_rows() -> None:
    offline = {"accuracy": 0.95, "f1": 0.94, "roc_auc": 0.98}
    few = est.estimated_degradation({"n_estimated": 10, "accuracy": 0.5}, offline, tolerance=0.05)
    assert not few.judged and not few.degraded
    bad = est.estimated_degradation({"n_estimated": 500, "accuracy": 0.85, "f1": 0.9, "roc_auc": 0.97}, offline,
                                    tolerance=0.05)
    assert bad.degraded and "estimated accuracy 0.850" in bad.reasons[0]


def covariate_shifted(pool: pd.DataFrame, spec: DatasetSpec, strength: float, n: int, seed: int,
                      hard: np.ndarray | None = None) -> pd.DataFrame:
    """Traffic whose mix of feature vectors moved but whose meaning did not: rows of `pool` drawn with
    weights that depend on the features only (exp(strength) per ternary feature at its middle value 0;
    with `hard`, a per-row hardness computed from the features, exp(strength * hard)), so
    P(label | features) is the pool's (the assumption of the estimate)."""
    ternary = [f.name for f in spec.features if 0 in f.values]
    weight = np.exp(strength * (hard if hard is not None else (pool[ternary] == 0).sum(axis=1).to_numpy(dtype=float)))
    rows = np.random.default_rng(seed).choice(len(pool), size=n, replace=False, p=weight / weight.sum())
    return pool.iloc[rows].reset_index(drop=True)


@pytest.fixture(scope="module")
def calibrated_model(spec: DatasetSpec) -> tr.TrainingResult:
    """The training path's model and calibrator on 6,000 simulated rows (cleaned and split as the pipeline does)."""
    raw = simulate_records(spec, SimulationConfig(n_rows=6000, seed=42))
    features, _ = clean_features(raw, spec)
    split = split_train_test(features, spec.feature_names, 0.2, 20240611)
    train = split[split["split"] == "train"]
    return tr.train_model(train, spec.feature_names, tr.TrainingParams(iterations=200, thread_count=1))


def test_the_estimated_accuracy_of_each_drifted_window_is_within_3_points_of_the_realized(
        spec: DatasetSpec, calibrated_model: tr.TrainingResult) -> None:
    model, calibrator = calibrated_model.model, calibrated_model.calibrator
    assert calibrator is not None and calibrator.method == "platt" and calibrator.rows > 300
    pool = simulate_records(spec, SimulationConfig(n_rows=40000, seed=5))
    # Hardness of a row from its features alone: how close the model's score is to the threshold.
    hard = -np.abs(tr.predict_positive(model, pool[spec.feature_names]) - 0.5) * 10
    windows = [(0.0, 1, None), (0.0, 2, None), (1.0, 3, None), (2.0, 4, None), (3.0, 5, None),
               (0.25, 6, hard), (0.5, 7, hard)]
    figures = [_window_figures(spec, model, calibrator, covariate_shifted(pool, spec, s, 2000, seed, toward), s)
               for s, seed, toward in windows]
    beyond = [_window_figures(spec, model, calibrator, covariate_shifted(pool, spec, s, 2000, seed, hard), s)
              for s, seed in ((0.75, 8), (1.0, 9))]
    # The simulator's own drift moves each feature's shares *given the label*: P(label | features)
    # changes, which no label-free estimate can see (reported, not asserted: the labels catch it).
    concept = [_window_figures(spec, model, calibrator, simulate_records(
        spec, SimulationConfig(n_rows=2000, seed=seed, drift={"SSLfinal_State": amount})), amount)
        for amount, seed in ((0.1, 10), (0.3, 11))]
    print("\nshift positive_share estimated_accuracy realized_accuracy estimated_auc realized_auc")
    for title, rows in (("covariate shift (asserted)", figures), ("toward the hardest rows", beyond),
                        ("simulator drift, P(label|x) moved", concept)):
        print(title)
        for row in rows:
            print("  ".join(f"{v:.4f}" for v in row))
    assert max(abs(f[2] - f[3]) for f in figures) <= 0.03
    assert max(f[1] for f in figures) - min(f[1] for f in figures) > 0.15  # the traffic did drift
    assert min(f[3] for f in figures) < 0.9  # and toward rows the model gets wrong more often


def _window_figures(spec: DatasetSpec, model: object, calibrator: est.Calibrator, window: pd.DataFrame,
                    shift: float) -> tuple[float, ...]:
    p = tr.predict_positive(model, window[spec.feature_names])  # type: ignore[arg-type]
    predicted = p >= tr.DECISION_THRESHOLD
    truth = (window[spec.label] == spec.positive_class).to_numpy()
    got = est.estimate_performance(p, predicted, calibrator)
    return (float(shift), float(truth.mean()), got["accuracy"], float((predicted == truth).mean()),
            got["roc_auc"], float(roc_auc_score(truth, p)))


def test_online_performance_puts_the_estimate_beside_the_realized_metrics(tmp_path, spec: DatasetSpec) -> None:
    from mlops_assets.defs.monitoring.assets import (
        OnlinePerformanceConfig,
        ServingModel,
        _performance_of_hour,
    )
    from mlops_assets.settings import load_settings

    rng = np.random.default_rng(4)
    n = 400
    p = rng.uniform(size=n)
    truth = np.where(rng.uniform(size=n) < p, spec.positive_class, spec.negative_class)
    start = pd.Timestamp("2026-03-01T10:00:00Z")
    log = pd.DataFrame({"timestamp": start + pd.to_timedelta(np.arange(n), unit="s"),
                        "request_id": [f"r{i}" for i in range(n)], "record_index": 0, "model_version": "3",
                        "label": np.where(p >= 0.5, spec.positive_class, spec.negative_class),
                        "phishing_probability": p, "shadow": False})
    labels = pd.DataFrame({"request_id": log["request_id"], "record_index": 0, "label": truth,
                           "labelled_at": "2026-03-01T12:00:00Z"})
    model = ServingModel("m", "3", "endpoint", "run", {"metric.test_accuracy": "0.95", "metric.test_f1": "0.95",
                                                       "metric.test_roc_auc": "0.99"})
    settings = load_settings({"MLOPS_DATA_URL": str(tmp_path)})
    meta, check = _performance_of_hour(OnlinePerformanceConfig(), settings, spec, model, log, labels.iloc[:0], start)
    assert meta["n_matched"] == 0 and "live_accuracy" not in meta  # no labels yet: the estimate only
    assert meta["estimated_accuracy"].value == pytest.approx(0.75, abs=0.03)  # E[max(p, 1 - p)] of uniform p
    assert meta["estimated_degraded"] is True and meta["estimated_event_key"] == "estimated-degraded-3"
    later, _ = _performance_of_hour(OnlinePerformanceConfig(), settings, spec, model, log, labels, start)
    assert later["estimated_degraded"] is False  # with labels, the realized verdict decides
    assert abs(later["estimate_error_accuracy"].value) < 0.05 and later["degraded"] is True


def test_the_degradation_sensor_retrains_on_an_estimated_degradation_before_labels_come() -> None:
    import dagster as dg

    from mlops_assets.defs.monitoring.sensors import degradation_retraining_sensor
    from mlops_assets.defs.resources import MonitoringResource, PlatformResource

    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key="online_performance", partition="2026-01-05-11:00",
            metadata={"degraded": False, "event_key": "none", "estimated_degraded": True,
                      "estimated_event_key": "estimated-degraded-4"}))
        # Nothing trained yet: the training path is stale, so the event gets its run.
        context = dg.build_sensor_context(instance=instance, resources={"monitoring": MonitoringResource.at("memory://x"),
                                                                        "platform": PlatformResource.at("memory://x")})
        result = degradation_retraining_sensor(context)
        assert isinstance(result, dg.SensorResult)
        assert [(r.run_key, r.tags["mlops_assets/trigger"]) for r in result.run_requests or []] == [
            ("estimated-degraded-4", "degradation")]


def test_the_post_deploy_watch_signals_an_estimated_accuracy_drop_of_the_new_version(tmp_path, spec: DatasetSpec) -> None:
    from mlops_assets.defs.monitoring.sensors import _estimated_accuracy_signal
    from mlops_assets.defs.resources import MlflowResource
    from mlops_assets_tests.registry_support import register_simulated_versions

    tracking_uri, client, _ = register_simulated_versions(tmp_path, spec, model_name="m", experiment="e",
                                                          seeds_and_iterations=[(1, 5)], n_rows=300)
    client.set_model_version_tag("m", "1", "metric.test_accuracy", "0.95")
    mlflow = MlflowResource(tracking_uri=tracking_uri, model_name="m")
    n = 300
    sure = pd.DataFrame({"phishing_probability": np.r_[np.full(n // 2, 0.99), np.full(n // 2, 0.01)],
                         "label": [spec.positive_class] * (n // 2) + [spec.negative_class] * (n // 2)})
    assert _estimated_accuracy_signal(mlflow, "1", sure, spec.positive_class, 100)["reason"] is None
    unsure = sure.assign(phishing_probability=np.r_[np.full(n // 2, 0.6), np.full(n // 2, 0.4)])
    signal = _estimated_accuracy_signal(mlflow, "1", unsure, spec.positive_class, 100)
    assert signal["estimated_accuracy"] == pytest.approx(0.6) and "no labels needed" in signal["reason"]
    assert _estimated_accuracy_signal(mlflow, "1", unsure.head(50), spec.positive_class, 100)["reason"] is None
