"""The platform's Definitions, loaded from the defs folder the way `dg` projects do.

Each module under `defs/` ends in a `defs` it owns; `defs/resources.py` binds every resource once.
With several data sets (MLOPS_DATASETS), each other one gets a copy of that graph under its own
names (`defs/datasets.py`), in the same Definitions.
"""

import functools

import dagster as dg

import mlops_assets.defs
from mlops_assets.defs.datasets import DatasetNames, prefixed_definitions
from mlops_assets.settings import Settings


@functools.cache
def _loaded() -> dg.Definitions:
    """The defs folder: the primary's graph, resources built from this environment. Not a module
    attribute, so the code location finds exactly one Definitions here (`defs`)."""
    return dg.load_defs(defs_root=mlops_assets.defs)


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """The primary's graph and a prefixed copy per other data set; resources from `settings`
    (None: the ones built from this environment at load)."""
    loaded = primary = _loaded()
    if settings is not None:
        from mlops_assets.defs.resources import build_resources

        primary = dg.Definitions(
            assets=loaded.assets, asset_checks=loaded.asset_checks, schedules=loaded.schedules, sensors=loaded.sensors,
            jobs=loaded.jobs, loggers=loaded.loggers, executor=loaded.executor, metadata=loaded.metadata,
            resources=build_resources(settings))
    # The other data sets: the settings', else those the resources were built with at load.
    others = ([name for name, _ in settings.other_datasets] if settings is not None
              else list(getattr((loaded.resources or {}).get("platform"), "datasets", None) or {}))
    if not others:
        return primary
    from mlops_assets.defs.ingestion.assets import BUILT_PER_DATASET
    from mlops_assets.defs.monitoring.sensors import run_failure_alert  # one alert sensor sees every run

    copies = [prefixed_definitions(primary, DatasetNames(name), shared_sensors=[run_failure_alert.name],
                                   built=BUILT_PER_DATASET) for name in others]
    return dg.Definitions.merge(primary, *copies)


defs = build_definitions()


def training_job() -> dg.JobDefinition:
    """The primary data set's training job, for `dg.reconstructable` (`mlops-assets train`): a
    module-level target, callable without arguments, that a multiprocess executor's step processes
    can import again."""
    from mlops_assets.defs.ingestion.assets import TRAINING_JOB

    return defs.resolve_job_def(TRAINING_JOB)


def dataset_training_job(dataset: str) -> dg.JobDefinition:
    """Another data set's training job, for `dg.build_reconstructable_job` (`mlops-assets train --dataset`)."""
    from mlops_assets.defs.ingestion.assets import TRAINING_JOB

    return defs.resolve_job_def(DatasetNames(dataset).name(TRAINING_JOB))
