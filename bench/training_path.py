"""Training-path benchmark: `dagster asset materialize` (a real instance, what `make pipeline` runs)
against the same work called directly, in interleaved rounds on the same data.

Each round trains twice on each side, each side in its own fresh folder (data root, MLflow SQLite
store, DAGSTER_HOME) holding the same simulated files:

1. a first file (6000 rows, seed 42, what `make demo` lands): ingest, validate, clean, split,
   train with all its MLflow logging, evaluate (no champion yet), register and promote;
2. a second file lands (2000 rows, seed 43): ingest it and train again on both batches; now the
   champion is loaded and scored on the same test rows, the gate compares them, and the model
   card is written for the new version.

- `dagster`: what `make pipeline` runs for the training path, `mlops-assets ingest` (each landed
  file a raw_batches partition) then `dagster asset materialize -m mlops_assets.definitions -c
  deploy/run_config/in_process.yaml --select <training path>`: wall time of the commands, so it
  includes starting Python, loading the definitions, the run, its event log and the IO manager.
- `direct`: one plain Python process (`python -m bench.training_path --direct <root>`) that calls
  the very functions the assets run (their bodies, which call the library: ingestion, validation,
  cleaning, split, CatBoost training, MLflow logging, evaluation with the champion, gate,
  registration, model card), in order, passing the records in memory: no instance, no run, no
  event log, no IO manager, no definitions loaded. Calling the asset bodies (rather than a copy of
  them) keeps the work identical as the assets change.

The sides alternate which goes first in each round, so drift in the machine's load hits both.
The figure that matters is dagster / direct for the training path (raw_dataset to
registered_model, what the issue names: `dagster asset materialize` against the direct calls less
their ingestion lap) per round (goal: at most 1.5x), with its median, in wall time and in CPU time
(every process of a side); the goal is judged on the larger of the two, because on a shared machine
wall time drifts with others' load and CPU time does not. The ratio with ingestion (the dagster
side's `mlops-assets ingest`, a second process that loads the definitions again, against the direct
side's raw_batches lap) is reported beside it.

Run: `python -m bench.training_path [--quick] [--rounds N] [--json bench/results/training_path.json]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.common import code_version, emit, format_table, machine, median, run_timings

REPO = Path(__file__).resolve().parents[1]
TRAINING_PATH = ("raw_dataset,validation_report,feature_set,train_test_split,trained_model,"
                 "model_evaluation,registered_model")
FILES = (("first.csv", 6000, 42), ("second.csv", 2000, 43))
GOAL_RATIO = 1.5
COMMAND = "python -m bench.training_path --json bench/results/training_path.json"


def fresh_root(parent: Path, name: str) -> tuple[Path, dict[str, str]]:
    """A folder for one side of one round, and the environment pointing every store at it."""
    root = parent / name
    (root / "data" / "mlflow").mkdir(parents=True)
    (root / "dagster_home").mkdir()
    shutil.copy(REPO / "deploy" / "local" / "dagster.yaml", root / "dagster_home" / "dagster.yaml")
    env = {"DAGSTER_HOME": str(root / "dagster_home"), "MLOPS_DATA_URL": str(root / "data"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'data' / 'mlflow' / 'mlflow.db'}",
           "MLOPS_LANDING_URL": str(root / "data" / "raw")}
    return root, env


def land(env: Mapping[str, str], phase: int) -> None:
    from mlops_assets.core.dataset_spec import default_spec
    from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch

    name, rows, seed = FILES[phase]
    write_batch(simulate_records(default_spec(), SimulationConfig(n_rows=rows, seed=seed)), env["MLOPS_LANDING_URL"],
                name=name)


def _env(extra: Mapping[str, str]) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "MLFLOW_", "DAGSTER_"))}
    return {**keep, "PATH": path, "PYTHONPATH": str(REPO), "DAGSTER_DISABLE_TELEMETRY": "1", **extra}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: Sequence[str], env: Mapping[str, str], timeout_s: float, may_reject: bool = False
         ) -> tuple[float, float, str]:
    """Run a command; (wall s, CPU s of it and its children, stdout). With `may_reject`, a run that
    stops at the blocking passed_gate check (a candidate registered as challenger) counts as done."""
    cpu, started = _children_cpu(), time.perf_counter()
    proc = subprocess.run(list(cmd), env=_env(env), cwd=str(REPO), capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - started
    rejected = may_reject and "registered_model_passed_gate" in proc.stdout + proc.stderr
    if proc.returncode != 0 and not rejected:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-2500:]}")
    return wall, _children_cpu() - cpu, proc.stdout


def dagster_phase(env: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
    """`make pipeline`'s training path: ingest, then `dagster asset materialize` on the real instance."""
    bin_dir = Path(sys.executable).parent
    ingest_wall, ingest_cpu, _ = _run([str(bin_dir / "mlops-assets"), "ingest"], env, timeout_s)
    cmd = [str(bin_dir / "dagster"), "asset", "materialize", "-m", "mlops_assets.definitions",
           "-c", str(REPO / "deploy" / "run_config" / "in_process.yaml"), "--select", TRAINING_PATH]
    wall, cpu, _ = _run(cmd, env, timeout_s, may_reject=True)
    return {"wall": ingest_wall + wall, "cpu": ingest_cpu + cpu, "ingest_wall": ingest_wall,
            "materialize_wall": wall, "path_wall": wall, "path_cpu": cpu, **run_timings(env["DAGSTER_HOME"])}


