"""`mlops-assets spec infer`: a spec suggested from a user's CSV or Parquet file, untyped columns reported."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mlops_assets.core.dataset_spec import load_spec
from mlops_assets.core.schema import check_contract
from mlops_assets.core.spec_infer import SpecInferenceError, infer_spec, read_table_file
from mlops_assets.ingestion.batches import ingest_landed_files
from mlops_assets.tools.cli import main
from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch


@pytest.fixture(scope="module")
def flow_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    flows = load_spec("network_flows")
    frame = simulate_records(flows, SimulationConfig(n_rows=600, seed=4))
    frame.loc[3, "dst_bytes"] = None  # one missing value: nullable
    path = tmp_path_factory.mktemp("infer") / "my_flows.csv"
    frame.to_csv(path, index=False)
    return path


def test_a_flow_csv_gives_kinds_value_sets_ranges_and_label_values(flow_csv: Path):
    inferred = infer_spec(read_table_file(flow_csv), "outcome", "attack", name="my_flows")
    spec = inferred.spec
    assert inferred.untyped == {}
    assert spec.categorical_features == ["protocol", "service", "flag"]
    assert spec.feature("protocol").values == ("icmp", "tcp", "udp") and spec.feature("protocol").closed
    src, rate = spec.feature("src_bytes"), spec.feature("error_rate")
    assert (src.kind, src.type, src.minimum, src.maximum, src.nullable) == ("numeric", "int", 0.0, None, False)
    assert (rate.type, rate.minimum, rate.maximum) == ("float", 0.0, 1.0)
    assert spec.feature("dst_bytes").nullable is True
    assert spec.positive_class == "attack" and set(spec.label_values) == {"normal", "attack"}


def test_the_inferred_spec_accepts_its_own_file_through_ingestion(tmp_path: Path, flow_csv: Path):
    spec = infer_spec(read_table_file(flow_csv), "outcome", "attack").spec
    landing = tmp_path / "raw"
    write_batch(pd.read_csv(flow_csv), str(landing), name="my_flows.csv")
    result = ingest_landed_files(str(landing), str(tmp_path / "b"), str(tmp_path / "q"), spec)
    assert [b.file_name for b in result.accepted] == ["my_flows.csv"] and not result.quarantined


def test_integer_codes_and_integer_labels_are_categorical_like_the_phishing_data(spec, simulated):
    inferred = infer_spec(simulated.astype(str), spec.label, "-1").spec
    assert inferred.positive_class == -1 and set(inferred.label_values) == {-1, 1}
    assert all(f.kind == "categorical" and f.type == "int" for f in inferred.features)
    assert inferred.feature("port").values == (-1, 1)
    assert check_contract(simulated, inferred) == []


def test_columns_it_cannot_type_are_reported_not_guessed():
    frame = pd.DataFrame({
        "row_id": range(200), "mixed": ["1", "2", "three", *["4"] * 197], "empty": [None] * 200,
        "host": [f"h{i}" for i in range(200)], "size": [float(i) + 0.5 for i in range(200)],
        "y": ["a", "b"] * 100,
    })
    inferred = infer_spec(frame, "y", "b")
    assert set(inferred.untyped) == {"row_id", "mixed", "empty", "host"}
    assert "'three'" in inferred.untyped["mixed"] and "row id" in inferred.untyped["row_id"]
    assert "an id" in inferred.untyped["host"] and "every row is missing" in inferred.untyped["empty"]
    assert inferred.spec.feature_names == ["size"]


@pytest.mark.parametrize(("label", "positive", "words"), [
    ("nope", "a", "no label column 'nope'"),
    ("y", "maybe", "--positive 'maybe' is not a value of 'y'"),
    ("x", "1", "exactly two values"),
])
def test_a_file_that_cannot_give_a_spec_says_why(label, positive, words):
    frame = pd.DataFrame({"x": ["1", "2", "3"], "y": ["a", "b", "a"]})
    with pytest.raises(SpecInferenceError, match=words):
        infer_spec(frame, label, positive)


def test_the_cli_writes_the_spec_and_exits_3_when_a_column_was_left_out(tmp_path: Path, flow_csv: Path, capsys):
    out = tmp_path / "spec.json"
    assert main(["spec", "infer", str(flow_csv), "--label", "outcome", "--positive", "attack", "--out", str(out)]) == 0
    assert load_spec(out).feature("service").type == "string"
    assert f"export MLOPS_DATASET_SPEC={out}" in capsys.readouterr().out
    parquet = tmp_path / "with_id.parquet"
    pd.read_csv(flow_csv).assign(flow_id=range(600)).to_parquet(parquet)
    assert main(["spec", "infer", str(parquet), "--label", "outcome", "--positive", "attack"]) == 3
    printed = capsys.readouterr()
    assert "NOT TYPED flow_id" in printed.err and json.loads(printed.out)["label"] == "outcome"
    assert main(["spec", "infer", str(tmp_path / "missing.csv"), "--label", "y", "--positive", "1"]) == 2
