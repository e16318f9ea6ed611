"""Prometheus metrics of the service, through Ray Serve's metrics API.

Replica metrics go to the Ray node's metrics agent, which Prometheus scrapes at
`http://<node>:<metrics-export-port>/metrics` (names get Ray's `ray_` prefix), so counts from
every replica are aggregated by Prometheus rather than by whichever replica a scrape hits.
`InMemoryMetrics` has the same interface for tests and for running the app without Ray.
"""

from __future__ import annotations

import asyncio
from collections import Counter as _Tally
from typing import Any, Protocol

PREFIX = "mlops_serving_"
LATENCY_BOUNDARIES_MS: list[float] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
COUNTER_FLUSH_INTERVAL_S = 1.0  # well inside Ray's export interval: a scrape sees the counts as before


class BufferedCounter:
    """A Ray counter whose increments on the event loop are summed here and handed to Ray once a second.

    Each Ray metrics call merges and checks tags and crosses into C++ (several microseconds), and
    the ingress made a few per request; a sum per tag set is one dict update. An increment made off
    the event loop (the prediction log's shipping thread) goes to Ray at once, so the pending sums
    are touched by the loop's thread only. `flush` hands everything over now (shutdown, tests).
    """

    def __init__(self, counter: Any, tag_keys: tuple[str, ...] = (),
                 interval_s: float = COUNTER_FLUSH_INTERVAL_S) -> None:
        self._counter = counter
        self._tag_keys = tag_keys
        self._interval_s = interval_s
        self._pending: dict[tuple[str, ...], float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def inc(self, value: float, *tag_values: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._send(tag_values, value)
            return
        self._pending[tag_values] = self._pending.get(tag_values, 0.0) + value
        if self._timer is None:
            self._timer = loop.call_later(self._interval_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for tag_values, value in pending.items():
            self._send(tag_values, value)

    def _send(self, tag_values: tuple[str, ...], value: float) -> None:
        if self._tag_keys:
            self._counter.inc(value, dict(zip(self._tag_keys, tag_values, strict=True)))
        else:
            self._counter.inc(value)


def buffered_counter(name: str, description: str, tag_keys: tuple[str, ...] = ()) -> BufferedCounter:
    """A Ray Serve counter (made in a replica) behind a `BufferedCounter` that knows its tag keys."""
    from ray.serve import metrics as m

    # Ray annotates tag_keys as a 1-tuple (Tuple[str]); any tuple of names is what it takes.
    return BufferedCounter(m.Counter(name, description, tag_keys=tag_keys), tag_keys)  # type: ignore[arg-type]


class ServingMetrics(Protocol):
    def request(self, route: str, status: int, latency_s: float) -> None: ...
    def predictions(self, label_name: str, count: int) -> None: ...
    def prediction_log_failure(self, kind: str, rows: int) -> None: ...
    def prediction_log_written(self, rows: int) -> None: ...
    def model_loaded(self, version: str) -> None: ...
    def flush(self) -> None: ...


class InMemoryMetrics:
    """Counts kept in dicts: what tests assert on, and the metrics of a core whose answers reach no client."""

    def __init__(self) -> None:
        self.requests: _Tally[tuple[str, int]] = _Tally()
        self.latencies: list[float] = []
        self.by_label: _Tally[str] = _Tally()
        self.log_failures: _Tally[str] = _Tally()
        self.log_written = 0
        self.versions: list[str] = []

    def request(self, route: str, status: int, latency_s: float) -> None:
        self.requests[(route, status)] += 1
        self.latencies.append(latency_s)

    def predictions(self, label_name: str, count: int) -> None:
        self.by_label[label_name] += count

    def prediction_log_failure(self, kind: str, rows: int) -> None:
        self.log_failures[kind] += 1

    def prediction_log_written(self, rows: int) -> None:
        self.log_written += rows

    def model_loaded(self, version: str) -> None:
        self.versions.append(version)

    def flush(self) -> None:
        pass


class RayServeMetrics:
    """The same counters as Ray metrics (created in the replica, never at import time)."""

    def __init__(self) -> None:
        from ray.serve import metrics as m

        self._requests = buffered_counter(PREFIX + "requests_total", "HTTP requests by route and status code.",
                                          ("route", "status"))
        self._errors = buffered_counter(PREFIX + "errors_total", "HTTP responses with status >= 400 by route and status.",
                                        ("route", "status"))
        # Histograms stay Ray's own: each observation falls in a bucket, and a sum of them cannot be handed over.
        self._latency = m.Histogram(PREFIX + "request_latency_ms", "Request latency in the replica, ms.",
                                    boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("route",))
        self._predictions = buffered_counter(PREFIX + "predictions_total", "Scored records by predicted class.",
                                             ("label",))
        self._log_failures = m.Counter(PREFIX + "prediction_log_failures_total",
                                       "Prediction-log flush failures and dropped-row events.", tag_keys=("kind",))
        self._log_rows = m.Counter(PREFIX + "prediction_log_rows_written_total", "Rows written to the prediction log.")
        self._model = m.Gauge(PREFIX + "model_info", "1 for the registry version this replica serves.",
                              tag_keys=("version",))
        self._version: str | None = None

    def request(self, route: str, status: int, latency_s: float) -> None:
        code = str(status)
        self._requests.inc(1, route, code)
        if status >= 400:
            self._errors.inc(1, route, code)
        self._latency.observe(latency_s * 1000.0, {"route": route})

    def predictions(self, label_name: str, count: int) -> None:
        self._predictions.inc(count, label_name)

    def flush(self) -> None:
        """The summed counts to Ray now (a replica's shutdown)."""
        for counter in (self._requests, self._errors, self._predictions):
            counter.flush()

    def prediction_log_failure(self, kind: str, rows: int) -> None:
        self._log_failures.inc(1, {"kind": kind})

    def prediction_log_written(self, rows: int) -> None:
        self._log_rows.inc(rows)

    def model_loaded(self, version: str) -> None:
        if self._version is not None and self._version != version:
            self._model.set(0, {"version": self._version})
        self._model.set(1, {"version": version})
        self._version = version
