"""The Ray Serve application: a thin ingress in front of scoring replicas that run a FastAPI app.

Deployed declaratively from `deploy/serve_config.yaml` (import path
`mlops_assets.serving.app:build_app`). Two deployments:

- `PredictionIngress` takes the HTTP request. With `ingress_scores` (the default) it answers the
  champion's `POST /predict` itself, with the version its user_config names (`local_answers` says
  when); everything else it forwards to a `PredictionService` replica through a handle, sending it
  again to another replica if that one dies mid-request (see `ingress.py`). It spools the answered
  request's log line before it answers.
- `PredictionService` runs the FastAPI app below in process over its one `ServiceCore`; its
  `user_config` names the registry version, so switching versions is a `reconfigure` on
  running replicas, not a restart.

Routes are plain functions over the replica's `ServiceCore`, which lets tests run the same
FastAPI app without Ray.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlops_assets.core.dataset_spec import DatasetSpec, load_spec
from mlops_assets.serving.config import (
    DEFAULT_BATCH_MAX_SIZE,
    DEFAULT_BATCH_WAIT_TIMEOUT_S,
    DEPLOYMENT_NAME,
    ModelRef,
    ServiceOptions,
    mlflow_tracking_uri,
)
from mlops_assets.serving.ingress import (
    ATTEMPTS_HEADER,
    JSON_HEADERS,
    ForwardedRequest,
    ForwardedResponse,
    call_asgi,
    call_with_retry,
    read_capped,
)
from mlops_assets.serving.metrics import InMemoryMetrics, RayServeMetrics, ServingMetrics
from mlops_assets.serving.prediction_log import (
    SPOOL_DIR_ENV,
    PredictionLogWriter,
    default_spool_dir,
    encode_request,
    encode_rows,
    frame_matrix,
    prediction_rows,
)
from mlops_assets.serving.release import (
    CANDIDATE_DEPLOYMENT_NAME,
    IDLE_CANDIDATE_AUTOSCALING,
    RELEASE_ROUTE,
    SHADOW_FIELD,
    RayServeReleaseMetrics,
    ReleaseRouter,
    batch_call,
    score_mirrors,
    split_ingress_config,
)
from mlops_assets.serving.request import RequestError, parse_predict_matrix
from mlops_assets.serving.scoring import ScoredRecords, Scorer, scorer_from_loaded
from mlops_assets.serving.service import NO_MODEL_CONFIGURED, ServiceCore, score_off_loop_if_large
from mlops_assets.settings import Settings, load_settings

logger = logging.getLogger(__name__)

_INTERNAL_ERROR = b'{"error":"internal error; the server log has the details"}'

INGRESS_DEPLOYMENT_NAME = "PredictionIngress"
KNOWN_ROUTES = {"/predict", "/healthz", "/model"}

api = FastAPI(
    title="mlops_assets prediction service",
    description="Binary classification over the dataset spec's features. POST /predict needs a bearer token.",
    version="1",
)

_core: ServiceCore | None = None  # set by the replica (or a test) before requests arrive


def set_core(core: ServiceCore | None) -> None:
    global _core
    _core = core


def _require_core() -> ServiceCore:
    if _core is None:
        raise RequestError(503, "service is starting; no model loaded yet")
    return _core


def prediction_log_url(settings: Settings, options: ServiceOptions) -> str:
    """The Serve option, else the settings' (MLOPS_PREDICTION_LOG_URL, else `<data root>/predictions`)."""
    return options.prediction_log_url or settings.prediction_log_url


def registry_loader(tracking_uri: str, spec: DatasetSpec):
    """Load a version through model_store (sha256 verified, native CatBoost format)."""
    from mlops_assets.registry.model_store import load_verified_model

    def load(ref: ModelRef) -> Scorer:
        loaded = load_verified_model(tracking_uri, ref.model_name, alias=ref.alias, version=ref.version)
        return scorer_from_loaded(loaded, spec)

    return load


# --- error handling: a JSON message for every failure, never a traceback or a path -------


def _error_response(status: int, body: dict[str, Any]) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(status_code=status, content=body, headers=headers)


@api.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    return _error_response(exc.status_code, exc.body())


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error_response(exc.status_code, {"error": str(exc.detail)})


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(422, {"error": "invalid request"})


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in the prediction service")
    return _error_response(500, {"error": "internal error; the server log has the details"})


