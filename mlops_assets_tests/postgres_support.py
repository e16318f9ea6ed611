"""PostgreSQL for the tests: the server CI names in MLOPS_TEST_POSTGRES_URL, else a private throwaway
cluster on loopback; without either, tests fail under CI=true and skip elsewhere."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from mlops_assets_tests.ray_support import free_port
from mlops_assets_tests.service_support import unavailable as service_unavailable

URL_ENV = "MLOPS_TEST_POSTGRES_URL"


def unavailable(reason: str) -> None:
    service_unavailable(reason, "the Postgres tests must run, .ci/run provides the server")


def postgres_bindir() -> Path | None:
    """The folder with initdb and pg_ctl (Debian's versioned folders first, then PATH)."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                        if p.parent.name.isdigit() else 0, reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).resolve().parent)
    for folder in candidates:
        if os.access(folder / "initdb", os.X_OK) and os.access(folder / "pg_ctl", os.X_OK):
            return folder
    return None


class PrivatePostgres:
    """A throwaway cluster on 127.0.0.1:<free port>, in a private folder; run as `postgres` when root."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="mlops-test-pg-"))
        self.password = secrets.token_hex(16)
        self.port = free_port()
        self.as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgresql://mlops:{self.password}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self.as_pg, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self) -> None:
        pwfile = self.folder / "pwfile"
        pwfile.write_text(self.password + "\n")
        (self.folder / "socket").mkdir()
        if self.as_pg:
            shutil.chown(self.folder, "postgres")
            for path in self.folder.iterdir():
                shutil.chown(path, "postgres")
        self._run(str(self.bindir / "initdb"), "-D", str(self.folder / "data"), "-U", "mlops",
                  f"--pwfile={pwfile}", "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                  "--encoding=UTF8", "--no-locale")
        pwfile.unlink()
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder / 'socket'} "
                   "-c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-l",
                  str(self.folder / "server.log"), "-w", "-t", "60", "-o", options, "start")

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def postgres_server_url() -> Iterator[str]:
    """A superuser URL of a running server: the one CI names, else a private one started here."""
    given = os.environ.get(URL_ENV)
    if given:
        yield given
        return
    bindir = postgres_bindir()
    if bindir is None:
        unavailable(f"no PostgreSQL: {URL_ENV} is not set and no initdb/pg_ctl is installed "
                     "(apt-get install postgresql, or run .ci/run which does it)")
    server = PrivatePostgres(bindir)  # type: ignore[arg-type]
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(server.folder, ignore_errors=True)
        unavailable(f"could not start a private PostgreSQL from {bindir}: {exc}")
    try:
        yield server.url
    finally:
        server.stop()


def with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def admin(url: str):  # type: ignore[no-untyped-def]
    import psycopg2

    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def mlflow_uri(url: str) -> str:
    """MLflow's store URI for a database: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3,
    the platform ships psycopg2 (which dagster-postgres uses too), so the driver is named."""
    return url.replace("postgresql://", "postgresql+psycopg2://", 1)
