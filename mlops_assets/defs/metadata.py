"""Small helpers for reading upstream materialization metadata (versions travel this way), and
for putting URIs into metadata and messages without their credentials."""


import dagster as dg

from mlops_assets.core.redaction import redact_text, redact_uri

__all__ = ["latest_metadata", "path_value", "redact_text", "redact_uri", "required_text", "url_value"]


def path_value(uri: str) -> dg.MetadataValue:
    """A path or fsspec URL as Dagster metadata, credentials redacted (metadata is shown to every UI user)."""
    return dg.MetadataValue.path(redact_uri(uri))


def url_value(url: str) -> dg.MetadataValue:
    """A clickable URL as Dagster metadata, credentials redacted."""
    return dg.MetadataValue.url(redact_uri(url))


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
