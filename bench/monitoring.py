"""Monitoring benchmark: profiling throughput on a prediction log and drift computation time, against
the time it takes to serve the same rows.

The log is written in the serving format (lib/serving/prediction_log.py: Parquet parts of
`prediction_rows`) from simulated records and a CatBoost model trained with the platform's
trainer; the monitoring side uses lib/monitoring.py and lib/drift.py as the assets do:
read and normalize the log, profile the monitored columns (features, label, probability),
profile the reference (training rows), and score drift per column.

"Time to serve the same rows" is the rows divided by the endpoint's best records per second with
100-record requests, when a serving benchmark ran in the same session (`bench.run_all` passes
it); the model's own in-process scoring time for the rows is always shown as the floor.

Run: `python -m bench.monitoring [--quick] [--rows N]`.
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


def build_log(root: Path, rows: int, seed: int = 5) -> tuple[Any, Any, Any, float]:
    """A prediction log of `rows` rows under `root`; (spec, reference frame, model, in-process scoring s)."""
    from mlops_assets.core.dataset_spec import default_spec
    from mlops_assets.serving.prediction_log import prediction_rows, write_part
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
    at = datetime.now(UTC) - timedelta(hours=1)
    part = 5000
    for i, start in enumerate(range(0, rows, part)):
        batch = []
        for j in range(start, min(start + part, rows), 100):  # requests of 100 records
            end = min(j + 100, rows)
            batch += prediction_rows(request_id=f"r{j}", model_version="1", records=records[j:end],
                                     labels=labels[j:end].tolist(), probabilities=p[j:end].tolist(),
                                     logged_at=at + timedelta(seconds=j / 1000))
        write_part(batch, str(root), f"part-{i:05d}.parquet")
    ref_p = model.predict_proba(reference[spec.feature_names].to_numpy(np.float32), thread_count=1)[:, 1]
    reference["label"] = np.where(ref_p >= 0.5, spec.positive_class, spec.negative_class)
    reference["phishing_probability"] = ref_p
    return spec, reference, model, scoring_s


def measure(root: Path, spec: Any, reference: Any, repeats: int) -> dict[str, float]:
    from mlops_assets.monitoring import drift
    from mlops_assets.monitoring import live as mon

    columns = mon.monitored_columns(spec.feature_names)
    prob = columns[-1]
    times: dict[str, list[float]] = {"read": [], "profile": [], "reference_profile": [], "drift": []}
    rows = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        log = mon.read_prediction_log(str(root))
        t1 = time.perf_counter()
        current = drift.profile_frame(log[columns])
        t2 = time.perf_counter()
        ref_blob = drift.profile_frame(reference[columns])
        t3 = time.perf_counter()
        scores = drift.drift_scores(ref_blob, current, columns, continuous={prob})
        t4 = time.perf_counter()
        rows = len(log)
        for key, value in (("read", t1 - t0), ("profile", t2 - t1), ("reference_profile", t3 - t2),
                           ("drift", t4 - t3)):
            times[key].append(value)
        drifted = sum(1 for s in scores.values() if s.drift)
    out = {k: median(v) for k, v in times.items()}
    out["rows"] = rows
    out["columns"] = len(columns)
    out["drifted_columns"] = drifted
    return out


def run(quick: bool, rows: int | None, parent: Path, serving_records_per_s: float | None = None,
        log: Any = print) -> dict[str, Any]:
    rows = rows or (20_000 if quick else 100_000)
    repeats = 1 if quick else 3
    log(f"monitoring benchmark: {rows} logged rows, {repeats} repeat(s); machine {machine()}")
    spec, reference, _, scoring_s = build_log(parent / "predictions", rows)
    m = measure(parent / "predictions", spec, reference, repeats)
    log(f"  {m}")
    monitor_s = m["read"] + m["profile"] + m["drift"]
    table = [
        {"step": "read + normalize the prediction log", "seconds": m["read"], "rows/s": rows / m["read"]},
        {"step": f"profile {m['columns']} monitored columns (whylogs)", "seconds": m["profile"],
         "rows/s": rows / m["profile"]},
        {"step": "profile the reference (6000 training rows)", "seconds": m["reference_profile"],
         "rows/s": 6000 / m["reference_profile"]},
        {"step": f"drift scores, {m['columns']} columns (from the two profiles)", "seconds": m["drift"],
         "rows/s": float("nan")},
        {"step": "monitoring total (read + profile + drift)", "seconds": monitor_s, "rows/s": rows / monitor_s},
        {"step": "serving the same rows: model in-process (floor)", "seconds": scoring_s, "rows/s": rows / scoring_s},
    ]
    if serving_records_per_s:
        table.append({"step": "serving the same rows: our endpoint, 100-record requests (best concurrency)",
                      "seconds": rows / serving_records_per_s, "rows/s": serving_records_per_s})
    return {"machine": machine(), "rows": rows, "measures": m, "table": table, "monitor_seconds": monitor_s,
            "serving_seconds": rows / serving_records_per_s if serving_records_per_s else None,
            "in_process_scoring_seconds": scoring_s}


def report(out: Mapping[str, Any]) -> str:
    lines = [f"## Monitoring: {out['rows']} logged predictions", "", format_table(out["table"]), ""]
    if out.get("serving_seconds"):
        lines += [f"Monitoring these rows takes {out['monitor_seconds'] / out['serving_seconds']:.2f}x the time "
                  "it took to serve them.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.monitoring", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 000 rows, one repeat")
    parser.add_argument("--rows", type=int, help="rows in the prediction log (default 100 000; quick 20 000)")
    parser.add_argument("--serving-records-per-s", type=float, help="records/s of the endpoint, for the comparison")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    parent = Path(tempfile.mkdtemp(prefix="mlops-bench-monitoring-"))
    try:
        out = run(args.quick, args.rows, parent, args.serving_records_per_s)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    emit(report(out), out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
