"""Features: cleaning, deduplication and the leakage-free split.

Pure, typed functions: no Dagster imports here."""
