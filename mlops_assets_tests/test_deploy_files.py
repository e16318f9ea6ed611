"""The deploy files start: what can be checked without a Docker engine or a Kubernetes cluster.

Images: every path their user must write is created and owned before `USER`. Compose files: every
file, variable and port they name exists and agrees with the code and with each other; the
commands parse with the real CLIs (mlflow, dagster, ray); secrets arrive as files, never on a
command line. The production entrypoint runs outside a container on each service's environment.
The deploy scripts run with stand-in `docker` and `ssh`: secrets are checked, host keys pinned.
The shipped Dagster instances enable freshness, and the monitoring assets' freshness policy and
verdict reach the UI's GraphQL API after `make up` has written DAGSTER_HOME/dagster.yaml.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PRODUCTION = DEPLOY / "production"
ENTRYPOINT = PRODUCTION / "entrypoint.sh"
COMPOSE_FILES = {"local": DEPLOY / "docker-compose.yaml", "production": PRODUCTION / "docker-compose.yaml"}
INSTANCE_FILES = [DEPLOY / "dagster.yaml", PRODUCTION / "dagster.yaml", DEPLOY / "local" / "dagster.yaml",
                  PRODUCTION / "dagster-k8s.yaml", PRODUCTION / "dagster-docker.yaml"]
SECRETISH = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY\b|CREDENTIAL", re.IGNORECASE)
APP = PurePosixPath("/app")  # the images' WORKDIR: the repository's files are copied there


# --- parsing helpers -------------------------------------------------------------------------------


def _compose(name: str) -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILES[name].read_text())


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuations joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        instruction, _, args = current.strip().partition(" ")
        lines.append((instruction.upper(), args.strip()))
        current = ""
    return lines


def _env_of(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in instructions:
        if instruction == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(args))  # type: ignore[misc]
    return env


def _shell_commands(script: str) -> list[list[str]]:
    return [shlex.split(part) for part in re.split(r"&&|;", script) if part.strip()]


def _under(path: PurePosixPath, folder: PurePosixPath) -> bool:
    return path == folder or folder in path.parents


def _platform_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from this repository's Dockerfiles (not postgres)."""
    return {name: s for name, s in compose["services"].items() if s.get("build")}


