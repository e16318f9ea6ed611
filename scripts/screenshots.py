"""Screenshots of what a user sees after `make demo` and `make up`, taken by a real headless browser.

    .venv/bin/python scripts/screenshots.py [--root /tmp/mlops-screens] [--out data/screenshots] [--reuse]

On a private data root (its own Dagster home and MLflow store, never the project's `data/`), it runs
a demo-like path with the platform's own commands: simulated data landed and ingested
(`mlops-assets ingest`), the training path materialized with `dagster asset materialize` up to the
registered champion and its reference profile; then two past hours of production traffic scored by
that champion and written with the serving prediction-log writer (one hour normal, with delayed
labels, one hour drifted), and the monitoring assets materialized for both hours. Ray Serve is not
started (the deployment step is the serving tests' business): monitoring judges the registry's
champion, as it does when no endpoint answers.

Then it starts the Dagster webserver and the MLflow UI on loopback (free ports), takes screenshots
with Debian's `chromium --headless` (the asset graph, model_evaluation, drift_report, the
registered model version and the experiment in MLflow), and stops both. Screenshots are PNGs under
`--out` (git-ignored `data/`): look at them, they are not committed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAINING_PATH = ("raw_dataset,validation_report,feature_set,train_test_split,trained_model,model_evaluation,"
                 "registered_model,reference_profile")
MONITORING = "production_profiles,drift_report,online_performance"
DRIFT = {"SSLfinal_State": 0.6, "URL_of_Anchor": 0.6, "having_Sub_Domain": 0.6, "web_traffic": 0.6}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], env: dict[str, str], timeout: float = 900) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, cwd=REPO, check=True, timeout=timeout)


def environment(root: Path, dagster_port: int, mlflow_port: int) -> dict[str, str]:
    closed = free_port()  # nothing listens there: no endpoint answers, the champion is what serves
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "MLFLOW_", "DAGSTER_"))}
    env.update({
        "MLOPS_DATA_URL": str(root / "data"),
        "DAGSTER_HOME": str(root / "dagster_home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'data' / 'mlflow' / 'mlflow.db'}",
        "MLFLOW_UI_URL": f"http://127.0.0.1:{mlflow_port}",
        "MLOPS_DAGSTER_UI_URL": f"http://127.0.0.1:{dagster_port}",
        "MLOPS_SERVE_URL": f"http://127.0.0.1:{closed}",
        "MLOPS_RAY_DASHBOARD_URL": f"http://127.0.0.1:{closed}",
        "MLOPS_API_TOKEN": secrets.token_urlsafe(16),
        "MLOPS_ACTOR": "screenshots",
    })
    return env


def demo_like_run(root: Path, env: dict[str, str]) -> None:
    (root / "data" / "mlflow").mkdir(parents=True, exist_ok=True)
    (root / "dagster_home").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "deploy" / "local" / "dagster.yaml", root / "dagster_home" / "dagster.yaml")
    cli = str(BIN / "mlops-assets")
    run([cli, "simulate", "data", "--rows", "4000", "--seed", "42", "--name", "demo-seed42.csv"], env)
    run([cli, "ingest"], env)
    run([str(BIN / "dagster"), "asset", "materialize", "-m", "mlops_assets.definitions", "-c",
         "deploy/run_config/in_process.yaml", "--select", TRAINING_PATH], env)
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    hours = [(now - timedelta(hours=2), {}), (now - timedelta(hours=1), DRIFT)]
    run([str(BIN / "python"), "-c", _TRAFFIC, *[h.isoformat() for h, _ in hours]], env)
    for hour, _ in hours:
        run([str(BIN / "dagster"), "asset", "materialize", "-m", "mlops_assets.definitions", "-c",
             "deploy/run_config/in_process.yaml", "--select", MONITORING, "--partition",
             hour.strftime("%Y-%m-%d-%H:00")], env)


# Run in the data root's environment: the champion scores simulated traffic, written as serving writes it.
_TRAFFIC = r'''
import sys
from datetime import datetime, timedelta
import pandas as pd
from mlops_assets.core.dataset_spec import default_spec
from mlops_assets.registry import model_store
from mlops_assets.serving.prediction_log import prediction_rows, write_part
from mlops_assets.serving.scoring import scorer_from_loaded
from mlops_assets.settings import load_settings
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets.tools.traffic import write_labels

settings, spec = load_settings(), default_spec()
loaded = model_store.load_verified_model(settings.mlflow_tracking_uri, settings.model_name, alias="champion")
scorer = scorer_from_loaded(loaded, spec)
drift = {"SSLfinal_State": 0.6, "URL_of_Anchor": 0.6, "having_Sub_Domain": 0.6, "web_traffic": 0.6}
for n, at in enumerate(sys.argv[1:]):
    hour = datetime.fromisoformat(at)
    frame = simulate_records(spec, SimulationConfig(n_rows=1500, seed=100 + n, drift=drift if n else {}))
    scored = scorer.score(frame[spec.feature_names])
    rows, labels = [], []
    for start in range(0, len(frame), 10):
        stop = min(start + 10, len(frame))
        request = f"screens-{n}-{start}"
        records = frame[spec.feature_names].iloc[start:stop].astype(int).to_dict("records")
        rows += prediction_rows(request_id=request, model_version=str(loaded.version), records=records,
                                labels=list(scored.labels[start:stop]),
                                probabilities=list(scored.probabilities[start:stop]),
                                logged_at=hour + timedelta(seconds=2 * start))
        labels += [{"request_id": request, "record_index": i, "label": int(frame[spec.label].iloc[start + i]),
                    "labelled_at": (hour + timedelta(hours=1)).isoformat()} for i in range(stop - start)]
    write_part(rows, settings.prediction_log_url, f"part-screens-{n}.parquet")
    if not n:  # delayed labels for the normal hour
        write_labels(pd.DataFrame(labels), settings.labels_url, name=f"labels-screens-{n}.csv")
print("wrote", len(sys.argv) - 1, "hours of traffic")
'''


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    print("+", " ".join(cmd), f"> {log}", flush=True)
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_http(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """The whole process group (the webserver and MLflow start children), gracefully first."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Browser:
    """Debian's headless Chromium driven over the DevTools protocol: navigate, wait for text, press a
    key, click, capture. (`chromium --screenshot` alone cannot wait for a page's data or dismiss a
    first-visit dialog.)"""

    def __init__(self, profile: Path, width: int = 1600, height: int = 1100) -> None:
        from websockets.sync.client import connect

        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            raise SystemExit("no chromium: apt-get install -y chromium")
        port = free_port()
        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                    pages = [t for t in json.load(response) if t.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("chromium's DevTools endpoint did not come up")
            time.sleep(0.5)
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=20).__enter__()
        self.ids = 0
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, **params: object) -> dict:
        self.ids += 1
        self.ws.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.ids:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def js(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def wait_text(self, text: str, timeout_s: float = 60) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.js(f"document.body && document.body.innerText.includes({json.dumps(text)})"):
                return True
            time.sleep(0.5)
        print(f"  (did not see {text!r} within {timeout_s:.0f} s)", flush=True)
        return False

    def key(self, key: str, code: str, modifiers: int = 0) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, modifiers=modifiers,
                      windowsVirtualKeyCode=ord(key.upper()))

    def click_text(self, text: str) -> bool:
        """Click the innermost visible element whose own text is `text`."""
        return bool(self.js(
            "(() => { const want = " + json.dumps(text) + ";"
            " const all = [...document.querySelectorAll('button, a, [role=tab], [role=button], span, div')]"
            "   .filter(e => e.innerText && e.innerText.trim() === want && e.offsetParent !== null);"
            " if (!all.length) return false; all[all.length - 1].click(); return true; })()"))

    def shot(self, url: str, path: Path, wait_for: str, settle_s: float = 3.0,
             actions: tuple[tuple[str, str], ...] = ()) -> None:
        self.call("Page.navigate", url=url)
        self.wait_text(wait_for)
        for action, arg in actions:
            time.sleep(1.0)
            if action == "click":
                self.click_text(arg)
            elif action == "alt-key":
                self.key(arg, f"Key{arg.upper()}", modifiers=1)
            elif action == "wait":
                self.wait_text(arg)
            elif action == "js":
                self.js(arg)
            elif action == "scroll":  # bring the element whose own text is `arg` to the top
                self.js("(() => { const e = [...document.querySelectorAll('td, div, span')].find(x => x.innerText"
                        f" && x.innerText.trim() === {json.dumps(arg)}); if (e) e.scrollIntoView(); }})()")
        time.sleep(settle_s)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"screenshot {path.name}: {url} ({path.stat().st_size // 1024} KiB)", flush=True)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            stop(self.process)


def graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/mlops-screens"), help="private data root")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "screenshots", help="where the PNGs go")
    parser.add_argument("--reuse", action="store_true", help="keep the root's earlier run (no new data)")
    args = parser.parse_args(argv)
    dagster_port, mlflow_port = free_port(), free_port()
    env = environment(args.root, dagster_port, mlflow_port)
    if not args.reuse:
        shutil.rmtree(args.root, ignore_errors=True)
        demo_like_run(args.root, env)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.root / "logs"
    logs.mkdir(exist_ok=True)
    from mlops_assets.settings import load_settings  # the data root's settings, for the store's folders

    settings = load_settings(env)
    servers = [
        start([str(BIN / "mlflow"), "server", "--backend-store-uri", settings.mlflow_tracking_uri,
               "--default-artifact-root", settings.mlflow_artifact_root, "--host", "127.0.0.1", "--port",
               str(mlflow_port), "--workers", "1"], env, logs / "mlflow.log"),
        start([str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(dagster_port)],
              env, logs / "dagster-webserver.log"),
    ]
    try:
        dagster, mlflow = env["MLOPS_DAGSTER_UI_URL"], env["MLFLOW_UI_URL"]
        wait_http(f"{dagster}/server_info")
        wait_http(f"{mlflow}/health")
        graphql(dagster, "mutation { setNuxSeen }")  # the first-visit "join the community" dialog
        import dagster as dg

        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:  # the drifted (newest) hour
            partition = max(instance.get_materialized_partitions(dg.AssetKey("drift_report")))
        ml = "workflowType=machine_learning"  # MLflow 3.17's UI-wide GenAI / model-training switch
        close = ("js", "document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()")
        from mlflow import MlflowClient

        client = MlflowClient(settings.mlflow_tracking_uri)
        version = client.get_model_version(settings.model_name, "1")
        experiment = client.get_run(version.run_id).info.experiment_id
        shots = [  # name, url, text to wait for, actions
            ("asset_graph", f"{dagster}/asset-groups", "monitoring", (("alt-key", "e"), ("wait", "drift_report"))),
            ("model_evaluation", f"{dagster}/assets/model_evaluation", "gate_decision", ()),
            ("promotion_gate", f"{dagster}/assets/model_evaluation?view=checks", "promotion_gate",
             (("click", "promotion_gate"), ("wait", "gate_decision"))),
            ("drift_report", f"{dagster}/assets/drift_report?view=partitions&partition={partition}", "drift_scores",
             (("scroll", "drift_scores"),)),
            ("drift_plots", f"{dagster}/assets/drift_report", "Metadata", (("click", "Plots"), ("wait", "drift_share"),
                                                                          ("scroll", "drift_share"))),
            ("prediction_log", f"{dagster}/assets/prediction_log?view=events", "rows_by_version", ()),
            ("resources", f"{dagster}/locations/mlops_assets.definitions/resources/mlflow", "tracking_uri", ()),
            ("mlflow_model_version", f"{mlflow}/#/models/{settings.model_name}/versions/1?{ml}", "Version 1", (close,)),
            ("mlflow_run", f"{mlflow}/#/experiments/{experiment}/runs/{version.run_id}?{ml}", "Made by Dagster run",
             (close,)),
            ("mlflow_experiment", f"{mlflow}/#/experiments/{experiment}?{ml}", "trained_model", (close,)),
        ]
        browser = Browser(args.root / "chromium-profile")
        try:
            for name, url, wait_for, actions in shots:
                browser.shot(url, args.out / f"{name}.png", wait_for, actions=actions)
        finally:
            browser.close()
    finally:
        for process in servers:
            stop(process)
    print(f"screenshots in {args.out}; servers stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
