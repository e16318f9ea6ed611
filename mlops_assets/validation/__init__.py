"""Validation: the data report and its thresholds.

Pure, typed functions: no Dagster imports here."""
