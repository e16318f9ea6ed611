"""The GitHub Actions workflows cannot run here: check that they parse, have the triggers and gates
the release process promises, and that every command they call exists (make targets, scripts,
Python modules, CLI subcommands, Dagster assets and jobs, Dockerfiles)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"


def _load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def _runs(workflow: dict[str, Any]) -> list[str]:
    return [step["run"] for job in workflow["jobs"].values() for step in job.get("steps", []) if "run" in step]


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*):(?!=)", text, re.MULTILINE))


def _all_workflows() -> list[str]:
    return sorted(p.name for p in WORKFLOWS.glob("*.yml"))


def test_the_three_workflows_exist_and_parse() -> None:
    assert _all_workflows() == ["ci.yml", "continuous-training.yml", "release.yml"]
    for name in _all_workflows():
        workflow = _load(name)
        assert workflow["name"] and workflow["on"] and workflow["jobs"], name
        for job_name, job in workflow["jobs"].items():
            assert job["runs-on"] and job.get("timeout-minutes"), f"{name}:{job_name}"
            for step in job["steps"]:
                assert ("run" in step) != ("uses" in step), f"{name}:{job_name}: {step}"


def test_pull_requests_run_lint_typecheck_tests_and_a_materialize_smoke_run() -> None:
    ci = _load("ci.yml")
    assert "pull_request" in ci["on"]
    runs = {job: " ".join(_runs({"jobs": {job: spec}})) for job, spec in ci["jobs"].items()}
    assert "make lint" in runs["lint"] and "make typecheck" in runs["typecheck"]
    assert ".ci/run" in runs["test"]  # the README's `make test`, with the private PostgreSQL around it
    assert "make pipeline" in runs["smoke"]  # the training path, materialized when stale
    # `mlops-assets pipeline` ingests, then runs the selection in the training job, in-process
    # unless nothing in it is stale (tools/cli.py), then prints the status.
    target = (REPO / "Makefile").read_text().split("\npipeline:", 1)[1].split("\n\n")[0]
    assert "mlops-assets pipeline" in target and "--select '$(TRAINING_PATH)'" in target


def test_tags_build_tag_push_and_deploy_to_staging_then_production_behind_approval() -> None:
    release = _load("release.yml")
    assert release["on"]["push"]["tags"] == ["v*"]
    jobs = release["jobs"]
    assert jobs["images"]["needs"] == "test"
    assert jobs["deploy-staging"]["needs"] == "images" and jobs["deploy-staging"]["environment"] == "staging"
    assert set(jobs["deploy-production"]["needs"]) == {"images", "deploy-staging"}
    assert jobs["deploy-production"]["environment"] == "production"
    build = " ".join(_runs({"jobs": {"images": jobs["images"]}}))
    assert "$MLOPS_IMAGE_TAG-model-v$CHAMPION" in build and "docker push" in build
    assert release["env"]["REGISTRY"] == "${{ vars.REGISTRY }}"
    assert release["env"]["MLOPS_IMAGE_TAG"] == "${{ github.ref_name }}"
    for dockerfile in re.findall(r"deploy/Dockerfile\.\$image", build):
        assert dockerfile
    for image in ("dagster", "serving"):
        assert (REPO / "deploy" / f"Dockerfile.{image}").is_file()


def test_continuous_training_starts_on_a_schedule_or_a_monitoring_event() -> None:
    ct = _load("continuous-training.yml")
    assert ct["on"]["schedule"][0]["cron"]
    assert set(ct["on"]["repository_dispatch"]["types"]) == {"drift-detected", "performance-degraded"}
    from mlops_assets import constants as c

    assert ct["on"]["schedule"][0]["cron"] == c.RETRAINING_SCHEDULE_CRON
    # The run is queued on the production host (retrain.sh there; test_deploy_files.py runs it).
    assert ct["jobs"]["retrain"]["environment"] == "production"
    assert "deploy/production/remote-retrain.sh" in " ".join(_runs(ct))
    assert "-j retraining" in (REPO / "deploy" / "production" / "retrain.sh").read_text()


# What a GitHub-hosted runner can reach of the deployment: the hosts' SSH, and the MLflow server
# through the TLS proxy in front of its published port. The Dagster instance's database is
# published by no compose file, so no workflow may need it.
REACHED_THROUGH = {"DAGSTER_PG_": "postgres", "MLFLOW_TRACKING_URI": "mlflow", "MLOPS_RAY_DASHBOARD_URL": "ray-head",
                   "MLOPS_SERVE_URL": "ray-head", "MLFLOW_UI_URL": "mlflow"}


def _workflow_env(workflow: dict[str, Any]) -> dict[str, str]:
    env = dict(workflow.get("env") or {})
    for job in workflow["jobs"].values():
        env.update(job.get("env") or {})
        for step in job.get("steps", []):
            env.update(step.get("env") or {})
    return env


def test_workflows_reach_only_what_the_deployment_publishes() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "production" / "docker-compose.yaml").read_text())
    published = {name for name, service in compose["services"].items() if service.get("ports")}
    assert "postgres" not in published and "mlflow" in published
    ssh_steps = 0
    for name in _all_workflows():
        workflow = _load(name)
        for key in _workflow_env(workflow):
            for prefix, service in REACHED_THROUGH.items():
                if key.startswith(prefix):
                    assert service in published, f"{name}: {key} needs {service}, which compose never publishes"
        assert "DAGSTER_HOME" not in _workflow_env(workflow) or name == "ci.yml", f"{name}: a remote Dagster instance"
        for job_name, job in workflow["jobs"].items():
            for step in job.get("steps", []):
                if "remote-" in step.get("run", ""):
                    # Over SSH only with the host keys pinned from a secret of the job's environment.
                    assert step["env"]["DEPLOY_KNOWN_HOSTS"] == "${{ secrets.DEPLOY_KNOWN_HOSTS }}", f"{name}:{job_name}"
                    assert job.get("environment"), f"{name}:{job_name}: environment secrets need an environment"
                    ssh_steps += 1
    assert ssh_steps == 3  # staging and production deploys, the retraining


def test_images_go_only_to_the_registry_variable_and_no_workflow_holds_a_secret_value() -> None:
    for name in _all_workflows():
        text = (WORKFLOWS / name).read_text()
        for script in _runs(_load(name)):
            for words in _commands(script):
                if words[:2] in (["docker", "build"], ["docker", "push"]):
                    refs = [words[i + 1] for i, w in enumerate(words) if w == "-t"] or words[2:3]
                    for ref in refs:
                        assert ref.startswith(("$ref:", "$REGISTRY/")), f"{name}: image {ref} outside $REGISTRY"
                    if any(r.startswith("$ref:") for r in refs):
                        assert 'ref="$REGISTRY/' in script, f"{name}: $ref is not under $REGISTRY"
        for key, value in re.findall(r"^\s*([A-Z_]*(?:PASSWORD|TOKEN|SECRET|KEY)[A-Z_]*):\s*(.+)$", text, re.M):
            assert value.strip().startswith("${{ secrets."), f"{name}: {key} is not from secrets"


def _commands(script: str) -> list[list[str]]:
    """Shell commands of a run block, split on newlines, `&&`, `||`, `;` and pipes (continuations joined)."""
    script = script.replace("\\\n", " ")
    out = []
    for line in script.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(part, posix=True)
            except ValueError:  # a quote that spans a `|` or `;` (python -c): the words still say enough
                words = part.split()
            if words:
                out.append(words)
    return out


def _cli_accepts(args: list[str]) -> bool:
    """Whether `mlops-assets <args>` parses: subcommand, nested subcommand and every option exist."""
    from mlops_assets.tools.cli import build_parser

    try:
        build_parser().parse_args(args)
    except SystemExit:
        return False
    return True


@pytest.mark.parametrize("name", ["ci.yml", "release.yml", "continuous-training.yml"])
def test_every_command_a_workflow_calls_exists(name: str) -> None:
    import dagster as dg

    from mlops_assets.definitions import defs

    targets = _make_targets()
    assets = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    checked = 0
    for script in _runs(_load(name)):
        for words in _commands(script):
            head = words[0]
            if head == "make":
                for target in [w for w in words[1:] if not w.startswith("-") and "=" not in w]:
                    assert target in targets, f"{name}: make {target}: no such target"
                    checked += 1
            elif head.startswith((".ci/", "deploy/", "scripts/")):
                path = REPO / head
                assert path.is_file() and os.access(path, os.X_OK), f"{name}: {head} missing or not executable"
                checked += 1
            elif head.endswith("mlops-assets"):
                assert _cli_accepts(words[1:]), f"{name}: mlops-assets {' '.join(words[1:])} does not parse"
                checked += 1
            elif head.endswith("/python") and len(words) > 2 and words[1] == "-m":
                assert importlib.util.find_spec(words[2]) is not None, f"{name}: no module {words[2]}"
                checked += 1
            elif head.endswith("dagster"):
                if words[1:3] == ["job", "launch"]:
                    job = words[words.index("-j") + 1]
                    assert defs.resolve_job_def(job) is not None
                    assert (REPO / words[words.index("-w") + 1]).is_file()
                elif words[1:3] == ["asset", "materialize"]:
                    selection = words[words.index("--select") + 1]
                    assert set(selection.split(",")) <= assets, f"{name}: {selection}"
                checked += 1
            if "-f" in words and head == "docker":
                dockerfile = words[words.index("-f") + 1].replace("$image", "dagster")
                assert (REPO / dockerfile.strip('"')).is_file(), f"{name}: {dockerfile}"
    assert checked, f"{name}: no command was checked"
    assert dg  # the definitions loaded with the platform


def test_the_deploy_scripts_the_release_calls_use_the_production_compose_file() -> None:
    deploy = (REPO / "deploy" / "production" / "deploy.sh").read_text()
    assert "docker-compose.yaml" in deploy and "mlops-assets serve restore" in deploy
    compose = yaml.safe_load((REPO / "deploy" / "production" / "docker-compose.yaml").read_text())
    images = {s["image"] for s in compose["services"].values() if "image" in s and "mlops-assets" in s["image"]}
    assert images == {"${REGISTRY:-local}/mlops-assets-dagster:${MLOPS_IMAGE_TAG:-dev}",
                      "${REGISTRY:-local}/mlops-assets-serving:${MLOPS_IMAGE_TAG:-dev}"}
    for service in compose["services"].values():
        build = service.get("build")
        if build:
            assert (REPO / "deploy" / "production" / build["context"] / build["dockerfile"]).resolve().is_file()
