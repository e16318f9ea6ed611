"""Shared fixtures: the default spec, simulated frames, and an isolated data root per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from mlops_assets.core.dataset_spec import DatasetSpec, default_spec
from mlops_assets.tools.simulator import SimulationConfig, simulate_records


@pytest.fixture(scope="session")
def spec() -> DatasetSpec:
    return default_spec()


@pytest.fixture(scope="session")
def simulated(spec: DatasetSpec) -> pd.DataFrame:
    """3,000 calibrated records with the calibrated duplicate and conflict shares."""
    return simulate_records(spec, SimulationConfig(n_rows=3000, seed=11))


@pytest.fixture()
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private data root; the environment points every default at it for this test only."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("MLOPS_DATA_URL", str(root))
    monkeypatch.delenv("MLOPS_LANDING_URL", raising=False)
    monkeypatch.delenv("MLOPS_DATASET_SPEC", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    (root / "mlflow").mkdir()
    yield root
