"""The platform's Definitions, loaded from the defs folder the way `dg` projects do.

Each module under `defs/` ends in a `defs` it owns; `defs/resources.py` binds every resource once.
"""

import dagster as dg

import mlops_assets.defs

defs = dg.load_defs(defs_root=mlops_assets.defs)


def training_job() -> dg.JobDefinition:
    """The training job, for `dg.reconstructable` (`mlops-assets train`): a module-level target that
    a multiprocess executor's step processes can import again."""
    from mlops_assets.defs.ingestion.assets import TRAINING_JOB

    return defs.resolve_job_def(TRAINING_JOB)
