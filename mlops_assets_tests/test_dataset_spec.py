import json
from pathlib import Path

import pytest

from mlops_assets.core.dataset_spec import DatasetSpecError, load_spec
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
