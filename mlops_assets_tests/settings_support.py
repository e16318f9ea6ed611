"""The platform's Definitions as a code location started with this process's environment has them.

The resources are built once, when the definitions load: a test that sets variables after
`mlops_assets.definitions` was first imported gets Definitions rebuilt from them here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg

from mlops_assets.settings import load_settings


def platform_resources(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    from mlops_assets.defs.resources import build_resources

    return build_resources(load_settings(os.environ if env is None else env))


def platform_definitions(env: Mapping[str, str] | None = None) -> dg.Definitions:
    """The loaded Definitions (every data set's graph) with every resource built from `env`
    (default: the environment now)."""
    from mlops_assets.definitions import build_definitions

    return build_definitions(load_settings(os.environ if env is None else env))
