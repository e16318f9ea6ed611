"""Is anything on the training path stale? Asked before a run is launched, so an unchanged re-run
(`make pipeline`, the sensors that start training runs) launches nothing and says why.

The answer is Dagster's own: its stale-status resolver over the instance's recorded data versions,
code versions and provenance (the same data versions the assets return). Two things it does not
see are added from records Dagster keeps too: the run configuration an asset was last materialized
with (changed parameters retrain), and raw_dataset's data version computed the way the asset
computes it, since Dagster stops comparing upstream partitions beyond a hundred raw_batches.
"""

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from mlops_assets import constants as c
from mlops_assets.defs.datasets import PRIMARY, DatasetNames

RAW_DATASET = "raw_dataset"


@dataclass(frozen=True)
class Staleness:
    """Why each asset of a selection would be materialized again; nothing stale when `reasons` is empty."""

    reasons: tuple[str, ...]
    fresh: tuple[str, ...]  # assets found up to date

    @property
    def stale(self) -> bool:
        return bool(self.reasons)

    def summary(self) -> str:
        if self.stale:
            return "stale: " + "; ".join(self.reasons)
        return (f"nothing on the training path is stale ({len(self.fresh)} assets up to date: no new raw batch, "
                f"no changed code version, no changed parameters)")


def op_config(run_config: Mapping[str, Any] | None, asset: str) -> dict[str, Any]:
    ops = (run_config or {}).get("ops") or {}
    return dict((ops.get(asset) or {}).get("config") or {})


def _resolved_config(asset_def: dg.AssetsDefinition, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The asset's config with its defaults filled in (so omitting a default equals stating it)."""
    fn = getattr(asset_def.op.compute_fn, "decorated_fn", None)
    hints = typing.get_type_hints(fn) if fn is not None else {}
    cls = hints.get("config")
    if isinstance(cls, type) and issubclass(cls, dg.Config):
        return cls(**raw).model_dump()
    return dict(raw)


def _config_change(instance: dg.DagsterInstance, asset_def: dg.AssetsDefinition, key: dg.AssetKey,
                   run_config: Mapping[str, Any] | None, last_run_id: str | None,
                   runs: dict[str, dg.DagsterRun | None]) -> str | None:
    """Did `run_config` change the asset's parameters since the run that last materialized it
    (`last_run_id`)? `runs` caches the runs looked up: one training run materialized them all."""
    if last_run_id is None:
        return None  # never materialized: the resolver says so
    if last_run_id not in runs:
        runs[last_run_id] = instance.get_run_by_id(last_run_id)
    run = runs[last_run_id]
    if run is None:
        return f"{key.to_user_string()}: the run that last materialized it is gone, its parameters unknown"
    name, op = key.to_user_string(), asset_def.op.name  # run config is keyed by op name
    before = _resolved_config(asset_def, op_config(run.run_config, op))
    now = _resolved_config(asset_def, op_config(run_config, op))
    if before == now:
        return None
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return f"{name}: parameters changed ({', '.join(f'{k} {before.get(k)!r} -> {now.get(k)!r}' for k in changed)})"


def _cause_text(cause: Any) -> str:
    where = cause.key.asset_key.to_user_string() + (f"[{cause.key.partition_key[:12]}]" if cause.key.partition_key else "")
    dep = ""
    if cause.dependency is not None:
        dep = f" ({cause.dependency.asset_key.to_user_string()}" + (
            f"[{cause.dependency.partition_key[:12]}])" if cause.dependency.partition_key else ")")
    return f"{where} {cause.reason}{dep}"


def training_staleness(instance: dg.DagsterInstance, asset_graph: Any, selection: Sequence[str],
                       run_config: Mapping[str, Any] | None, batches_url: str | None,
                       names: DatasetNames = PRIMARY) -> Staleness:
    """Why materializing `selection` with `run_config` would do work, from the instance's records.

    `batches_url`: the batch store raw_dataset unions (its current version is compared with the one
    recorded); None skips that comparison. `selection` names the assets of data set `names`."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._time import get_current_datetime

    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=asset_graph)
    resolver = CachingStaleStatusResolver(instance, asset_graph, view)
    reasons: list[str] = []
    fresh: list[str] = []
    keys = [names.key(name) for name in selection]
    # The run that last materialized each asset, for every asset in one query.
    last_runs = {record.asset_entry.asset_key: (event.run_id if (event := record.asset_entry.last_materialization)
                                                else None) for record in instance.get_asset_records(keys)}
    runs: dict[str, dg.DagsterRun | None] = {}
    for name, key in zip(selection, keys, strict=True):
        before = len(reasons)
        status = resolver.get_status(key)
        if status == StaleStatus.MISSING:
            reasons.append(f"{name} was never materialized")
        elif status == StaleStatus.STALE:
            causes = resolver.get_stale_root_causes(key)
            reasons.extend(f"{name}: {_cause_text(cause)}" for cause in causes[:3])
            if not causes:
                reasons.append(f"{name} is stale")
        if name == RAW_DATASET and batches_url is not None and status != StaleStatus.MISSING:
            from mlops_assets.defs.ingestion.assets import current_raw_version

            recorded = resolver.get_current_data_version(key).value
            now = current_raw_version(batches_url)
            if now != recorded and len(reasons) == before:
                reasons.append(f"{name}: the accepted batches are data version {now}, it was built from {recorded}")
        assets_def = asset_graph.get(key).assets_def
        change = _config_change(instance, assets_def, key, run_config, last_runs.get(key), runs)
        if change:
            reasons.append(change)
        if len(reasons) == before:
            fresh.append(name)
    return Staleness(tuple(dict.fromkeys(reasons)), tuple(fresh))


def sensor_staleness(context: dg.SensorEvaluationContext | dg.ScheduleEvaluationContext,
                     batches_url: str, names: DatasetNames = PRIMARY) -> Staleness:
    """What a training run a sensor or schedule requests would find stale on the training path
    (raw_dataset to registered_model). Such a run has no run config, so the assets' defaults are
    compared with the parameters of their last materialization. Deployment and the reference
    profile follow the registration and are no reason to train.

    The daemon gives the sensor its repository; a context built without one (a test, a tool)
    gets the platform's own asset graph, the one the sensor is defined in."""
    try:
        repo = context.repository_def
    except dg.DagsterInvariantViolationError:  # a schedule context built without one raises instead
        repo = None
    if repo is not None:
        graph = repo.asset_graph
    else:
        from mlops_assets.definitions import defs

        graph = defs.resolve_asset_graph()
    return training_staleness(context.instance, graph, c.TRAINING_PATH_ASSETS, None, batches_url, names)
