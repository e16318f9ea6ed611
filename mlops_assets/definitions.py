"""The platform's Definitions, loaded from the defs folder the way `dg` projects do.

Each module under `defs/` ends in a `defs` it owns; `defs/resources.py` binds every resource once.
"""

import dagster as dg

import mlops_assets.defs

defs = dg.load_defs(defs_root=mlops_assets.defs)
