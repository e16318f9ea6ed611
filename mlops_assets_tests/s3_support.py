"""A real S3-compatible server for tests: moto's standalone server (`moto[server]`), started in its
own process on 127.0.0.1 on a free port, stopped when the fixture ends.

`s3_server()` yields an `S3Server` with a fresh bucket and the standard variables a client of the
platform sets (`AWS_ENDPOINT_URL`, `MLFLOW_S3_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`): botocore (s3fs, MLflow's artifact repository) reads
them itself, so the platform sees only `s3://` URLs. When the server cannot start, the tests fail
under CI=true (the S3 tests must run there) and skip elsewhere, saying why.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops_assets_tests.ray_support import free_port
from mlops_assets_tests.service_support import unavailable as service_unavailable

START_TIMEOUT_S = 60.0


def unavailable(reason: str) -> None:
    service_unavailable(reason, "the S3 storage tests must run; `make install` installs moto[server]")


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str] = field(repr=False)  # holds the (test) secret key: never printed

    @property
    def secret(self) -> str:
        return self.env["AWS_SECRET_ACCESS_KEY"]

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.secret, region_name=self.env["AWS_DEFAULT_REGION"])

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            unavailable(f"moto's S3 server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    unavailable(f"moto's S3 server did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s")


def s3_server(root: Path) -> Iterator[S3Server]:
    """Start moto's server (logging to `root/moto.log`), create a bucket, yield; stop the server."""
    try:
        import boto3  # noqa: F401  (MLflow's S3 artifacts)
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401  (the platform's files)
    except ImportError as exc:
        unavailable(f"the S3 test stack is not installed ({exc.name}): run `make install`")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_for_port(port, proc, log)
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "mlops-test",
            "AWS_SECRET_ACCESS_KEY": f"s3-secret-{secrets.token_hex(12)}",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        server = S3Server(endpoint, f"mlops-{secrets.token_hex(4)}", env)
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