class RequestMetricsMiddleware:
    """Count every HTTP request by route and status, and time it (a plain ASGI middleware).

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs each
    request through an extra task and memory stream, which cost more than the model call.
    An exception that escapes the app is counted as the 500 the error handler answers.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_and_note(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            core = _core
            if core is not None:
                path = scope.get("path", "")
                core.metrics.request(path if path in KNOWN_ROUTES else "other", status[0], time.perf_counter() - start)


api.add_middleware(RequestMetricsMiddleware)


# --- routes --------------------------------------------------------------------------------


@api.post("/predict", summary="Score 1..max_records records", openapi_extra={
    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
})
async def predict(request: Request) -> Response:
    core = _require_core()
    # Behind the ingress, the request id and the log sink come with the request (`call_asgi`).
    result = await core.predict(request.headers, request.stream(),
                                request_id=getattr(request.state, "request_id", None),
                                log_sink=getattr(request.state, "log_sink", None))
    return Response(orjson.dumps(result.body()), media_type="application/json")


@api.get("/healthz", summary="200 when a model is loaded, else 503")
async def healthz() -> JSONResponse:
    if _core is None:
        return JSONResponse(status_code=503, content={"status": "unavailable", "error": NO_MODEL_CONFIGURED.body()})
    ok, body = _core.health()
    return JSONResponse(status_code=200 if ok else 503, content=body)


@api.get("/model", summary="The served version: training run, feature version, trained at, features")
async def model() -> JSONResponse:
    return JSONResponse(_require_core().model_info())


async def predict_direct(core: ServiceCore, request: ForwardedRequest,
                         sink: Callable[[bytes, int], None]) -> ForwardedResponse:
    """`POST /predict` without the ASGI app: what the route and the error handlers answer, counted alike."""
    start = time.perf_counter()
    headers: dict[str, str] = {}
    for key, value in request.headers:
        headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))

    async def chunks() -> AsyncIterator[bytes]:
        yield request.body

    status, version = 500, None
    try:
        result = await core.predict(headers, chunks(), request_id=request.request_id, log_sink=sink)
        status, body, extra, version = 200, orjson.dumps(result.body()), [], result.model_version
    except RequestError as exc:
        status, body = exc.status_code, orjson.dumps(exc.body())
        extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
    except Exception:
        logger.exception("unhandled error in the prediction service")
        body, extra = _INTERNAL_ERROR, []
    finally:
        core.metrics.request("/predict", status, time.perf_counter() - start)
    return ForwardedResponse(status, [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *extra], body,
                             model_version=version)


# --- the Ray Serve deployments -------------------------------------------------------------


def log_to_serve_files() -> None:
    """In a replica, send this package's log records to the replica's Serve log file.

    Serve configures only the `ray.serve` logger; without this, a failed load's traceback or a
    retry warning would go nowhere.
    """
    ours = logging.getLogger("mlops_assets")
    ours.handlers = list(logging.getLogger("ray.serve").handlers)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def service_core(opts: ServiceOptions, settings: Settings, metrics: ServingMetrics | None = None) -> ServiceCore:
    """A replica's ServiceCore (a scoring replica's, or an ingress's that scores the champion itself);
    no log writer: the ingress spools what is answered. `metrics`: the replica's Ray metrics unless given."""
    spec = load_spec(opts.dataset_spec_path or settings.dataset_spec_path)
    return ServiceCore(
        spec=spec,
        options=opts,
        token=settings.serving_token(),
        metrics=metrics or RayServeMetrics(),
        log_writer=None,
        loader=registry_loader(mlflow_tracking_uri() or settings.mlflow_tracking_uri, spec),
    )


def use_batching(core: ServiceCore, opts: ServiceOptions, batched: Any) -> None:
    """Score `core`'s requests through the replica's `@serve.batch` method, sized by `opts` (1: no batching)."""
    if opts.batch_max_size > 1:
        batched.set_max_batch_size(opts.batch_max_size)
        batched.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)
        core.score_fn = batched


async def answer_predict(core: ServiceCore, request: ForwardedRequest) -> ForwardedResponse:
    """`POST /predict` on `core` (`predict_direct`), its prediction-log lines carried on the answer."""
    lines: list[tuple[bytes, int]] = []
    response = await predict_direct(core, request, lambda line, rows: lines.append((line, rows)))
    response.log_lines = lines
    return response