def direct_phase(env: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
    """The same work in one plain process (see `direct_work`); wall and CPU of that process."""
    wall, cpu, out = _run([sys.executable, "-m", "bench.training_path", "--direct", env["MLOPS_DATA_URL"]], env,
                          timeout_s)
    laps = json.loads(out.strip().splitlines()[-1])
    # The training path alone: the process less its ingestion lap (the dagster side's ingest command).
    return {"wall": wall, "cpu": cpu, "path_wall": wall - laps["laps"]["raw_batches"],
            "path_cpu": cpu - laps["cpu_laps"]["raw_batches"], **laps}


def direct_work() -> dict[str, Any]:
    """What one `make pipeline` training-path run computes, called directly in this process: every
    landed file ingested (its contract checked, copied once), then the training path's asset
    bodies in order with their checks, the records passed in memory. Laps in seconds, as JSON."""
    started = time.perf_counter()
    import dagster as dg

    from mlops_assets.defs.evaluation import assets as evaluation
    from mlops_assets.defs.features import assets as features
    from mlops_assets.defs.ingestion import assets as ingestion
    from mlops_assets.defs.registry import assets as registry
    from mlops_assets.defs.resources import ParquetIOManager, build_resources
    from mlops_assets.defs.training import assets as training
    from mlops_assets.defs.validation import assets as validation
    from mlops_assets.ingestion import batches
    from mlops_assets.settings import load_settings

    laps: dict[str, float] = {"imports": time.perf_counter() - started}
    cpu_laps: dict[str, float] = {"imports": time.process_time()}
    t, t_cpu = time.perf_counter(), time.process_time()

    def lap(name: str) -> None:
        nonlocal t, t_cpu
        now, now_cpu = time.perf_counter(), time.process_time()
        laps[name] = laps.get(name, 0.0) + now - t
        cpu_laps[name] = cpu_laps.get(name, 0.0) + now_cpu - t_cpu
        t, t_cpu = now, now_cpu

    settings = load_settings()
    resources = {k: v for k, v in build_resources(settings).items() if not isinstance(v, ParquetIOManager)}
    platform, mlflow = resources["platform"], resources["mlflow"]

    run_id = uuid.uuid4().hex

    def call(asset: Any, **kwargs: Any) -> Any:
        """The asset's own function, called as a plain function with a plain context (what a script
        would pass: a run id, a logger, the asset's key); its output value."""
        key = asset.key if isinstance(asset, dg.AssetsDefinition) else None
        context = SimpleNamespace(run_id=run_id, job_name="direct", log=logging.getLogger("direct"),
                                  asset_key=key, run=SimpleNamespace(tags={}, run_id=run_id))
        out = asset.op.compute_fn.decorated_fn(context, **kwargs)
        items = [out] if isinstance(out, dg.Output | dg.MaterializeResult) else list(out)
        return next((o.value for o in items if isinstance(o, dg.Output)), None)

    lap("settings_and_resources")
    # raw_batches reads its run's tags, which a direct call has not: its body's calls, one file each.
    for sha, landed in batches.hash_landed_files(platform.landing_url).items():
        if batches.batch_record(platform.batches_url, sha) is None:
            outcome = batches.ingest_batch(sha, platform.landing_url, platform.batches_url, platform.quarantine_url,
                                           platform.spec(), hint_url=landed.url)
            ingestion._contract_result(outcome)  # the check result the asset reports
            batches.accepted_batches(platform.batches_url)
    lap("raw_batches")
    raw = call(ingestion.raw_dataset, platform=platform)
    lap("raw_dataset")
    report = call(validation.validation_report, config=validation.ValidationConfig(), platform=platform,
                  raw_dataset=raw)
    for check in (validation.schema_is_valid, validation.enough_rows, validation.label_balance,
                  validation.null_share, validation.duplicate_share, validation.conflicting_labels):
        check.node_def.compute_fn.decorated_fn(report)
    lap("validation_report")
    feature_set = call(features.feature_set, config=features.FeatureConfig(), platform=platform, raw_dataset=raw)
    lap("feature_set")
    split = call(features.train_test_split, config=features.SplitConfig(), platform=platform,
                 feature_set=feature_set)
    lap("train_test_split")
    model = call(training.trained_model, config=training.TrainingConfig(), platform=platform, mlflow=mlflow,
                 train_test_split=split)
    lap("trained_model")
    evaluated = call(evaluation.model_evaluation, config=evaluation.EvaluationConfig(), platform=platform,
                     mlflow=mlflow, trained_model=model, train_test_split=split)
    evaluation.promotion_gate.node_def.compute_fn.decorated_fn(evaluated)
    lap("model_evaluation")
    registered = call(registry.registered_model, mlflow=mlflow, trained_model=model, model_evaluation=evaluated)
    registry.passed_gate.node_def.compute_fn.decorated_fn(registered)
    lap("registered_model")
    laps["total_in_process"] = time.perf_counter() - started
    return {"laps": laps, "cpu_laps": cpu_laps, "version": registered.version, "champion": registered.champion_version,
            "gate_passed": registered.gate_passed}


def import_seconds(env: Mapping[str, str]) -> float:
    """Starting Python and loading the platform's Definitions (paid by every dagster CLI call)."""
    wall, _, _ = _run([sys.executable, "-c", "import mlops_assets.definitions"], env, 300)
    return wall


def _ratio(result: Mapping[str, Any], key: str) -> float:
    """dagster / direct of one round, both trainings: `key` summed over each side's phases."""
    return sum(p[key] for p in result["dagster"]) / sum(p[key] for p in result["direct"])


def run(rounds: int, parent: Path, log: Any = print, timeout_s: float = 900) -> dict[str, Any]:
    log(f"training-path benchmark: {rounds} interleaved round(s) of dagster and direct, two trainings each")
    started = machine()
    per_round: list[dict[str, Any]] = []
    for r in range(rounds):
        order = ("direct", "dagster") if r % 2 == 0 else ("dagster", "direct")
        result: dict[str, Any] = {"round": r + 1, "order": list(order)}
        for side in order:
            _, env = fresh_root(parent, f"{side}-{r}")
            phases = []
            for phase in range(len(FILES)):
                land(env, phase)
                out = (direct_phase if side == "direct" else dagster_phase)(env, timeout_s)
                phases.append(out)
                log(f"  round {r + 1} {side:<7} training {phase + 1}: {out['wall']:6.1f}s wall, {out['cpu']:6.1f}s CPU")
            result[side] = phases
        result["ratio_wall"], result["ratio_cpu"] = _ratio(result, "path_wall"), _ratio(result, "path_cpu")
        result["ratio_wall_with_ingest"], result["ratio_cpu_with_ingest"] = _ratio(result, "wall"), _ratio(result, "cpu")
        log(f"  round {r + 1}: dagster / direct, training path = {result['ratio_wall']:.2f}x wall, "
            f"{result['ratio_cpu']:.2f}x CPU; with ingestion {result['ratio_wall_with_ingest']:.2f}x wall, "
            f"{result['ratio_cpu_with_ingest']:.2f}x CPU")
        per_round.append(result)
    _, env = fresh_root(parent, "imports")
    imports = median([import_seconds(env) for _ in range(max(1, min(rounds, 3)))])
    return summarize(per_round, imports, started)


def summarize(per_round: Sequence[Mapping[str, Any]], imports: float, started: Mapping[str, Any]) -> dict[str, Any]:
    def med(side: str, phase: int, key: str) -> float:
        return median([r[side][phase][key] for r in per_round])

    def total(side: str, key: str) -> float:
        return median([sum(p[key] for p in r[side]) for r in per_round])

    ratio = median([r["ratio_wall"] for r in per_round])
    ratio_cpu = median([r["ratio_cpu"] for r in per_round])
    with_ingest = (median([r["ratio_wall_with_ingest"] for r in per_round]),
                   median([r["ratio_cpu_with_ingest"] for r in per_round]))
    table = []
    for phase, (name, rows, _) in enumerate(FILES):
        what = "first training (no champion)" if phase == 0 else f"second file landed ({name}): champion scored"
        d, g = med("direct", phase, "path_wall"), med("dagster", phase, "path_wall")
        table.append({"training": what, "rows landed": rows, "direct s": d, "dagster s": g,
                      "dagster run s (event log)": med("dagster", phase, "run_seconds"), "x direct": g / d,
                      "with ingestion: direct s": med("direct", phase, "wall"),
                      "with ingestion: dagster s": med("dagster", phase, "wall")})
    d, g = total("direct", "path_wall"), total("dagster", "path_wall")
    table.append({"training": "both", "rows landed": sum(f[1] for f in FILES), "direct s": d, "dagster s": g,
                  "dagster run s (event log)": float("nan"), "x direct": g / d,
                  "with ingestion: direct s": total("direct", "wall"),
                  "with ingestion: dagster s": total("dagster", "wall")})
    steps = []
    for phase in range(len(FILES)):
        direct_laps = per_round[0]["direct"][phase]["laps"]
        for step in [k for k in direct_laps if k not in ("total_in_process",)]:
            dagster_s = median([r["dagster"][phase]["steps"].get(step, float("nan")) for r in per_round])
            steps.append({"training": phase + 1, "step": step,
                          "direct s": median([r["direct"][phase]["laps"].get(step, float("nan")) for r in per_round]),
                          "dagster step s": dagster_s})
    return {
        "title": "Training path: dagster asset materialize against the same work called directly",
        "command": COMMAND,
        "code_version": code_version(),
        "machine": started,
        "machine_at_end": {"loadavg": machine()["loadavg"]},  # a load far above the CPU count: read CPU, not wall
        "files": [{"name": n, "rows": rows, "seed": seed} for n, rows, seed in FILES],
        "rounds": len(per_round),
        "goal": f"<= {GOAL_RATIO}x direct",
        "goal_met": max(ratio, ratio_cpu) <= GOAL_RATIO,
        "ratio_wall": ratio,
        "ratio_cpu": ratio_cpu,
        "summary": {
            "dagster / direct (wall, median of rounds)": round(ratio, 3),
            "dagster / direct (CPU, median of rounds)": round(ratio_cpu, 3),
            "goal": f"<= {GOAL_RATIO}x",
            "goal met (larger of wall and CPU ratios)": max(ratio, ratio_cpu) <= GOAL_RATIO,
            "with ingestion, dagster / direct (wall, median of rounds)": round(with_ingest[0], 3),
            "with ingestion, dagster / direct (CPU, median of rounds)": round(with_ingest[1], 3),
            "direct s (both trainings)": round(d, 2),
            "dagster s (both trainings)": round(g, 2),
            "load the definitions s": round(imports, 2),
            "rounds": len(per_round),
        },
        "definitions_import_s": imports,
        "table": table,
        "steps": steps,
        "per_round": list(per_round),
    }


def report(out: Mapping[str, Any]) -> str:
    met = "met" if out["goal_met"] else "MISSED"
    return "\n".join([
        f"## {out['title']}", "",
        f"{out['rounds']} interleaved round(s); the training path, dagster / direct {out['ratio_wall']:.2f}x wall "
        f"({out['ratio_cpu']:.2f}x CPU), goal {out['goal']} on the larger: {met}. With ingestion (the dagster "
        f"side's `mlops-assets ingest` command and the direct side's raw_batches lap): "
        f"{out['summary'].get('with ingestion, dagster / direct (wall, median of rounds)', float('nan')):.2f}x wall, "
        f"{out['summary'].get('with ingestion, dagster / direct (CPU, median of rounds)', float('nan')):.2f}x CPU. "
        "Load average "
        f"{out['machine'].get('loadavg')} at the start, {out['machine_at_end']['loadavg']} at the end. "
        "Loading the definitions: "
        f"{out['definitions_import_s']:.1f}s. Code {out['code_version']}.", "",
        format_table(out["table"]), "",
        "Per step (direct: laps in the direct process; dagster: STEP_START to STEP_SUCCESS):", "",
        format_table(out["steps"]), ""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training_path", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--direct", metavar="DATA_ROOT", help=argparse.SUPPRESS)  # the direct side's own process
    args = parser.parse_args(argv)
    if args.direct:
        print(json.dumps(direct_work()))
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    parent = Path(tempfile.mkdtemp(prefix="mlops-bench-training-"))
    try:
        out = run(rounds, parent)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    emit(report(out), out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
