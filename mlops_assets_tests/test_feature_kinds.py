"""Numeric and string features through every stage, on the packaged network-flow example:
contract, quarantine, cleaning and split, CatBoost with categorical features, drift per kind,
slices, the simulator and the request model. Tiny frames and the pure functions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlops_assets.core.dataset_spec import DatasetSpec, load_spec
from mlops_assets.core.schema import check_contract, typed_frame
from mlops_assets.evaluation.metrics import slice_metrics
from mlops_assets.features.cleaning import clean_features, shared_vectors, split_train_test
from mlops_assets.ingestion.batches import accepted_batches, ingest_landed_files, load_raw_dataset
from mlops_assets.monitoring import drift
from mlops_assets.serving.request import RequestError, build_request_model, parse_predict_matrix
from mlops_assets.tools.simulator import SimulationConfig, json_records, simulate_records, write_batch
from mlops_assets.training import train as tr


@pytest.fixture(scope="module")
def flows() -> DatasetSpec:
    return load_spec("network_flows")


@pytest.fixture(scope="module")
def flow_rows(flows: DatasetSpec) -> pd.DataFrame:
    return simulate_records(flows, SimulationConfig(n_rows=1500, seed=5))


# Each bad value kind: (column, raw text, violation kind, words the reason must hold).
BAD_VALUES = {
    "string_in_numeric": ("src_bytes", "lots", "wrong_type", "must hold whole numbers; found 'lots'"),
    "below_min": ("packets", "0", "out_of_range", "below min: must be an integer >= 1; found 0"),
    "unknown_category": ("service", "gopher", "out_of_domain", "found 'gopher'"),
    "missing_not_allowed": ("protocol", "", "missing_value", "must not be missing (nullable: false)"),
}


def test_the_simulator_draws_strings_and_numbers_per_label_within_the_spec(flows, flow_rows):
    assert check_contract(flow_rows, flows) == []
    assert set(flow_rows["outcome"]) == {"normal", "attack"}
    assert flow_rows["protocol"].map(type).eq(str).all() and flow_rows["src_bytes"].dtype == np.int64
    assert flow_rows["packets"].min() >= 1 and flow_rows["error_rate"].between(0, 1).all()
    by_label = flow_rows.groupby("outcome")
    # The calibration's per-label distributions: attacks are short, chatty and error-prone.
    assert by_label["conn_rate"].median()["attack"] > 5 * by_label["conn_rate"].median()["normal"]
    assert by_label["packets"].mean()["normal"] > 3 * by_label["packets"].mean()["attack"]
    assert (flow_rows["outcome"] == "attack").mean() == pytest.approx(0.3, abs=0.04)


def test_numeric_drift_scales_a_feature_and_categorical_drift_moves_its_shares(flows):
    base = simulate_records(flows, SimulationConfig(n_rows=800, seed=9))
    moved = simulate_records(flows, SimulationConfig(n_rows=800, seed=9, drift={"src_bytes": 0.5, "flag": 0.4}))
    assert moved["src_bytes"].median() > 1.8 * base["src_bytes"].median()
    before, after = (f["flag"].value_counts(normalize=True).reindex(flows.feature("flag").values, fill_value=0)
                     for f in (base, moved))
    assert drift.hellinger(before.to_numpy(), after.to_numpy()) > 0.2
    assert base["protocol"].equals(moved["protocol"])  # features not named do not move


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_each_bad_value_kind_is_quarantined_at_ingestion_naming_column_and_rule(tmp_path: Path, flows, flow_rows, case):
    column, text, kind, words = BAD_VALUES[case]
    good = flow_rows.head(30).astype(object)
    bad = good.copy()
    bad.loc[7, column] = text if text else None
    landing = tmp_path / "raw"
    write_batch(good, str(landing), name="good.csv")
    write_batch(bad, str(landing), name=f"{case}.csv")
    result = ingest_landed_files(str(landing), str(tmp_path / "batches"), str(tmp_path / "quarantine"), flows)
    assert [b.file_name for b in result.accepted] == ["good.csv"]
    [quarantined] = result.quarantined
    [violation] = [v for v in quarantined.violations if v["column"] == column]
    assert violation["kind"] == kind and words in violation["message"] and violation["row"] == 8
    reason = json.loads(next((tmp_path / "quarantine").glob("*.reason.json")).read_text())
    assert any(words in v["message"] for v in reason["violations"])
    # The accepted batch keeps each column's kind.
    [stored] = accepted_batches(str(tmp_path / "batches"))
    raw = load_raw_dataset([stored], flows)
    assert raw["protocol"].dtype == object and str(raw["src_bytes"].dtype) == "Int64"
    assert raw["duration_s"].dtype == np.float64 and set(raw["outcome"]) <= {"normal", "attack"}


def test_cleaning_dedups_float_and_string_vectors_and_the_split_shares_none(flows, flow_rows):
    raw = typed_frame(flow_rows, flows)
    doubled = pd.concat([raw, raw.head(100)], ignore_index=True)  # 100 exact duplicates, floats included
    cleaned, stats = clean_features(doubled, flows)
    assert stats.exact_duplicates_removed >= 100
    assert not cleaned.duplicated(subset=flows.feature_names).any()
    assert set(cleaned["target"]) == {0, 1}
    # target 1 is the positive class "attack"
    assert cleaned["target"].mean() == pytest.approx((raw["outcome"] == "attack").mean(), abs=0.03)
    split = split_train_test(cleaned, flows.feature_names, 0.25, seed=3)
    assert shared_vectors(split, flows.feature_names) == 0
    # 1 and 1.0 are one vector; "1" (a string category) and 1 are not confused with each other.
    tiny = pd.DataFrame({"a": [1.0, 1.0], "b": ["x", "x"]})
    from mlops_assets.features.cleaning import vector_keys
    keys = vector_keys(tiny.assign(a=[1, 1.0]), ["a", "b"])
    assert keys.nunique() == 1


def test_catboost_learns_string_categories_natively_and_slices_bin_numbers(flows, flow_rows):
    cleaned, _ = clean_features(typed_frame(flow_rows, flows), flows)
    split = split_train_test(cleaned, flows.feature_names, 0.25, seed=3)
    train, test = tr.split_frame(split)
    result = tr.train_model(train, flows.feature_names, tr.TrainingParams(iterations=60, thread_count=1),
                            cat_features=flows.catboost_cat_features)
    assert result.model.get_cat_feature_indices() == [0, 1, 2]  # protocol, service, flag: no one-hot
    X, y = tr.features_and_target(test, flows.feature_names)
    proba = tr.predict_positive(result.model, X)
    assert ((proba >= 0.5) == y).mean() > 0.9
    slices = slice_metrics(X, y, proba, ["flag", "src_bytes"], numeric={"src_bytes"}, bins=4)
    assert set(slices[slices.feature == "flag"]["value"]) <= {"SF", "S0", "REJ", "RSTO", "SH"}
    bins = slices[slices.feature == "src_bytes"]
    assert 2 <= len(bins) <= 4 and all(str(v).startswith("[") for v in bins["value"])
    assert bins["n"].sum() == len(X)
    with pytest.raises(ValueError, match="cat_features"):
        tr.train_model(train, flows.feature_names, cat_features=["nope"])


def test_drift_uses_ks_for_numeric_and_hellinger_for_categorical_features(flows):
    reference = simulate_records(flows, SimulationConfig(n_rows=1500, seed=1))
    same = simulate_records(flows, SimulationConfig(n_rows=1500, seed=2))
    moved = simulate_records(flows, SimulationConfig(n_rows=1500, seed=2, drift={"conn_rate": 0.5, "service": 0.4}))
    ref = drift.profile_frame(reference[flows.feature_names])
    quiet = drift.feature_drift(ref, drift.profile_frame(same[flows.feature_names]), flows)
    scores = drift.feature_drift(ref, drift.profile_frame(moved[flows.feature_names]), flows)
    assert {s.method for n, s in scores.items() if n in flows.numeric_features} == {drift.METHOD_CONTINUOUS}
    assert {s.method for n, s in scores.items() if n in flows.categorical_features} == {drift.METHOD_CATEGORICAL}
    assert not any(s.drift for s in quiet.values())
    assert {n for n, s in scores.items() if s.drift} == {"conn_rate", "service"}


def _record(rows: pd.DataFrame, spec: DatasetSpec, **changes: object) -> dict:
    return {**json_records(rows.head(1), spec)[0], **changes}


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"src_bytes": "100"}, "src_bytes", "expected an integer (not a string, float or boolean); must be an integer >= 0"),
    ({"duration_s": "fast"}, "duration_s", "expected a number (not a string, boolean or null)"),
    ({"packets": 0}, "packets", "value 0 is below min: must be an integer >= 1"),
    ({"error_rate": 1.5}, "error_rate", "value 1.5 is above max: must be a number >= 0 and <= 1"),
    ({"service": "gopher"}, "service", "value 'gopher' is not allowed; allowed values:"),
    ({"protocol": None}, "protocol", "a value is required (null is not allowed)"),
    ({"flag": 1}, "flag", "expected a string"),
])
def test_the_request_model_refuses_each_bad_value_naming_field_and_rule(flows, flow_rows, changes, field, words):
    model = build_request_model(flows, 10)
    with pytest.raises(RequestError) as info:
        parse_predict_matrix(json.dumps({"records": [_record(flow_rows, flows, **changes)]}).encode(), model)
    assert info.value.status_code == 422
    assert f"records[0].{field}: " in info.value.message and words in info.value.message


def test_a_valid_flow_request_becomes_a_typed_frame_and_the_schema_shows_ranges(flows, flow_rows):
    model = build_request_model(flows, 10)
    body = {"records": json_records(flow_rows.head(3), flows)}
    body["records"][0]["duration_s"] = 2  # an integer where a float belongs is a number
    records, features = parse_predict_matrix(json.dumps(body).encode(), model)
    assert isinstance(features, pd.DataFrame) and list(features.columns) == flows.feature_names
    assert features["duration_s"].dtype == np.float64 and features["protocol"].dtype == object
    props = model.json_schema()["$defs"]["Record"]["properties"]
    assert props["packets"]["minimum"] == 1 and props["protocol"]["enum"] == ["tcp", "udp", "icmp"]
    assert props["error_rate"]["maximum"] == 1


def test_get_model_describes_each_feature_by_kind(flows, spec):
    from mlops_assets.serving.request import feature_contract

    described = feature_contract(flows)
    assert described["src_bytes"] == {"kind": "numeric", "type": "int", "rule": "an integer >= 0", "min": 0.0}
    assert described["protocol"]["values"] == ["tcp", "udp", "icmp"]
    assert feature_contract(spec)["port"] == [-1, 1]  # integer codes: as GET /model always listed them
