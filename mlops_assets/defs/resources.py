"""Typed resources shared by every asset: platform settings and the Parquet/JSON IO manager."""


import json
from typing import Any

import dagster as dg
import fsspec
import pandas as pd

from mlops_assets.defs.metadata import path_value
from mlops_assets.lib.dataset_spec import DatasetSpec, load_spec
from mlops_assets.lib.settings import Settings, join_url, load_settings


class PlatformResource(dg.ConfigurableResource):
    """Where the platform reads and writes, and which data set it serves.

    Fields left empty fall back to the environment (`MLOPS_DATA_URL`, `MLOPS_LANDING_URL`,
    `MLOPS_DATASET_SPEC`, `MLFLOW_TRACKING_URI`, ...) at run time, then to `constants`.
    """

    data_url: str | None = None
    landing_url: str | None = None
    dataset_spec_path: str | None = None

    def settings(self) -> Settings:
        base = load_settings()
        overrides: dict[str, str] = {}
        if self.data_url:
            overrides["MLOPS_DATA_URL"] = self.data_url
        if self.landing_url:
            overrides["MLOPS_LANDING_URL"] = self.landing_url
        if not overrides:
            return _with_spec(base, self.dataset_spec_path)
        import os

        env = {**os.environ, **overrides}
        return _with_spec(load_settings(env), self.dataset_spec_path)

    def spec(self) -> DatasetSpec:
        return load_spec(self.settings().dataset_spec_path)


def _with_spec(settings: Settings, spec_path: str | None) -> Settings:
    if not spec_path:
        return settings
    from dataclasses import replace

    return replace(settings, dataset_spec_path=spec_path)


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores DataFrames as Parquet and plain dicts as JSON under the data root (any fsspec URL)."""

    base_url: str | None = None

    def _base(self) -> str:
        return self.base_url or load_settings().assets_url

    def _path(self, context: dg.OutputContext | dg.InputContext, suffix: str) -> str:
        key = context.asset_key.path if context.has_asset_key else [context.name]
        return join_url(self._base(), *key[:-1], f"{key[-1]}{suffix}")

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if isinstance(obj, pd.DataFrame):
            path = self._path(context, ".parquet")
            _makedirs_for(path)
            with fsspec.open(path, "wb") as handle:
                obj.to_parquet(handle, index=False)
        else:
            path = self._path(context, ".json")
            _makedirs_for(path)
            with fsspec.open(path, "w") as handle:
                json.dump(obj, handle, indent=1, default=str)
        context.add_output_metadata({"stored_at": path_value(path)})

    def load_input(self, context: dg.InputContext) -> Any:
        upstream = context.upstream_output
        assert upstream is not None
        parquet = self._path(upstream, ".parquet")
        fs, _ = fsspec.core.url_to_fs(parquet)
        if fs.exists(parquet):
            with fsspec.open(parquet, "rb") as handle:
                return pd.read_parquet(handle)
        with fsspec.open(self._path(upstream, ".json"), "r") as handle:
            return json.load(handle)


def _makedirs_for(path: str) -> None:
    fs, stripped = fsspec.core.url_to_fs(path)
    parent = stripped.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
