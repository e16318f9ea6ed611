"""Monitoring rules on tiny hand-made logs: reading, windows, freshness, labels, metrics, watch, cooldown."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlops_assets.monitoring import live as m

T0 = datetime(2024, 6, 11, 10, 0, tzinfo=UTC)
PHISHING, LEGIT = -1, 1  # the default spec's positive and negative class


def _log(*stamps: str, version: str = "3") -> pd.DataFrame:
    return pd.DataFrame({
        m.TIMESTAMP: pd.to_datetime(list(stamps), utc=True),
        m.REQUEST_ID: [f"r{i}" for i in range(len(stamps))],
        m.MODEL_VERSION: version,
        m.RECORD_INDEX: 0,
        "URL_Length": 1,
        m.PREDICTED_LABEL: LEGIT,
        m.PROBABILITY: 0.1,
    })


# ---------------------------------------------------------------------------------------------
# Reading the prediction log


def test_read_prediction_log_reads_parquet_and_jsonl_and_skips_junk(tmp_path: Path) -> None:
    root = tmp_path / "predictions"
    day = root / "date=2024-06-11"
    day.mkdir(parents=True)
    # The serving writer's names (logged_at, probability), two records of one request.
    pd.DataFrame({
        "logged_at": [pd.Timestamp("2024-06-11T10:30:00Z")] * 2, "request_id": ["a", "a"],
        "model_version": ["3", "3"], "record_index": [0, 1], "URL_Length": [1, -1],
        "label": [1, -1], "probability": [0.2, 0.9],
    }).to_parquet(day / "part-1.parquet", index=False)
    # The brief's names in JSONL, naive ISO timestamps (taken as UTC), no record_index.
    (root / "extra.jsonl").write_text(
        '{"timestamp": "2024-06-11T09:15:00", "request_id": "b", "model_version": 3, "URL_Length": 0,'
        ' "label": 1, "phishing_probability": 0.3}\n'
    )
    (day / ".part-2.parquet").write_bytes(b"half written")  # hidden: being written
    (day / "part-3.parquet.tmp").write_bytes(b"half written")
    (day / "part-4.parquet").write_bytes(b"corrupt")

    read = m.read_prediction_log_files(str(root))
    log = read.frame

    assert [p.rsplit("/", 1)[-1] for p in read.files] == ["part-1.parquet", "extra.jsonl"]
    assert len(read.skipped) == 1 and read.skipped[0][0].endswith("part-4.parquet")
    assert list(log[m.REQUEST_ID]) == ["b", "a", "a"]  # oldest first
    assert str(log[m.TIMESTAMP].dt.tz) == "UTC"
    assert log[m.TIMESTAMP].iloc[0] == pd.Timestamp("2024-06-11T09:15:00Z")
    assert list(log[m.RECORD_INDEX]) == [0, 0, 1]
    assert list(log[m.PROBABILITY]) == [0.3, 0.2, 0.9]
    assert log[m.MODEL_VERSION].tolist() == ["3", "3", "3"]  # JSON's number became the string id
    pd.testing.assert_frame_equal(m.read_prediction_log(str(root)), log)


def test_read_prediction_log_of_nothing_is_empty(tmp_path: Path) -> None:
    assert m.read_prediction_log(str(tmp_path / "absent")).empty
    (tmp_path / "empty").mkdir()
    log = m.read_prediction_log(str(tmp_path / "empty"))
    assert log.empty and m.TIMESTAMP in log
    assert m.split_windows(log) == []


def test_rows_without_a_readable_timestamp_are_dropped() -> None:
    raw = pd.DataFrame({"timestamp": ["2024-06-11T10:00:00Z", "not a time"], "request_id": ["a", "b"]})
    assert list(m.normalize_prediction_log(raw)[m.REQUEST_ID]) == ["a"]
    with pytest.raises(m.MonitoringError, match="timestamp"):
        m.normalize_prediction_log(pd.DataFrame({"request_id": ["a"]}))


def _ship(root: Path, name: str, *stamps: str) -> None:
    """Rows at these times, written as the serving writer ships a segment."""
    from mlops_assets.serving.prediction_log import prediction_rows, write_part

    rows = [row for i, at in enumerate(stamps) for row in prediction_rows(
        request_id=f"{name}-{i}", model_version="3", records=[{"URL_Length": 1}], labels=[LEGIT],
        probabilities=[0.1], logged_at=pd.Timestamp(at).to_pydatetime())]
    write_part(rows, str(root), f"part-{name}.parquet")


def test_a_window_reads_only_its_hour_folders_and_the_older_layouts(tmp_path: Path) -> None:
    root = tmp_path / "predictions"
    _ship(root, "a", "2024-06-11T09:59:00Z", "2024-06-11T10:01:00Z")  # spans 10:00: two parts of one name
    _ship(root, "b", "2024-06-11T11:30:00Z")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet")) == [
        "date=2024-06-11/hour=09/part-a.parquet", "date=2024-06-11/hour=10/part-a.parquet",
        "date=2024-06-11/hour=11/part-b.parquet"]
    # Parts of the day-only layout (the day of their first row) and a flat file still count.
    legacy = root / "date=2024-06-10"
    legacy.mkdir()
    _log("2024-06-10T23:59:00Z", "2024-06-11T10:30:00Z").to_parquet(legacy / "part-old.parquet", index=False)
    (root / "date=2024-06-11" / "hour=10" / "part-bad.parquet").write_bytes(b"corrupt")

    read = m.read_window(str(root), pd.Timestamp("2024-06-11T10:00Z"), pd.Timestamp("2024-06-11T11:00Z"))
    assert read.frame[m.TIMESTAMP].dt.strftime("%H:%M").tolist() == ["10:01", "10:30"]
    assert len(read.skipped) == 1
    hourly, old = m.list_log_parts(str(root), pd.Timestamp("2024-06-11T10:00Z"), pd.Timestamp("2024-06-11T11:00Z"))
    assert [p.rsplit("/", 2)[-2] for p in hourly] == ["hour=10", "hour=10"]  # never hour 09 or 11
    assert [p.rsplit("/", 1)[-1] for p in old] == ["part-old.parquet"]
    assert m.read_window(str(root), pd.Timestamp("2024-06-12T10:00Z"), pd.Timestamp("2024-06-12T11:00Z")).frame.empty
    assert m.newest_record(str(root)) == pd.Timestamp("2024-06-11T11:30:00Z")
    assert m.newest_record(str(tmp_path / "absent")) is None


def _hours_on_disk(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.glob("date=*/hour=*"))


def test_retention_deletes_old_hours_and_never_the_current_one(tmp_path: Path) -> None:
    root = tmp_path / "predictions"
    for day in ("01", "08", "09"):
        _ship(root, f"x{day}", f"2024-06-{day}T10:15:00Z")
    _ship(root, "now", "2024-06-10T12:05:00Z")
    now = pd.Timestamp("2024-06-10T12:30:00Z")

    done = m.apply_retention(str(root), 3, now, action="delete")
    assert done.hours == ("date=2024-06-01/hour=10",) and done.parts_removed == 1
    assert _hours_on_disk(root) == ["date=2024-06-08/hour=10", "date=2024-06-09/hour=10", "date=2024-06-10/hour=12"]
    assert not (root / "date=2024-06-01").exists()
    # However short the retention, the hour being written stays.
    m.apply_retention(str(root), 0.001, now, action="delete")
    assert _hours_on_disk(root) == ["date=2024-06-10/hour=12"]
    assert m.apply_retention(str(root), None, now).cutoff is None
    with pytest.raises(m.MonitoringError):
        m.apply_retention(str(root), 0, now)
    with pytest.raises(m.MonitoringError):
        m.apply_retention(str(root), 3, now, action="shred")


def test_retention_compacts_old_hours_into_one_part_with_the_same_rows(tmp_path: Path) -> None:
    root = tmp_path / "predictions"
    _ship(root, "a", "2024-06-01T10:15:00Z", "2024-06-01T10:20:00Z")
    _ship(root, "b", "2024-06-01T10:10:00Z")
    _ship(root, "c", "2024-06-10T12:05:00Z")
    before = m.read_prediction_log(str(root))
    now = pd.Timestamp("2024-06-10T12:30:00Z")

    done = m.apply_retention(str(root), 3, now, action="compact")
    assert done.hours == ("date=2024-06-01/hour=10",) and done.parts_removed == 2
    assert [p.name for p in (root / "date=2024-06-01" / "hour=10").iterdir()] == [m.COMPACTED_PART]
    assert (root / "date=2024-06-01" / m.COMPACTED_DAY_MARKER).exists()  # the day is not listed again
    pd.testing.assert_frame_equal(m.read_prediction_log(str(root)), before)
    assert len(list((root / "date=2024-06-10" / "hour=12").iterdir())) == 1
    assert m.apply_retention(str(root), 3, now, action="compact").hours == ()


# ---------------------------------------------------------------------------------------------
# Windows and freshness


def test_split_windows_epoch_aligned_and_skips_empty_hours() -> None:
    log = _log("2024-06-11T10:59:59Z", "2024-06-11T10:05:00Z", "2024-06-11T11:00:00Z", "2024-06-11T13:30:00Z")
    windows = m.split_windows(log, "1h")

    assert [(w.key, w.rows) for w, _ in windows] == [
        ("2024-06-11T10:00:00Z", 2), ("2024-06-11T11:00:00Z", 1), ("2024-06-11T13:00:00Z", 1)]
    first, rows = windows[0]
    assert first.end - first.start == pd.Timedelta("1h")
    assert first.newest == pd.Timestamp("2024-06-11T10:59:59Z")
    assert sorted(rows[m.REQUEST_ID]) == ["r0", "r1"]
    now = T0 + timedelta(hours=3, minutes=45)
    assert [w.complete(now) for w, _ in windows] == [True, True, False]
    assert [w.key for w, _ in m.split_windows(log, "15min")] == [
        "2024-06-11T10:00:00Z", "2024-06-11T10:45:00Z", "2024-06-11T11:00:00Z", "2024-06-11T13:30:00Z"]


@pytest.mark.parametrize("bad", ["soon", "-1h", "0s"])
def test_bad_windows_are_refused(bad: str) -> None:
    with pytest.raises(m.MonitoringError, match="window"):
        m.split_windows(_log("2024-06-11T10:00:00Z"), bad)


def test_freshness_fresh_stale_and_empty() -> None:
    fresh = m.freshness(T0, T0 + timedelta(hours=2), "3h")
    assert fresh.fresh and fresh.age_seconds == 7200 and fresh.max_age_seconds == 3 * 3600
    stale = m.freshness(T0, T0 + timedelta(hours=3, seconds=1), "3h")
    assert not stale.fresh and "10801s old" in stale.reason
    assert not m.freshness(None, T0).fresh
    assert m.freshness(datetime(2024, 6, 11, 10, 0), T0 + timedelta(minutes=1), timedelta(minutes=2)).fresh  # naive = UTC


def test_window_freshness_goes_by_the_newest_record_not_the_window_end() -> None:
    windows = [w for w, _ in m.split_windows(_log("2024-06-11T08:10:00Z", "2024-06-11T10:01:00Z"), "1h")]
    now = T0 + timedelta(hours=1, minutes=30)  # 11:30: the 10:00 window's end is only 30 min ago
    assert not m.window_freshness(windows, now, "1h").fresh  # but its newest record is 89 min old
    assert m.window_freshness(windows, now, "2h").fresh
    assert not m.window_freshness([], now, "2h").fresh


# ---------------------------------------------------------------------------------------------
# Delayed labels and live metrics


def test_label_join_counts_matched_unknown_duplicate_conflicting_invalid() -> None:
    log = _log(*["2024-06-11T10:00:00Z"] * 4)  # r0..r3
    log = pd.concat([log, log.iloc[[0]]], ignore_index=True)  # r0 logged twice (a retried flush)
    labels = pd.DataFrame({
        "request_id": ["r0", "r1", "r1", "r2", "r2", "zz", "r3"],
        "label": [-1, 1, 1, 1, -1, 1, 7],
        "labelled_at": ["2024-06-12T00:00:00Z", "2024-06-12T00:00:00Z", "2024-06-12T01:00:00Z",
                        "2024-06-12T02:00:00Z", "2024-06-12T01:00:00Z", "2024-06-12T00:00:00Z",
                        "2024-06-12T00:00:00Z"],
    })
    join = m.join_labels(log, labels, label_values={-1, 1})

    assert join.metadata() == {"n_predictions": 4, "n_labels": 7, "n_matched": 3, "n_unknown": 1,
                               "n_duplicates": 2, "n_conflicting": 1, "n_invalid": 1}
    assert join.unknown_ids == ("zz",)
    truth = dict(zip(join.joined[m.REQUEST_ID], join.joined[m.TRUE_LABEL], strict=True))
    assert truth == {"r0": -1, "r1": 1, "r2": 1}  # r2: the later label (02:00) wins
    assert m.PREDICTED_LABEL in join.joined  # the prediction stays next to the truth


def test_label_join_uses_record_index_for_multi_record_requests() -> None:
    log = _log("2024-06-11T10:00:00Z", "2024-06-11T10:00:00Z")
    log[m.REQUEST_ID] = "req"
    log[m.RECORD_INDEX] = [0, 1]
    labels = pd.DataFrame({"request_id": ["req"], "record_index": [1], "label": [-1], "labelled_at": ["2024-06-12"]})
    join = m.join_labels(log, labels)
    assert join.n_matched == 1 and join.joined[m.RECORD_INDEX].tolist() == [1]
    empty = m.join_labels(log, labels.iloc[:0])
    assert empty.n_matched == 0 and empty.joined.empty and m.TRUE_LABEL in empty.joined


def test_read_labels_from_csv_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.csv").write_text(
        "request_id,label,labelled_at\nr0,-1,2024-06-12T00:00:00Z\n1e5,1,2024-06-12T00:00:00Z\n")
    pd.DataFrame({"request_id": ["r1"], "label": [1], "labelled_at": ["2024-06-12T00:00:00Z"]}).to_parquet(
        tmp_path / "labels" / "b.parquet", index=False)
    read = m.read_labels(str(tmp_path / "labels"))
    assert sorted(read.frame["request_id"]) == ["1e5", "r0", "r1"] and len(read.files) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "c.csv").write_text("id,truth\nr0,1\n")
    with pytest.raises(m.MonitoringError, match="request_id"):
        m.read_labels(str(tmp_path / "bad"))


def _labelled() -> pd.DataFrame:
    # true, predicted, P(phishing): TP TP FN FP TN TN with phishing (-1) the positive class.
    return pd.DataFrame({
        m.TRUE_LABEL: [PHISHING, PHISHING, PHISHING, LEGIT, LEGIT, LEGIT],
        m.PREDICTED_LABEL: [PHISHING, PHISHING, LEGIT, PHISHING, LEGIT, LEGIT],
        m.PROBABILITY: [0.9, 0.8, 0.4, 0.6, 0.2, 0.1],
    })


def test_online_metrics_by_hand() -> None:
    got = m.online_metrics(_labelled(), positive_class=PHISHING)
    assert got["n_labelled"] == 6
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["precision"] == pytest.approx(2 / 3)  # TP / (TP + FP) = 2 / 3
    assert got["recall"] == pytest.approx(2 / 3)  # TP / (TP + FN) = 2 / 3
    assert got["f1"] == pytest.approx(2 / 3)
    assert got["roc_auc"] == pytest.approx(8 / 9)  # 8 of 9 (phishing, legit) pairs ranked right
    assert got["positive_share_true"] == pytest.approx(0.5)


def test_online_metrics_one_class_and_nothing() -> None:
    one_class = m.online_metrics(_labelled().iloc[:3], positive_class=PHISHING)
    assert math.isnan(one_class["roc_auc"]) and one_class["recall"] == pytest.approx(2 / 3)
    nothing = m.online_metrics(_labelled().iloc[:0], positive_class=PHISHING)
    assert nothing["n_labelled"] == 0 and math.isnan(nothing["f1"])


def test_degradation_rule() -> None:
    offline = {"f1": 0.90, "roc_auc": 0.95, "accuracy": 0.91}
    rule = m.DegradationRule(tolerance=0.05, min_labelled=200)

    ok = m.degradation({"n_labelled": 500, "f1": 0.86, "roc_auc": 0.94, "accuracy": 0.90}, offline, rule)
    assert ok.judged and not ok.degraded and ok.deltas["f1"] == pytest.approx(-0.04)

    bad = m.degradation({"n_labelled": 500, "f1": 0.80, "roc_auc": math.nan, "accuracy": 0.90}, offline, rule)
    assert bad.degraded and len(bad.reasons) == 1 and bad.reasons[0].startswith("f1 0.800")
    assert "roc_auc" not in bad.deltas  # one class among the labels: not compared

    few = m.degradation({"n_labelled": 50, "f1": 0.10}, offline, rule)
    assert not few.degraded and not few.judged and "50 labelled" in few.reasons[0]


# ---------------------------------------------------------------------------------------------
# After a deployment


LIMITS = m.WatchLimits(window="30min", max_error_rate=0.05, max_latency_p95_s=0.5,
                       max_positive_share_delta=0.15, max_probability_ks=0.2, min_requests=50,
                       max_flip_share=0.15, max_mean_abs_delta=0.15, min_compared_rows=100)


def _watch(obs: m.WatchObservation, minutes: float) -> m.WatchDecision:
    return m.watch_decision(obs, deployed_at=T0, now=T0 + timedelta(minutes=minutes), limits=LIMITS)


def test_watch_keeps_a_healthy_deployment() -> None:
    healthy = m.WatchObservation(requests=400, errors=2, latency_p95_s=0.08, positive_share_delta=0.03,
                                 probability_ks=0.05, compared_rows=400, flip_share=0.01, mean_abs_delta=0.01)
    assert _watch(healthy, 10).verdict == "watching"
    assert _watch(healthy, 31).verdict == "passed"
    assert _watch(healthy, 31).reasons == ("within limits for the whole window",)


@pytest.mark.parametrize(("obs", "why"), [
    (m.WatchObservation(requests=400, errors=40), "error rate 0.100"),
    (m.WatchObservation(requests=400, errors=0, latency_p95_s=1.2), "latency p95"),
    (m.WatchObservation(requests=400, errors=0, compared_rows=400, flip_share=0.3), "0.300 of answers differ"),
    (m.WatchObservation(requests=400, errors=0, compared_rows=400, mean_abs_delta=0.4), "differ by 0.400"),
    (m.WatchObservation(requests=400, errors=0, compared_rows=400, positive_share_delta=-0.3),
     "share predicted positive"),
    (m.WatchObservation(requests=400, errors=0, compared_rows=400, probability_ks=0.35), "KS 0.350"),
    (m.WatchObservation(requests=10, errors=3), "3 errors in 10 requests"),  # 3 > 5% of 50 already
])
def test_watch_rolls_back_beyond_limits(obs: m.WatchObservation, why: str) -> None:
    decision = _watch(obs, 5)
    assert decision.rollback and any(why in r for r in decision.reasons), decision.reasons


def test_watch_does_not_judge_a_handful_of_requests() -> None:
    # One slow first request and big disagreement on 10 rows are noise, not a reason to roll back.
    few = m.WatchObservation(requests=10, errors=1, latency_p95_s=3.0, positive_share_delta=0.5,
                             compared_rows=10, flip_share=0.5)
    assert _watch(few, 5).verdict == "watching"
    assert _watch(few, 45).verdict == "passed" and "only 10 of 50 requests" in _watch(few, 45).reasons[0]


# Two toy versions of one model: the probability of phishing rises with x; "flipped" has a
# decision threshold of 0 (it calls everything phishing), the failure the watch exists for.
def _toy(frame: pd.DataFrame, threshold: float = 0.5) -> tuple[list[int], list[float]]:
    p = 1.0 / (1.0 + np.exp(-(frame["x"].to_numpy(dtype=float) - 2.0)))
    return np.where(p >= threshold, PHISHING, LEGIT).tolist(), p.tolist()


def _served(x: np.ndarray, threshold: float = 0.5) -> pd.DataFrame:
    """What a version answered on inputs x, as the prediction log holds it."""
    frame = pd.DataFrame({"x": x})
    labels, probabilities = _toy(frame, threshold)
    return frame.assign(**{m.PREDICTED_LABEL: labels, m.PROBABILITY: probabilities})


def test_the_same_model_on_drifted_inputs_is_no_regression() -> None:
    rng = np.random.default_rng(0)
    earlier = _served(rng.normal(0.0, 1.0, 300))
    drifted = _served(rng.normal(3.0, 1.0, 300))  # the traffic moved, the model did not
    # Against earlier inputs the answers moved a lot (what the old watch rolled back for) ...
    ks_vs_earlier = m.prediction_shift(drifted[m.PREDICTED_LABEL], drifted[m.PROBABILITY],
                                       earlier[m.PREDICTED_LABEL], earlier[m.PROBABILITY], PHISHING).probability_ks
    assert ks_vs_earlier is not None and ks_vs_earlier > 0.5
    # ... on the same rows the previous version answers exactly the same.
    same = m.compare_on_same_rows(drifted, ["x"], _toy, PHISHING)
    assert (same.rows, same.flip_share, same.mean_abs_delta, same.probability_ks) == (300, 0.0, 0.0, 0.0)
    obs = m.WatchObservation(requests=300, errors=0, compared_rows=same.rows, flip_share=same.flip_share,
                             mean_abs_delta=same.mean_abs_delta, probability_ks=same.probability_ks,
                             positive_share_delta=same.positive_share_delta)
    assert _watch(obs, 5).verdict == "watching" and _watch(obs, 31).verdict == "passed"


def test_a_version_that_flips_answers_on_the_same_rows_is_a_regression() -> None:
    rows = _served(np.random.default_rng(1).normal(0.0, 1.0, 200), threshold=0.0)
    same = m.compare_on_same_rows(rows, ["x"], _toy, PHISHING)
    expected_flips = float((np.asarray(_toy(rows)[0]) == LEGIT).mean())  # every legit answer flipped
    assert same.rows == 200 and same.flip_share == pytest.approx(expected_flips) and expected_flips > 0.8
    assert same.mean_abs_delta == 0.0  # same probabilities: only the labels differ
    obs = m.WatchObservation(requests=200, errors=0, compared_rows=same.rows, flip_share=same.flip_share,
                             positive_share_delta=same.positive_share_delta)
    decision = _watch(obs, 5)
    assert decision.rollback and any("of answers differ" in r for r in decision.reasons), decision.reasons


def test_below_the_minimum_of_compared_rows_the_watch_keeps_watching() -> None:
    rows = _served(np.random.default_rng(2).normal(0.0, 1.0, 60), threshold=0.0)
    same = m.compare_on_same_rows(rows, ["x"], _toy, PHISHING)
    obs = m.WatchObservation(requests=60, errors=0, compared_rows=same.rows, flip_share=same.flip_share)
    assert same.rows == 60 and same.flip_share is not None and same.flip_share > 0.8
    assert _watch(obs, 5).verdict == "watching" and "60 of 100 rows compared" in _watch(obs, 5).reasons[0]
    assert _watch(obs, 31).verdict == "passed" and "60 of 100 rows compared" in _watch(obs, 31).reasons[0]


def test_rows_without_features_or_answers_are_not_compared() -> None:
    rows = _served(np.arange(5.0))
    rows.loc[0, "x"] = np.nan
    rows.loc[1, m.PROBABILITY] = np.nan
    assert m.compare_on_same_rows(rows, ["x"], _toy, PHISHING).rows == 3
    assert m.compare_on_same_rows(rows.drop(columns="x"), ["x"], _toy, PHISHING) == m.VersionComparison(0)
    assert m.compare_on_same_rows(rows.tail(0), ["x"], _toy, PHISHING).rows == 0
    assert m.compare_on_same_rows(_served(np.arange(50.0)), ["x"], _toy, PHISHING, max_rows=20).rows == 20


def test_prediction_shift_by_hand() -> None:
    new = ([PHISHING, PHISHING, PHISHING, LEGIT], [0.7, 0.8, 0.9, 0.4])
    old = ([PHISHING, LEGIT, LEGIT, LEGIT], [0.9, 0.1, 0.2, 0.3])
    shift = m.prediction_shift(*new, *old, positive_class=PHISHING)
    assert shift.rows == 4 and shift.flip_share == pytest.approx(0.5)  # rows 2 and 3 changed label
    assert shift.positive_share_delta == pytest.approx(0.5)  # 1/4 -> 3/4 predicted phishing
    assert shift.mean_abs_delta == pytest.approx((0.2 + 0.7 + 0.7 + 0.1) / 4)
    assert shift.probability_ks == pytest.approx(0.75)  # CDF gap at 0.3: 3/4 old, 0 new
    assert m.prediction_shift([], [], [], [], PHISHING) == m.VersionComparison(0)
    with pytest.raises(m.MonitoringError):
        m.prediction_shift([PHISHING], [0.5], [], [], PHISHING)


# ---------------------------------------------------------------------------------------------
# Retraining requests of drift events


def test_retrain_requests_once_per_event_never_during_a_run_and_again_after_cooldown() -> None:
    cooldown = 3600.0
    event = m.drift_event_key("3", "2024-06-11T10:00:00Z")

    first = m.retrain_decision(event, m.RetrainCursor(), T0, run_in_progress=False, cooldown_s=cooldown)
    assert first.request and first.run_key == event

    # The next ticks of the same event: nothing more, whatever the time.
    again = m.retrain_decision(event, first.cursor, T0 + timedelta(minutes=1), run_in_progress=False,
                               cooldown_s=cooldown)
    assert not again.request and "already handled" in again.reason
    much_later = m.retrain_decision(event, again.cursor, T0 + timedelta(days=2), run_in_progress=False,
                                    cooldown_s=cooldown)
    assert not much_later.request

    # A new event while the retraining runs: none.
    event2 = m.drift_event_key("3", "2024-06-11T11:00:00Z")
    running = m.retrain_decision(event2, first.cursor, T0 + timedelta(hours=2), run_in_progress=True,
                                 cooldown_s=cooldown)
    assert not running.request and "in progress" in running.reason

    # A new event within the cooldown: none, and not forgotten as handled ...
    cooling = m.retrain_decision(event2, first.cursor, T0 + timedelta(minutes=30), run_in_progress=False,
                                 cooldown_s=cooldown)
    assert not cooling.request and cooling.reason == "cooldown: 1800s left"
    # ... so the same drift still reported after the cooldown asks again.
    after = m.retrain_decision(event2, cooling.cursor, T0 + timedelta(hours=1, seconds=1), run_in_progress=False,
                               cooldown_s=cooldown)
    assert after.request and after.run_key == event2
    assert after.cursor.keys == (event, event2)

    assert not m.retrain_decision(None, after.cursor, T0, run_in_progress=False).request


def test_retrain_cursor_round_trips_and_stays_bounded() -> None:
    cursor = m.RetrainCursor()
    for i in range(5):
        cursor = m.retrain_decision(f"e{i}", cursor, T0 + timedelta(days=i), run_in_progress=False,
                                    cooldown_s=60, keys_kept=3).cursor
    assert cursor.keys == ("e2", "e3", "e4")
    assert m.RetrainCursor.from_json(cursor.to_json()) == cursor
    assert m.RetrainCursor.from_json(None) == m.RetrainCursor.from_json("{not json") == m.RetrainCursor()


def test_monitored_columns_are_inputs_and_outputs() -> None:
    assert m.monitored_columns(["a", "b"]) == ["a", "b", "label", "phishing_probability"]
    assert np.isclose(m.to_timedelta(90).total_seconds(), 90)
