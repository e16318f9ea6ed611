"""Validation: the pandera contract and dataset-level figures as a report with asset checks."""

import json

import dagster as dg

from mlops_assets import constants as c
from mlops_assets.core import records, storage
from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.core.records import RawDataset, content_hash
from mlops_assets.defs.ingestion.assets import contract_url, load_raw_frame
from mlops_assets.defs.metadata import path_value
from mlops_assets.defs.resources import PlatformResource
from mlops_assets.settings import join_url
from mlops_assets.validation.report import ValidationThresholds, build_report, render_markdown

VALIDATION_CODE_VERSION = "2"  # bump when the report is computed differently


class ValidationConfig(dg.Config):
    """Limits of the dataset-level checks (defaults in constants.py)."""

    min_rows: int = c.MIN_ROWS
    max_null_share: float = c.MAX_NULL_SHARE
    min_minority_class_share: float = c.MIN_MINORITY_CLASS_SHARE
    warn_duplicate_share: float = c.WARN_DUPLICATE_SHARE


@dg.asset(group_name=c.GROUP_VALIDATION, owners=c.ASSET_OWNERS, kinds={"pandera", "pandas"}, code_version=VALIDATION_CODE_VERSION)
def validation_report(context: dg.AssetExecutionContext, config: ValidationConfig, platform: PlatformResource,
                      raw_dataset: RawDataset) -> dg.Output[dict]:
    """Contract result, nulls, duplicates, conflicting labels and label balance of raw_dataset."""
    settings = platform
    data_version = raw_dataset.version  # the version of the very data this run validates
    thresholds = ValidationThresholds(**config.model_dump())
    spec = platform.spec()
    # Addressed by data, thresholds, spec and code: written once (temporary name, then rename),
    # never in place; the same data is checked against the contract once, later runs read the report.
    key = content_hash(config.model_dump(), repr(spec), VALIDATION_CODE_VERSION)[:8]
    base = join_url(settings.reports_url, f"validation-{data_version}-{key}")
    if storage.exists(f"{base}.json"):
        report = storage.read_json(f"{base}.json")
        context.log.info(f"data version {data_version} was validated before: report {base}.json reused")
    else:
        violations = batch_violations(raw_dataset, spec, settings.reports_url)
        report = build_report(load_raw_frame(raw_dataset, spec), spec, thresholds, data_version, violations)
        records.write_atomic(f"{base}.json", json.dumps(report, indent=1).encode())
    markdown = render_markdown(report)
    records.write_atomic(f"{base}.md", markdown.encode())
    return dg.Output(
        report,
        metadata={
            "data_version": data_version,
            "row_count": report["row_count"],
            "schema_valid": report["schema"]["valid"],
            "null_share": report["null_share"],
            "duplicate_share": report["duplicate_share"],
            "conflicting_label_vectors": report["conflicting_label_vectors"],
            "minority_class_share": report["minority_class_share"],
            "report_json": path_value(f"{base}.json"),
            "report_markdown": path_value(f"{base}.md"),
            "report": dg.MetadataValue.md(markdown),
        },
    )


def batch_violations(raw: RawDataset, spec: DatasetSpec, reports_url: str) -> list[dict]:
    """The data contract's findings on each batch of `raw`, each batch checked once: a batch checked
    when it landed (or by an earlier validation) under this spec is not checked again."""
    from mlops_assets.core.schema import check_contract
    from mlops_assets.ingestion import batches

    found: list[dict] = []
    by_id: dict[str, batches.BatchRecord] | None = None
    for batch_id in raw.batch_ids:
        url = contract_url(reports_url, spec, batch_id)
        if storage.exists(url):
            violations = storage.read_json(url)
        else:  # a batch that came in another way (a labelled production batch), or under another spec
            by_id = by_id or {b.batch_id: b for b in batches.accepted_batches(raw.batches_url)}
            if batch_id not in by_id:
                raise dg.Failure(f"raw dataset {raw.version}: batch {batch_id} is gone from the batch store")
            frame = batches.load_raw_dataset([by_id[batch_id]], spec)
            violations = [v.as_dict() for v in check_contract(frame, spec)]
            records.write_atomic(url, json.dumps(violations, default=str).encode())
        found += [{**v, "batch_id": batch_id} for v in violations]
    return found


@dg.asset_check(asset=validation_report, blocking=True, description="raw_dataset meets the pandera contract.")
def schema_is_valid(validation_report: dict) -> dg.AssetCheckResult:
    violations = validation_report["schema"]["violations"]
    return dg.AssetCheckResult(
        passed=not violations,
        metadata={"violations": len(violations),
                  "details": dg.MetadataValue.json(violations[:20])},
        description="; ".join(v["message"] for v in violations[:5]) or None,
    )


@dg.asset_check(asset=validation_report, blocking=True, description="Enough rows to train and evaluate.")
def enough_rows(validation_report: dict) -> dg.AssetCheckResult:
    rows, limit = validation_report["row_count"], validation_report["thresholds"]["min_rows"]
    return dg.AssetCheckResult(passed=rows >= limit, metadata={"row_count": rows, "min_rows": limit})


@dg.asset_check(asset=validation_report, blocking=True, description="Both classes present in usable shares.")
def label_balance(validation_report: dict) -> dg.AssetCheckResult:
    share, limit = validation_report["minority_class_share"], validation_report["thresholds"]["min_minority_class_share"]
    return dg.AssetCheckResult(
        passed=share >= limit,
        metadata={"minority_class_share": share, "min_minority_class_share": limit,
                  "label_share": dg.MetadataValue.json(validation_report["label_share"])},
    )


@dg.asset_check(asset=validation_report, blocking=True, description="Few enough missing feature values.")
def null_share(validation_report: dict) -> dg.AssetCheckResult:
    share, limit = validation_report["null_share"], validation_report["thresholds"]["max_null_share"]
    return dg.AssetCheckResult(
        passed=share <= limit,
        metadata={"null_share": share, "max_null_share": limit,
                  "unlabelled_rows": validation_report["unlabelled_rows"],
                  "by_column": dg.MetadataValue.json(validation_report["null_share_by_column"])},
    )


@dg.asset_check(asset=validation_report, description="Exact duplicate rows (reported; removed by cleaning).")
def duplicate_share(validation_report: dict) -> dg.AssetCheckResult:
    share, limit = validation_report["duplicate_share"], validation_report["thresholds"]["warn_duplicate_share"]
    return dg.AssetCheckResult(
        passed=share <= limit, severity=dg.AssetCheckSeverity.WARN,
        metadata={"duplicate_share": share, "warn_above": limit,
                  "distinct_feature_vectors": validation_report["distinct_feature_vectors"]},
    )


@dg.asset_check(asset=validation_report, description="Feature vectors seen with both labels (reported; resolved by cleaning).")
def conflicting_labels(validation_report: dict) -> dg.AssetCheckResult:
    count = validation_report["conflicting_label_vectors"]
    distinct = max(1, validation_report["distinct_feature_vectors"])
    # A few per cent of vectors is what real data of this kind shows; far more means mislabelled data.
    return dg.AssetCheckResult(
        passed=count / distinct <= 0.05, severity=dg.AssetCheckSeverity.WARN,
        metadata={"conflicting_label_vectors": count, "share_of_distinct_vectors": round(count / distinct, 6)},
    )


defs = dg.Definitions(
    assets=[validation_report],
    asset_checks=[schema_is_valid, enough_rows, label_balance, null_share, duplicate_share, conflicting_labels],
)
