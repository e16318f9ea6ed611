"""Shared pieces of the benchmarks: a bounded HTTP/1.1 load generator, statistics, tables, machine facts.

The load generator speaks HTTP/1.1 over asyncio streams with pre-encoded requests and
keep-alive connections: it costs far less CPU per request than a general client (httpx), which
matters on a 2-core machine where client and server share the cores. Every load is bounded by a
request count AND a wall-clock limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class LoadResult:
    """One load run: latencies (s) of successful requests, status counts, wall time."""

    target: str
    records: int
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 200) + sum(self.errors.values())

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else float("nan")

    def ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000.0

    def row(self) -> dict[str, Any]:
        return {"target": self.target, "records": self.records, "concurrency": self.concurrency, "ok": self.ok,
                "failed": self.failed, "rps": round(self.throughput, 1), "p50_ms": round(self.ms(50), 2),
                "p90_ms": round(self.ms(90), 2), "p99_ms": round(self.ms(99), 2)}


class HttpConnection:
    """One keep-alive HTTP/1.1 connection sending pre-encoded requests."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        else:
            body = await self.reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body


def encode_post(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _phase(conns: Sequence[HttpConnection], requests: Sequence[bytes], count: int, max_seconds: float,
                 result: LoadResult | None, check: Callable[[bytes], None] | None) -> float:
    """Send up to `count` requests over `conns` (one in flight per connection) for at most `max_seconds`."""
    left = [count]
    start = time.perf_counter()
    stop_at = start + max_seconds
    last = [start]

    async def worker(i: int, conn: HttpConnection) -> None:
        n = i
        while time.perf_counter() < stop_at and left[0] > 0:
            left[0] -= 1
            raw = requests[n % len(requests)]
            n += 1
            t0 = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(conn.request(raw), timeout=max(0.1, stop_at - t0 + 5))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
                conn.close()
                if result is not None:
                    result.errors[type(exc).__name__] += 1
                continue
            t1 = last[0] = time.perf_counter()
            if result is None:
                continue
            result.statuses[status] += 1
            if status == 200:
                if check is not None and n % 50 == 1:
                    check(body)
                result.latencies.append(t1 - t0)

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    return last[0] - start


async def _load(host: str, port: int, requests: Sequence[bytes], result: LoadResult, max_requests: int,
                max_seconds: float, warmup: int, check: Callable[[bytes], None] | None) -> None:
    conns = [HttpConnection(host, port) for _ in range(result.concurrency)]
    try:
        await _phase(conns, requests, warmup, max(1.0, max_seconds / 2), None, None)  # bounded warm-up, not measured
        result.seconds = await _phase(conns, requests, max_requests, max_seconds, result, check)
    finally:
        for conn in conns:
            conn.close()


def run_load(target: str, host: str, port: int, requests: Sequence[bytes], *, records: int, concurrency: int,
             max_requests: int, max_seconds: float, warmup: int = 20,
             check: Callable[[bytes], None] | None = None) -> LoadResult:
    """Closed-loop load: `concurrency` connections, each sending its next request when answered."""
    result = LoadResult(target, records, concurrency)
    asyncio.run(_load(host, port, requests, result, max_requests, max_seconds, warmup, check))
    return result


def json_check(key: str, n: int) -> Callable[[bytes], None]:
    """A response check: the JSON body's `key` holds `n` items (a sample of responses is parsed)."""
    def check(body: bytes) -> None:
        got = json.loads(body)
        items = got[key] if key else got
        if len(items) != n:
            raise AssertionError(f"expected {n} predictions, got {len(items)}")
    return check


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text (also Markdown) table of dict rows."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:  # NaN
                return "-"
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    text = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(columns)]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(t.rjust(w) for t, w in zip(row, widths, strict=True)) + " |" for row in text]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, load average, Python: what the figures ran on."""
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Thread(s) per core", "Core(s) per socket", "CPU MHz", "Hypervisor vendor"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo") as handle:
            total_kb = int(handle.readline().split()[1])
        info["memory_gib"] = round(total_kb / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    info["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def code_version(repo: Path | None = None, paths: Sequence[str] = ("mlops_assets", "bench", "deploy")) -> str:
    """The checkout's commit, with "+dirty" when the files under `paths` differ from it.

    BENCH_CODE_VERSION wins: a run from an exported tree (`git archive <commit>`) names its commit.
    """
    if os.environ.get("BENCH_CODE_VERSION"):
        return os.environ["BENCH_CODE_VERSION"]
    where = str(repo or Path(__file__).resolve().parents[1])
    try:
        sha = subprocess.run(["git", "-C", where, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # Results files are outputs, not code: a run beside a just-written results file is not dirty.
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no", "--", *paths,
                                ":(exclude)bench/results"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}{'+dirty' if dirty else ''}" if sha else "unknown"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def wait_http(url_host: str, port: int, path: str, timeout_s: float, ok: Callable[[int], bool] = lambda s: s == 200,
              proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until GET path answers (bounded); raise with the reason otherwise."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before answering {path}")
        try:
            status = httpx.get(f"http://{url_host}:{port}{path}", timeout=2, trust_env=False).status_code
            if ok(status):
                return
            last = f"status {status}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.3)
    raise TimeoutError(f"http://{url_host}:{port}{path} not ready after {timeout_s}s ({last})")


def emit(report_text: str, out: dict[str, Any], json_path: str | None) -> None:
    """Print a benchmark's report and, when asked, keep its figures as JSON."""
    print()
    print(report_text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=1, default=str))


def run_timings(dagster_home: str) -> dict[str, Any]:
    """From the instance's event log: the newest run's wall (start to end), each step's seconds and their sum."""
    import dagster as dg
    from dagster import DagsterEventType as E

    with dg.DagsterInstance.from_config(dagster_home) as instance:
        record = instance.get_run_records(limit=1)[0]
        events = instance.all_logs(record.dagster_run.run_id)
    starts: dict[str, float] = {}
    steps: dict[str, float] = {}
    run_start = run_end = None
    for event in events:
        kind = event.dagster_event_type
        if kind == E.RUN_START:
            run_start = event.timestamp
        elif kind in (E.RUN_SUCCESS, E.RUN_FAILURE):
            run_end = event.timestamp
        elif kind == E.STEP_START:
            starts[event.step_key or ""] = event.timestamp
        elif kind in (E.STEP_SUCCESS, E.STEP_FAILURE) and event.step_key in starts:
            steps[event.step_key] = event.timestamp - starts[event.step_key]
    return {"run_seconds": (run_end - run_start) if run_start and run_end else float("nan"),
            "step_seconds": sum(steps.values()), "steps": steps}
