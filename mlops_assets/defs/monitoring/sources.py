"""What serving writes and what arrives later, declared as external assets so the graph's lineage
runs from model_deployment through the prediction log (and the delayed labels) to profiles and drift.

Dagster never materializes them: the Ray Serve replicas append the prediction log, and labels are
dropped into the labels folder by whoever learns the truth. The monitoring runs that read them
record what they saw as observations of these assets (`prediction_log_observation`,
`delayed_labels_observation`), so each hour of the log shows its rows and versions in the UI.
"""

from collections.abc import Mapping
from typing import Any

import dagster as dg
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.defs.datasets import PRIMARY, DatasetNames
from mlops_assets.defs.monitoring.assets import monitoring_partitions
from mlops_assets.monitoring import live as mon

PREDICTION_LOG = dg.AssetKey("prediction_log")
DELAYED_LABELS = dg.AssetKey("delayed_labels")

prediction_log = dg.AssetSpec(
    PREDICTION_LOG,
    description="Every prediction the Ray Serve application answered (timestamp, request id, model version, "
                "inputs, outputs), appended by the replicas in buffered Parquet parts under date=/hour= folders.",
    deps=["model_deployment"],
    group_name=c.GROUP_MONITORING,
    owners=c.ASSET_OWNERS,
    kinds={"ray", "parquet"},
    partitions_def=monitoring_partitions,
    metadata={"written_by": "the serving replicas (mlops_assets.serving.prediction_log)",
              "layout": "date=YYYY-MM-DD/hour=HH/<part>.parquet"},
)

delayed_labels = dg.AssetSpec(
    DELAYED_LABELS,
    description="True labels that arrive after the prediction (CSV or Parquet files with request_id, label and "
                "labelled_at), joined onto the prediction log by request id.",
    deps=[PREDICTION_LOG],
    group_name=c.GROUP_MONITORING,
    owners=c.ASSET_OWNERS,
    kinds={"csv", "parquet"},
    metadata={"written_by": "the team or system that learns the truth (mlops-assets simulate labels here)"},
)


def prediction_log_observation(partition_key: str, frame: pd.DataFrame, files: int, skipped: int,
                               names: DatasetNames = PRIMARY) -> dg.AssetObservation:
    """What one hour of the prediction log held when a monitoring run read it."""
    versions = frame[mon.MODEL_VERSION].astype(str).value_counts().sort_index() if not frame.empty else pd.Series()
    metadata: dict[str, Any] = {
        "rows": len(frame),
        "requests": int(frame[mon.REQUEST_ID].nunique()) if not frame.empty else 0,
        "parts": files,
        "skipped_parts": skipped,
        "rows_by_version": dg.MetadataValue.table(
            records=[dg.TableRecord({"model_version": str(v), "rows": int(n)}) for v, n in versions.items()],
            schema=dg.TableSchema(columns=[dg.TableColumn("model_version", "string"), dg.TableColumn("rows", "int")])),
        "dagster/row_count": len(frame),
    }
    if not frame.empty:
        metadata["newest_record"] = str(pd.Timestamp(frame[mon.TIMESTAMP].max()))
    return dg.AssetObservation(asset_key=names.key(PREDICTION_LOG.path[-1]), partition=partition_key, metadata=metadata)


def delayed_labels_observation(frame: pd.DataFrame, files: int, skipped: int,
                               join: Mapping[str, int] | None = None, names: DatasetNames = PRIMARY) -> dg.AssetObservation:
    """How many labels had arrived when a monitoring run read them (and, with `join`, how they matched)."""
    metadata: dict[str, Any] = {"rows": len(frame), "files": files, "skipped_files": skipped,
                                "dagster/row_count": len(frame)}
    metadata.update({f"join_{k}": int(v) for k, v in (join or {}).items()})
    return dg.AssetObservation(asset_key=names.key(DELAYED_LABELS.path[-1]), metadata=metadata)


defs = dg.Definitions(assets=[prediction_log, delayed_labels])
