"""The benchmark scripts import, parse their options, and format their tables (no timing asserted).

Benchmarks are not tests: this only keeps `make bench` from breaking silently. It also runs the
load generator for a fraction of a second against a loopback server in this process.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench import common, monitoring, pipeline, run_all, serving


def test_percentile_and_table_formatting() -> None:
    assert common.percentile([1, 2, 3, 4], 50) == 2.5
    assert common.percentile([], 50) != common.percentile([], 50)  # NaN
    text = common.format_table([{"a": 1, "b": 2.345, "c": float("nan")}, {"a": 10, "b": 1234.5, "c": "x"}])
    lines = text.splitlines()
    assert lines[0].startswith("| a ") and "2.35" in text and "1234" in text and " - " in text
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert common.format_table([]) == "(no rows)"


def _results() -> list[common.LoadResult]:
    out = []
    for target, rps in (("ray-haproxy", 600.0), ("mlflow", 100.0), ("fastapi", 800.0), ("in-process", 5000.0)):
        for n in serving.RECORDS:
            for conc in serving.CONCURRENCY:
                r = common.LoadResult(target, n, conc, latencies=[0.002, 0.003, 0.004], seconds=3 / rps)
                r.statuses[200] = 3
                out.append(r)
    return out


def test_serving_comparison_and_goals_tables() -> None:
    results = _results()
    rows = serving.comparison_rows(results)
    assert len(rows) == len(results)
    ours = next(r for r in rows if r["target"] == "ray-haproxy")
    assert ours["x mlflow"] == pytest.approx(6.0) and ours["x fastapi"] == pytest.approx(0.75)
    goals = serving.goals(results)
    assert {g["goal >=5x"] for g in goals} == {"met"} and {g["goal >=0.7x"] for g in goals} == {"met"}
    out = {"table": rows, "goals": goals, "levers": [], "failures": {"mlflow": "did not start"}}
    report = serving.report(out)
    assert "## Serving goals" in report and "did not start" in report


def test_reports_of_monitoring_and_pipeline_format() -> None:
    mon = {"rows": 10, "table": [{"step": "read", "seconds": 0.1, "rows/s": 100.0}], "monitor_seconds": 1.0,
           "serving_seconds": 0.5}
    assert "2.00x the time" in monitoring.report(mon)
    pipe = {"table": [{"how": "direct", "wall s": 1.0}], "direct_steps": {"raw_batches": 0.1},
            "dagster_steps_in_process": {"raw_batches": 0.2}, "dagster_steps_multiprocess": {},
            "sensor": {"landing_to_run_started_s": 31.0}}
    text = pipeline.report(pipe)
    assert "raw_batches" in text and "landing_to_run_started_s" in text


def test_options_parse() -> None:
    with pytest.raises(SystemExit) as info:
        run_all.main(["--only", "nothing"])
    assert info.value.code == 2
    assert run_all.best_records_per_s({"results": [{"target": "ray", "records": 100, "rps": 5.0}]}, "ray") == 500.0


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        n = len(json.loads(body)["records"])
        out = json.dumps({"predictions": [0.5] * n}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


def test_load_generator_is_bounded_by_requests_and_checks_answers() -> None:
    server = ThreadingHTTPServer((common.HOST, 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        reqs = [common.encode_post(common.HOST, port, "/predict", json.dumps({"records": [{}, {}]}).encode())]
        result = common.run_load("echo", common.HOST, port, reqs, records=2, concurrency=2, max_requests=30,
                                 max_seconds=5, warmup=2, check=common.json_check("predictions", 2))
    finally:
        server.shutdown()
        server.server_close()
    assert result.ok == 30 and result.failed == 0 and result.throughput > 0
