"""Several data sets at once (MLOPS_DATASETS): one asset graph per data set in one Definitions.

The primary data set keeps the plain names it always had (`raw_dataset`, job `training`), so
adding a data set renames nothing. Every other one is the same graph with its name before each
key (`network_flows/raw_dataset`), group (`network_flows_training`), job, sensor and schedule
(`network_flows__training`). Code that names an asset or a job asks `DatasetNames` for the data
set it runs for: an asset from its own key, a sensor or schedule from its own name, a run from its
tag (or the keys it selected); resources pick that data set's values the same way (`resources.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg

DATASET_TAG = "mlops_assets/dataset"  # on every run of another data set's jobs
NAME_SEPARATOR = "__"  # between a data set's name and a job, sensor or schedule name


@dataclass(frozen=True)
class DatasetNames:
    """The names of one data set's assets, groups, jobs, sensors and schedules."""

    dataset: str | None = None  # None: the primary data set's plain names

    def key(self, asset: str) -> dg.AssetKey:
        return dg.AssetKey([self.dataset, asset] if self.dataset else [asset])

    def name(self, name: str) -> str:
        """A job, sensor or schedule name."""
        return f"{self.dataset}{NAME_SEPARATOR}{name}" if self.dataset else name

    def group(self, group: str) -> str:
        return f"{self.dataset}_{group}" if self.dataset else group

    def run_tags(self) -> dict[str, str]:
        return {DATASET_TAG: self.dataset} if self.dataset else {}


PRIMARY = DatasetNames()


def names_for_key(key: dg.AssetKey) -> DatasetNames:
    return DatasetNames(key.path[0]) if len(key.path) > 1 else PRIMARY


def names_for_asset(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext | dg.OpExecutionContext
                    ) -> DatasetNames:
    """The data set an asset (or check) belongs to, from its key; an op's from its run."""
    if isinstance(context, dg.AssetCheckExecutionContext):
        return names_for_key(context.check_specs[0].asset_key)
    if context.has_assets_def:
        return names_for_key(next(iter(context.assets_def.keys)))
    return names_for_run(context.run)


def names_for_name(name: str) -> DatasetNames:
    """The data set of a job, sensor or schedule, from its name."""
    dataset, separator, _ = name.partition(NAME_SEPARATOR)
    return DatasetNames(dataset) if separator else PRIMARY


def names_for_instigator(context: dg.SensorEvaluationContext | dg.ScheduleEvaluationContext) -> DatasetNames:
    """A sensor's or schedule's data set, from its name (a context built without one: the primary)."""
    if isinstance(context, dg.ScheduleEvaluationContext):
        name = getattr(context, "_schedule_name", None)  # no public accessor for a schedule's own name
    else:
        try:
            name = context.sensor_name
        except Exception:  # a context built by a test or a tool, with no name: raises rather than None
            name = None
    return names_for_name(name or "")


def names_for_run(run: dg.DagsterRun) -> DatasetNames:
    """A run's data set: its tag, else the keys it selected (one data set's only), else its job's name."""
    if run.tags.get(DATASET_TAG):
        return DatasetNames(run.tags[DATASET_TAG])
    keys = [*(run.asset_selection or ()), *(check.asset_key for check in run.asset_check_selection or ())]
    found = {names_for_key(key).dataset for key in keys}
    if len(found) > 1:
        shown = ", ".join(sorted(name or "the primary" for name in found))
        raise dg.DagsterInvariantViolationError(
            f"run {run.run_id[:8]} selects assets of several data sets ({shown}): materialize one data set's assets per run")
    if found:
        return DatasetNames(found.pop())
    return names_for_name(run.job_name or "")


