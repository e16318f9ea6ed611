"""The registry helpers against a real MLflow SQLite store in a temporary folder."""

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.registry import model_store as ms
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets.training import tracking
from mlops_assets.training import train as tr

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


def _log_runs(store, frame, spec, n: int) -> list[tuple[str, str]]:
    """One trained model logged in `n` runs: n registrable candidates for the price of one training."""
    client, uri, experiment = store
    model = tr.train_model(frame, spec.feature_names, tr.TrainingParams(iterations=20, thread_count=2)).model
    logged = []
    for _ in range(n):
        with tracking.use_tracking_uri(uri), mlflow.start_run(experiment_id=experiment) as run:
            info = ms.log_catboost_model(model, input_example=frame[spec.feature_names].head(3))
        logged.append((run.info.run_id, info.model_uri))
    return logged


def assert_one_promotion_chain(client: MlflowClient, name: str, promoted: Sequence[str]) -> list[str]:
    """Every promotion once, each replacing the one before it; the aliases name the last two.

    Returns the versions in the order they became champion.
    """
    events = ms.history(client, name)
    promotes = [e for e in events if e.action == "promote"]
    chain = [e.version for e in promotes]
    assert sorted(chain, key=int) == sorted(map(str, promoted), key=int), "every promotion exactly once"
    assert [e.details.get("replaced") for e in promotes] == [None, *chain[:-1]], "each replaced the one before"
    demotes = sorted((e.version, e.details.get("replaced_by")) for e in events if e.action == "demote")
    assert demotes == sorted(zip(chain[:-1], chain[1:], strict=True))
    assert ms.alias_version(client, name, c.ALIAS_CHAMPION) == chain[-1]
    assert ms.alias_version(client, name, c.ALIAS_PREVIOUS_CHAMPION) == (chain[-2] if len(chain) > 1 else None)
    return chain


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
    assert all(e.by == ms.actor() and e.at for e in events)  # no explicit actor: the OS user
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


def test_eight_concurrent_promotions_leave_one_chain_and_the_last_one_champion(store, frame, spec, name):
    client, uri, _ = store
    assert ms.lock_kind(uri) == "sqlite-file"
    logged = _log_runs(store, frame, spec, 8)
    versions = [str(ms.register_version(client, name, run_id=r, model_uri=u, tags={}).version) for r, u in logged]
    barrier = threading.Barrier(len(versions))
    errors: list[BaseException] = []

    def promote(version: str) -> None:
        try:
            own = MlflowClient(uri)  # one client per writer, as separate processes would have
            barrier.wait(timeout=60)
            ms.promote_to_champion(own, name, version)
        except BaseException as exc:  # asserted in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    chain = assert_one_promotion_chain(client, name, versions)
    assert (db := Path(uri.removeprefix("sqlite:///"))).with_name(f"{db.name}.promotion.lock").exists()

    # A rollback that expects a champion someone has since replaced changes nothing.
    with pytest.raises(ms.ConcurrentPromotionError, match=f"champion is version {chain[-1]}"):
        ms.rollback_champion(client, name, expected_champion=chain[-2])
    assert ms.alias_version(client, name, c.ALIAS_CHAMPION) == chain[-1]
    assert ms.rollback_champion(client, name, expected_champion=chain[-1]) == (chain[-2], chain[-1])


def test_a_version_the_gate_rejected_is_never_promoted_and_is_found_with_its_reasons(store, frame, spec, name):
    client = store[0]
    (good_run, good_uri), (bad_run, bad_uri) = _log_runs(store, frame, spec, 2)
    good = ms.register_version(client, name, run_id=good_run, model_uri=good_uri,
                               tags=ms.gate_tags(True, [], None))
    ms.promote_to_champion(client, name, good.version)
    failures = ["FAIL: roc_auc 0.5000 >= 0.9000", "FAIL: f1 0.1000 >= 0.8000"]
    bad = ms.register_version(client, name, run_id=bad_run, model_uri=bad_uri,
                              tags=ms.gate_tags(False, failures, good.version))
    assert ms.record_rejection(client, name, bad.version, failures, good.version)
    assert not ms.record_rejection(client, name, bad.version, failures, good.version)  # once
    assert ms.alias_version(client, name, c.ALIAS_CHALLENGER) == str(bad.version)

    with pytest.raises(ms.GateRejectedError, match="rejected by the promotion gate.*roc_auc"):
        ms.promote_to_champion(client, name, bad.version)
    assert ms.alias_version(client, name, c.ALIAS_CHAMPION) == str(good.version)

    # After the fact: the registry search finds it, with the verdict and the reasons.
    [found] = client.search_model_versions(f"name = '{name}' and tags.gate_passed = 'false'")
    assert found.version == bad.version and found.tags[ms.TAG_GATE_VERDICT] == "reject"
    assert found.tags[ms.TAG_GATE_FAILURES] == "; ".join(failures)
    assert found.tags[ms.TAG_GATE_COMPARED_TO] == str(good.version)
    assert [v.version for v in ms.rejected_versions(client, name)] == [bad.version]
    [reject] = [e for e in ms.history(client, name) if e.action == "reject"]
    assert reject.version == str(bad.version) and reject.details["failures"] == failures

    # An explicit override is possible, and the history says so.
    assert ms.promote_to_champion(client, name, bad.version, allow_rejected=True) == str(good.version)
    assert [e.details.get("override") for e in ms.history(client, name) if e.action == "promote"] == [
        None, "gate rejected"]


@pytest.mark.parametrize("uri, kind", [
    ("sqlite:////data/mlflow/mlflow.db", "sqlite-file"), ("sqlite:///mlflow.db", "sqlite-file"),
    ("sqlite://", "process"), ("postgresql+psycopg2://u:p@db/mlflow", "postgres"),
    ("postgresql://db/mlflow", "postgres"), ("http://127.0.0.1:5000", "process"), ("/tmp/mlruns", "process"),
])
def test_the_lock_lives_in_the_registry_database_where_there_is_one(uri, kind):
    assert ms.lock_kind(uri) == kind


def test_the_sqlite_promotion_lock_holds_off_another_process(store, name):
    import subprocess
    import sys

    client, uri, _ = store
    probe = ("import sys; from mlflow import MlflowClient; from mlops_assets.registry import model_store as ms\n"
             "try:\n"
             "    with ms.promotion_lock(MlflowClient(sys.argv[1]), sys.argv[2], timeout_s=0.5): print('granted')\n"
             "except ms.PromotionLockTimeout: print('timed out')\n")
    with ms.promotion_lock(client, name) as kind:
        assert kind == "sqlite-file"
        held = subprocess.run([sys.executable, "-c", probe, uri, name], capture_output=True, text=True, timeout=120)
    free = subprocess.run([sys.executable, "-c", probe, uri, name], capture_output=True, text=True, timeout=120)
    assert held.stdout.strip() == "timed out", held.stderr[-2000:]
    assert free.stdout.strip() == "granted", free.stderr[-2000:]