def _dockerfile_of(service: dict[str, Any]) -> str:
    return PurePosixPath(service["build"]["dockerfile"]).name


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _with_defaults(value: Any) -> str:
    """A compose value as compose makes it when the variables it names are unset: their defaults."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def _command_line(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    return shlex.split(command) if isinstance(command, str) else list(command or [])


# --- images: their user writes what it must -----------------------------------------------------


def _paths_the_image_must_write(dockerfile: str) -> set[PurePosixPath]:
    env = _env_of(_dockerfile(DEPLOY / dockerfile))
    paths = {PurePosixPath(env[k]) for k in ("DAGSTER_HOME", "MLOPS_PREDICTION_SPOOL_DIR") if k in env}
    for name in COMPOSE_FILES:
        for service in _platform_services(_compose(name)).values():
            if _dockerfile_of(service) != dockerfile:
                continue
            for volume in service.get("volumes") or []:
                source, target, *mode = str(volume).split(":")
                if not source.startswith((".", "/")) and "ro" not in mode:  # a named volume it writes
                    paths.add(PurePosixPath(target))
            for key in ("MLOPS_DATA_URL", "MLOPS_PREDICTION_LOG_URL", "MLFLOW_ARTIFACTS_DESTINATION"):
                value = _with_defaults((service.get("environment") or {}).get(key, ""))
                if value.startswith("/"):
                    paths.add(PurePosixPath(value))
            if "mlflow" in _command_line(service):
                ini = (PRODUCTION / "mlflow-auth.ini").read_text()
                database = re.search(r"^database_uri = sqlite:///(/.*)$", ini, re.M)
                assert database, "mlflow-auth.ini: no sqlite database_uri"
                paths.add(PurePosixPath(database.group(1)).parent)
    return paths


@pytest.mark.parametrize("dockerfile", ["Dockerfile.dagster", "Dockerfile.serving"])
def test_every_image_user_can_write_every_path_it_must_write(dockerfile: str) -> None:
    instructions = _dockerfile(DEPLOY / dockerfile)
    users = [i for i, (instruction, _) in enumerate(instructions) if instruction == "USER"]
    assert len(users) == 1, f"{dockerfile}: one USER, not root"
    user = instructions[users[0]][1]
    created: set[PurePosixPath] = set()
    owned: dict[PurePosixPath, bool] = {}  # folder -> chowned recursively
    added = False
    for instruction, args in instructions[: users[0]]:
        if instruction != "RUN":
            continue
        for words in _shell_commands(args):
            if words[:2] == ["mkdir", "-p"]:
                created |= {PurePosixPath(w) for w in words[2:]}
            elif words and words[0] == "chown":
                recursive = "-R" in words
                rest = [w for w in words[1:] if not w.startswith("-")]
                assert rest[0].split(":")[0] == user, f"{dockerfile}: chown to {rest[0]}, USER is {user}"
                owned.update({PurePosixPath(w): recursive for w in rest[1:]})
            elif words and words[0] == "useradd":
                added = added or words[-1] == user
    assert added, f"{dockerfile}: USER {user} is never created"
    must_write = _paths_the_image_must_write(dockerfile)
    assert must_write, dockerfile
    for path in sorted(must_write):
        assert any(_under(path, folder) for folder in created), f"{dockerfile}: {path} is never created"
        assert any(path == folder or (recursive and _under(path, folder)) for folder, recursive in owned.items()), (
            f"{dockerfile}: {path} is not owned by {user} before USER")


def test_the_images_copy_every_path_the_deploy_files_run_inside_them() -> None:
    referenced: set[PurePosixPath] = set()
    for name in COMPOSE_FILES:
        for service in _platform_services(_compose(name)).values():
            words = _strings([service.get("entrypoint"), service.get("command"), service.get("environment")])
            referenced |= {PurePosixPath(m) for w in words for m in re.findall(r"/app/[\w./-]+", w)}
    for script in PRODUCTION.glob("*.sh"):
        referenced |= {PurePosixPath(m) for m in re.findall(r"/app/[\w./-]+", script.read_text())}
    for dockerfile in ("Dockerfile.dagster", "Dockerfile.serving"):
        referenced |= {PurePosixPath(m) for _, a in _dockerfile(DEPLOY / dockerfile) for m in re.findall(r"/app/[\w./-]+", a)}
    assert PurePosixPath("/app/deploy/production/entrypoint.sh") in referenced
    copied = {PurePosixPath(w) for f in ("Dockerfile.dagster", "Dockerfile.serving")
              for i, a in _dockerfile(DEPLOY / f) if i == "COPY" for w in shlex.split(a)[:-1]}
    for path in sorted(referenced):
        relative = path.relative_to(APP)
        assert (REPO / relative).exists(), f"{path}: no {relative} in the repository"
        assert relative.parts[0] in {c.parts[0] for c in copied}, f"{path}: not copied into the images"
        if relative.suffix == ".sh":
            assert os.access(REPO / relative, os.X_OK), f"{relative} is not executable"
    dagster = _dockerfile(DEPLOY / "Dockerfile.dagster")
    assert ("ENTRYPOINT", '["/app/deploy/production/entrypoint.sh"]') in dagster  # run launchers' containers too


def test_no_secret_file_or_local_data_enters_an_image_and_every_copied_path_does() -> None:
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for private in ("deploy/production/secrets", ".env", "data", ".venv", ".git"):
        assert private in ignored, f".dockerignore lets {private} into the build context"
    for dockerfile in ("Dockerfile.dagster", "Dockerfile.serving"):
        for instruction, args in _dockerfile(DEPLOY / dockerfile):
            if instruction == "COPY":
                for source in shlex.split(args)[:-1]:
                    assert (REPO / source).exists() and source not in ignored, f"{dockerfile}: COPY {source}"


# --- compose files: files, variables, ports -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(COMPOSE_FILES))
def test_every_file_a_compose_file_names_exists(name: str) -> None:
    compose, folder = _compose(name), COMPOSE_FILES[name].parent
    for service_name, service in compose["services"].items():
        build = service.get("build")
        if build:
            assert (folder / build["context"] / build["dockerfile"]).resolve().is_file(), service_name
        for volume in service.get("volumes") or []:
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (folder / source).resolve().is_file(), f"{name}: {service_name} mounts {source}"
            else:
                assert source in compose["volumes"], f"{name}: {service_name}: undeclared volume {source}"
        for secret in service.get("secrets") or []:
            assert secret in compose["secrets"], f"{name}: {service_name}: undeclared secret {secret}"
    text = COMPOSE_FILES[name].read_text()
    for secret_name, secret in compose["secrets"].items():
        if "environment" in secret:  # made from a variable: the file must require it
            assert f"${{{secret['environment']}:?" in text, f"{name}: {secret_name} from an optional variable"
        elif name == "production":  # operator-provisioned, git-ignored: deploy.sh checks for each
            assert secret["file"] == f"./secrets/{secret_name}"
        else:
            from mlops_assets.tools.ray_cluster import TOKEN_FILE, ClusterConfig

            default = re.fullmatch(r"\$\{RAY_AUTH_TOKEN_FILE:-(.+)\}", secret["file"])
            assert default, secret["file"]
            assert (folder / default.group(1)).resolve() == (REPO / ClusterConfig().state_dir / TOKEN_FILE)


def _names_read_by_the_code() -> set[str]:
    names = set()
    for path in (REPO / "mlops_assets").rglob("*.py"):
        names |= set(re.findall(r"[\"']([A-Z][A-Z0-9_]{3,})[\"']", path.read_text()))
    return names


def _names_read_by_the_entrypoint() -> set[str]:
    text = ENTRYPOINT.read_text()
    loop = re.search(r"for name in (.*?); do", text, re.S)
    assert loop
    listed = loop.group(1).replace("\\\n", " ").split()
    return {n for name in listed for n in (name, f"{name}_FILE")} | set(re.findall(r"\$\{([A-Z_]+)", text))


def _names_read_by_the_tools() -> set[str]:
    import mlflow
    import ray
    from mlflow.cli import server

    mlflow_root, ray_root = Path(mlflow.__file__).parent, Path(ray.__file__).parent
    names = set(re.findall(r"\"(MLFLOW_[A-Z_]+)\"", (mlflow_root / "environment_variables.py").read_text()))
    names |= {p.envvar for p in server.params if isinstance(getattr(p, "envvar", None), str)}  # type: ignore[misc]
    for path in (ray_root / "_private" / "authentication").glob("*.py"):
        names |= set(re.findall(r"\"(RAY_[A-Z_]+)\"", path.read_text()))
    for path in INSTANCE_FILES:
        names |= set(re.findall(r"env: (DAGSTER_[A-Z_]+)", path.read_text()))
    return names | {"DAGSTER_HOME"}


def test_every_variable_the_compose_files_set_is_read_by_something() -> None:
    readers = _names_read_by_the_code() | _names_read_by_the_entrypoint() | _names_read_by_the_tools()
    for name in COMPOSE_FILES:
        for service_name, service in _platform_services(_compose(name)).items():
            unread = set(service.get("environment") or {}) - readers
            assert not unread, f"{name}: {service_name} sets {sorted(unread)}, which nothing reads"
        for variable in re.findall(r"\$\{([A-Z_]+)", COMPOSE_FILES[name].read_text()):
            head = COMPOSE_FILES[name].read_text().split("\nservices:")[0]
            text = COMPOSE_FILES[name].read_text()
            documented = variable in head or re.search(rf"\$\{{{variable}:[-?]", text)
            assert documented, f"{name}: ${{{variable}}} has no default, no message and no mention in the header"


def _listening_ports(service_name: str, service: dict[str, Any]) -> set[int]:
    """The ports a service's processes listen on, from its command and the shipped configs."""
    from mlops_assets.deployment import rollout
    from mlops_assets.serving.config import DEFAULT_DASHBOARD_PORT

    words = _command_line(service)
    if service_name == "postgres":
        return {5432}
    ports = set()
    for i, word in enumerate(words):
        flag, _, value = word.partition("=")
        if flag in ("--port", "-p") and not value:
            value = words[i + 1]
        if flag in ("--port", "-p", "--metrics-export-port", "--dashboard-port") and value:
            ports.add(int(value))
    if "ray" in words[:1]:
        ports.add(DEFAULT_DASHBOARD_PORT if "--dashboard-port" not in " ".join(words) else 0)
        ports.add(int(rollout.load_serve_config()["http_options"]["port"]))  # the Serve proxy
    return ports


