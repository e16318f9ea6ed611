"""The Dagster layer of ingestion -> validation -> features: materialized for real with temporary
storage and a test instance, sensors evaluated with a built context."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from mlops_assets.defs.features import assets as features
from mlops_assets.defs.ingestion import assets as ingestion
from mlops_assets.defs.ingestion.assets import raw_files_sensor
from mlops_assets.defs.resources import ParquetIOManager, PlatformResource
from mlops_assets.defs.validation import assets as validation
from mlops_assets.tools.simulator import write_batch

FOUNDATION = [ingestion.raw_dataset, validation.validation_report, features.feature_set, features.train_test_split]
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


def _ingest(root: Path, instance: dg.DagsterInstance) -> list[ingestion.IngestedFile]:
    """Each landed file as a raw_batches partition, materialized on `instance` (what `mlops-assets ingest` does)."""
    job = dg.Definitions(assets=[ingestion.raw_batches], jobs=[ingestion.ingest_raw_batch_job],
                         resources=_resources(root)).resolve_job_def(ingestion.INGEST_JOB)
    return ingestion.ingest_landed_on_instance(instance, job, str(root / "raw"))


def _partition_checks(instance: dg.DagsterInstance) -> dict[tuple[str, str], dg.AssetCheckEvaluation]:
    """(partition, check name) -> the latest evaluation of that check on that raw_batches partition."""
    out: dict[tuple[str, str], dg.AssetCheckEvaluation] = {}
    for name in (ingestion.CONTRACT_CHECK, ingestion.NOT_EMPTY_CHECK):
        key = dg.AssetCheckKey(dg.AssetKey("raw_batches"), name)
        for record in reversed(instance.event_log_storage.get_asset_check_execution_history(key, limit=100)):
            evaluation = record.event.asset_check_evaluation if record.event else None
            if evaluation is not None and evaluation.partition:
                out[(evaluation.partition, name)] = evaluation
    return out


def _materialize(root: Path, instance: dg.DagsterInstance) -> "dg.ExecuteInProcessResult":
    _ingest(root, instance)
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
        partition_checks = _partition_checks(instance)
        partitions = set(instance.get_dynamic_partitions(ingestion.RAW_BATCHES_PARTITIONS))
    assert result.success
    assert len(partitions) == 2 and {p for p, _ in partition_checks} == partitions
    good, bad = (sorted(p for (p, name), e in partition_checks.items()
                        if name == ingestion.CONTRACT_CHECK and e.passed is ok) for ok in (True, False))
    assert len(good) == len(bad) == 1
    assert partition_checks[(good[0], ingestion.NOT_EMPTY_CHECK)].passed
    assert not partition_checks[(bad[0], ingestion.NOT_EMPTY_CHECK)].passed
    contract = partition_checks[(bad[0], ingestion.CONTRACT_CHECK)]
    assert contract.metadata["quarantined_files"].value == 1
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


def test_empty_landing_folder_makes_no_partition_and_raw_dataset_names_the_landing_folder(data_root: Path):
    with dg.instance_for_test() as instance:
        result = _materialize(data_root, instance)
        assert instance.get_dynamic_partitions(ingestion.RAW_BATCHES_PARTITIONS) == []
    assert not result.success and not result.asset_materializations_for_node("raw_dataset")
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "land files" in (failure.message or "") + str(failure.event_specific_data)
    assert not result.asset_materializations_for_node("feature_set")


def _tick(root: Path, cursor: str | None, instance: dg.DagsterInstance):
    context = dg.build_sensor_context(cursor=cursor, instance=instance,
                                      resources={"platform": PlatformResource.at(str(root))})
    return raw_files_sensor(context)


def test_sensor_targets_the_partition_job_and_ingestion_onward():
    from mlops_assets.definitions import defs

    sensor = defs.resolve_sensor_def("raw_files_sensor")
    assert {target.job_name for target in sensor.targets} == {ingestion.INGEST_JOB, "ingestion_onward"}
    onward = {k.to_user_string() for k in defs.resolve_job_def("ingestion_onward").asset_layer.selected_asset_keys}
    assert onward >= {a.key.to_user_string() for a in FOUNDATION} and "raw_batches" not in onward
    ingest = defs.resolve_job_def(ingestion.INGEST_JOB)
    assert ingest.asset_layer.selected_asset_keys == {dg.AssetKey("raw_batches")}
    assert ingest.partitions_def == ingestion.raw_batch_partitions


def test_the_ingest_command_makes_each_landed_file_a_partition_with_its_checks(
        tmp_path: Path, simulated, monkeypatch: pytest.MonkeyPatch):
    """`mlops-assets ingest` (the first step of make pipeline) on a real instance in DAGSTER_HOME."""
    data, home = tmp_path / "data", tmp_path / "dagster_home"
    home.mkdir()
    write_batch(simulated.head(500), str(data / "raw"), name="good.csv")
    broken = simulated.head(20).astype(object)
    broken.loc[2, "port"] = 0
    write_batch(broken, str(data / "raw"), name="bad.csv")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    env = {**os.environ, "MLOPS_DATA_URL": str(data)}
    env.pop("MLOPS_LANDING_URL", None)
    command = [str(Path(sys.executable).with_name("mlops-assets")), "ingest"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "quarantined" in first.stdout and "bad.csv" in first.stdout and "accepted" in first.stdout

    with dg.DagsterInstance.get() as instance:
        partitions = set(instance.get_dynamic_partitions(ingestion.RAW_BATCHES_PARTITIONS))
        assert len(partitions) == 2
        assert instance.get_materialized_partitions(dg.AssetKey("raw_batches")) == partitions
        checks = _partition_checks(instance)
        runs = len(instance.get_runs())
    contract = {e.metadata["file"].value: e for (_, name), e in checks.items() if name == ingestion.CONTRACT_CHECK}
    assert contract["good.csv"].passed and not contract["bad.csv"].passed
    assert contract["bad.csv"].metadata["column"].value == "port"
    assert len(list((data / "quarantine").glob("*bad.csv.reason.json"))) == 1

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and "already_ingested" in again.stdout and "bad.csv" not in again.stdout
    with dg.DagsterInstance.get() as instance:
        assert len(instance.get_runs()) == runs  # nothing new landed: no run


@pytest.mark.parametrize("url", ["memory://sensor-test/raw"])
def test_sensor_reads_any_fsspec_landing_url(url, simulated):
    write_batch(simulated.head(10), url, name="m.csv")
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance,
                                          resources={"platform": PlatformResource(data_url=url.rsplit("/", 1)[0], landing_url=url)})
        result = raw_files_sensor(context)
    assert isinstance(result, dg.SensorResult) and len(result.run_requests) == 1


def test_each_batch_meets_the_contract_check_once_and_unchanged_inputs_are_not_recomputed(data_root: Path, simulated):
    write_batch(simulated.iloc[:1500], str(data_root / "raw"), name="first.csv")
    with dg.instance_for_test() as instance:
        assert _materialize(data_root, instance).success
        # Landing checked the file against the contract: its finding is kept per batch and spec.
        [finding] = list((data_root / "reports" / ingestion.CONTRACT_DIR).rglob("*.json"))
        assert json.loads(finding.read_text()) == []
        # A finding kept for a batch stands for that batch: a new data version holding it does not
        # check it again (only the new batch is checked, at its landing).
        finding.write_text(json.dumps([{"column": "kept", "message": "the kept finding, not a new check"}]))
        write_batch(simulated.iloc[1500:], str(data_root / "raw"), name="second.csv")
        result = _materialize(data_root, instance)
        schema = _checks(result)["schema_is_valid"]
        assert not schema.passed and "the kept finding" in (schema.description or "")
        assert len(list((data_root / "reports" / ingestion.CONTRACT_DIR).rglob("*.json"))) == 2

    finding.write_text("[]")
    for report in (data_root / "reports").glob("validation-*"):  # the report kept the planted finding
        report.unlink()
    with dg.instance_for_test() as instance:  # the same inputs twice: features and split are reused, not recomputed
        assert _materialize(data_root, instance).success
        again = _materialize(data_root, instance)
        assert again.success
        for asset in ("feature_set", "train_test_split"):
            assert again.asset_materializations_for_node(asset)[0].metadata["reused"].value is True, asset
        assert _checks(again)["no_shared_feature_vectors"].passed


def test_loading_the_definitions_imports_no_model_library():
    """Every CLI call and step process loads the definitions: CatBoost, scikit-learn, whylogs and
    matplotlib load only in the steps that use them."""
    heavy = ("catboost", "sklearn", "whylogs", "matplotlib")
    code = ("import sys, mlops_assets.definitions; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DAGSTER_HOME": os.environ.get("DAGSTER_HOME", "")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"loading the definitions imported {done.stdout.strip()}"
