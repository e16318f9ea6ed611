"""Prometheus metrics of the service, through Ray Serve's metrics API.

Replica metrics go to the Ray node's metrics agent, which Prometheus scrapes at
`http://<node>:<metrics-export-port>/metrics` (names get Ray's `ray_` prefix), so counts from
every replica are aggregated by Prometheus rather than by whichever replica a scrape hits.
`InMemoryMetrics` has the same interface for tests and for running the app without Ray.
"""

from __future__ import annotations

from collections import Counter as _Tally
from typing import Protocol

PREFIX = "mlops_serving_"
LATENCY_BOUNDARIES_MS: list[float] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


class ServingMetrics(Protocol):
    def request(self, route: str, status: int, latency_s: float) -> None: ...
    def predictions(self, label_name: str, count: int) -> None: ...
    def prediction_log_failure(self, kind: str, rows: int) -> None: ...
    def prediction_log_written(self, rows: int) -> None: ...
    def model_loaded(self, version: str) -> None: ...


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


class RayServeMetrics:
    """The same counters as Ray metrics (created in the replica, never at import time)."""

    def __init__(self) -> None:
        from ray.serve import metrics as m

        # Ray annotates tag_keys as a 1-tuple (Tuple[str]); any tuple of names is what it takes.
        self._requests = m.Counter(PREFIX + "requests_total", "HTTP requests by route and status code.",
                                   tag_keys=("route", "status"))  # type: ignore[arg-type]
        self._errors = m.Counter(PREFIX + "errors_total", "HTTP responses with status >= 400 by route and status.",
                                 tag_keys=("route", "status"))  # type: ignore[arg-type]
        self._latency = m.Histogram(PREFIX + "request_latency_ms", "Request latency in the replica, ms.",
                                    boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("route",))
        self._predictions = m.Counter(PREFIX + "predictions_total", "Scored records by predicted class.",
                                      tag_keys=("label",))
        self._log_failures = m.Counter(PREFIX + "prediction_log_failures_total",
                                       "Prediction-log flush failures and dropped-row events.", tag_keys=("kind",))
        self._log_rows = m.Counter(PREFIX + "prediction_log_rows_written_total", "Rows written to the prediction log.")
        self._model = m.Gauge(PREFIX + "model_info", "1 for the registry version this replica serves.",
                              tag_keys=("version",))
        self._version: str | None = None

    def request(self, route: str, status: int, latency_s: float) -> None:
        tags = {"route": route, "status": str(status)}
        self._requests.inc(1, tags)
        if status >= 400:
            self._errors.inc(1, tags)
        self._latency.observe(latency_s * 1000.0, {"route": route})

    def predictions(self, label_name: str, count: int) -> None:
        self._predictions.inc(count, {"label": label_name})

    def prediction_log_failure(self, kind: str, rows: int) -> None:
        self._log_failures.inc(1, {"kind": kind})

    def prediction_log_written(self, rows: int) -> None:
        self._log_rows.inc(rows)

    def model_loaded(self, version: str) -> None:
        if self._version is not None and self._version != version:
            self._model.set(0, {"version": self._version})
        self._model.set(1, {"version": version})
        self._version = version
