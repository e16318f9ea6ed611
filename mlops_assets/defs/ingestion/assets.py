"""Ingestion: landed files -> content-addressed batches (bad files quarantined) -> raw_dataset."""


import json
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import dagster as dg
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.core import records
from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.core.records import RawDataset, content_hash
from mlops_assets.defs.datasets import PRIMARY, DatasetNames, names_for_instigator
from mlops_assets.defs.metadata import path_value, redact_text, redact_uri
from mlops_assets.defs.resources import PlatformResource, end_mlflow_on_run_finished
from mlops_assets.defs.training.staleness import sensor_staleness
from mlops_assets.ingestion import batches as ingestion
from mlops_assets.settings import join_url

CONTRACT_CHECK = "landed_files_meet_contract"
NOT_EMPTY_CHECK = "has_accepted_batches"
RAW_BATCHES_PARTITIONS = "raw_batches"
INGEST_JOB = "ingest_raw_batch"
TRAINING_JOB = "ingestion_onward"  # the training path and what follows it: sensors' and `mlops-assets train`'s runs
LANDED_FILE_TAG = "mlops_assets/landed_file"  # the file a partition run reads first
LANDED_FILES_TAG = "mlops_assets/landed_files"
RAW_DATASET_CODE_VERSION = "2"  # bump when the union of batches is built differently
CONTRACT_DIR = "contract"  # under the reports folder: each batch's contract findings, per dataset spec


def raw_batch_partitions_of(names: DatasetNames) -> dg.DynamicPartitionsDefinition:
    """Each landed file is one partition of raw_batches, keyed by the sha256 of its bytes; each
    data set has its own set of them."""
    return dg.DynamicPartitionsDefinition(name=names.name(RAW_BATCHES_PARTITIONS))


raw_batch_partitions = raw_batch_partitions_of(PRIMARY)


def _contract_result(outcome: ingestion.BatchOutcome) -> dg.AssetCheckResult:
    bad = outcome.quarantine
    first_problem = bad.violations[0] if bad and bad.violations else {}
    return dg.AssetCheckResult(
        check_name=CONTRACT_CHECK,
        passed=bad is None,
        severity=dg.AssetCheckSeverity.ERROR,
        description=redact_text(f"{bad.file_name}: {bad.reason}") if bad else f"{outcome.file_name} met the contract",
        metadata={
            "quarantined_files": int(bad is not None),
            "file": outcome.file_name,
            "column": str(first_problem.get("column") or ""),
            "example": str(first_problem.get("example") or ""),
            "quarantine": dg.MetadataValue.json([
                {"file": bad.file_name, "moved_to": redact_text(bad.moved_to), "reason": bad.reason,
                 "violations": bad.violations}] if bad else []),
        },
    )


