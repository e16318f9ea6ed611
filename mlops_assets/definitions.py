"""Assembles the platform's Definitions: every concern's `defs`, with the resources bound once."""

import dagster as dg

from mlops_assets.defs import features, ingestion, validation
from mlops_assets.defs.resources import ParquetIOManager, PlatformResource

defs = dg.Definitions.merge(
    ingestion.defs,
    validation.defs,
    features.defs,
    dg.Definitions(
        resources={
            "platform": PlatformResource(),
            "io_manager": ParquetIOManager(),
        },
    ),
)
