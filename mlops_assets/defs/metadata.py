"""Small helpers for reading upstream materialization metadata (versions travel this way)."""


import dagster as dg


def latest_metadata(instance: dg.DagsterInstance, asset: str) -> dict[str, object]:
    """The metadata of an asset's latest materialization as plain values ({} if never materialized)."""
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return {}
    return {key: getattr(value, "value", value) for key, value in event.asset_materialization.metadata.items()}


def required_text(instance: dg.DagsterInstance, asset: str, key: str) -> str:
    """One text entry of an upstream asset's metadata; a clear error if it is missing."""
    value = latest_metadata(instance, asset).get(key)
    if value is None:
        raise dg.Failure(f"upstream asset {asset!r} has no {key!r} in its latest materialization; "
                         f"materialize {asset!r} first")
    return str(value)
