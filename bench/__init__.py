"""Benchmarks of mlops_assets: serving, pipeline and monitoring (`make bench`). Not tests."""
