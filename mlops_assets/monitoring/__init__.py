"""Monitoring: the prediction log's windows, profiles and drift, labels, the watch and retrain rules.

Pure, typed functions: no Dagster imports here."""
