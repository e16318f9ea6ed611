"""Assembles the platform's Definitions: every concern's `defs`, with the resources bound once."""

import dagster as dg

from mlops_assets.defs import (
    automation,
    deployment,
    evaluation,
    features,
    ingestion,
    monitoring,
    registry,
    training,
    validation,
)
from mlops_assets.defs.deployment import RayServeResource
from mlops_assets.defs.mlflow_resource import MlflowResource
from mlops_assets.defs.monitoring import MonitoringResource
from mlops_assets.defs.resources import ParquetIOManager, PlatformResource

defs = dg.Definitions.merge(
    ingestion.defs,
    validation.defs,
    features.defs,
    training.defs,
    evaluation.defs,
    registry.defs,
    deployment.defs,
    monitoring.defs,
    automation.defs,
    dg.Definitions(
        resources={
            "platform": PlatformResource(),
            "io_manager": ParquetIOManager(),
            "mlflow": MlflowResource(),
            "ray_serve": RayServeResource(),
            "monitoring": MonitoringResource(),
        },
    ),
)
