"""The Dagster layer of ingestion -> validation -> features: materialized for real with temporary
storage and a test instance, sensors evaluated with a built context."""

import json
from pathlib import Path

import dagster as dg
import pytest

from mlops_assets.defs.features import assets as features
from mlops_assets.defs.ingestion import assets as ingestion
from mlops_assets.defs.ingestion.assets import raw_files_sensor
from mlops_assets.defs.resources import ParquetIOManager, PlatformResource
from mlops_assets.defs.validation import assets as validation
from mlops_assets.tools.simulator import write_batch

FOUNDATION = [ingestion.raw_batches, ingestion.raw_dataset, validation.validation_report,
              features.feature_set, features.train_test_split]
CHECKS = [validation.schema_is_valid, validation.enough_rows, validation.label_balance, validation.null_share,
          validation.duplicate_share, validation.conflicting_labels]


def test_definitions_load_and_every_asset_has_a_group_kinds_and_description():
    from mlops_assets.definitions import defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.group_name and node.group_name != "default", key
        assert node.kinds, key
        assert node.description, key


def _resources(root: Path) -> dict:
    return {"platform": PlatformResource.at(str(root)),
            "io_manager": ParquetIOManager(base_url=str(root / "assets"))}


def _materialize(root: Path, instance: dg.DagsterInstance) -> "dg.ExecuteInProcessResult":
    return dg.materialize([*FOUNDATION, *CHECKS], resources=_resources(root), instance=instance,
                          raise_on_error=False)


def _checks(result: "dg.ExecuteInProcessResult") -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_chain_materializes_with_versions_and_reports(data_root: Path, simulated):
    write_batch(simulated, str(data_root / "raw"), name="batch1.csv")
    with dg.instance_for_test() as instance:
        result = _materialize(data_root, instance)
        assert result.success
        checks = _checks(result)
        assert all(e.passed for name, e in checks.items() if name != "duplicate_share"), checks
        raw_meta = result.asset_materializations_for_node("raw_dataset")[0].metadata
        split_meta = result.asset_materializations_for_node("train_test_split")[0].metadata
        feature_meta = result.asset_materializations_for_node("feature_set")[0].metadata
        report_meta = result.asset_materializations_for_node("validation_report")[0].metadata

    assert raw_meta["rows"].value == 3000
    version = raw_meta["data_version"].value
    assert split_meta["data_version"].value == version
    assert split_meta["feature_version"].value == feature_meta["feature_version"].value
    assert Path(feature_meta["feature_path"].value).exists()
    assert feature_meta["exact_duplicates_removed"].value > 1000
    assert checks["no_shared_feature_vectors"].metadata["shared_feature_vectors"].value == 0
    report = Path(report_meta["report_json"].value)
    assert json.loads(report.read_text())["data_version"] == version
    assert Path(report_meta["report_markdown"].value).read_text().startswith("# Validation report")


def test_bad_file_fails_the_contract_check_but_good_data_flows_on(data_root: Path, simulated):
    landing = str(data_root / "raw")
    write_batch(simulated, landing, name="good.csv")
    broken = simulated.head(20).astype(object)
    broken.loc[3, "SSLfinal_State"] = 7
    write_batch(broken, landing, name="broken.csv")
    with dg.instance_for_test() as instance:
        result = _materialize(data_root, instance)
    assert result.success
    contract = _checks(result)[ingestion.CONTRACT_CHECK]
    assert not contract.passed
    assert contract.metadata["file"].value == "broken.csv"
    assert contract.metadata["column"].value == "SSLfinal_State"
    assert contract.metadata["example"].value == "7"
    assert "broken.csv" in (contract.description or "")
    assert len(result.asset_materializations_for_node("train_test_split")) == 1
    assert len(list((data_root / "quarantine").glob("*broken.csv.reason.json"))) == 1


def test_blocking_check_failure_stops_everything_downstream(data_root: Path, spec, simulated):
    one_class = simulated[simulated[spec.label] == 1]
    write_batch(one_class, str(data_root / "raw"), name="one_class.csv")
    with dg.instance_for_test() as instance:
        result = _materialize(data_root, instance)
        balance = _checks(result)["label_balance"]
        assert not balance.passed
        assert balance.metadata["minority_class_share"].value == 0.0
        assert result.asset_materializations_for_node("validation_report")
        assert not result.asset_materializations_for_node("feature_set")
        assert not result.asset_materializations_for_node("train_test_split")


def test_empty_landing_folder_stops_at_the_not_empty_check(data_root: Path):
    with dg.instance_for_test() as instance:
        result = _materialize(data_root, instance)
    assert not result.success or not result.asset_materializations_for_node("raw_dataset")
    assert not _checks(result)[ingestion.NOT_EMPTY_CHECK].passed
    assert not result.asset_materializations_for_node("feature_set")


def _tick(root: Path, cursor: str | None, instance: dg.DagsterInstance):
    context = dg.build_sensor_context(cursor=cursor, instance=instance,
                                      resources={"platform": PlatformResource.at(str(root))})
    return raw_files_sensor(context)


def test_sensor_on_new_repeated_and_bad_files(data_root: Path, simulated):
    landing = str(data_root / "raw")
    with dg.instance_for_test() as instance:
        empty = _tick(data_root, None, instance)
        assert isinstance(empty, dg.SkipReason)

        write_batch(simulated.head(100), landing, name="a.csv")
        first = _tick(data_root, None, instance)
        assert isinstance(first, dg.SensorResult) and len(first.run_requests) == 1
        key_a = first.run_requests[0].run_key

        repeated = _tick(data_root, first.cursor, instance)
        assert isinstance(repeated, dg.SkipReason)  # same files: no duplicate run

        (Path(landing) / "garbage.csv").write_text("\x00\x01 not a table")
        bad = _tick(data_root, first.cursor, instance)
        assert isinstance(bad, dg.SensorResult) and len(bad.run_requests) == 1
        assert bad.run_requests[0].run_key != key_a
        assert "garbage.csv" in bad.run_requests[0].tags["mlops_assets/landed_files"]
        assert "a.csv" not in bad.run_requests[0].tags["mlops_assets/landed_files"]

        # The run quarantines the bad file; the folder changes but nothing new is landed.
        (Path(landing) / "garbage.csv").unlink()
        after = _tick(data_root, bad.cursor, instance)
        assert isinstance(after, dg.SkipReason)


def test_sensor_targets_ingestion_onward():
    from mlops_assets.definitions import defs

    sensor = defs.resolve_sensor_def("raw_files_sensor")
    job = defs.resolve_job_def(sensor.job_name)
    selected = job.asset_layer.selected_asset_keys
    assert {k.to_user_string() for k in selected} >= {a.key.to_user_string() for a in FOUNDATION}


@pytest.mark.parametrize("url", ["memory://sensor-test/raw"])
def test_sensor_reads_any_fsspec_landing_url(url, simulated):
    write_batch(simulated.head(10), url, name="m.csv")
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance,
                                          resources={"platform": PlatformResource(data_url=url.rsplit("/", 1)[0], landing_url=url)})
        result = raw_files_sensor(context)
    assert isinstance(result, dg.SensorResult) and len(result.run_requests) == 1
