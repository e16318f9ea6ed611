"""Governance lookups in the Dagster instance for `mlops-assets trace` (registry/governance.py stays
free of Dagster): runs by id, and the runs that materialized a given data or feature version."""

from typing import Any

import dagster as dg

from mlops_assets.defs.datasets import PRIMARY, DatasetNames

MAX_MATERIALIZATIONS = 500  # how far back the lookups page through an asset's history


class InstanceLookup:
    """`lib.governance.DagsterLookup` on a Dagster instance, for the assets of data set `names`."""

    def __init__(self, instance: dg.DagsterInstance, names: DatasetNames = PRIMARY) -> None:
        self.instance = instance
        self.names = names

    def run(self, run_id: str) -> dict[str, Any] | None:
        record = self.instance.get_run_record_by_id(run_id)
        if record is None:
            return None
        run = record.dagster_run
        return {"status": run.status.value, "job_name": run.job_name,
                "start_time": record.start_time, "end_time": record.end_time}

    def _materializations(self, asset: str) -> list[Any]:
        return list(self.instance.fetch_materializations(self.names.key(asset), limit=MAX_MATERIALIZATIONS).records)

    @staticmethod
    def _meta(record: Any) -> dict[str, Any]:
        materialization = record.asset_materialization
        if materialization is None:
            return {}
        return {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}

    def materializing_runs(self, asset: str, key: str, value: str) -> list[str]:
        runs = [r.run_id for r in self._materializations(asset) if str(self._meta(r).get(key)) == value]
        return list(dict.fromkeys(runs))

    def batch_ids(self, raw_dataset_version: str) -> list[str] | None:
        for record in self._materializations("raw_dataset"):
            meta = self._meta(record)
            if str(meta.get("data_version")) == raw_dataset_version and isinstance(meta.get("batch_ids"), list):
                return [str(i) for i in meta["batch_ids"]]
        return None