@pytest.mark.parametrize("name", sorted(COMPOSE_FILES))
def test_the_ports_agree_with_the_urls_the_commands_and_the_images(name: str) -> None:
    compose = _compose(name)
    services = compose["services"]
    listening = {n: _listening_ports(n, s) for n, s in services.items()}
    published: dict[int, str] = {}
    for service_name, service in services.items():
        exposed = set()
        if service.get("build"):
            exposed = {int(p) for i, a in _dockerfile(DEPLOY / _dockerfile_of(service)) if i == "EXPOSE" for p in a.split()}
        for port in service.get("ports") or []:
            _, host, container = str(port).split(":")
            assert int(container) in listening[service_name], f"{name}: {service_name} publishes {port}, listens on {listening[service_name]}"
            if exposed:
                assert int(container) in exposed, f"{name}: {service_name} publishes {container}, the image exposes {exposed}"
            published[int(host)] = service_name
    urls = 0
    for service_name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            match = re.fullmatch(r"https?://([\w.-]+):(\d+)", str(value))
            if not match:
                continue
            host, port = match.group(1), int(match.group(2))
            if host in services:  # another container, on the compose network
                assert port in listening[host], f"{name}: {service_name} {key}={value}: {host} listens on {listening[host]}"
            else:  # a browser on the host: a published port
                assert host == "127.0.0.1" and port in published, f"{name}: {service_name} {key}={value} is published nowhere"
            urls += 1
        for key in ("DAGSTER_PG_PORT", "MLFLOW_DB_PORT"):
            assert int((service.get("environment") or {}).get(key, 5432)) in listening["postgres"]
    assert urls >= 5
    mlflow = services["mlflow"]
    allowed = set(mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(","))
    mlflow_port = next(iter(listening["mlflow"]))
    host_port = next(h for h, s in published.items() if s == "mlflow")
    assert {f"mlflow:{mlflow_port}", f"127.0.0.1:{host_port}", f"localhost:{host_port}"} <= allowed, allowed


def test_the_two_compose_files_describe_the_same_platform() -> None:
    local, production = _compose("local"), _compose("production")
    assert set(local["services"]) == set(production["services"])
    assert set(local["volumes"]) <= set(production["volumes"])
    for service_name in _platform_services(production):
        one, other = local["services"][service_name], production["services"][service_name]
        assert _dockerfile_of(one) == _dockerfile_of(other), service_name
        assert one.get("entrypoint") == other.get("entrypoint") == ["/app/deploy/production/entrypoint.sh"], service_name
        # The same program with the same options (production adds basic auth and workers).
        extra = {"--app-name", "basic-auth", "--workers", "2"}
        assert [w for w in _command_line(other) if w not in extra] == _command_line(one), service_name
        for key in ("RAY_AUTH_MODE", "MLOPS_DATA_URL", "MLFLOW_TRACKING_URI", "MLOPS_RAY_DASHBOARD_URL", "MLOPS_SERVE_URL"):
            assert (key in (one.get("environment") or {})) == (key in (other.get("environment") or {})), (service_name, key)
        # Production adds volumes (MLflow's auth database), never drops one.
        assert {str(v).split(":")[1] for v in one.get("volumes") or []} <= \
            {str(v).split(":")[1] for v in other.get("volumes") or []}, service_name