async def score_mirrors_here(core: ServiceCore, batch: list[ForwardedRequest]) -> list[ForwardedResponse]:
    """A shadow's mirrors scored by the candidate this ingress holds (`ingress_scores`): what a
    candidate replica's `handle_many` answers, without the handle call and its copies.

    The features come from the champion's log frame of the same request (`champion_lines`: the
    matrix it parsed and scored), or, where there is none (a data set of strings and floats), from
    the body parsed again; the champion's answer already checked the token and the body. The batch
    is one model call, and each answer carries its log line marked `shadow`. Nothing is counted in
    `predictions_total`: these answers reach no client (the release counts them).
    """
    scorer = core.require_scorer()
    columns = core.spec.feature_names
    answers: list[ForwardedResponse | None] = [None] * len(batch)
    parsed: list[tuple[int, list[dict[str, Any]], Any]] = []
    for i, request in enumerate(batch):
        lines = request.champion_lines
        matrix = frame_matrix(lines[0][0], columns) if len(lines) == 1 else None
        if matrix is not None:
            parsed.append((i, [], matrix))
            continue
        try:
            records, features = parse_predict_matrix(request.body, core.request_model)
        except RequestError as exc:
            answers[i] = ForwardedResponse(exc.status_code, [], orjson.dumps(exc.body()))
            continue
        parsed.append((i, records, features))
    scored = await score_off_loop_if_large(scorer, [features for _, _, features in parsed]) if parsed else []
    for (i, records, features), result in zip(parsed, scored, strict=True):
        request_id = batch[i].request_id
        if isinstance(features, np.ndarray):
            line = encode_request(request_id=request_id, model_version=result.version,
                                  columns=columns, matrix=features, labels=result.labels,
                                  probabilities=result.probabilities, shadow=True)
        else:
            rows = prediction_rows(request_id=request_id, model_version=result.version, records=records,
                                   labels=result.labels, probabilities=result.probabilities)
            line = encode_rows([{**row, SHADOW_FIELD: True} for row in rows])
        body = orjson.dumps({"request_id": request_id, "model_version": result.version})
        answers[i] = ForwardedResponse(200, [], body, [(line, len(result.labels))], model_version=result.version)
    return [answer for answer in answers if answer is not None]


def _prediction_log(opts: ServiceOptions, settings: Settings, metrics: ServingMetrics) -> PredictionLogWriter:
    url = prediction_log_url(settings, opts)
    return PredictionLogWriter(
        url,
        spool_dir=default_spool_dir(url, os.environ.get(SPOOL_DIR_ENV)),  # the replica reads its node's setting
        flush_interval_s=opts.log_flush_interval_s,
        flush_rows=opts.log_flush_rows,
        max_buffer_rows=opts.log_max_buffer_rows,
        on_failure=metrics.prediction_log_failure,
        on_flush=metrics.prediction_log_written,
    )


