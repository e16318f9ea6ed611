"""Evaluation: hold-out metrics, plots, slices and the promotion gate.

Pure, typed functions: no Dagster imports here."""
