"""The platform's core: the dataset spec and its feature kinds, the pandera contract, redaction of secrets.

Pure, typed functions: no Dagster imports here."""
