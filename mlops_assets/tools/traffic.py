"""Bounded, rate-limited traffic to the prediction endpoint, and the delayed labels for it.

Records come from the seeded simulator (optionally with drift), so the true label of every
record sent is known: `write_labels` turns the answered requests into a labels file in the
landing folder of delayed labels, which is how the loop is watched on one machine.

Every bound is explicit: total records, records per request, requests per second, threads,
and a wall-clock cap after which nothing new is sent.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import numpy as np
import pandas as pd

from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.tools.simulator import SimulationConfig, json_records, simulate_records, write_batch

MAX_RATE = 1000.0  # requests per second: a safety cap, this is a demo tool not a load tester
MAX_CONCURRENCY = 32


@dataclass(frozen=True)
class TrafficConfig:
    endpoint: str  # the /predict URL
    token: str
    records: int = 500
    batch_size: int = 10  # records per request
    rate: float = 20.0  # requests per second, over all threads
    concurrency: int = 2
    max_duration_s: float = 60.0
    seed: int = 1
    drift: Mapping[str, float] = field(default_factory=dict)
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL, got {self.endpoint!r}")
        if not self.token:
            raise ValueError("no API token: set MLOPS_API_TOKEN (the serving token)")
        if self.records < 1 or self.batch_size < 1:
            raise ValueError("records and batch_size must be at least 1")
        if not 0 < self.rate <= MAX_RATE:
            raise ValueError(f"rate must be in (0, {MAX_RATE:g}] requests per second, got {self.rate}")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be in [1, {MAX_CONCURRENCY}], got {self.concurrency}")
        if self.max_duration_s <= 0 or self.timeout_s <= 0:
            raise ValueError("max_duration_s and timeout_s must be positive")


@dataclass
class TrafficResult:
    requests_sent: int = 0
    requests_ok: int = 0
    records_sent: int = 0
    records_answered: int = 0
    statuses: Counter = field(default_factory=Counter)  # status code (0: no answer) -> count
    latencies_s: list[float] = field(default_factory=list)
    answered: list[dict] = field(default_factory=list)  # request_id, record_index, label, predicted, version
    seconds: float = 0.0
    stopped_by_duration_cap: bool = False

    def summary(self) -> str:
        p95 = float(np.percentile(self.latencies_s, 95)) if self.latencies_s else float("nan")
        versions = sorted({a["model_version"] for a in self.answered})
        return (f"{self.requests_ok}/{self.requests_sent} requests answered ({self.records_answered} records) in "
                f"{self.seconds:.1f}s; statuses {dict(sorted(self.statuses.items()))}; p95 {p95 * 1000:.0f} ms; "
                f"model versions {versions}" + ("; stopped at the duration cap" if self.stopped_by_duration_cap else ""))


class _Pacer:
    """Hands out send times `1/rate` apart to any number of threads."""

    def __init__(self, rate: float, deadline: float) -> None:
        self._gap = 1.0 / rate
        self._next = time.monotonic()
        self._deadline = deadline
        self._lock = threading.Lock()

    def wait(self) -> bool:
        """Sleep until this caller's slot; False when the slot is past the deadline."""
        with self._lock:
            slot = max(self._next, time.monotonic())
            self._next = slot + self._gap
        if slot >= self._deadline:
            return False
        time.sleep(max(0.0, slot - time.monotonic()))
        return True


def traffic_records(spec: DatasetSpec, config: TrafficConfig) -> pd.DataFrame:
    """The records to send, with their true label (seeded; drift moves the named features)."""
    return simulate_records(spec, SimulationConfig(n_rows=config.records, seed=config.seed, drift=dict(config.drift)))


def send_traffic(spec: DatasetSpec, config: TrafficConfig, frame: pd.DataFrame | None = None) -> TrafficResult:
    """Send the records in requests of `batch_size`, paced at `rate`, on `concurrency` threads."""
    frame = traffic_records(spec, config) if frame is None else frame
    features = frame[spec.feature_names]
    truth = [spec.label_code(v) for v in frame[spec.label]] if spec.label in frame else [None] * len(frame)
    batches = [(start, min(start + config.batch_size, len(frame))) for start in range(0, len(frame), config.batch_size)]
    result = TrafficResult()
    lock = threading.Lock()
    todo = iter(batches)
    start_time = time.monotonic()
    pacer = _Pacer(config.rate, start_time + config.max_duration_s)
    key = f"{spec.positive_name}_probability"
    headers = {"Authorization": f"Bearer {config.token}"}

    def worker() -> None:
        with httpx.Client(timeout=config.timeout_s, trust_env=False) as client:
            while True:
                with lock:
                    batch = next(todo, None)
                if batch is None:
                    return
                if not pacer.wait():
                    with lock:
                        result.stopped_by_duration_cap = True
                    return
                lo, hi = batch
                records = json_records(features.iloc[lo:hi], spec)
                sent_at = time.monotonic()
                try:
                    response = client.post(config.endpoint, json={"records": records}, headers=headers)
                    status = response.status_code
                except httpx.HTTPError:
                    response, status = None, 0
                elapsed = time.monotonic() - sent_at
                with lock:
                    result.requests_sent += 1
                    result.records_sent += hi - lo
                    result.statuses[status] += 1
                    result.latencies_s.append(elapsed)
                    if response is not None and status == 200:
                        body = response.json()
                        result.requests_ok += 1
                        result.records_answered += hi - lo
                        for i, prediction in enumerate(body["predictions"]):
                            result.answered.append({
                                "request_id": body["request_id"], "record_index": i, "label": truth[lo + i],
                                "predicted": prediction["label"], "probability": prediction.get(key),
                                "model_version": str(body["model_version"]),
                            })

    threads = [threading.Thread(target=worker, name=f"traffic-{i}") for i in range(config.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - start_time
    return result


def labels_frame(result: TrafficResult, share: float = 1.0, seed: int = 0,
                 labelled_at: datetime | None = None) -> pd.DataFrame:
    """Delayed labels of answered records: request_id, record_index, label, labelled_at.

    `share` < 1 labels a seeded random part of them (in production most labels never arrive).
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"label share must be in (0, 1], got {share}")
    rows = [a for a in result.answered if a["label"] is not None]
    frame = pd.DataFrame(rows, columns=["request_id", "record_index", "label"])
    if share < 1.0 and len(frame):
        frame = frame.sample(frac=share, random_state=seed).sort_index()
    at = labelled_at or datetime.now(UTC)
    return frame.assign(labelled_at=at.isoformat()).reset_index(drop=True)


def write_labels(frame: pd.DataFrame, labels_url: str, name: str | None = None) -> str:
    """Write a labels file into the labels landing folder (temp name first, then renamed)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return write_batch(frame, labels_url, fmt="csv", name=name or f"labels-{stamp}.csv")