@pytest.mark.parametrize("name", sorted(COMPOSE_FILES))
def test_the_commands_parse_with_the_real_command_line_tools(name: str) -> None:
    """Each service's command, with /app mapped to the repository, parses with the CLI it runs."""
    import click
    from dagster._daemon.cli import run_command as dagster_daemon_run
    from dagster_webserver.cli import dagster_webserver
    from mlflow.cli import server as mlflow_server
    from ray.scripts.scripts import start as ray_start

    clis: dict[tuple[str, ...], click.Command] = {("mlflow", "server"): mlflow_server, ("ray", "start"): ray_start,
                                                 ("dagster-webserver",): dagster_webserver,
                                                 ("dagster-daemon", "run"): dagster_daemon_run}
    parsed = 0
    for service in _platform_services(_compose(name)).values():
        words = [w.replace("/app/", f"{REPO}/") for w in _command_line(service)]
        prefix = next(p for p in clis if tuple(words[: len(p)]) == p)
        clis[prefix].make_context(" ".join(prefix), words[len(prefix):])  # raises on an unknown option
        parsed += 1
    assert parsed == 4


# --- secrets: never on a command line -----------------------------------------------------------


def _secretish_interpolation(text: str) -> list[str]:
    return [v for v in re.findall(r"\$\{\{?\s*([\w.]+)", text) if SECRETISH.search(v)]


def test_no_secret_value_reaches_a_command_line() -> None:
    lines: list[tuple[str, str]] = []
    for name in COMPOSE_FILES:
        for service_name, service in _compose(name)["services"].items():
            for key in ("command", "entrypoint", "healthcheck"):
                lines += [(f"{name}:{service_name}:{key}", s) for s in _strings(service.get(key))]
    for dockerfile in ("Dockerfile.dagster", "Dockerfile.serving"):
        lines += [(dockerfile, a) for i, a in _dockerfile(DEPLOY / dockerfile) if i in ("RUN", "CMD", "ENTRYPOINT")]
    rayservice = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        lines += [("rayStartParams", s) for s in _strings(group["rayStartParams"])]
        lines += [("container args", s) for c in group["template"]["spec"]["containers"]
                  for s in _strings([c.get("command"), c.get("args")])]
    for script in sorted(PRODUCTION.glob("*.sh")):
        # Commands that start a process (an assignment or `export` is the shell's own, in no argv).
        lines += [(script.name, line) for line in script.read_text().splitlines()
                  if not re.match(r"\s*(#|(export\s+)?[A-Za-z_]+=)", line)
                  and re.search(r"\b(ssh|docker|mlflow|dagster)\b", line)]
    assert len(lines) > 20
    for where, line in lines:
        assert not _secretish_interpolation(line), f"{where}: a secret on a command line: {line}"
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", line), f"{where}: a URI with a password: {line}"
    # Both compose files hand secrets over as files under /run/secrets, never as values.
    for name in COMPOSE_FILES:
        for service_name, service in _compose(name)["services"].items():
            for key, value in (service.get("environment") or {}).items():
                if SECRETISH.search(key) and key != "MLFLOW_TRACKING_USERNAME":
                    assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), f"{name}: {service_name}: {key}"
                    assert str(value).removeprefix("/run/secrets/") in (service.get("secrets") or []), (name, service_name, key)
                assert not _secretish_interpolation(str(value)), f"{name}: {service_name}: {key}={value}"


# --- the entrypoint, outside a container ----------------------------------------------------------


