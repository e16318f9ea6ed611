"""Ingestion assets, the landing-folder sensor and its job."""
