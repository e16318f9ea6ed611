"""Ingestion: landed files -> content-addressed batches (bad files quarantined) -> raw_dataset."""


import hashlib
import json

import dagster as dg
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.core.records import RawDataset
from mlops_assets.defs.metadata import path_value, redact_text
from mlops_assets.defs.resources import PlatformResource
from mlops_assets.ingestion import batches as ingestion

CONTRACT_CHECK = "landed_files_meet_contract"
NOT_EMPTY_CHECK = "has_accepted_batches"
RAW_DATASET_CODE_VERSION = "2"  # bump when the union of batches is built differently


@dg.asset(
    group_name=c.GROUP_INGESTION,
    kinds={"pandas", "parquet"},
    # Labelled production records become a batch first, so retraining learns from them.
    deps=["labelled_production_batch"],
    check_specs=[
        dg.AssetCheckSpec(CONTRACT_CHECK, asset="raw_batches",
                          description="Every file landed in this run was readable and met the data contract."),
        dg.AssetCheckSpec(NOT_EMPTY_CHECK, asset="raw_batches", blocking=True,
                          description="At least one batch has been accepted, so there is data to train on."),
    ],
)
def raw_batches(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """Immutable, content-addressed copies of every accepted landed file."""
    settings = platform.settings()
    result = ingestion.ingest_landed_files(
        settings.landing_url, settings.batches_url, settings.quarantine_url, platform.spec())
    batches = ingestion.accepted_batches(settings.batches_url)
    for bad in result.quarantined:
        context.log.warning(redact_text(f"quarantined {bad.file_name}: {bad.reason} (moved to {bad.moved_to})"))

    first_problem = result.quarantined[0].violations[0] if result.quarantined else {}
    contract = dg.AssetCheckResult(
        check_name=CONTRACT_CHECK,
        passed=not result.quarantined,
        severity=dg.AssetCheckSeverity.ERROR,
        description=("; ".join(f"{q.file_name}: {q.reason}" for q in result.quarantined)
                     or "every landed file met the contract"),
        metadata={
            "quarantined_files": len(result.quarantined),
            "file": result.quarantined[0].file_name if result.quarantined else "",
            "column": str(first_problem.get("column") or ""),
            "example": str(first_problem.get("example") or ""),
            "quarantine": dg.MetadataValue.json([
                {"file": q.file_name, "moved_to": q.moved_to, "reason": q.reason, "violations": q.violations}
                for q in result.quarantined
            ]),
        },
    )
    not_empty = dg.AssetCheckResult(
        check_name=NOT_EMPTY_CHECK,
        passed=bool(batches),
        metadata={"accepted_batches": len(batches)},
        description=None if batches else redact_text(f"no accepted batch yet; drop CSV or Parquet files into {settings.landing_url}"),
    )
    accepted_table = pd.DataFrame(
        [{"file": b.file_name, "rows": b.rows, "columns": len(b.columns), "sha256": b.batch_id[:16],
          "source": b.source} for b in result.accepted],
        columns=["file", "rows", "columns", "sha256", "source"],
    )
    return dg.MaterializeResult(
        metadata={
            "accepted_this_run": len(result.accepted),
            "quarantined_this_run": len(result.quarantined),
            "already_accepted_files": len(result.already_accepted),
            "total_batches": len(batches),
            "total_rows": sum(b.rows for b in batches),
            "accepted": dg.MetadataValue.md(accepted_table.to_markdown(index=False) if len(accepted_table) else "none"),
            "batches": dg.MetadataValue.json([b.as_dict() for b in result.accepted]),
            "landing_folder": path_value(settings.landing_url),
            "batch_store": path_value(settings.batches_url),
        },
        check_results=[contract, not_empty],
        data_version=dg.DataVersion(ingestion.dataset_version([b.batch_id for b in batches])),
    )


@dg.asset(group_name=c.GROUP_INGESTION, kinds={"pandas", "parquet"}, deps=[raw_batches],
          code_version=RAW_DATASET_CODE_VERSION)
def raw_dataset(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.Output[RawDataset]:
    """The union of all accepted batches, versioned by their content hashes (a record naming them)."""
    settings = platform.settings()
    batches = ingestion.accepted_batches(settings.batches_url)
    if not batches:
        raise dg.Failure(redact_text(f"no accepted batch in {settings.batches_url}; land files in {settings.landing_url}"))
    ids = tuple(b.batch_id for b in batches)
    version = ingestion.dataset_version(list(ids))
    record = RawDataset(version=version, batch_ids=ids, rows=sum(b.rows for b in batches),
                        batches_url=settings.batches_url)
    return dg.Output(
        record,
        data_version=dg.DataVersion(version),
        metadata={
            "data_version": version,
            "rows": record.rows,
            "batches": len(batches),
            "batch_ids": dg.MetadataValue.json(list(ids)),
            "batch_store": path_value(settings.batches_url),
            "dagster/row_count": record.rows,
        },
    )


def load_raw_frame(raw: RawDataset, spec: DatasetSpec) -> pd.DataFrame:
    """The frame of exactly the batches the record names (later batches are not mixed in)."""
    by_id = {b.batch_id: b for b in ingestion.accepted_batches(raw.batches_url)}
    missing = [i for i in raw.batch_ids if i not in by_id]
    if missing:
        raise dg.Failure(f"raw dataset {raw.version}: batches {missing[:3]} are gone from the batch store")
    return ingestion.load_raw_dataset([by_id[i] for i in raw.batch_ids], spec)


def _fingerprints(landing_url: str) -> dict[str, str]:
    return {f.name: f.fingerprint for f in ingestion.list_landed_files(landing_url)}


# New data runs everything downstream of ingestion: validation, features and, once they exist,
# training, evaluation, registry and deployment.
ingestion_onward_job = dg.define_asset_job(
    "ingestion_onward", selection=dg.AssetSelection.assets("raw_batches").downstream(),
    description="Ingest landed files and rebuild everything downstream of them.",
)


@dg.sensor(
    job=ingestion_onward_job,
    minimum_interval_seconds=c.RAW_FILES_SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def raw_files_sensor(context: dg.SensorEvaluationContext, platform: PlatformResource) -> dg.SensorResult | dg.SkipReason:
    """Requests one ingestion-onward run per set of new or changed landed files."""
    landing = platform.settings().landing_url
    try:
        current = _fingerprints(landing)
    except OSError as exc:
        # An unreachable landing folder is reported, not raised: the sensor keeps ticking.
        return dg.SkipReason(f"cannot list landing folder {landing}: {exc}")
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    new = {name: fp for name, fp in current.items() if seen.get(name) != fp}
    if not new:
        return dg.SkipReason(f"no new files in {landing}")
    run_key = hashlib.sha256(json.dumps(sorted(new.items())).encode()).hexdigest()[:16]
    # Forget files that left the folder (quarantined ones move away), so the cursor stays small.
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=run_key, tags={"mlops_assets/landed_files": ",".join(sorted(new))[:200]})],
        cursor=json.dumps(current),
    )


defs = dg.Definitions(assets=[raw_batches, raw_dataset], jobs=[ingestion_onward_job], sensors=[raw_files_sensor])