@serve.deployment(
    name=DEPLOYMENT_NAME,
    # Scoring is a few ms; a small in-flight limit plus a bounded queue turns overload into a
    # fast 503 ("Request dropped due to backpressure") instead of unbounded latency.
    max_ongoing_requests=16,
    max_queued_requests=64,
    health_check_period_s=5,
    health_check_timeout_s=10,
    graceful_shutdown_timeout_s=20,
    user_config=ModelRef().to_user_config(),
    ray_actor_options={"num_cpus": 0.5},
)
class PredictionService:
    def __init__(self, options: dict[str, Any] | None = None) -> None:
        log_to_serve_files()
        opts = ServiceOptions.from_args(options)
        core = service_core(opts, load_settings())
        use_batching(core, opts, self._score_batched)
        self._core = core
        set_core(core)

    async def handle(self, request: ForwardedRequest) -> ForwardedResponse:
        """One HTTP request from the ingress, through the FastAPI app; the log line goes back with it.

        `POST /predict` takes the direct path (`predict_direct`): the same ServiceCore call, answers,
        errors and metrics as the app's route without Starlette's per-request routing and objects.
        """
        if request.method == "POST" and request.path == "/predict":
            return await answer_predict(self._core, request)
        lines: list[tuple[bytes, int]] = []
        response = await call_asgi(api, request, {"request_id": request.request_id,
                                                  "log_sink": lambda line, rows: lines.append((line, rows))})
        response.log_lines = lines
        return response

    async def handle_many(self, requests: list[ForwardedRequest]) -> list[ForwardedResponse]:
        """A shadow's mirrors from the ingress in one call, each answered as `handle` does (serving/release.py)."""
        return await score_mirrors(self.handle, requests)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await self._core.reconfigure(ModelRef.from_user_config(user_config))

    def check_health(self) -> None:
        self._core.check_health()
        # Re-report the served version each period: Ray's metrics agent drops a gauge its process
        # has not reported for two export intervals, so one set at load would vanish from Prometheus.
        scorer = self._core.scorer
        if scorer is not None:
            self._core.metrics.model_loaded(scorer.version)

    async def __del__(self) -> None:
        self._core.metrics.flush()  # the counts summed since the last second (metrics.BufferedCounter)

    @serve.batch(max_batch_size=DEFAULT_BATCH_MAX_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def _score_batched(self, matrices: list[np.ndarray]) -> list[ScoredRecords]:
        # One model snapshot per batch: every request in it is answered by the same version.
        scorer = self._core.require_scorer()
        return await score_off_loop_if_large(scorer, matrices)


_NO_REPLICA = b'{"error":"no replica could answer (they were restarting); retry"}'
_JSON = JSON_HEADERS


@serve.deployment(
    name=INGRESS_DEPLOYMENT_NAME,
    # It only waits on scorers: a high in-flight limit, so the scorers' queue is what bounds load.
    max_ongoing_requests=256,
    max_queued_requests=256,
    health_check_period_s=5,
    graceful_shutdown_timeout_s=25,  # longer than the scorers', so their last answers are still logged
    ray_actor_options={"num_cpus": 0.25},
)
class PredictionIngress:
    def __init__(self, scorer: Any, options: dict[str, Any] | None = None, candidate: Any | None = None) -> None:
        log_to_serve_files()
        opts = ServiceOptions.from_args(options)
        self._scorer = scorer
        self._body_cap = opts.max_body_bytes + 1  # one byte over the limit is enough for the scorer's 413
        self._settings = load_settings()
        self._log = _prediction_log(opts, self._settings, RayServeMetrics()) if opts.prediction_log else None
        # Releases (serving/release.py): canary routing and the shadow mirror, set by this deployment's user_config.
        self._candidate_batch = batch_call(candidate) if candidate is not None else None
        self._release = ReleaseRouter(scorer, candidate, RayServeReleaseMetrics(), send_mirrors=self._send_mirrors)
        # `ingress_scores` in a shadow release: the candidate's model in this process too, scoring the
        # mirrors here (`score_mirrors_here`), not in a call to the candidate deployment.
        self._local_candidate: ServiceCore | None = None
        self._shadow_log: PredictionLogWriter | None = None
        self._opts = opts
        # `ingress_scores`: the champion's model in this process too, so its answers skip the handle call.
        self._local: ServiceCore | None = service_core(opts, self._settings) if opts.ingress_scores else None
        if self._local is not None:
            use_batching(self._local, opts, self._score_batched)

    async def __call__(self, request: Request) -> Response:
        import uuid

        from ray.serve.exceptions import BackPressureError

        forwarded = ForwardedRequest(
            method=request.method, path=_app_path(request.scope), query_string=request.url.query.encode(),
            headers=list(request.headers.raw), body=await read_capped(request.stream(), self._body_cap),
            request_id=uuid.uuid4().hex,
        )
        if forwarded.path == RELEASE_ROUTE and forwarded.method == "GET":
            return _raw_response(200, _JSON, json.dumps(self._release.state()).encode())
        async def send(deployment: Any) -> tuple[ForwardedResponse, int]:
            local = self._local
            if deployment is self._scorer and local is not None and local_answers(local, forwarded):
                return await answer_predict(local, forwarded), 1
            return await call_with_retry(lambda: deployment.handle.remote(forwarded),
                                         what=f"{request.method} {forwarded.path}")

        try:
            answer, tries = await self._release.forward(forwarded, send, self._log_shadow)
        except BackPressureError as exc:
            return _raw_response(503, [*_JSON, (b"retry-after", b"1")], json.dumps({"error": str(exc)}).encode())
        except Exception as exc:
            from mlops_assets.serving.ingress import replica_died

            if replica_died(exc):
                logger.error("%s %s: every try hit a dying replica", request.method, forwarded.path)
                return _raw_response(503, _JSON, _NO_REPLICA)
            logger.exception("the scoring deployment failed on %s %s", request.method, forwarded.path)
            return _raw_response(500, _JSON, _INTERNAL_ERROR)
        for line, rows in answer.log_lines:
            if self._log is not None:
                self._log.append_encoded(line, rows)  # before the answer leaves: a crash keeps the row
        headers = answer.headers if tries == 1 else [*answer.headers, (ATTEMPTS_HEADER, str(tries).encode())]
        return _raw_response(answer.status, headers, answer.body)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._release.reconfigure(user_config)
        release, champion = split_ingress_config(user_config)
        if self._local is not None and champion is not None:
            await self._local.reconfigure(champion)  # a failed load keeps what it had and forwards (local_answers)
        if self._local is not None and champion is not None and release.strategy == "shadow":
            if self._local_candidate is None:
                # Metrics kept in the process only: the candidate answers no client, so its load must not
                # show in `model_info` as a version this replica serves (the candidate replica's does).
                self._local_candidate = service_core(self._opts, self._settings, InMemoryMetrics())
            # A failed load leaves the mirrors to the candidate deployment (`_send_mirrors`).
            await self._local_candidate.reconfigure(ModelRef(model_name=champion.model_name,
                                                             version=release.candidate_version))
        else:
            self._local_candidate = None

    async def _send_mirrors(self, batch: list[ForwardedRequest]) -> list[ForwardedResponse]:
        """A shadow batch to the candidate held here when it holds the release's version, else to the deployment."""
        local, wanted = self._local_candidate, self._release.config.candidate_version
        if local is not None and local.scorer is not None and local.scorer.version == wanted:
            self._release.counts.shadow_batches_here += 1
            return await score_mirrors_here(local, batch)
        if self._candidate_batch is None:
            raise RuntimeError("this application has no candidate deployment")
        return await self._candidate_batch(batch)

    @serve.batch(max_batch_size=DEFAULT_BATCH_MAX_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def _score_batched(self, matrices: list[np.ndarray]) -> list[ScoredRecords]:
        scorer = self._local.require_scorer() if self._local is not None else None
        if scorer is None:
            raise RuntimeError("this ingress does not score")
        return await score_off_loop_if_large(scorer, matrices)

    def _log_shadow(self, line: bytes, rows: int) -> None:
        """A candidate's mirrored answer: a writer of its own, so its parts carry the `shadow` column."""
        if self._log is None:
            return
        if self._shadow_log is None:
            self._shadow_log = _prediction_log(self._opts, self._settings, RayServeMetrics())
        self._shadow_log.append_encoded(line, rows)

    async def __del__(self) -> None:
        # Graceful shutdown (Serve awaits an async __del__): the queued shadow mirrors first, since
        # their answers go to the shadow log, then ship what the spools still hold.
        release = getattr(self, "_release", None)
        if release is not None:
            await release.close()
            release.metrics.flush()
        local = getattr(self, "_local", None)
        if local is not None:
            local.metrics.flush()
        for log in (getattr(self, "_log", None), getattr(self, "_shadow_log", None)):
            if log is not None:
                log.close()


def local_answers(core: ServiceCore, request: ForwardedRequest) -> bool:
    """Does an ingress that scores answer this request itself? Only `POST /predict`, and only while
    the version it was last asked for is the one it holds: before its first load, or after a failed
    one, the scoring replicas answer (they report the failure the same way)."""
    if request.method != "POST" or request.path != "/predict" or core.scorer is None or core.load_error is not None:
        return False
    wanted = core.requested
    return wanted is not None and (wanted.version is None or wanted.version == core.scorer.version)


def _app_path(scope: Mapping[str, Any]) -> str:
    """The path below the application's route prefix (Serve passes it as `root_path`): `/predict` under any prefix."""
    path, root = str(scope.get("path") or "/"), str(scope.get("root_path") or "").rstrip("/")
    return (path[len(root):] or "/") if root and (path == root or path.startswith(root + "/")) else path


def _raw_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
    response = Response(content=body, status_code=status)
    response.raw_headers = [(k, v) for k, v in headers if k.lower() != b"content-length"] + [
        (b"content-length", str(len(body)).encode())]
    return response


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder for the Serve config's `import_path`; `args` are ServiceOptions."""
    options = ServiceOptions.from_args(args)  # fail the deploy early on a bad option
    given = {k: v for k, v in vars(options).items() if v is not None}
    # The candidate of a release: the same scorer under another name, no replica until a release starts.
    candidate = PredictionService.options(  # type: ignore[attr-defined]
        name=CANDIDATE_DEPLOYMENT_NAME, autoscaling_config=IDLE_CANDIDATE_AUTOSCALING).bind(given)
    return PredictionIngress.bind(PredictionService.bind(given), given, candidate)  # type: ignore[attr-defined]
