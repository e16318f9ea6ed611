import json
from pathlib import Path

import pytest

from mlops_assets.core.dataset_spec import (
    DatasetSpecError,
    json_schema,
    load_spec,
    spec_from_dict,
    spec_to_dict,
)
from mlops_assets.core.schema import build_schema


def test_default_spec_is_the_phishing_schema(spec):
    assert spec.label == "Result"
    assert len(spec.feature_names) == 30
    assert spec.positive_class == -1 and spec.positive_name == "phishing"
    assert spec.negative_class == 1
    assert all(set(f.values) <= {-1, 0, 1} for f in spec.features)
    assert spec.feature("port").values == (-1, 1)
    assert spec.calibration is not None
    assert spec.calibration.label_share[1] == pytest.approx(0.5569)


def test_pandera_schema_is_built_from_the_spec(spec):
    schema = build_schema(spec)
    assert list(schema.columns) == spec.columns
    assert schema.strict is True


def test_another_dataset_plugs_in_by_configuration(tmp_path: Path):
    custom = {
        "name": "toy_intrusions",
        "label": "attack",
        "label_values": {"0": "normal", "1": "attack"},
        "positive_class": 1,
        "features": {"proto": {"values": [0, 1, 2]}, "flag": {"values": [0, 1]}},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(custom))
    loaded = load_spec(path)
    assert loaded.columns == ["proto", "flag", "attack"]
    assert loaded.positive_name == "attack" and loaded.negative_class == 0
    assert loaded.calibration is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"label": "y", "label_values": {"0": "a"}, "positive_class": 0, "features": {"x": {"values": [0]}}},
         "exactly two classes"),
        ({"label": "y", "label_values": {"0": "a", "1": "b"}, "positive_class": 5, "features": {"x": {"values": [0]}}},
         "positive_class 5"),
        ({"label": "y", "label_values": {"0": "a", "1": "b"}, "positive_class": 1}, "features"),
    ],
)
def test_bad_spec_files_name_the_problem_and_the_file(tmp_path: Path, body, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(body))
    with pytest.raises(DatasetSpecError, match=message) as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_missing_or_broken_spec_file(tmp_path: Path):
    with pytest.raises(DatasetSpecError, match="not found"):
        load_spec(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DatasetSpecError, match="not valid JSON: line 1"):
        load_spec(broken)


# --- feature kinds ------------------------------------------------------------------------------

def test_the_network_flow_example_has_string_categories_numeric_ranges_and_string_labels():
    flows = load_spec("network_flows")
    assert flows.categorical_features == ["protocol", "service", "flag"]
    assert flows.feature("protocol").type == "string" and flows.feature("protocol").nullable is False
    src = flows.feature("src_bytes")
    assert (src.kind, src.type, src.minimum, src.maximum) == ("numeric", "int", 0.0, None)
    assert flows.feature("error_rate").rule() == "a number >= 0 and <= 1"
    assert flows.positive_class == "attack" and flows.negative_class == "normal"
    assert flows.catboost_cat_features == ["protocol", "service", "flag"]
    assert not flows.integer_coded
    assert flows.calibration is not None and flows.calibration.numeric_given_label["packets"]["attack"].params == {
        "lam": 4.0}


def test_the_phishing_spec_keeps_integer_codes_as_numbers_to_catboost(spec):
    assert spec.integer_coded and spec.catboost_cat_features == []
    assert all(f.kind == "categorical" and f.type == "int" and f.closed for f in spec.features)


def test_an_open_category_accepts_unseen_values_and_is_declared_to_catboost(tmp_path: Path):
    body = {"label": "y", "label_values": ["no", "yes"], "positive_class": "yes",
            "features": {"host": {"kind": "categorical", "type": "string", "unseen": "keep"},
                         "port": {"kind": "categorical", "values": [22, 80], "unseen": "keep"}}}
    loaded = spec_from_dict(body)
    assert not loaded.feature("host").closed and loaded.feature("host").rule() == "any string"
    assert loaded.catboost_cat_features == ["host", "port"]
    assert loaded.label_values == {"no": "no", "yes": "yes"}


_OK_FEATURES = {"x": {"kind": "numeric"}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"features": {"x": {"kind": "numerc"}}}, "features.x.kind: must be 'categorical' or 'numeric'"),
        ({"features": {"x": {"kind": "numeric", "min": "low"}}}, "features.x.min: must be a number, got 'low'"),
        ({"features": {"x": {"kind": "numeric", "min": 5, "max": 1}}}, "features.x.min: 5 is above max 1"),
        ({"features": {"x": {"kind": "numeric", "values": [1]}}}, "features.x.values: only categorical"),
        ({"features": {"x": {"kind": "categorical", "min": 0, "values": [1]}}}, "features.x.min: only numeric"),
        ({"features": {"x": {"kind": "categorical"}}}, "features.x.values: missing"),
        ({"features": {"x": {"values": [1, "a"], "type": "int"}}}, r"features.x.values\[1\]: must be an integer"),
        ({"features": {"x": {"values": [1], "colour": "red"}}}, "features.x.colour: unknown key"),
        ({"features": {"x": {"kind": "numeric", "nullable": "no"}}}, "features.x.nullable: must be true or false"),
        ({"features": _OK_FEATURES, "positive_class": "maybe"}, "positive_class: positive_class maybe is not one"),
        ({"features": _OK_FEATURES, "lable": "y"}, "lable: unknown key"),
    ],
)
def test_spec_errors_name_the_key_and_what_is_wrong(body, message):
    full = {"label": "y", "label_values": {"normal": "normal", "attack": "attack"}, "positive_class": "attack",
            **body}
    with pytest.raises(DatasetSpecError, match=message):
        spec_from_dict(full, origin="my_spec.json")


def test_the_shipped_json_schema_accepts_both_packaged_specs_and_rejects_a_bad_one():
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for name in ("phishing_websites.json", "network_flows.json"):
        jsonschema.validate(json.loads(resources.files("mlops_assets.core.datasets").joinpath(name).read_text()),
                            schema)
    bad = {"label": "y", "label_values": ["a", "b"], "positive_class": "a",
           "features": {"x": {"kind": "numeric", "values": [1]}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_spec_to_dict_round_trips():
    flows = load_spec("network_flows")
    again = spec_from_dict(spec_to_dict(flows))
    assert again.features == flows.features and again.label_values == flows.label_values
