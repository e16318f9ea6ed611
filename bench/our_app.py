"""Our serving app without Ray: the same FastAPI app and ServiceCore (token, validation, prediction
log, metrics kept in memory instead of Ray's Prometheus export), under one uvicorn worker.

It separates what our own request path costs from what Ray Serve's replica machinery adds.
Settings come from the environment, set by bench/serving.py: MLFLOW_TRACKING_URI, BENCH_MODEL_NAME,
BENCH_MODEL_VERSION, MLOPS_API_TOKEN, BENCH_LOG_URL.
"""

from __future__ import annotations

import asyncio
import os

from mlops_assets.core.dataset_spec import default_spec
from mlops_assets.serving import app as app_module
from mlops_assets.serving.config import ModelRef, ServiceOptions
from mlops_assets.serving.metrics import InMemoryMetrics
from mlops_assets.serving.prediction_log import PredictionLogWriter
from mlops_assets.serving.service import ServiceCore


class _CountingMetrics(InMemoryMetrics):
    def request(self, route: str, status: int, latency_s: float) -> None:
        self.requests[(route, status)] += 1  # no latency list: it would grow without bound


_spec = default_spec()
_options = ServiceOptions()
_core = ServiceCore(
    spec=_spec, options=_options, token=os.environ["MLOPS_API_TOKEN"], metrics=_CountingMetrics(),
    log_writer=PredictionLogWriter(os.environ["BENCH_LOG_URL"], flush_interval_s=_options.log_flush_interval_s,
                                   flush_rows=_options.log_flush_rows, max_buffer_rows=_options.log_max_buffer_rows),
    loader=app_module.registry_loader(os.environ["MLFLOW_TRACKING_URI"], _spec),
)
asyncio.run(_core.reconfigure(ModelRef(model_name=os.environ["BENCH_MODEL_NAME"],
                                       version=os.environ["BENCH_MODEL_VERSION"])))
app_module.set_core(_core)
app = app_module.api
