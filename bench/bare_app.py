"""The fair Python-HTTP peer: a bare FastAPI app under uvicorn doing the same work per request as ours.

One route, no Ray, no middleware: the bearer-token check, the content type and size limits, the
same parsing and validation (`request.parse_predict_matrix`), the same scoring call (a `Scorer`
over the same registered CatBoost file), the same response body and the same prediction log
(a spool line per request, shipped as Parquet parts by `PredictionLogWriter`). What it leaves out
is what Ray Serve adds: the ingress, the handle call, replica bookkeeping, rolling updates.

Run by bench/serving.py as `uvicorn bench.bare_app:app --workers N`; settings from the environment:
BENCH_MODEL_PATH (a .cbm file), BENCH_MODEL_VERSION, MLOPS_API_TOKEN, BENCH_LOG_URL, BENCH_SPOOL_DIR.
"""

from __future__ import annotations

import os
import uuid

import orjson
from catboost import CatBoostClassifier
from fastapi import FastAPI, Request
from fastapi.responses import Response

from mlops_assets.core.dataset_spec import default_spec
from mlops_assets.serving.config import ServiceOptions
from mlops_assets.serving.prediction_log import PredictionLogWriter, encode_request
from mlops_assets.serving.request import RequestError, build_request_model, parse_predict_matrix
from mlops_assets.serving.scoring import Scorer, prediction_items, takes_arrays
from mlops_assets.serving.service import bearer_token_ok, is_json_content_type

_spec = default_spec()
_options = ServiceOptions()
_model = CatBoostClassifier()
_model.load_model(os.environ["BENCH_MODEL_PATH"], format="cbm")
_version = os.environ.get("BENCH_MODEL_VERSION", "1")
_scorer = Scorer(_model, _spec, _version, 0.5, {}, array_input=takes_arrays(_model, _spec))
_request_model = build_request_model(_spec, _options.max_records)
_token = os.environ["MLOPS_API_TOKEN"]
_log = PredictionLogWriter(os.environ["BENCH_LOG_URL"],
                           spool_dir=os.path.join(os.environ["BENCH_SPOOL_DIR"], str(os.getpid())),
                           flush_interval_s=_options.log_flush_interval_s, flush_rows=_options.log_flush_rows,
                           max_buffer_rows=_options.log_max_buffer_rows)
_JSON = "application/json"

app = FastAPI()


def _error(exc: RequestError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return Response(orjson.dumps(exc.body()), status_code=exc.status_code, media_type=_JSON, headers=headers)


@app.post("/predict")
async def predict(request: Request) -> Response:
    try:
        if not bearer_token_ok(request.headers.get("authorization"), _token):
            raise RequestError(401, "invalid bearer token")
        if not is_json_content_type(request.headers.get("content-type")):
            raise RequestError(415, "Content-Type must be application/json")
        raw = await request.body()
        if len(raw) > _options.max_body_bytes:
            raise RequestError(413, "request body is too large")
        _, matrix = parse_predict_matrix(raw, _request_model)
    except RequestError as exc:
        return _error(exc)
    scored = _scorer.score(matrix)
    request_id = uuid.uuid4().hex
    _log.append_encoded(encode_request(request_id=request_id, model_version=scored.version,
                                       columns=_spec.feature_names, matrix=matrix, labels=scored.labels,
                                       probabilities=scored.probabilities), len(scored.labels))
    body = {"request_id": request_id, "model_version": scored.version,
            "predictions": prediction_items(scored, _spec)}
    return Response(orjson.dumps(body), media_type=_JSON)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
