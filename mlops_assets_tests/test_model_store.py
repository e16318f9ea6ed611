"""The registry helpers against a real MLflow SQLite store in a temporary folder."""

from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.lib import model_store as ms
from mlops_assets.lib import tracking
from mlops_assets.lib import training as tr
from mlops_assets.lib.simulator import SimulationConfig, simulate_records

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def frame(spec) -> pd.DataFrame:
    raw = simulate_records(spec, SimulationConfig(n_rows=600, seed=21))
    return raw[spec.feature_names].assign(target=(raw[spec.label] == spec.positive_class).astype(int))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[tuple[MlflowClient, str, str]]:
    """One real store per module (creating the schema takes seconds); each test its own model name."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLOPS_ACTOR", "test-actor")
        client = MlflowClient(uri)
        yield client, uri, tracking.ensure_experiment(client, "exp", (root / "artifacts").as_uri())


@pytest.fixture()
def name(request) -> str:
    return request.node.name.removeprefix("test_")[:60]


def _log(store, frame, spec, seed: int = 1):
    client, uri, experiment = store
    result = tr.train_model(frame, spec.feature_names, tr.TrainingParams(iterations=40, thread_count=2,
                                                                         random_seed=seed))
    with tracking.use_tracking_uri(uri), mlflow.start_run(experiment_id=experiment) as run:
        info = ms.log_catboost_model(result.model, input_example=frame[spec.feature_names].head(3))
    return result.model, run.info.run_id, info.model_uri


def _register(store, frame, spec, name, seed: int = 1):
    model, run_id, uri = _log(store, frame, spec, seed)
    return model, ms.register_version(store[0], name, run_id=run_id, model_uri=uri, tags={"data_version": "d"})


def test_register_is_idempotent_per_run_and_sets_challenger(store, frame, spec, name):
    client = store[0]
    _, run_id, uri = _log(store, frame, spec)
    first = ms.register_version(client, name, run_id=run_id, model_uri=uri, tags={"data_version": "d1"})
    again = ms.register_version(client, name, run_id=run_id, model_uri=uri, tags={"data_version": "d1"})
    assert str(first.version) == str(again.version) == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert ms.alias_version(client, name, c.ALIAS_CHALLENGER) == "1"
    assert ms.alias_version(client, name, c.ALIAS_CHAMPION) is None
    assert first.tags["data_version"] == "d1" and len(first.tags[ms.TAG_SHA256]) == 64


def test_the_verified_model_predicts_like_the_trained_one(store, frame, spec, name):
    client, uri, _ = store
    model, mv = _register(store, frame, spec, name)
    ms.promote_to_champion(client, name, mv.version)
    loaded = ms.load_verified_model(uri, name, alias=c.ALIAS_CHAMPION)
    X = frame[spec.feature_names]
    assert loaded.version == str(mv.version) and loaded.run_id == mv.run_id
    assert np.array_equal(loaded.model.predict_proba(X), model.predict_proba(X))
    with tracking.use_tracking_uri(uri):  # URI-only MLflow calls read the global tracking URI
        via_mlflow = mlflow.catboost.load_model(f"models:/{name}@{c.ALIAS_CHAMPION}")
    assert np.array_equal(via_mlflow.predict_proba(X), model.predict_proba(X))


def test_promotion_keeps_the_previous_champion_and_rollback_swaps_back_and_forth(store, frame, spec, name):
    client = store[0]
    versions = [str(_register(store, frame, spec, name, seed)[1].version) for seed in (1, 2, 3)]
    assert ms.promote_to_champion(client, name, versions[0]) is None
    assert ms.promote_to_champion(client, name, versions[0]) is None  # no-op when already champion
    assert ms.alias_version(client, name, c.ALIAS_PREVIOUS_CHAMPION) is None
    assert ms.promote_to_champion(client, name, versions[1]) == versions[0]
    assert ms.promote_to_champion(client, name, versions[2]) == versions[1]
    assert ms.alias_version(client, name, c.ALIAS_CHAMPION) == versions[2]
    assert ms.alias_version(client, name, c.ALIAS_PREVIOUS_CHAMPION) == versions[1]

    assert ms.rollback_champion(client, name) == (versions[1], versions[2])
    assert ms.alias_version(client, name, c.ALIAS_CHAMPION) == versions[1]
    assert ms.rollback_champion(client, name) == (versions[2], versions[1])  # twice = back
    assert ms.alias_version(client, name, c.ALIAS_CHAMPION) == versions[2]

    events = ms.history(client, name)
    actions = [(e.version, e.action) for e in events]
    assert actions.count((versions[1], "promote")) == 1 and actions.count((versions[2], "rollback-to")) == 1
    assert all(e.by == "test-actor" and e.at for e in events)
    assert [e.at for e in events] == sorted(e.at for e in events)


def test_rollback_without_a_previous_champion_says_why(store, frame, spec, name):
    client = store[0]
    with pytest.raises(ms.NoChampionError, match="no 'champion'"):
        ms.rollback_champion(client, name)
    _, mv = _register(store, frame, spec, name)
    ms.promote_to_champion(client, name, mv.version)
    with pytest.raises(ms.NoChampionError, match="previous-champion"):
        ms.rollback_champion(client, name)


def test_a_tampered_artifact_is_refused_before_loading(store, frame, spec, name):
    client, uri, _ = store
    _, mv = _register(store, frame, spec, name)
    path = Path(client.get_model_version_download_uri(name, mv.version).removeprefix("file://")) / ms.MODEL_ARTIFACT_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(ms.ModelIntegrityError, match="does not match"):
        ms.load_verified_model(uri, name, version=mv.version)


def test_a_version_without_a_recorded_hash_is_refused(store, frame, spec, name):
    client, uri, _ = store
    _, mv = _register(store, frame, spec, name)
    client.delete_model_version_tag(name, mv.version, ms.TAG_SHA256)
    with pytest.raises(ms.ModelIntegrityError, match="no 'model_sha256'"):
        ms.load_verified_model(uri, name, version=mv.version)


def test_resolve_version_by_alias_or_number(store, frame, spec, name):
    client = store[0]
    _, mv = _register(store, frame, spec, name)
    assert ms.resolve_version(client, name, version=mv.version).version == mv.version
    assert ms.resolve_version(client, name, alias=c.ALIAS_CHALLENGER).version == mv.version
    with pytest.raises(ms.NoChampionError):
        ms.resolve_version(client, name)  # champion by default; none yet
    with pytest.raises(ValueError, match="not both"):
        ms.resolve_version(client, name, alias="x", version="1")