def _run_through_entrypoint(environment: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """Run entrypoint.sh on a service's environment, its /run/secrets files made in tmp_path:
    (the environment the command got, its argv, the secret values)."""
    values: dict[str, str] = {}
    env = {"PATH": os.environ["PATH"]}
    for key, value in environment.items():
        value = _with_defaults(value)
        if value.startswith("/run/secrets/"):
            secret = tmp_path / value.removeprefix("/run/secrets/")
            values.setdefault(secret.name, secrets.token_hex(16))
            secret.write_text(values[secret.name] + "\n")
            value = str(secret)
        env[key] = value
    probe = "import json, os, sys; print(json.dumps({'env': dict(os.environ), 'argv': sys.argv[1:]}))"
    done = subprocess.run([str(ENTRYPOINT), sys.executable, "-c", probe, "--serve-artifacts"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    return out["env"], out["argv"], values


@pytest.mark.parametrize("name", sorted(COMPOSE_FILES))
def test_the_entrypoint_prepares_every_service_outside_a_container(name: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.cli import server as mlflow_server

    for service_name, service in _platform_services(_compose(name)).items():
        folder = tmp_path / service_name
        folder.mkdir()
        env, argv, values = _run_through_entrypoint(service.get("environment") or {}, folder)
        leftover = sorted(k for k in env if k.endswith("_FILE") and k != "RAY_AUTH_TOKEN_FILE")
        assert not leftover, f"{name}: {service_name}: the entrypoint does not read {leftover}"
        assert "RAY_AUTH_TOKEN_FILE" not in env
        for value in values.values():
            assert not any(value in a for a in argv)
        if "ray_auth_token" in values:
            assert Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip() == values["ray_auth_token"]
            assert values["ray_auth_token"] not in json.dumps(env)  # a path, never the value
        if "api_token" in values:
            assert env["MLOPS_API_TOKEN"] == values["api_token"]
        if "postgres_password" in values and "DAGSTER_PG_HOST" in env:
            assert env["DAGSTER_PG_PASSWORD"] == values["postgres_password"]
        if "mlflow" in _command_line(service):
            # mlflow server reads its store, artifacts and allowed hosts from the environment.
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            params = mlflow_server.make_context("server", _command_line(service)[2:]).params
            assert params["backend_store_uri"] == (
                f"postgresql+psycopg2://mlops:{values['postgres_password']}@postgres:5432/mlflow")
            assert params["artifacts_destination"] == "/data/mlflow-artifacts" and params["serve_artifacts"]
            assert "mlflow:5000" in params["allowed_hosts"]


# --- the deploy scripts, with stand-in docker and ssh -------------------------------------------


def _stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _deploy_secrets() -> list[str]:
    text = (PRODUCTION / "deploy.sh").read_text()
    loop = re.search(r"for secret in (.*?); do", text)
    assert loop
    return loop.group(1).split()


def test_deploy_sh_checks_for_every_secret_the_production_compose_file_mounts(tmp_path: Path) -> None:
    mounted = set(_compose("production")["secrets"])
    assert set(_deploy_secrets()) == mounted
    assert all(s in (PRODUCTION / "secrets" / ".gitignore").read_text() for s in mounted)
    host = tmp_path / "checkout" / "production"
    (host / "secrets").mkdir(parents=True)
    shutil.copy(PRODUCTION / "deploy.sh", host)
    shutil.copy(PRODUCTION / "docker-compose.yaml", host)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir, "docker", f'printf "%s\\n" "$*" >> {tmp_path}/docker.log\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "REGISTRY": "registry.invalid/team", "MLOPS_IMAGE_TAG": "v1"}
    for missing in sorted(mounted):
        for secret in mounted - {missing}:
            (host / "secrets" / secret).write_text("x")
        (host / "secrets" / missing).unlink(missing_ok=True)
        done = subprocess.run([str(host / "deploy.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and f"secrets/{missing} is missing" in done.stderr, done.stderr
        assert not (tmp_path / "docker.log").exists()
    (host / "secrets" / missing).write_text("x")
    done = subprocess.run([str(host / "deploy.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "docker.log").read_text().splitlines()
    assert calls[:2] == ["compose -f docker-compose.yaml pull --quiet",
                         "compose -f docker-compose.yaml up -d --no-build --remove-orphans"]
    # The champion is served again by the command made for it, not by model_deployment alone (which
    # loads its inputs only from its own training run).
    assert any(c.endswith("entrypoint.sh mlops-assets serve restore") for c in calls), calls


def _remote_env(tmp_path: Path, ssh_body: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stand_in(bin_dir, "ssh", ssh_body)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DEPLOY_SSH_KEY": "-----BEGIN KEY-----\nk\n-----END KEY-----",
            "DEPLOY_KNOWN_HOSTS": "deploy.invalid ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPinnedHostKey",
            "DEPLOY_HOST": "ops@deploy.invalid", "DEPLOY_PATH": str(tmp_path / "checkout"),
            "REGISTRY": "registry.invalid/team", "MLOPS_IMAGE_TAG": "v1.2.3"}


# The stand-in ssh records its options, the files they name as they were during the call, and
# the remote command.
RECORDING_SSH = """out="$(dirname "$0")/../ssh.json"
python3 - "$@" > "$out" <<'EOF'
import json, os, stat, sys
args = sys.argv[1:]
opts = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith(("cd ", "-")))
files = {}
for i, a in enumerate(args):
    path = args[i + 1] if a == "-i" else a.split("=", 1)[1] if a.startswith("UserKnownHostsFile=") else None
    if path:
        files[path] = {"text": open(path).read(), "mode": stat.S_IMODE(os.stat(path).st_mode)}
print(json.dumps({"args": args, "files": files}))
EOF
"""


def test_the_remote_deploy_trusts_only_the_pinned_host_keys(tmp_path: Path) -> None:
    env = _remote_env(tmp_path, RECORDING_SSH)
    done = subprocess.run([str(PRODUCTION / "remote-deploy.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    call = json.loads((tmp_path / "ssh.json").read_text())
    args = call["args"]
    options = [args[i + 1] for i, a in enumerate(args) if a == "-o"]
    assert "StrictHostKeyChecking=yes" in options and "GlobalKnownHostsFile=/dev/null" in options
    known_hosts = next(o.split("=", 1)[1] for o in options if o.startswith("UserKnownHostsFile="))
    assert call["files"][known_hosts]["text"] == env["DEPLOY_KNOWN_HOSTS"] + "\n"
    key = args[args.index("-i") + 1]
    assert call["files"][key]["mode"] == 0o600 and call["files"][key]["text"].startswith("-----BEGIN KEY")
    assert not Path(key).exists() and not Path(known_hosts).exists()  # removed on exit
    assert args[-2] == env["DEPLOY_HOST"] and args[-1].endswith("deploy/production/deploy.sh")
    assert "MLOPS_IMAGE_TAG=v1.2.3" in args[-1] and env["DEPLOY_SSH_KEY"] not in " ".join(args)
    del env["DEPLOY_KNOWN_HOSTS"]
    (tmp_path / "ssh.json").unlink()
    refused = subprocess.run([str(PRODUCTION / "remote-deploy.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "DEPLOY_KNOWN_HOSTS" in refused.stderr
    assert not (tmp_path / "ssh.json").exists()  # ssh never ran
    # Nothing anywhere accepts an unknown host key.
    for path in [*DEPLOY.rglob("*.sh"), *(REPO / ".github").rglob("*.yml"), *(REPO / "scripts").glob("*")]:
        text = path.read_text()
        assert not re.search(r"StrictHostKeyChecking[= ](no|accept-new|off)", text, re.I), path
        assert "ssh-keyscan" not in "".join(line for line in text.splitlines() if not line.lstrip().startswith("#")), path


def test_the_remote_retrain_queues_the_job_with_its_tags_intact(tmp_path: Path) -> None:
    from dagster._cli.job import job_launch_command

    from mlops_assets.definitions import defs

    # The stand-in ssh runs the remote command here; the host's docker is a stand-in that records.
    env = _remote_env(tmp_path, 'exec bash -c "${@: -1}"\n')
    _stand_in(tmp_path / "bin", "docker", f'python3 -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@" > {tmp_path}/docker.json\n')
    checkout = tmp_path / "checkout" / "deploy" / "production"
    checkout.mkdir(parents=True)
    shutil.copy(PRODUCTION / "retrain.sh", checkout)
    tags = {"mlops_assets/trigger": "repository_dispatch", "mlops_assets/event": "drift-detected",
            "mlops_assets/reason": "it's \"drifting\" $(touch pwned) `id` ; rm -rf /", "mlops_assets/github_run": "42"}
    env["RUN_TAGS"] = json.dumps(tags)
    done = subprocess.run([str(PRODUCTION / "remote-retrain.sh")], env=env, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "pwned").exists() and not (checkout / "pwned").exists()
    argv = json.loads((tmp_path / "docker.json").read_text())
    assert argv[:7] == ["compose", "-f", "docker-compose.yaml", "exec", "-T", "dagster-webserver",
                        "/app/deploy/production/entrypoint.sh"]
    assert "dagster-webserver" in _compose("production")["services"]
    assert argv[7:9] == ["dagster", "job"] and json.loads(argv[-1]) == tags
    launch = [w.replace("/app/", f"{REPO}/") for w in argv[9:]]
    params = job_launch_command.make_context("launch", launch[1:]).params
    assert defs.resolve_job_def(params["job_name"]).name == "retraining"


# --- the KubeRay manifest ---------------------------------------------------------------------------


def test_the_rayservice_gives_replicas_the_registry_the_token_the_store_and_a_spool() -> None:
    from ray.serve.schema import ServeDeploySchema

    from mlops_assets.core.redaction import has_credentials
    from mlops_assets.deployment import rollout
    from mlops_assets.serving.config import TOKEN_FILE_ENV, TRACKING_URI_FILE_ENV
    from mlops_assets.serving.prediction_log import SPOOL_DIR_ENV

    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    k8s = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(k8s)
    local = rollout.load_serve_config()
    (k8s_app,), (local_app,) = k8s["applications"], local["applications"]
    assert [d["name"] for d in k8s_app["deployments"]] == [d["name"] for d in local_app["deployments"]]
    for theirs, ours in zip(k8s_app["deployments"], local_app["deployments"], strict=True):
        assert set(theirs) == set(ours) and theirs.get("user_config") == ours.get("user_config"), theirs["name"]
    runtime_env = k8s_app["runtime_env"]["env_vars"]
    assert "MLFLOW_TRACKING_URI" not in runtime_env  # the file below, so no credential reaches the dashboard
    assert not any(has_credentials(str(v)) or SECRETISH.search(k) for k, v in runtime_env.items())
    spool_dir = _env_of(_dockerfile(DEPLOY / "Dockerfile.serving"))[SPOOL_DIR_ENV]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "mlops-ray-auth"}
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            env = {e["name"]: e for e in container["env"]}
            mounts = container["volumeMounts"]

            def volume_of(path: str, mounts: list[dict[str, Any]] = mounts,
                          volumes: dict[str, Any] = volumes) -> dict[str, Any]:
                mount = next(m for m in mounts if _under(PurePosixPath(path), PurePosixPath(m["mountPath"])))
                return volumes[mount["name"]] | {"readOnly": mount.get("readOnly", False)}

            for name in (TRACKING_URI_FILE_ENV, TOKEN_FILE_ENV, "AWS_SHARED_CREDENTIALS_FILE"):
                secret = volume_of(env[name]["value"])
                assert "secret" in secret and secret["readOnly"], f"{container['name']}: {name}"
                key = PurePosixPath(env[name]["value"]).name
                assert f"--from-literal={key}=" in (DEPLOY / "rayservice.yaml").read_text() or \
                    f"--from-file={key}=" in (DEPLOY / "rayservice.yaml").read_text(), key
            assert env[SPOOL_DIR_ENV]["value"] == spool_dir
            spool = volume_of(spool_dir)
            assert ("emptyDir" in spool or "persistentVolumeClaim" in spool or "hostPath" in spool) and not spool["readOnly"]
            for entry in container["env"]:  # values are paths and settings, never secrets
                assert "value" in entry and not has_credentials(entry["value"]), entry
                assert not SECRETISH.search(entry["name"]) or entry["name"].endswith("_FILE"), entry
        assert pod["securityContext"]["fsGroup"] == 1000


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if str(quantity).endswith("m") else float(quantity)


def test_the_rayservice_has_every_field_the_platform_relies_on() -> None:
    """What the code reads or needs of a RayService cluster: the app and deployments it deploys and
    watches, options the replicas accept, replicas on the workers only (the head has no CPUs) with
    room for every replica there, a metrics port on every node (the post-deploy watch scrapes each
    node the dashboard lists), a dashboard the platform can reach, the Ray version it was tested with."""
    import importlib

    import ray

    from mlops_assets.deployment import rollout
    from mlops_assets.serving.config import APP_NAME, DEPLOYMENT_NAME, ModelRef, ServiceOptions

    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = serve["applications"]
    assert app["name"] == APP_NAME and DEPLOYMENT_NAME in [d["name"] for d in app["deployments"]]
    module, _, attribute = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    ServiceOptions.from_args(app["args"])  # the replicas' constructor arguments, as they will read them
    [scorer] = [d for d in app["deployments"] if d["name"] == DEPLOYMENT_NAME]
    assert ModelRef.from_user_config(scorer["user_config"]).alias == "champion"
    assert set(app["runtime_env"]["env_vars"]) <= set(rollout.FORWARDED_ENV)
    assert serve["proxy_location"] == "EveryNode" and serve["http_options"]["host"] == "0.0.0.0"

    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    for group in [head, *workers]:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), params  # the CRD takes strings only
        [container] = group["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports.get("metrics") == int(params["metrics-export-port"]), (group.get("groupName", "head"), ports)
    head_ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["serve"] == serve["http_options"]["port"] and "dashboard" in head_ports
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the platform deploys and discovers nodes there
    # Replicas on the workers: the head offers no CPU and every replica asks for some.
    assert head["rayStartParams"]["num-cpus"] == "0"
    wanted = 0.0
    for deployment in app["deployments"]:
        cpus = float(deployment["ray_actor_options"]["num_cpus"])
        assert cpus > 0, deployment["name"]
        wanted += cpus * int(deployment["num_replicas"])
    offered = sum(int(w["minReplicas"]) * float(w["rayStartParams"].get("num-cpus") or
                  _cpus(w["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])) for w in workers)
    assert offered >= wanted, f"the workers offer {offered} CPUs to replicas asking for {wanted}"


def _schema_errors(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """What a Kubernetes API server would refuse or silently drop: wrong types, missing required
    fields, values outside an enum, and fields the structural schema does not know (pruned)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return []
    if schema.get("x-kubernetes-int-or-string"):
        return [] if isinstance(value, int | str) else [f"{where}: {value!r} is neither int nor string"]
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": int | float}
    kind = schema.get("type")
    if kind in kinds and not isinstance(value, kinds[kind]) or (kind in ("integer", "number") and isinstance(value, bool)):
        return [f"{where}: {value!r} is not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in {schema['enum']}"]
    errors = []
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        errors += [f"{where}.{k}: required" for k in schema.get("required") or [] if k not in value]
        for key, item in value.items():
            if key in properties:
                errors += _schema_errors(item, properties[key], f"{where}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _schema_errors(item, schema["additionalProperties"], f"{where}.{key}")
            elif properties and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{where}.{key}: unknown field (the API server drops it)")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors


def test_the_rayservice_validates_against_the_kuberay_crd() -> None:
    """Set MLOPS_TEST_RAYSERVICE_CRD to KubeRay's ray.io_rayservices.yaml (ray-operator/config/crd/bases,
    of the operator version the cluster runs) to check the manifest against it; not shipped here."""
    crd_path = os.environ.get("MLOPS_TEST_RAYSERVICE_CRD")
    if not crd_path:
        pytest.skip("MLOPS_TEST_RAYSERVICE_CRD names no KubeRay RayService CRD file")
    crd = yaml.safe_load(Path(crd_path).read_text())
    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    [version] = [v for v in crd["spec"]["versions"] if f"{crd['spec']['group']}/{v['name']}" == service["apiVersion"]]
    assert crd["spec"]["names"]["kind"] == service["kind"]
    schema = version["schema"]["openAPIV3Schema"]
    body = {k: v for k, v in service.items() if k not in ("apiVersion", "kind", "metadata")}
    assert _schema_errors(body, {**schema, "properties": {k: v for k, v in schema["properties"].items()
                                                          if k not in ("apiVersion", "kind", "metadata")}}) == []
    # And the checker finds what it must: a misspelt field, a number where the CRD wants a string.
    broken = json.loads(json.dumps(body))
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 2
    found = _schema_errors(broken, schema)
    assert any("num-cpus" in e for e in found) and any("minReplica:" in e for e in found), found


# --- the Dagster instances: freshness on ------------------------------------------------------------


@pytest.mark.parametrize("path", INSTANCE_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_shipped_instance_validates_and_enables_freshness(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster._config import process_config
    from dagster._config.field_utils import Shape
    from dagster._core.instance.config import dagster_instance_config_schema

    config = yaml.safe_load(path.read_text())
    for variable in re.findall(r"env: ([A-Z_]+)", path.read_text()):
        monkeypatch.setenv(variable, "5432" if variable.endswith("PORT") else "x")
    result = process_config(Shape(dagster_instance_config_schema()), config)
    assert result.success, result.errors
    from dagster._core.instance.config import validate_concurrency_config

    validate_concurrency_config(config)  # what loading the instance checks beyond the schema (run limits in one place)
    assert config["freshness"] == {"enabled": True}
    coordinator = config.get("run_coordinator") or {}
    if coordinator.get("class") == "QueuedRunCoordinator":  # its own config is checked only when it starts
        from dagster._core.run_coordinator import QueuedRunCoordinator

        queued = process_config(QueuedRunCoordinator.config_type(), coordinator.get("config") or {})
        assert queued.success, queued.errors
    for value in (config.get("run_launcher") or {}).get("config", {}).get("env_vars", []):
        key = value.split("=", 1)[0]  # a run's secrets: mounted files only
        assert not SECRETISH.search(key) or key.endswith("_FILE"), f"{path.name}: {value}"


def _write_local_instance(home: Path) -> None:
    """What `make demo`/`make up` do first: the Makefile's DAGSTER_HOME/dagster.yaml target."""
    done = subprocess.run(["make", "-s", f"DAGSTER_HOME={home}", f"{home}/dagster.yaml"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_make_and_platform_sh_write_the_shipped_instance_settings_and_keep_an_edited_one(tmp_path: Path) -> None:
    shipped = (DEPLOY / "local" / "dagster.yaml").read_text()
    _write_local_instance(tmp_path / "home")
    assert (tmp_path / "home" / "dagster.yaml").read_text() == shipped
    # An empty file from an earlier version (`touch`) gets the settings; an edited one is kept.
    line = next(x for x in (REPO / "scripts" / "platform.sh").read_text().splitlines()
                if "dagster.yaml" in x and not x.lstrip().startswith("#"))
    for content, expected in (("", shipped), ("telemetry:\n  enabled: false\n", "telemetry:\n  enabled: false\n")):
        home = tmp_path / f"home-{len(content)}"
        home.mkdir()
        (home / "dagster.yaml").write_text(content)
        done = subprocess.run(["bash", "-c", f"set -eu; {line}"], cwd=REPO, capture_output=True, text=True,
                              timeout=30, env={**os.environ, "DAGSTER_HOME": str(home)})
        assert done.returncode == 0, done.stderr
        assert (home / "dagster.yaml").read_text() == expected
        os.utime(home / "dagster.yaml", (0, 0))  # older than the shipped file: make looks at it again
        _write_local_instance(home)
        assert (home / "dagster.yaml").read_text() == expected


@pytest.mark.integration
@pytest.mark.slow
def test_the_freshness_policy_and_verdict_of_the_monitoring_assets_reach_the_ui(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The instance `make up` runs on: the freshness daemon is one of its daemons, and the UI's
    GraphQL API shows each monitoring asset's policy and, after a daemon pass, its verdict."""
    import asyncio

    import dagster as dg
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.test_utils import InProcessTestWorkspaceLoadTarget
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._daemon.freshness import FreshnessDaemon
    from dagster_graphql.test.utils import execute_dagster_graphql

    from mlops_assets import constants as c
    from mlops_assets.definitions import defs

    home = tmp_path / "dagster_home"
    _write_local_instance(home)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    expected = {key.to_user_string(): spec.freshness_policy for key, spec in
                ((k, defs.resolve_assets_def(k).specs_by_key[k]) for k in defs.resolve_asset_graph().get_all_asset_keys()
                 if defs.resolve_asset_graph().get(k).is_materializable)
                if spec.freshness_policy is not None}
    monitoring = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()
                  if defs.resolve_asset_graph().get(k).group_name == c.GROUP_MONITORING}
    assert expected and set(expected) <= monitoring, expected
    query = """{ instance { freshnessEvaluationEnabled }
      assetNodes { assetKey { path }
        internalFreshnessPolicy { ... on TimeWindowFreshnessPolicy { failWindowSeconds warnWindowSeconds } }
        freshnessStatusInfo { freshnessStatus } } }"""
    with dg.DagsterInstance.get() as instance:
        assert instance.get_settings("freshness") == {"enabled": True}
        assert "FRESHNESS_DAEMON" in instance.get_required_daemon_types()
        origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="mlops_assets.definitions",
                                                                  working_directory=str(REPO)))
        with WorkspaceProcessContext(instance, InProcessTestWorkspaceLoadTarget(origin)) as workspace:
            for key in expected:
                instance.report_runless_asset_event(dg.AssetMaterialization(key))
            asyncio.run(FreshnessDaemon()._evaluate_assets(workspace))
            result = execute_dagster_graphql(workspace.create_request_context(), query)
    assert not result.errors, result.errors
    assert result.data["instance"]["freshnessEvaluationEnabled"] is True
    shown = {"/".join(n["assetKey"]["path"]): n for n in result.data["assetNodes"]}
    for key, policy in expected.items():
        assert shown[key]["internalFreshnessPolicy"] == {
            "failWindowSeconds": int(policy.fail_window.to_timedelta().total_seconds()),
            "warnWindowSeconds": int(policy.warn_window.to_timedelta().total_seconds()) if policy.warn_window else None}
        assert shown[key]["freshnessStatusInfo"]["freshnessStatus"] == "HEALTHY", key  # just materialized
    # The UI itself: the webserver `make up` starts, on that instance, answers the same over HTTP.
    assert _graphql_over_http(home, query) == result.data


def _graphql_over_http(home: Path, query: str) -> dict[str, Any]:
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = home / "webserver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("dagster-webserver")), "-h", "127.0.0.1",
                                 "-p", str(port), "-m", "mlops_assets.definitions"],
                                cwd=REPO, env={**os.environ, "DAGSTER_HOME": str(home)},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=30).json()
                if answer.get("data", {}).get("assetNodes"):  # the code location has loaded
                    assert not answer.get("errors"), answer["errors"]
                    return answer["data"]
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the webserver did not answer: " + log.read_text()[-3000:]
            time.sleep(1)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
