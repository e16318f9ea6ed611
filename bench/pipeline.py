"""Pipeline benchmark: the training path under Dagster against the same computations called directly,
Dagster's in-process against its multiprocess executor, and the time from a file landing to its
run starting under a real Dagster daemon.

Each measurement starts from a fresh folder (data root, MLflow SQLite store, DAGSTER_HOME) holding
the same simulated file (6000 rows, seed 42, what `make demo` lands):

- `direct`: the lib/ functions each asset calls, in order, in this process (ingest, union,
  validation report, cleaning, split, training with its MLflow logging, evaluation with plots,
  registration and promotion): the work without the orchestration;
- `dagster in_process` / `dagster multiprocess`: `dagster asset materialize --select <training path>`
  (direct and in_process twice, medians; multiprocess once),
  what `make pipeline` runs, with the in-process executor or the default multiprocess one
  (wall time of the command, so it includes starting Python and loading the definitions, which is
  reported on its own too);
- `sensor`: `dagster-daemon run` on a fresh instance; after the sensor's first (skipped) tick a
  file lands in the landing folder, and the clock stops when the run the sensor requests has
  started. That is the worst phase: the sensor's 30 s minimum interval is the bulk of it.

Run: `python -m bench.pipeline [--quick]`.

`--rerun`: `make pipeline`'s command (`mlops-assets pipeline -c deploy/run_config/in_process.yaml
--select <training path>`: ingest, train only if stale, status, in one process) on a fresh
folder, then again on unchanged data, then after a new file lands: wall and CPU seconds of each,
MLflow runs and model versions after each, and the second run's share of the first (goal: at most
a quarter, judged on the medians of `--rounds` rounds, 3 by default, each on a fresh folder).
`--json bench/results/pipeline_rerun.json` keeps it for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import code_version, emit, format_table, machine, median, run_timings

# As `make pipeline`: `mlops-assets ingest` (each landed file a raw_batches partition), then this.
TRAINING_PATH = ("raw_dataset,validation_report,feature_set,train_test_split,trained_model,"
                 "model_evaluation,registered_model")
ROWS, SEED = 6000, 42
REPO = Path(__file__).resolve().parents[1]
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


def fresh_root(parent: Path, name: str) -> tuple[Path, dict[str, str]]:
    """A folder with the simulated file in its landing folder, and the environment pointing at it."""
    from mlops_assets.core.dataset_spec import default_spec
    from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch

    root = parent / name
    (root / "data" / "mlflow").mkdir(parents=True)
    (root / "dagster_home").mkdir()
    (root / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    spec = default_spec()
    write_batch(simulate_records(spec, SimulationConfig(n_rows=ROWS, seed=SEED)), str(root / "data" / "raw"),
                name=f"bench-seed{SEED}.csv")
    env = {"DAGSTER_HOME": str(root / "dagster_home"), "MLOPS_DATA_URL": str(root / "data"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'data' / 'mlflow' / 'mlflow.db'}",
           "MLOPS_LANDING_URL": str(root / "data" / "raw")}
    return root, env


def _env(extra: Mapping[str, str]) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "MLFLOW_", "DAGSTER_"))}
    return {**keep, "PATH": path, "PYTHONPATH": str(REPO), "DAGSTER_DISABLE_TELEMETRY": "1", **extra}


def direct(env: Mapping[str, str]) -> dict[str, float]:
    """The training path's computations called directly, step by step; seconds per step."""
    import mlflow
    from mlflow import MlflowClient

    from mlops_assets import constants as c
    from mlops_assets.core.dataset_spec import default_spec
    from mlops_assets.evaluation import gate
    from mlops_assets.evaluation import metrics as ev
    from mlops_assets.features import cleaning as feat
    from mlops_assets.ingestion import batches as ingestion
    from mlops_assets.registry import model_store
    from mlops_assets.settings import load_settings
    from mlops_assets.training import train as tr
    from mlops_assets.training.tracking import use_tracking_uri
    from mlops_assets.validation.report import ValidationThresholds, build_report, render_markdown

    settings = load_settings(dict(env))
    spec = default_spec()
    steps: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        steps[name] = now - t
        t = now

    ingestion.ingest_landed_files(settings.landing_url, settings.batches_url, settings.quarantine_url, spec)
    lap("raw_batches")
    batches = ingestion.accepted_batches(settings.batches_url)
    raw = ingestion.load_raw_dataset(batches, spec)
    version = ingestion.dataset_version([b.batch_id for b in batches])
    lap("raw_dataset")
    report = build_report(raw, spec, ValidationThresholds(), version)
    reports = Path(settings.reports_url)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"validation-{version}.json").write_text(json.dumps(report, default=str))
    (reports / f"validation-{version}.md").write_text(render_markdown(report))
    lap("validation_report")
    features, _ = feat.clean_features(raw, spec, c.MISSING_FEATURE_POLICY)
    fversion = feat.feature_version(features, f"{c.TRANSFORMATION_VERSION}:{c.MISSING_FEATURE_POLICY}")
    fpath = Path(settings.features_url) / fversion / "features.parquet"
    fpath.parent.mkdir(parents=True, exist_ok=True)
    features.to_parquet(fpath, index=False)
    lap("feature_set")
    split = feat.split_train_test(features, spec.feature_names, c.TEST_FRACTION, c.SPLIT_SEED)
    lap("train_test_split")
    train, test = tr.split_frame(split)
    uri = env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri)
    with use_tracking_uri(uri):
        experiment = mlflow.create_experiment("direct")
        with mlflow.start_run(experiment_id=experiment) as run:
            result = tr.train_model(train, spec.feature_names, tr.TrainingParams())
            client.log_metric(run.info.run_id, "best_iteration", result.best_iteration)
            info = model_store.log_catboost_model(result.model, input_example=train[spec.feature_names].head(5))
            sha = model_store.artifact_sha256(client, info.model_uri)
    lap("trained_model")
    X_test, y_test = tr.features_and_target(test, spec.feature_names)
    candidate = model_store.load_logged_model(client, info.model_uri, sha)
    with tempfile.TemporaryDirectory(prefix="direct-eval-") as tmp:
        evaluation = ev.evaluate(candidate, X_test, y_test, tmp, threshold=tr.DECISION_THRESHOLD)
        for path in evaluation.plots.values():
            client.log_artifact(run.info.run_id, str(path), "plots")
    for key, value in evaluation.metrics.items():
        if value == value:  # not NaN
            client.log_metric(run.info.run_id, f"test_{key}", float(value))
    gate.decide(evaluation.metrics, None, gate.GateCriteria())
    lap("model_evaluation")
    name = c.REGISTERED_MODEL_NAME
    mv = model_store.register_version(client, name, run_id=run.info.run_id, model_uri=info.model_uri,
                                      tags={"data_version": version, "feature_version": fversion})
    model_store.promote_to_champion(client, name, str(mv.version))
    lap("registered_model")
    return steps


