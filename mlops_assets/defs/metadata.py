"""Small helpers for putting paths and URIs into metadata and messages without their credentials.

Versions do not travel through metadata: each asset's value is a record carrying its own version
and lineage (mlops_assets.core.records), loaded from exactly what the run's upstream produced."""


import dagster as dg

from mlops_assets.core.redaction import redact_text, redact_uri

__all__ = ["path_value", "redact_text", "redact_uri", "url_value"]


def path_value(uri: str) -> dg.MetadataValue:
    """A path or fsspec URL as Dagster metadata, credentials redacted (metadata is shown to every UI user)."""
    return dg.MetadataValue.path(redact_uri(uri))


def url_value(url: str) -> dg.MetadataValue:
    """A clickable URL as Dagster metadata, credentials redacted."""
    return dg.MetadataValue.url(redact_uri(url))
