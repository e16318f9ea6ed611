"""A registry with a few small, different models in it: the starting point of the serving and
deployment tests, which need versions whose answers differ but not the training pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd
from catboost import CatBoostClassifier
from mlflow import MlflowClient

from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.registry import model_store
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets.training.tracking import use_tracking_uri


def train_small_model(frame: pd.DataFrame, spec: DatasetSpec, seed: int, iterations: int) -> CatBoostClassifier:
    y = (frame[spec.label] == spec.positive_class).astype(int)
    model = CatBoostClassifier(iterations=iterations, depth=4, random_seed=seed, verbose=False,
                               thread_count=1, allow_writing_files=False,
                               cat_features=spec.catboost_cat_features or None)  # string columns as categories
    model.fit(frame[spec.feature_names], y)
    return model


def register_simulated_versions(data: Path, spec: DatasetSpec, *, model_name: str, experiment: str,
                                seeds_and_iterations: Sequence[tuple[int, int]], n_rows: int,
                                artifacts: str = "artifacts",
                                ) -> tuple[str, MlflowClient, dict[str, CatBoostClassifier]]:
    """One registered version per (seed, iterations), each trained on its own simulated data, in a
    SQLite store under `data/mlflow`. Returns the tracking URI, a client and the models by version."""
    (data / "mlflow").mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{data / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    models: dict[str, CatBoostClassifier] = {}
    with use_tracking_uri(tracking_uri):  # scoped: other test modules see no global MLflow state
        experiment_id = mlflow.create_experiment(experiment,
                                                 artifact_location=(data / "mlflow" / artifacts).as_uri())
        for seed, iterations in seeds_and_iterations:
            frame = simulate_records(spec, SimulationConfig(n_rows=n_rows, seed=seed))
            model = train_small_model(frame, spec, seed, iterations)
            with mlflow.start_run(experiment_id=experiment_id) as run:
                info = model_store.log_catboost_model(model, input_example=frame[spec.feature_names].head(5))
            mv = model_store.register_version(client, model_name, run_id=run.info.run_id, model_uri=info.model_uri,
                                              tags={"decision_threshold": "0.5", "feature_version": f"fv-{seed}",
                                                    "data_version": f"dv-{seed}",
                                                    "trained_at": f"2026-01-0{seed}T00:00:00+00:00"})
            models[str(mv.version)] = model
    return tracking_uri, client, models