def build_raw_batches(names: DatasetNames = PRIMARY) -> dg.AssetsDefinition:
    """raw_batches of data set `names`: built per data set (not renamed like the other assets)
    because each data set's landed files are a partition set of their own."""
    partitions = raw_batch_partitions_of(names)
    key = names.key("raw_batches")

    @dg.asset(
        key=key, group_name=names.group(c.GROUP_INGESTION), owners=c.ASSET_OWNERS,
        kinds={"pandas", "parquet"},
        partitions_def=partitions,
        check_specs=[
            # Partitioned checks: the UI shows each file's check results on its own partition.
            dg.AssetCheckSpec(CONTRACT_CHECK, asset=key, partitions_def=partitions,
                              description="The landed file was readable and met the data contract."),
            # Not blocking: nothing downstream runs in a partition's run, and a bad file's run should
            # report it (failed checks, quarantine) rather than fail.
            dg.AssetCheckSpec(NOT_EMPTY_CHECK, asset=key, partitions_def=partitions,
                              description="The file became an accepted batch with rows, so there is data to train on."),
        ],
    )
    def raw_batches(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
        """One landed file (partition key: its sha256), copied once into the batch store or quarantined."""
        return _ingest_partition(context, platform)

    return raw_batches


def _ingest_partition(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    settings = platform
    sha = context.partition_key
    try:
        outcome = ingestion.ingest_batch(sha, settings.landing_url, settings.batches_url, settings.quarantine_url,
                                         platform.spec(), hint_url=context.run.tags.get(LANDED_FILE_TAG))
    except ingestion.LandedFileNotFoundError as exc:
        raise dg.Failure(redact_text(str(exc))) from exc
    if outcome.quarantine is not None:
        bad = outcome.quarantine
        context.log.warning(redact_text(f"quarantined {bad.file_name}: {bad.reason} (moved to {bad.moved_to})"))
    if outcome.status == "accepted":  # checked against this spec just now: validation does not check it again
        records.write_atomic(contract_url(settings.reports_url, platform.spec(), sha), b"[]")
    accepted = len(ingestion.accepted_batches(settings.batches_url))
    batch = outcome.batch
    not_empty = dg.AssetCheckResult(
        check_name=NOT_EMPTY_CHECK,
        passed=batch is not None and batch.rows > 0,
        metadata={"accepted_batches": accepted},
        description=f"{outcome.file_name}: {batch.rows} rows accepted" if batch is not None else redact_text(
            f"{outcome.file_name} gave no accepted rows (quarantined); drop CSV or Parquet files that meet "
            f"the contract into {settings.landing_url}"),
    )
    metadata: dict[str, dg.RawMetadataValue] = {
        "status": outcome.status,
        "file": outcome.file_name,
        "sha256": sha,
        "source": redact_text(outcome.source),
        "accepted_batches": accepted,
        "landing_folder": path_value(settings.landing_url),
    }
    if batch is not None:
        metadata.update({
            "rows": batch.rows,
            "columns": len(batch.columns),
            "column_names": dg.MetadataValue.json(batch.columns),
            "file_format": batch.file_format,
            "accepted_at": batch.accepted_at,
            "stored_at": path_value(batch.stored_at),
            "dagster/row_count": batch.rows,
        })
    else:
        assert outcome.quarantine is not None
        metadata.update({"rows": 0, "reason": redact_text(outcome.quarantine.reason),
                         "moved_to": path_value(outcome.quarantine.moved_to)})
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[_contract_result(outcome), not_empty],
        # The content is the version: re-ingesting the same bytes is never new data.
        data_version=dg.DataVersion(sha if batch is not None else f"quarantined-{sha}"),
    )


raw_batches = build_raw_batches()
# Assets another data set gets built for itself rather than renamed (definitions.py).
BUILT_PER_DATASET = {"raw_batches": build_raw_batches}


# All partitions: the union of every accepted batch (labelled production batches are stored
# straight into the batch store).
@dg.asset(group_name=c.GROUP_INGESTION, owners=c.ASSET_OWNERS, kinds={"pandas", "parquet"},
          deps=[dg.AssetDep("raw_batches", partition_mapping=dg.AllPartitionMapping()), "labelled_production_batch"],
          code_version=RAW_DATASET_CODE_VERSION)
def raw_dataset(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.Output[RawDataset]:
    """The union of all accepted batches, versioned by their content hashes (a record naming them)."""
    settings = platform
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


def current_raw_version(batches_url: str) -> str | None:
    """The data version raw_dataset would have now (None: no accepted batch), as raw_dataset computes it."""
    batches = ingestion.accepted_batches(batches_url)
    return ingestion.dataset_version([b.batch_id for b in batches]) if batches else None


def contract_url(reports_url: str, spec: DatasetSpec, batch_id: str) -> str:
    """Where the data contract's findings on one batch under one dataset spec are kept: each batch
    is checked once (when it lands, or by the first validation that sees it), not per data version."""
    return join_url(reports_url, CONTRACT_DIR, content_hash(repr(spec))[:12], f"{batch_id}.json")


def load_raw_frame(raw: RawDataset, spec: DatasetSpec) -> pd.DataFrame:
    """The frame of exactly the batches the record names (later batches are not mixed in)."""
    by_id = {b.batch_id: b for b in ingestion.accepted_batches(raw.batches_url)}
    missing = [i for i in raw.batch_ids if i not in by_id]
    if missing:
        raise dg.Failure(f"raw dataset {raw.version}: batches {missing[:3]} are gone from the batch store")
    return ingestion.load_raw_dataset([by_id[i] for i in raw.batch_ids], spec)


# Everything downstream of raw_dataset up to the deployed champion and its reference profile; not
# what serving writes (the prediction log and labels are external) nor the hourly monitoring assets.
TRAINING_ONWARD = (dg.AssetSelection.assets("raw_dataset").downstream()
                   - dg.AssetSelection.assets("prediction_log").downstream())

# A run per landed file (one partition), then one run of everything downstream of raw_dataset.
ingest_raw_batch_job = dg.define_asset_job(
    INGEST_JOB, selection=dg.AssetSelection.assets("raw_batches"), partitions_def=raw_batch_partitions,
    description="Ingest one landed file: one partition of raw_batches, keyed by its content hash.",
)

# New data runs everything downstream of ingestion: validation, features, training, evaluation,
# registry and deployment, on the union of the accepted batches.
ingestion_onward_job = dg.define_asset_job(
    TRAINING_JOB, selection=TRAINING_ONWARD,
    description="Rebuild everything downstream of the accepted raw batches.",
    hooks={end_mlflow_on_run_finished},  # dagster-mlflow: no MLflow run left open by a failed step
)


@dataclass(frozen=True)
class IngestedFile:
    file_name: str
    sha256: str
    status: str  # accepted | already_accepted | quarantined | already_ingested | failed
    detail: str = ""


def ingest_landed_on_instance(instance: dg.DagsterInstance, job: dg.JobDefinition, landing_url: str,
                              names: DatasetNames = PRIMARY) -> list[IngestedFile]:
    """Register every landed file as a partition of raw_batches and materialize, one run each, those
    not materialized yet: what the file sensor does through the daemon, for the command line.
    `job` is data set `names`'s ingest job."""
    by_hash = ingestion.hash_landed_files(landing_url)
    instance.add_dynamic_partitions(names.name(RAW_BATCHES_PARTITIONS), list(by_hash))  # idempotent
    done = instance.get_materialized_partitions(names.key("raw_batches"))
    out = []
    for sha, landed in by_hash.items():
        if sha in done:
            out.append(IngestedFile(landed.name, sha, "already_ingested"))
            continue
        result = job.execute_in_process(instance=instance, partition_key=sha, raise_on_error=False,
                                        tags={LANDED_FILE_TAG: redact_uri(landed.url)})
        materialized = result.asset_materializations_for_node(names.name("raw_batches"))  # its op's name
        if not materialized:  # the run broke before reporting: not a verdict on the file
            failure = next((e.message for e in result.all_events if e.is_failure), None) or "run failed"
            out.append(IngestedFile(landed.name, sha, "failed", redact_text(failure)))
            continue
        contract = next(e for e in result.get_asset_check_evaluations() if e.check_name == CONTRACT_CHECK)
        status = str(getattr(materialized[0].metadata["status"], "value", ""))
        out.append(IngestedFile(landed.name, sha, status, "" if contract.passed else contract.description or ""))
    return out


@dataclass(frozen=True)
class _FilesCursor:
    seen: dict[str, str]  # file name -> fingerprint, so only changed files are read and hashed
    pending: list[str]  # partitions requested, whose downstream run is not requested yet

    @classmethod
    def parse(cls, text: str | None) -> "_FilesCursor":
        raw = json.loads(text) if text else {}
        if "seen" not in raw:  # the cursor of the unpartitioned sensor: names -> fingerprints
            return cls(seen=dict(raw), pending=[])
        return cls(seen=dict(raw["seen"]), pending=list(raw["pending"]))

    def dump(self) -> str:
        return json.dumps({"seen": self.seen, "pending": self.pending})


def _ingest_finished(instance: dg.DagsterInstance, sha: str, materialized: AbstractSet[str], names: DatasetNames) -> bool:
    runs = instance.get_runs(dg.RunsFilter(job_name=names.name(INGEST_JOB), tags={"dagster/partition": sha}), limit=5)
    if any(not run.is_finished for run in runs):
        return False
    return bool(runs) or sha in materialized


@dg.sensor(
    jobs=[ingest_raw_batch_job, ingestion_onward_job],
    minimum_interval_seconds=c.RAW_FILES_SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def raw_files_sensor(context: dg.SensorEvaluationContext, platform: PlatformResource) -> dg.SensorResult | dg.SkipReason:
    """Adds a raw_batches partition (and its run) per new landed file; once those runs finished,
    requests one ingestion_onward run if any of the files was accepted and the training path is
    stale (a run since, `make pipeline` say, may have trained on them already)."""
    names = names_for_instigator(context)
    settings = platform.for_dataset(names.dataset)
    landing = settings.landing_url
    cursor = _FilesCursor.parse(context.cursor)
    try:
        files = ingestion.list_landed_files(landing)
        hashes = ingestion.hash_landed_files(landing, [f for f in files if cursor.seen.get(f.name) != f.fingerprint])
    except OSError as exc:
        # An unreachable landing folder is reported, not raised: the sensor keeps ticking.
        return dg.SkipReason(redact_text(f"cannot list landing folder {landing}: {exc}"))
    # Files that left the folder (quarantined ones move away) are forgotten, so the cursor stays small.
    seen = {f.name: f.fingerprint for f in files}
    known = set(context.instance.get_dynamic_partitions(names.name(RAW_BATCHES_PARTITIONS)))
    new = {sha: f for sha, f in hashes.items() if sha not in known and sha not in cursor.pending}
    if new:
        return dg.SensorResult(
            dynamic_partitions_requests=[raw_batch_partitions_of(names).build_add_request(list(new))],
            run_requests=[dg.RunRequest(job_name=names.name(INGEST_JOB), partition_key=sha, run_key=f"raw_batch-{sha}",
                                        tags={LANDED_FILE_TAG: redact_uri(f.url)}) for sha, f in new.items()],
            cursor=_FilesCursor(seen, [*cursor.pending, *new]).dump(),
        )
    if not cursor.pending:
        return dg.SensorResult(skip_reason=redact_text(f"no new files in {landing}"), cursor=_FilesCursor(seen, []).dump())
    materialized = context.instance.get_materialized_partitions(names.key("raw_batches"))
    waiting = [sha for sha in cursor.pending if not _ingest_finished(context.instance, sha, materialized, names)]
    if waiting:
        return dg.SensorResult(skip_reason=f"waiting for {len(waiting)} raw_batches run(s) to finish",
                               cursor=_FilesCursor(seen, cursor.pending).dump())
    accepted = [sha for sha in cursor.pending if ingestion.batch_record(settings.batches_url, sha) is not None]
    if not accepted:
        return dg.SensorResult(skip_reason=f"none of the {len(cursor.pending)} new file(s) met the contract; "
                                           "see the landed_files_meet_contract check of their partitions",
                               cursor=_FilesCursor(seen, []).dump())
    found = sensor_staleness(context, settings.batches_url, names)
    if not found.stale:
        return dg.SensorResult(skip_reason=f"{len(accepted)} new file(s) accepted, no training run: {found.summary()}; "
                                           "a run since has trained on them",
                               cursor=_FilesCursor(seen, []).dump())
    context.log.info(f"requesting ingestion_onward: {found.summary()}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(job_name=names.name(ingestion_onward_job.name),
                                    run_key=f"ingestion_onward-{ingestion.dataset_version(accepted)}",
                                    tags={LANDED_FILES_TAG: ",".join(sha[:16] for sha in accepted)[:200]})],
        cursor=_FilesCursor(seen, []).dump(),
    )


defs = dg.Definitions(assets=[raw_batches, raw_dataset], jobs=[ingest_raw_batch_job, ingestion_onward_job],
                      sensors=[raw_files_sensor])
