"""An ingress that scores the champion itself (`ingress_scores`): which requests it answers, and
the champion's ModelRef it reads beside the release in its user_config. Without a cluster; the
real Ray Serve path is in test_serving_integration (`test_an_ingress_that_scores_...`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mlops_assets import constants as c
from mlops_assets.core.dataset_spec import DatasetSpec, default_spec
from mlops_assets.deployment import rollout as dep
from mlops_assets.serving.app import local_answers
from mlops_assets.serving.config import ModelRef, ServiceOptions
from mlops_assets.serving.ingress import ForwardedRequest
from mlops_assets.serving.metrics import InMemoryMetrics
from mlops_assets.serving.release import (
    CHAMPION_REF_KEY,
    ReleaseConfig,
    ReleaseConfigError,
    ingress_user_config,
    split_ingress_config,
)
from mlops_assets.serving.scoring import Scorer
from mlops_assets.serving.service import ServiceCore
from mlops_assets_tests.test_serving_unit import _scorer

TOKEN = "t" * 32


def _request(method: str = "POST", path: str = "/predict") -> ForwardedRequest:
    return ForwardedRequest(method=method, path=path, query_string=b"", headers=[], body=b"{}", request_id="r1")


@pytest.fixture()
def core() -> ServiceCore:
    spec: DatasetSpec = default_spec()
    scorers = {"1": _scorer(spec, "1"), "2": _scorer(spec, "2", shift=0.1)}

    def loader(ref: ModelRef) -> Scorer:
        if ref.version is None:
            return scorers["1"]  # the alias resolves to version 1
        if ref.version not in scorers:
            raise LookupError(f"no version {ref.version}")
        return scorers[ref.version]

    return ServiceCore(spec=spec, options=ServiceOptions(), token=TOKEN, metrics=InMemoryMetrics(), log_writer=None,
                       loader=loader)


def test_the_ingress_answers_predict_only_while_it_holds_the_version_it_was_asked_for(core: ServiceCore) -> None:
    assert not local_answers(core, _request())  # nothing loaded yet: the scoring replicas answer
    asyncio.run(core.reconfigure(ModelRef(version="1")))
    assert local_answers(core, _request())
    assert not local_answers(core, _request("GET", "/healthz")) and not local_answers(core, _request("GET", "/model"))
    assert not local_answers(core, _request("GET", "/predict"))
    asyncio.run(core.reconfigure(ModelRef(version="9")))  # fails: version 1 stays loaded
    assert core.scorer is not None and core.scorer.version == "1"
    assert not local_answers(core, _request()), "after a failed load the scoring replicas answer and report it"
    asyncio.run(core.reconfigure(ModelRef(version="2")))
    assert local_answers(core, _request())
    asyncio.run(core.reconfigure(ModelRef(alias=c.ALIAS_CHAMPION)))  # an alias: whatever it resolved to
    assert local_answers(core, _request())


def test_a_switch_in_progress_is_answered_by_the_scoring_replicas(core: ServiceCore) -> None:
    asyncio.run(core.reconfigure(ModelRef(version="1")))
    core.requested = ModelRef(version="2")  # what reconfigure sets before its load finishes
    assert not local_answers(core, _request())


def test_the_ingress_user_config_carries_the_release_and_the_champion() -> None:
    release = ReleaseConfig(strategy="canary", candidate_version="5", canary_share=0.3, release_id="5-1")
    raw = ingress_user_config(release, ModelRef(model_name="m", version="4"))
    assert raw[CHAMPION_REF_KEY] == {"model_name": "m", "version": "4"}
    assert split_ingress_config(raw) == (release, ModelRef(model_name="m", version="4"))
    assert split_ingress_config(release.to_user_config()) == (release, None)  # a config written by hand
    with pytest.raises(ReleaseConfigError, match="unknown release setting"):
        split_ingress_config({**raw, "percent": 5})
    with pytest.raises(ValueError, match="unknown user_config key"):
        split_ingress_config({**raw, CHAMPION_REF_KEY: {"model_name": "m", "stage": "Production"}})


def test_the_rendered_serve_config_names_the_champion_to_the_ingress(tmp_path: Path) -> None:
    config = dep.render_serve_config(dep.load_serve_config(), ref=ModelRef(version="4"),
                                     args={"ingress_scores": True})
    app = config["applications"][0]
    ingress = next(d for d in app["deployments"] if d["name"] == "PredictionIngress")
    assert split_ingress_config(ingress["user_config"])[1] == ModelRef(version="4")
    assert app["args"]["ingress_scores"] is True
    with pytest.raises(ValueError, match="unknown serving option"):
        dep.render_serve_config(dep.load_serve_config(), ref=ModelRef(version="4"), args={"ingress_score": True})


def test_an_ingress_holding_the_candidate_scores_a_shadow_batch_as_a_candidate_replica_would(
        core: ServiceCore) -> None:
    """`score_mirrors_here` (one model call for the batch) answers and logs what the candidate
    replica's `handle_many` does through the full request path, every row marked shadow."""
    import orjson

    from mlops_assets.serving.app import answer_predict, score_mirrors_here
    from mlops_assets.serving.prediction_log import decode_spool_table
    from mlops_assets.serving.release import score_mirrors
    from mlops_assets_tests.test_serving_unit import _records

    spec = core.spec
    asyncio.run(core.reconfigure(ModelRef(version="2")))
    headers = [(b"authorization", f"Bearer {TOKEN}".encode()), (b"content-type", b"application/json")]
    batch = [ForwardedRequest(method="POST", path="/predict", query_string=b"", headers=headers,
                              body=orjson.dumps({"records": _records(spec, n, first=first)}), request_id=f"m{i}")
             for i, (n, first) in enumerate(((1, 1), (3, -1), (2, 1)))]
    here = asyncio.run(score_mirrors_here(core, batch))
    replica = asyncio.run(score_mirrors(lambda r: answer_predict(core, r), batch, lower=False))
    assert [a.status for a in here] == [200, 200, 200] == [a.status for a in replica]
    assert [orjson.loads(a.body)["model_version"] for a in here] == ["2"] * 3
    # The version rides on each answer too, so the release counts them without parsing the bodies.
    assert [a.model_version for a in here] == ["2"] * 3 == [a.model_version for a in replica]

    def logged(answers):
        table = decode_spool_table(b"".join(line for a in answers for line, _ in a.log_lines))
        return table.drop_columns(["logged_at"]).to_pandas()

    ours, theirs = logged(here), logged(replica)
    assert len(ours) == 6 and ours["shadow"].all() and list(ours["request_id"].unique()) == ["m0", "m1", "m2"]
    assert ours.equals(theirs)
    # With the champion's log frames on the mirrors (what the router queues), their features are
    # read from those frames: the body is not parsed again (here it could not be), same answers.
    from dataclasses import replace

    champion = [asyncio.run(answer_predict(core, r)) for r in batch]
    framed = [replace(r, body=b"not parsed again", champion_lines=a.log_lines) for r, a in zip(batch, champion, strict=True)]
    assert logged(asyncio.run(score_mirrors_here(core, framed))).equals(ours)
    # A body that fails validation gets its error; the rest are still scored.
    bad = ForwardedRequest(method="POST", path="/predict", query_string=b"", headers=headers,
                           body=b'{"records": [{"nope": 1}]}', request_id="bad")
    answers = asyncio.run(score_mirrors_here(core, [bad, batch[0]]))
    assert [a.status for a in answers] == [422, 200] and answers[0].log_lines == []
