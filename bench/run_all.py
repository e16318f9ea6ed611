"""`make bench`: the serving, monitoring, pipeline and training-path benchmarks in one session, one report.

Prints every table and writes them, with the raw figures, to `data/bench/` (report-<stamp>.md
and results-<stamp>.json). `--quick` shortens every load and repeat (about 5 minutes instead of
about 13 on 2 cores). Every load is bounded in requests and time, servers listen on 127.0.0.1
on free ports, and everything started is stopped.

Run: `python -m bench.run_all [--quick] [--only serving,monitoring,pipeline,training_path] [--no-levers] [--results]`;
`--results` also writes bench/results/serving.json and training_path.json and regenerates bench/RESULTS.md (`python -m bench.report`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import monitoring, pipeline, serving, training_path
from bench.common import machine

PARTS = ("serving", "monitoring", "pipeline", "training_path")


def best_records_per_s(serving_out: Mapping[str, Any], target: str, records: int = 100) -> float | None:
    rates = [r["rps"] * records for r in serving_out.get("results", [])
             if r["target"] == target and r["records"] == records and r["rps"] == r["rps"]]
    return max(rates) if rates else None


def header(info: Mapping[str, Any], args: argparse.Namespace) -> str:
    cpu = info.get("Model name", "?")
    return "\n".join([
        f"# mlops_assets benchmarks ({'quick' if args.quick else 'full'}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "",
        f"Machine: {info.get('cpus')} CPUs ({cpu}, {info.get('Hypervisor vendor', 'bare metal')}), "
        f"{info.get('memory_gib')} GiB, Python {info.get('python')}; load average at start {info.get('loadavg')}.",
        ""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short loads and single repeats (about 5 minutes)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--no-levers", dest="levers", action="store_false",
                        help="serving: only the shipped default and its peers (saves minutes)")
    parser.add_argument("--results", action="store_true",
                        help="also write bench/results/serving.json and regenerate bench/RESULTS.md")
    parser.add_argument("--out", default="data/bench", help="folder for the report and the JSON")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    started = time.monotonic()
    info = machine()
    sections = [header(info, args)]
    results: dict[str, Any] = {"machine": info, "quick": args.quick}
    work = Path(tempfile.mkdtemp(prefix="mlops-bench-"))
    try:
        if "serving" in parts:
            out = serving.run(args.quick, work / "serving", levers=args.levers)
            results["serving"] = out
            sections.append(serving.report(out))
            print(sections[-1], flush=True)
        if "monitoring" in parts:
            served = results.get("serving", {})
            rate = best_records_per_s(served, serving.SHIPPED)
            (work / "monitoring").mkdir()
            out = monitoring.run(args.quick, None, work / "monitoring", rate)
            results["monitoring"] = out
            sections.append(monitoring.report(out))
            print(sections[-1], flush=True)
        if "pipeline" in parts:
            (work / "pipeline").mkdir()
            out = pipeline.run(args.quick, work / "pipeline")
            results["pipeline"] = out
            sections.append(pipeline.report(out))
            print(sections[-1], flush=True)
        if "training_path" in parts:  # dagster asset materialize against the same work called directly
            (work / "training_path").mkdir()
            out = training_path.run(1 if args.quick else 3, work / "training_path")
            results["training_path"] = out
            sections.append(training_path.report(out))
            print(sections[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - started
    sections.append(f"Total {total / 60:.1f} minutes; load average at the end {machine()['loadavg']}.\n")
    report = "\n".join(sections)
    print()
    print("=" * 100)
    print(report)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out_dir / f"report-{stamp}.md").write_text(report)
    (out_dir / f"results-{stamp}.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"written: {out_dir / f'report-{stamp}.md'} and results-{stamp}.json")
    if args.results and ("serving" in results or "training_path" in results):
        from bench import report as results_report

        for part in ("serving", "training_path"):
            if part in results:
                target = results_report.RESULTS / f"{part}.json"
                target.write_text(json.dumps(results[part], indent=1, default=str))
        results_report.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
