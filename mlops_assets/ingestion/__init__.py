"""Ingestion: content-addressed batches of landed raw files, with quarantine reasons.

Pure, typed functions: no Dagster imports here."""
