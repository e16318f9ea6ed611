"""Monitoring benchmark: the time to monitor one hourly window with 1x and 10x the prediction-log
history, and what one window costs next to serving its rows.

The log is written in the serving layout (serving/prediction_log.py: Parquet parts under
`date=YYYY-MM-DD/hour=HH/`, several parts an hour as a replica ships them) from simulated records
scored by a CatBoost model trained with the platform's trainer. One window's monitoring is what the
hourly partitions of `production_profiles` and `drift_report` do, through the same library calls:
read the hour's folder (`read_window`), profile each answering version (whylogs), save the
profiles, merge the day's hourly profiles, find the log's newest record (the freshness check), run
the retention pass, load the window's profiles and score drift against the reference.

The 10x log has ten times the hours of history before the same last window (same rows per hour):
a window's cost must not grow with the history (goal: 10x at most 1.3x the 1x time). For
contrast, reading the whole log (what monitoring did before the hourly layout) is timed too.

"Time to serve the same rows" is the window's rows divided by the endpoint's best records per
second with 100-record requests, when a serving benchmark ran in the same session (`bench.run_all`
passes it); the model's own in-process scoring time for the rows is always shown as the floor.

Run: `python -m bench.monitoring [--quick] [--rows N] [--json bench/results/monitoring.json]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import emit, format_table, machine, median

PARTS_PER_HOUR = 6  # a replica ships a part every few seconds to minutes; six an hour keeps the files few
GOAL_RATIO = 1.3


def build_traffic(rows: int, seed: int = 5) -> tuple[Any, Any, Any, float]:
    """(spec, the reference frame with the model's answers, one hour's served rows as an Arrow table,
    in-process scoring s for those rows)."""
    from mlops_assets.core.dataset_spec import default_spec
    from mlops_assets.serving.prediction_log import prediction_rows, rows_to_table
    from mlops_assets.serving.scoring import positive_column
    from mlops_assets.tools.simulator import SimulationConfig, simulate_records
    from mlops_assets.training.train import TARGET_COLUMN, TrainingParams, train_model

    spec = default_spec()
    reference = simulate_records(spec, SimulationConfig(n_rows=6000, seed=42))
    reference[TARGET_COLUMN] = (reference[spec.label] == spec.positive_class).astype(int)
    model = train_model(reference, spec.feature_names, TrainingParams()).model
    traffic = simulate_records(spec, SimulationConfig(n_rows=rows, seed=seed, drift={spec.feature_names[0]: 0.3}))
    x = traffic[spec.feature_names].to_numpy(dtype=np.float32)
    started = time.perf_counter()
    proba = model.predict_proba(x, thread_count=1)
    scoring_s = time.perf_counter() - started
    p = proba[:, positive_column(getattr(model, "classes_", None), spec.positive_class)]
    labels = np.where(p >= 0.5, spec.positive_class, spec.negative_class)
    records = traffic[spec.feature_names].astype("int64").to_dict(orient="records")
    hour = datetime(2026, 1, 1, tzinfo=UTC)
    served = []
    for j in range(0, rows, 100):  # requests of 100 records, spread over the hour
        end = min(j + 100, rows)
        served += prediction_rows(request_id=f"r{j}", model_version="1", records=records[j:end],
                                  labels=labels[j:end].tolist(), probabilities=p[j:end].tolist(),
                                  logged_at=hour + timedelta(seconds=3599 * j / rows))
    ref_p = model.predict_proba(reference[spec.feature_names].to_numpy(np.float32), thread_count=1)[:, 1]
    reference["label"] = np.where(ref_p >= 0.5, spec.positive_class, spec.negative_class)
    reference["phishing_probability"] = ref_p
    return spec, reference, rows_to_table(served), scoring_s


def write_history(root: Path, hour_table: Any, hours: int, last_hour: datetime) -> None:
    """`hours` hours of the log ending with `last_hour`, each the same traffic shifted in time,
    written in the serving layout (`write_part`'s folders and names)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mlops_assets.serving.prediction_log import hour_folder

    base = datetime(2026, 1, 1, tzinfo=UTC)
    stamps = hour_table.column("logged_at")
    n = hour_table.num_rows
    for h in range(hours):
        start = last_hour - timedelta(hours=hours - 1 - h)
        shifted = pc.add(stamps, pa.scalar(start - base, pa.duration("ns")))
        table = hour_table.set_column(hour_table.schema.get_field_index("logged_at"), "logged_at",
                                      shifted.cast(stamps.type))
        folder = root / hour_folder(start)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(PARTS_PER_HOUR):
            lo, hi = n * i // PARTS_PER_HOUR, n * (i + 1) // PARTS_PER_HOUR
            pq.write_table(table.slice(lo, hi - lo), folder / f"part-{start:%Y%m%dT%H}-{i:03d}.parquet")


def monitor_window(log_url: str, profiles: Path, spec: Any, ref_blob: bytes, start: datetime) -> dict[str, float]:
    """One window's monitoring as the hourly partitions do it; seconds per step."""
    import pandas as pd

    from mlops_assets.monitoring import drift
    from mlops_assets.monitoring import live as mon

    columns = mon.monitored_columns(spec.feature_names)
    begin, end = pd.Timestamp(start), pd.Timestamp(start) + pd.Timedelta(hours=1)
    t0 = time.perf_counter()
    read = mon.read_window(log_url, begin, end)
    t1 = time.perf_counter()
    folder = profiles / f"{begin:%Y%m%dT%H%M%SZ}"
    blobs = {}
    for version, part in read.frame.groupby(mon.MODEL_VERSION):
        blobs[str(version)] = blob = drift.profile_frame(part[columns], begin.to_pydatetime())
        drift.save_profile(blob, str(folder / f"{version}.bin"))
    t2 = time.perf_counter()
    day = [p.read_bytes() for d in profiles.glob(f"{begin:%Y%m%d}T*") for p in d.glob("*.bin")]
    drift.save_profile(drift.merge_profiles(day), str(profiles.parent / "daily" / f"{begin:%Y-%m-%d}" / "1.bin"))
    newest = mon.newest_record(log_url)
    mon.apply_retention(log_url, 30, end, "compact")
    t3 = time.perf_counter()
    current = drift.merge_profiles(drift.load_profile(str(folder / f"{v}.bin")) for v in blobs)
    scores = drift.drift_scores(ref_blob, current, spec.feature_names)
    drift.prediction_drift(ref_blob, current, probability_column=mon.PROBABILITY, label_column=mon.PREDICTED_LABEL)
    t4 = time.perf_counter()
    assert newest is not None and newest < end
    return {"read": t1 - t0, "profile": t2 - t1, "day_freshness_retention": t3 - t2, "drift": t4 - t3,
            "total": t4 - t0, "rows": float(len(read.frame)), "files": float(len(read.files)),
            "drifted_columns": float(sum(1 for s in scores.values() if s.drift))}


def run(quick: bool, rows: int | None, parent: Path, serving_records_per_s: float | None = None,
        log: Any = print, repeats: int | None = None) -> dict[str, Any]:
    from mlops_assets.monitoring import drift
    from mlops_assets.monitoring import live as mon

    rows = rows or (2_000 if quick else 10_000)  # rows per hour
    hours_1x = 12 if quick else 24
    repeats = repeats or (3 if quick else 5)
    log(f"monitoring benchmark: {rows} rows an hour, {hours_1x} and {10 * hours_1x} hours of history, "
        f"{repeats} repeats; machine {machine()}")
    spec, reference, hour_table, scoring_s = build_traffic(rows)
    ref_blob = drift.profile_frame(reference[mon.monitored_columns(spec.feature_names)])
    last = datetime(2026, 3, 1, 10, tzinfo=UTC)
    logs = {}
    for name, hours in (("1x", hours_1x), ("10x", 10 * hours_1x)):
        root = parent / f"log-{name}" / "predictions"
        started = time.perf_counter()
        write_history(root, hour_table, hours, last)
        log(f"  {name}: {hours} hours, {hours * PARTS_PER_HOUR} parts written in {time.perf_counter() - started:.1f}s")
        logs[name] = root
    runs: dict[str, list[dict[str, float]]] = {"1x": [], "10x": []}
    for _ in range(repeats):  # interleaved, so both sizes share the machine's noise
        for name, root in logs.items():
            runs[name].append(monitor_window(str(root), root.parent / "profiles" / "3600s", spec, ref_blob, last))
    windows = {name: {k: median([r[k] for r in rs]) for k in rs[0]} for name, rs in runs.items()}
    whole = {}
    for name, root in logs.items():  # the old design: every run read the whole log
        started = time.perf_counter()
        frame = mon.read_prediction_log(str(root))
        whole[name] = {"seconds": time.perf_counter() - started, "rows": len(frame)}
    ratio = windows["10x"]["total"] / windows["1x"]["total"]
    one = windows["1x"]
    table = [
        {"step": "read the window's hour folder", "1x s": one["read"], "10x s": windows["10x"]["read"]},
        {"step": "profile the window (whylogs, per version) and save", "1x s": one["profile"],
         "10x s": windows["10x"]["profile"]},
        {"step": "merge the day, newest record (freshness), retention pass", "1x s": one["day_freshness_retention"],
         "10x s": windows["10x"]["day_freshness_retention"]},
        {"step": "drift scores against the reference", "1x s": one["drift"], "10x s": windows["10x"]["drift"]},
        {"step": "one window, total", "1x s": one["total"], "10x s": windows["10x"]["total"]},
        {"step": "for contrast: read the whole log (the old design, every run)", "1x s": whole["1x"]["seconds"],
         "10x s": whole["10x"]["seconds"]},
    ]
    serving = [{"step": "monitoring one window (1x history)", "seconds": one["total"], "rows/s": rows / one["total"]},
               {"step": "serving the same rows: model in-process (floor)", "seconds": scoring_s,
                "rows/s": rows / scoring_s}]
    if serving_records_per_s:
        serving.append({"step": "serving the same rows: our endpoint, 100-record requests (best concurrency)",
                        "seconds": rows / serving_records_per_s, "rows/s": serving_records_per_s})
    out = {"machine": machine(), "rows": rows, "rows_per_window": rows, "hours": {"1x": hours_1x, "10x": 10 * hours_1x},
           "parts_per_hour": PARTS_PER_HOUR, "repeats": repeats, "windows": windows, "whole_log_read": whole,
           "ratio_10x_to_1x": ratio, "goal": f"<= {GOAL_RATIO}x", "goal_met": ratio <= GOAL_RATIO,
           "history_table": table, "table": serving, "monitor_seconds": one["total"],
           "serving_seconds": rows / serving_records_per_s if serving_records_per_s else None,
           "in_process_scoring_seconds": scoring_s}
    log(f"  window 1x {one['total']:.3f}s, 10x {windows['10x']['total']:.3f}s: {ratio:.2f}x")
    return out


def report(out: Mapping[str, Any]) -> str:
    lines = [f"## Monitoring: one hourly window of {out['rows']} logged predictions", ""]
    if out.get("history_table"):
        hours = out["hours"]
        lines += [f"History before the window: {hours['1x']} hours (1x) and {hours['10x']} hours (10x), "
                  f"{out['parts_per_hour']} parts an hour; medians of {out['repeats']}.", "",
                  format_table(out["history_table"]), "",
                  f"10x history / 1x: {out['ratio_10x_to_1x']:.2f}x (goal {out['goal']}: "
                  f"{'met' if out['goal_met'] else 'NOT met'}).", ""]
    lines += [format_table(out["table"]), ""]
    if out.get("serving_seconds"):
        lines += [f"Monitoring these rows takes {out['monitor_seconds'] / out['serving_seconds']:.2f}x the time "
                  "it took to serve them.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.monitoring", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 000 rows an hour, 12 and 120 hours, 3 repeats")
    parser.add_argument("--rows", type=int, help="rows per hourly window (default 10 000; quick 2 000)")
    parser.add_argument("--repeats", type=int, help="runs per size, the median is reported (default 5; quick 3)")
    parser.add_argument("--serving-records-per-s", type=float, help="records/s of the endpoint, for the comparison")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    parent = Path(tempfile.mkdtemp(prefix="mlops-bench-monitoring-"))
    try:
        out = run(args.quick, args.rows, parent, args.serving_records_per_s, repeats=args.repeats)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    emit(report(out), out, args.json)
    return 0 if out["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
