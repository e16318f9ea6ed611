"""A loopback stand-in for the Ray dashboard's Serve REST API and the Serve proxy's /healthz and
/model, for tests of logic that only reads them (the outage check, the watch's regression path).
Tests of deploying, serving and restoring use a real head (ray_support.isolated_cluster)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mlops_assets.deployment import rollout as dep
from mlops_assets.serving.config import APP_NAME, DEPLOYMENT_NAME


def running_app(version: str = "1", replicas: int = 2, state: str = "RUNNING") -> dict[str, Any]:
    """The `applications` entry of a healthy app serving `version`, as the dashboard returns it."""
    return {"status": "RUNNING", "deployed_app_config": {"name": APP_NAME},
            "deployments": {DEPLOYMENT_NAME: {"status": "HEALTHY",
                                              "replicas": [{"state": state} for _ in range(replicas)]}},
            "_version": version}


class ServeStub:
    """Answers GET /api/serve/applications/, /healthz and /model from its fields; `close()` stops it."""

    def __init__(self, version: str = "1") -> None:
        self.applications: dict[str, Any] = {APP_NAME: running_app(version)}
        self.healthz = 200
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                app = stub.applications.get(APP_NAME) or {}
                if self.path.startswith("/api/serve/applications"):
                    code, body = 200, {"applications": stub.applications}
                elif self.path == "/healthz":
                    code, body = stub.healthz, {"status": "ok" if stub.healthz == 200 else "unavailable"}
                elif self.path == "/model" and app:
                    code, body = 200, {"version": app.get("_version")}
                else:
                    code, body = 404, {"error": "Not Found"}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.target = dep.ServeTarget(self.url, self.url, token="stub-token")
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