def dagster_cli(env: Mapping[str, str], run_config: Mapping[str, Any] | None, timeout_s: float) -> dict[str, Any]:
    """`mlops-assets ingest` and `dagster asset materialize` of the training path, as `make pipeline`
    runs them; wall seconds (both) and the training run's step times."""
    started = time.perf_counter()
    ingest = subprocess.run([str(Path(sys.executable).with_name("mlops-assets")), "ingest"], env=_env(env),
                            cwd=str(REPO), capture_output=True, text=True, timeout=timeout_s)
    if ingest.returncode != 0:
        raise RuntimeError(f"mlops-assets ingest failed ({ingest.returncode}): {ingest.stderr[-1500:]}")
    cmd = [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m", "mlops_assets.definitions",
           "--select", TRAINING_PATH]
    if run_config:
        cmd += ["--config-json", json.dumps(run_config)]
    proc = subprocess.run(cmd, env=_env(env), cwd=str(REPO), capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"dagster asset materialize failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return {"wall": wall, **run_timings(env["DAGSTER_HOME"])}


def import_seconds(env: Mapping[str, str]) -> float:
    """Starting Python and loading the platform's Definitions (what every CLI call and step process pays)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mlops_assets.definitions"], env=_env(env), cwd=str(REPO),
                   check=True, capture_output=True, timeout=300)
    return time.perf_counter() - started


def sensor_latency(parent: Path, timeout_s: float) -> dict[str, float]:
    """Land a file under a running `dagster-daemon`; seconds until the sensor's run has started."""
    import dagster as dg

    from mlops_assets.core.dataset_spec import default_spec
    from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch

    root = parent / "sensor"
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "mlflow").mkdir(parents=True)
    (root / "dagster_home").mkdir()
    (root / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {"DAGSTER_HOME": str(root / "dagster_home"), "MLOPS_DATA_URL": str(root / "data"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'data' / 'mlflow' / 'mlflow.db'}",
           "MLOPS_LANDING_URL": str(root / "data" / "raw")}
    daemon_bin = str(Path(sys.executable).with_name("dagster-daemon"))
    log = open(root / "daemon.log", "wb")
    proc = subprocess.Popen([daemon_bin, "run", "-m", "mlops_assets.definitions"], env=_env(env), cwd=str(REPO),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    out: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    try:
        with dg.DagsterInstance.get() as instance:
            origin = None
            daemon_started = time.time()
            while time.monotonic() < deadline and origin is None:  # the sensor's first tick: nothing to do
                for state in instance.all_instigator_state():
                    if state.name == "raw_files_sensor":
                        ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
                        if ticks:
                            origin = state
                time.sleep(0.2)
            if origin is None:
                raise TimeoutError(f"raw_files_sensor did not tick within {timeout_s}s; see {root / 'daemon.log'}")
            out["daemon_to_first_tick_s"] = time.time() - daemon_started
            spec = default_spec()
            landed = time.time()
            write_batch(simulate_records(spec, SimulationConfig(n_rows=500, seed=7)), env["MLOPS_LANDING_URL"],
                        name="landed.csv")
            run = None
            while time.monotonic() < deadline:
                records = instance.get_run_records(limit=1)
                if records and records[0].start_time:
                    run = records[0]
                    break
                time.sleep(0.1)
            if run is None:
                raise TimeoutError(f"no run started within {timeout_s}s of landing a file")
            out["landing_to_run_created_s"] = run.create_timestamp.timestamp() - landed
            out["run_created_to_started_s"] = run.start_time - run.create_timestamp.timestamp()
            out["landing_to_run_started_s"] = run.start_time - landed
            instance.run_launcher.terminate(run.dagster_run.run_id)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        log.close()
    return out


def run(quick: bool, parent: Path, log: Any = print) -> dict[str, Any]:
    repeats = 1 if quick else 2
    log(f"pipeline benchmark ({'quick' if quick else 'full'}, {repeats} run(s) of direct and in_process, one "
        f"multiprocess): machine {machine()}")
    out: dict[str, Any] = {"machine": machine(), "repeats": repeats}
    direct_runs, inproc_runs, multi_runs = [], [], []
    for i in range(repeats):
        _, env = fresh_root(parent, f"direct-{i}")
        steps = direct(env)
        direct_runs.append(steps)
        log(f"  direct            {sum(steps.values()):6.1f}s  " + " ".join(f"{k}={v:.1f}" for k, v in steps.items()))
        _, env = fresh_root(parent, f"inproc-{i}")
        inproc_runs.append(dagster_cli(env, IN_PROCESS, 900))
        log(f"  dagster in_process {inproc_runs[-1]['wall']:6.1f}s wall, run {inproc_runs[-1]['run_seconds']:.1f}s")
        if i == 0:  # one multiprocess run: it takes minutes, and its figure is far from the others
            _, env = fresh_root(parent, f"multi-{i}")
            multi_runs.append(dagster_cli(env, None, 900))
            log(f"  dagster multiproc  {multi_runs[-1]['wall']:6.1f}s wall, run {multi_runs[-1]['run_seconds']:.1f}s")
    _, env = fresh_root(parent, "imports")
    imports = median([import_seconds(env) for _ in range(repeats)])
    direct_s = median([sum(s.values()) for s in direct_runs])
    rows = [{"how": "lib functions called directly", "wall s": direct_s, "run s (event log)": float("nan"),
             "sum of steps s": direct_s, "x direct": 1.0}]
    for label, runs in (("dagster asset materialize, in_process executor", inproc_runs),
                        ("dagster asset materialize, multiprocess executor (default)", multi_runs)):
        wall = median([r["wall"] for r in runs])
        rows.append({"how": label, "wall s": wall, "run s (event log)": median([r["run_seconds"] for r in runs]),
                     "sum of steps s": median([r["step_seconds"] for r in runs]), "x direct": wall / direct_s})
    rows.append({"how": "python -c 'import mlops_assets.definitions' (paid per CLI call and per step process)",
                 "wall s": imports, "run s (event log)": float("nan"), "sum of steps s": float("nan"),
                 "x direct": float("nan")})
    out["table"] = rows
    out["direct_steps"] = {k: median([s[k] for s in direct_runs]) for k in direct_runs[0]}
    out["dagster_steps_multiprocess"] = multi_runs[0]["steps"]
    out["dagster_steps_in_process"] = inproc_runs[0]["steps"]
    try:
        sensor = sensor_latency(parent, 150)
        log(f"  sensor: {sensor}")
    except Exception as exc:  # report, keep the other figures
        sensor = {"error": f"{type(exc).__name__}: {exc}"}  # type: ignore[dict-item]
        log(f"  sensor FAILED: {sensor['error']}")
    out["sensor"] = sensor
    return out


def report(out: Mapping[str, Any]) -> str:
    steps = [{"step": k, "direct s": v, "dagster in_process s": out["dagster_steps_in_process"].get(k, float("nan")),
              "dagster multiprocess s": out["dagster_steps_multiprocess"].get(k, float("nan"))}
             for k, v in out["direct_steps"].items()]
    sensor = out.get("sensor", {})
    sensor_rows = [{"measure": k, "seconds": v} for k, v in sensor.items()]
    return "\n".join([
        "## Pipeline: the training path (6000 simulated rows)", "", format_table(out["table"]), "",
        "Per step (Dagster: STEP_START to STEP_SUCCESS in the event log):", "", format_table(steps), "",
        "## Sensor: file landing to run started (real dagster-daemon, raw_files_sensor every 30 s; "
        "file landed right after a tick, the worst phase)", "", format_table(sensor_rows), ""])


RERUN_GOAL = 0.25


def make_pipeline(env: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
    """The Makefile's `pipeline` commands, in order; wall and CPU seconds (all child processes)."""
    import resource

    cli = str(Path(sys.executable).with_name("mlops-assets"))
    commands = [[cli, "pipeline", "-c", "deploy/run_config/in_process.yaml", "--select", TRAINING_PATH]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    printed, gate_rejected = [], False
    for cmd in commands:
        proc = subprocess.run(cmd, env=_env(env), cwd=str(REPO), capture_output=True, text=True, timeout=timeout_s)
        # A candidate the gate rejects fails the blocking passed_gate check; it is trained and
        # registered (as challenger) all the same, as the stale-training test allows too.
        rejected = cmd[1] == "pipeline" and "Steps failed: ['registered_model_passed_gate']" in proc.stderr
        gate_rejected = gate_rejected or rejected
        if proc.returncode != 0 and not rejected:
            raise RuntimeError(f"{' '.join(cmd[1:2])} failed ({proc.returncode}): {proc.stderr[-1500:]}")
        printed.append(proc.stdout)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    train_line = next((line for line in printed[0].splitlines() if line.startswith("mlops-assets train:")), "")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "gate_rejected": gate_rejected,
            "train_said": train_line[:300]}


def mlflow_counts(env: Mapping[str, str]) -> tuple[int, int]:
    """(MLflow runs in every experiment, model versions of the registered model)."""
    from mlflow import MlflowClient

    from mlops_assets import constants as c

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = len(client.search_runs(experiments)) if experiments else 0
    return runs, len(client.search_model_versions(f"name = '{c.REGISTERED_MODEL_NAME}'"))


def rerun(parent: Path, rounds: int = 3, log: Any = print) -> dict[str, Any]:
    """`rounds` rounds, each on a fresh folder: a first run, an unchanged re-run, a run after a new file.

    The goal is judged on the medians over rounds of second / first (wall and CPU), since one round's
    ratio moves by a few hundredths with the machine's load."""
    from mlops_assets.core.dataset_spec import default_spec
    from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch

    start_machine = machine()
    log(f"make pipeline, unchanged re-run, {rounds} round(s): machine {start_machine}", flush=True)
    rows: list[dict[str, Any]] = []
    ratios_wall, ratios_cpu, nothing_made, retrained = [], [], True, True
    for round_no in range(1, rounds + 1):
        root, env = fresh_root(parent, f"rerun-{round_no}")
        these = []
        for label in ("first run (fresh)", "second run (unchanged data)", "third run (a new file landed)"):
            if label.startswith("third"):
                write_batch(simulate_records(default_spec(), SimulationConfig(n_rows=1500, seed=SEED + 1)),
                            env["MLOPS_LANDING_URL"], name=f"bench-seed{SEED + 1}.csv")
            result = make_pipeline(env, 1800)
            runs, versions = mlflow_counts(env)
            these.append({"round": round_no, "run": label, **result, "mlflow_runs": runs, "model_versions": versions})
            log(f"  round {round_no}: {label:<32} {result['wall_s']:6.1f}s wall {result['cpu_s']:6.1f}s CPU, "
                f"{runs} MLflow run(s), {versions} version(s): {result['train_said'][:120]}", flush=True)
        first, second, third = these
        ratios_wall.append(second["wall_s"] / first["wall_s"])
        ratios_cpu.append(second["cpu_s"] / first["cpu_s"])
        nothing_made = nothing_made and (second["mlflow_runs"], second["model_versions"]) == (
            first["mlflow_runs"], first["model_versions"])
        retrained = retrained and third["model_versions"] == first["model_versions"] + 1
        rows += these
        shutil.rmtree(root, ignore_errors=True)
    ratio_wall, ratio_cpu = median(ratios_wall), median(ratios_cpu)
    met = max(ratio_wall, ratio_cpu) <= RERUN_GOAL and nothing_made and retrained
    return {
        "title": "make pipeline: an unchanged re-run against the first run",
        "command": f"python -m bench.pipeline --rerun --rounds {rounds} --json bench/results/pipeline_rerun.json",
        "code_version": code_version(),
        "machine": start_machine,
        "machine_at_end": {"loadavg": machine()["loadavg"]},
        "rows": ROWS,
        "rounds": rounds,
        "goal": f"second run <= {RERUN_GOAL}x the first (larger of the wall and CPU medians over rounds), no MLflow "
                "run and no model version; a new file retrains",
        "goal_met": met,
        "summary": {
            "second / first (wall, median of rounds)": round(ratio_wall, 3),
            "second / first (CPU, median of rounds)": round(ratio_cpu, 3),
            "second / first per round (wall)": [round(r, 3) for r in ratios_wall],
            "second / first per round (CPU)": [round(r, 3) for r in ratios_cpu],
            "goal": f"<= {RERUN_GOAL}x", "second run made no MLflow run and no version": nothing_made,
            "a new file retrained (one more version)": retrained, "goal met": met,
        },
        "table": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run of each instead of two")
    parser.add_argument("--rerun", action="store_true",
                        help="make pipeline's commands: first run, unchanged re-run, run after a new file")
    parser.add_argument("--rounds", type=int, default=3, help="--rerun: rounds, each on a fresh folder (default 3)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    parent = Path(tempfile.mkdtemp(prefix="mlops-bench-pipeline-"))
    try:
        out = rerun(parent, args.rounds) if args.rerun else run(args.quick, parent)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    emit(rerun_report(out) if args.rerun else report(out), out, args.json)
    return 0


def rerun_report(out: Mapping[str, Any]) -> str:
    summary = out["summary"]
    return "\n".join([f"## {out['title']}", "", format_table(out["table"]), "",
                      f"second / first, medians of {out.get('rounds', 1)} round(s): "
                      f"{summary['second / first (wall, median of rounds)']:.2f}x wall, "
                      f"{summary['second / first (CPU, median of rounds)']:.2f}x CPU; goal {summary['goal']}: "
                      f"{'met' if out['goal_met'] else 'MISSED'}", ""])


if __name__ == "__main__":
    sys.exit(main())