def prefixed_definitions(primary: dg.Definitions, names: DatasetNames, *, shared_sensors: Iterable[str] = (),
                         built: Mapping[str, Callable[[DatasetNames], dg.AssetsDefinition]] | None = None,
                         ) -> dg.Definitions:
    """The primary's graph (`primary`, resources left out) as data set `names`: every key, group,
    job, sensor and schedule renamed, runs tagged, dependencies kept inside the data set. Sensors
    named in `shared_sensors` watch every data set's runs already and are not copied; the assets
    named in `built` are built for the data set by their function (a partition set of its own)."""
    graph = primary.resolve_asset_graph()
    defs = primary
    plain = _plain_keys(defs)
    replacements = {key: names.key(key.path[0]) for key in plain}

    def rename(asset: Any) -> Any:
        if isinstance(asset, dg.AssetsDefinition) and len(asset.keys) == 1 and asset.key.path[0] in (built or {}):
            return (built or {})[asset.key.path[0]](names)
        if isinstance(asset, dg.AssetSpec):
            return asset.replace_attributes(
                key=replacements[asset.key], group_name=names.group(asset.group_name or "default"),
                deps=[dg.AssetDep(replacements.get(dep.asset_key, dep.asset_key)) for dep in asset.deps])
        renamed = asset.with_attributes(asset_key_replacements=replacements)
        # with_attributes keeps a group once set; a spec's group may be replaced
        return renamed.map_asset_specs(lambda spec: spec.replace_attributes(group_name=names.group(spec.group_name or "default")))

    assets = [rename(asset) for asset in defs.assets or ()]
    checks = [check.with_attributes(asset_key_replacements=replacements) for check in defs.asset_checks or ()]
    jobs: dict[str, Any] = {}
    for job in defs.jobs or ():
        jobs[job.name] = _renamed_job(job, names, replacements, graph)
    sensors = [_renamed_sensor(sensor, names, jobs) for sensor in defs.sensors or () if sensor.name not in shared_sensors]
    schedules = [_renamed_schedule(schedule, names, jobs) for schedule in defs.schedules or ()]
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=list(jobs.values()), sensors=sensors,
                          schedules=schedules)


def _plain_keys(defs: dg.Definitions) -> set[dg.AssetKey]:
    keys: set[dg.AssetKey] = set()
    for asset in defs.assets or ():
        if isinstance(asset, dg.AssetSpec):
            keys.add(asset.key)
        elif isinstance(asset, dg.AssetsDefinition):
            keys.update(asset.keys)
    return keys


def _renamed_job(job: Any, names: DatasetNames, replacements: dict[dg.AssetKey, dg.AssetKey],
                 graph: Any) -> Any:
    tags = {**(job.tags or {}), **names.run_tags()}
    if isinstance(job, dg.JobDefinition):  # an op job (rollback, release decisions): its ops ask the run's tag
        return job.graph.to_job(name=names.name(job.name), description=job.description, tags=tags,
                                hooks=job.hook_defs, executor_def=job.executor_def, op_retry_policy=job.op_retry_policy)
    selected = job.selection.resolve(graph)
    selected_checks = job.selection.resolve_checks(graph)
    selection: dg.AssetSelection = dg.AssetSelection.assets(*(replacements[key] for key in selected))
    if selected_checks:
        selection = selection | dg.AssetSelection.checks(
            *(dg.AssetCheckKey(replacements[check.asset_key], check.name) for check in selected_checks))
    partitions = job.partitions_def
    if isinstance(partitions, dg.DynamicPartitionsDefinition) and partitions.name:  # the data set's own set
        partitions = dg.DynamicPartitionsDefinition(name=names.name(partitions.name))
    return dg.define_asset_job(
        names.name(job.name), selection=selection, config=job.config, description=job.description, tags=tags,
        run_tags=job.run_tags, metadata=job.metadata, partitions_def=partitions, executor_def=job.executor_def,
        hooks=job.hooks, op_retry_policy=job.op_retry_policy)


def _renamed_sensor(sensor: dg.SensorDefinition, names: DatasetNames, jobs: dict[str, Any]) -> dg.SensorDefinition:
    targets = [jobs[target.job_name] for target in sensor.targets]
    return dg.SensorDefinition(
        name=names.name(sensor.name), evaluation_fn=sensor._raw_fn,  # noqa: SLF001 (the decorated body)
        minimum_interval_seconds=sensor.minimum_interval_seconds, description=sensor.description,
        jobs=targets or None, default_status=sensor.default_status,
        required_resource_keys=sensor._raw_required_resource_keys)  # noqa: SLF001


def _renamed_schedule(schedule: Any, names: DatasetNames, jobs: dict[str, Any]) -> Any:
    if not isinstance(schedule, dg.ScheduleDefinition):  # built from a partitioned asset job: build it again
        return dg.build_schedule_from_partitioned_job(
            jobs[schedule.job.name], name=names.name(schedule.name), description=schedule.description,
            minute_of_hour=schedule.minute_of_hour, hour_of_day=schedule.hour_of_day, day_of_week=schedule.day_of_week,
            day_of_month=schedule.day_of_month, default_status=schedule.default_status, tags=schedule.tags)
    return dg.ScheduleDefinition(
        name=names.name(schedule.name), cron_schedule=schedule.cron_schedule, job=jobs[schedule.job_name],
        execution_fn=schedule._execution_fn,  # noqa: SLF001 (its body, which asks its name for the data set)
        execution_timezone=schedule.execution_timezone, default_status=schedule.default_status,
        description=schedule.description, required_resource_keys=schedule._raw_required_resource_keys)  # noqa: SLF001
