"""The benchmark scripts import, parse their options, and format their tables (no timing asserted).

Benchmarks are not tests: this only keeps `make bench` from breaking silently. It also runs the
load generator for a fraction of a second against a loopback server in this process.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench import common, monitoring, pipeline, report, run_all, serving


def test_percentile_and_table_formatting() -> None:
    assert common.percentile([1, 2, 3, 4], 50) == 2.5
    assert common.percentile([], 50) != common.percentile([], 50)  # NaN
    text = common.format_table([{"a": 1, "b": 2.345, "c": float("nan")}, {"a": 10, "b": 1234.5, "c": "x"}])
    lines = text.splitlines()
    assert lines[0].startswith("| a ") and "2.35" in text and "1234" in text and " - " in text
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert common.format_table([]) == "(no rows)"


def _rows() -> list[dict]:
    rates = {serving.SHIPPED: 600.0, "mlflow": 100.0, "fastapi": 700.0, "ours: no prediction log": 610.0}
    runs = {}
    for target, rps in rates.items():
        for n, conc in serving.CELLS:
            r = common.LoadResult(target, n, conc, latencies=[0.002, 0.003, 0.004], seconds=3 / rps)
            r.statuses[200] = 3
            runs[(target, n, conc)] = [r, r]
    return serving.summarize(runs)


def test_serving_table_goals_and_report() -> None:
    rows = _rows()
    table = serving.table(rows)
    ours = next(r for r in table if r["target"] == serving.SHIPPED and r["conc"] == 8)
    assert ours["x mlflow"] == pytest.approx(6.0) and ours["x fastapi"] == pytest.approx(600 / 700)
    goals = {g["goal"]: g for g in serving.goals(rows)}
    assert goals["1 record(s), c=8: x mlflow (equal workers)"]["met"]
    assert goals["1 record, c=8: x the bare FastAPI app (equal work)"]["met"]  # 0.857 >= 0.8
    assert not next(g for k, g in goals.items() if k.startswith("1 record, c=1: p50"))["met"]  # equal p50s
    log_cost = [g for k, g in goals.items() if k.startswith("prediction log's cost")]
    assert log_cost and all(g["met"] for g in log_cost)  # 600 vs 610: 1.6%
    assert "6.0x mlflow" in serving.summary_text(rows)


def test_results_md_renders_every_results_file(tmp_path) -> None:
    rows = _rows()
    serving_json = {"title": "Serving", "command": "python -m bench.serving", "code_version": "abc123",
                    "machine": {"cpus": 2, "loadavg": "1.0 1.0 1.0"}, "budget": {"rounds": 2}, "workers": 2,
                    "results": rows, "table": serving.table(rows), "goals": serving.goals(rows),
                    "parsing_us": [{"records": 1, "step": "orjson.loads", "us": 1.5}], "summary": "fast"}
    (tmp_path / "serving.json").write_text(json.dumps(serving_json))
    (tmp_path / "training_path.json").write_text(json.dumps(
        {"title": "Training path", "command": "python -m bench.pipeline", "code_version": "def456",
         "summary": "3.2x direct", "table": [{"how": "direct", "wall s": 4.8}], "nested": {"ratio": 1.02}}))
    (tmp_path / "broken.json").write_text("{not json")
    text = report.render(tmp_path)
    assert text.index("## Serving") < text.index("## Training path")  # serving first, the rest by name
    assert "`python -m bench.serving`" in text and "abc123" in text and " ours |" in text and "MISSED" in text
    assert "def456" in text and "3.2x direct" in text and " direct |" in text and "nested.ratio: 1.02" in text
    assert "broken.json" in text and "unreadable" in text
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert report.main(["--results", str(tmp_path), "--out", str(out), "--check"]) == 0
    out.write_text("edited by hand")
    assert report.main(["--results", str(tmp_path), "--out", str(out), "--check"]) == 1


def test_the_committed_results_md_is_generated_from_the_committed_json() -> None:
    assert report.main(["--check"]) == 0, "bench/RESULTS.md differs from python -m bench.report's output"


def test_reports_of_monitoring_and_pipeline_format() -> None:
    mon = {"rows": 10, "table": [{"step": "read", "seconds": 0.1, "rows/s": 100.0}], "monitor_seconds": 1.0,
           "serving_seconds": 0.5}
    assert "2.00x the time" in monitoring.report(mon)
    pipe = {"table": [{"how": "direct", "wall s": 1.0}], "direct_steps": {"raw_batches": 0.1},
            "dagster_steps_in_process": {"raw_batches": 0.2}, "dagster_steps_multiprocess": {},
            "sensor": {"landing_to_run_started_s": 31.0}}
    text = pipeline.report(pipe)
    assert "raw_batches" in text and "landing_to_run_started_s" in text
    rerun = {"title": "make pipeline: rerun", "goal_met": False, "rounds": 3,
             "summary": {"second / first (wall, median of rounds)": 0.3, "second / first (CPU, median of rounds)": 0.2,
                         "goal": "<= 0.25x"},
             "table": [{"run": "first", "wall_s": 10.0}, {"run": "second", "wall_s": 3.0}]}
    text = pipeline.rerun_report(rerun)
    assert "medians of 3 round(s): 0.30x wall" in text and "0.20x CPU" in text and "MISSED" in text
    assert " second |" in text


def test_options_parse() -> None:
    with pytest.raises(SystemExit) as info:
        run_all.main(["--only", "nothing"])
    assert info.value.code == 2
    assert run_all.best_records_per_s({"results": [{"target": "ours", "records": 100, "rps": 5.0}]}, "ours") == 500.0
    with pytest.raises(SystemExit):
        serving.main(["--unknown-option"])


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


def test_training_path_results_carry_what_the_generic_renderer_shows() -> None:
    from bench import training_path

    def side(wall: float) -> list[dict]:  # the training path is `path_*`; `wall`/`cpu` add the ingestion
        return [{"wall": wall + 1, "cpu": wall / 2 + 1, "path_wall": wall, "path_cpu": wall / 2,
                 "run_seconds": wall / 3, "steps": {"trained_model": 1.0},
                 "laps": {"trained_model": 0.9, "total_in_process": wall}} for _ in training_path.FILES]

    rounds = [{"round": r, "order": ["direct", "dagster"], "direct": side(10.0), "dagster": side(13.0),
               "ratio_wall": 1.3, "ratio_cpu": 1.3, "ratio_wall_with_ingest": 1.6, "ratio_cpu_with_ingest": 1.5}
              for r in (1, 2)]
    out = training_path.summarize(rounds, 2.5, {"cpus": 2, "loadavg": "1 1 1"})
    out["machine_at_end"] = {"loadavg": "1 1 1"}
    assert {"title", "command", "code_version", "summary", "machine"} <= set(out)
    assert all(not isinstance(v, dict | list) for v in out["summary"].values())  # flat: a renderer shows it as is
    assert out["goal_met"] and out["ratio_wall"] == 1.3 and out["table"][-1]["x direct"] == 1.3
    rounds[0]["ratio_cpu"] = rounds[1]["ratio_cpu"] = 1.7  # judged on the larger of wall and CPU
    assert not training_path.summarize(rounds, 2.5, {"cpus": 2, "loadavg": "1 1 1"})["goal_met"]
    text = training_path.report(out)
    assert "1.30x wall" in text and "trained_model" in text and "met" in text
    assert "With ingestion" in text and "1.60x wall" in text and "1.50x CPU" in text
    json.dumps(out)  # the results file is plain JSON


def _shadow_rounds() -> list[dict]:
    from bench import shadow

    rows = []
    for round_no in (1, 2, 3):
        for strategy, slower in (("direct", 1.0), ("shadow", 1.02)):
            for conc in shadow.CONCURRENCY:
                rows.append({"round": round_no, "strategy": strategy, "concurrency": conc, "ok": 100, "failed": 0,
                             "rps": 500.0 / slower / conc ** 0.5, "p50_ms": 2.0 * slower * conc,
                             "p95_ms": 4.0 * slower * conc * (1.1 if round_no == 3 and strategy == "shadow" else 1),
                             "p99_ms": 5.0, "loadavg": "1 1 1", "switch_s": 2.0})
    return rows


def test_shadow_benchmark_ratios_and_its_results_md_section(tmp_path) -> None:
    from bench import shadow

    per_round = _shadow_rounds()
    table, ratios = shadow.summarize(per_round)
    by_conc = {r["concurrency"]: r for r in ratios}
    assert set(by_conc) == set(shadow.CONCURRENCY)
    assert by_conc[1]["p50 x direct"] == pytest.approx(1.02) and by_conc[1]["rps x direct"] == pytest.approx(1 / 1.02, abs=1e-3)
    assert by_conc[1]["met"]  # 2% on p50, p95's median is the unaffected rounds' 1.02
    counts = {"shadow_answered": 900, "shadow_failed": 0, "shadow_dropped": 3, "champion_answers_in_shadow": 900}
    out = {"title": "Shadow release", "command": shadow.COMMAND, "code_version": "abc123", "machine": {"loadavg": "1 1 1"},
           "budget": {"rounds": 3, "max_requests": 100, "max_seconds": 1.0}, "records_per_request": 1,
           "champion_version": "1", "candidate_version": "2", "table": table, "ratios": ratios,
           "per_round": per_round, "shadow": {**counts, "measured_requests_in_shadow": 600},
           "summary": shadow.summary_text(ratios, counts, table)}
    (tmp_path / "shadow.json").write_text(json.dumps(out))
    text = report.render(tmp_path)
    assert "## Shadow release" in text and "`python -m bench.shadow --json bench/results/shadow.json`" in text
    assert "900 answered, 0 failed, 3 dropped" in text and " met |" in text and "Every round" in text
    assert "p50 1.020x direct" in out["summary"]
    with pytest.raises(SystemExit):
        shadow.main(["--unknown-option"])


def test_the_committed_shadow_section_shows_the_committed_json() -> None:
    path = report.RESULTS / "shadow.json"
    assert path.is_file(), "bench/results/shadow.json is committed: RESULTS.md's shadow section cites it"
    data = json.loads(path.read_text())
    section = report.OUTPUT.read_text().split(f"## {data['title']}", 1)[1].split("\n## ", 1)[0]
    assert data["summary"] in section and data["code_version"] in section
    # The ratios as one table, as RESULTS.md renders them (a row alone would pad "met" to its own width).
    assert common.format_table([{**r, "met": "met" if r["met"] else "MISSED"} for r in data["ratios"]]) in section
    shadow = data["shadow"]
    assert f"{shadow['shadow_answered']} answered, {shadow['shadow_failed']} failed" in section
