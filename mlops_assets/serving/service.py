"""The service's logic without Ray: auth, body limits, scoring, logging, model switching.

`app.py` wraps this in a Ray Serve deployment; tests drive it directly or through FastAPI's
test client. One `ServiceCore` lives in each replica process.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.serving.config import ModelRef, ServiceOptions
from mlops_assets.serving.metrics import ServingMetrics
from mlops_assets.serving.prediction_log import (
    PredictionLogWriter,
    encode_request,
    encode_rows,
    prediction_rows,
)
from mlops_assets.serving.request import (
    RequestError,
    build_request_model,
    feature_contract,
    parse_predict_matrix,
)
from mlops_assets.serving.scoring import Features, ScoredRecords, Scorer, prediction_items, score_many

logger = logging.getLogger(__name__)

ScoreFn = Callable[[np.ndarray], Awaitable[ScoredRecords]]
LogSink = Callable[[bytes, int], None]  # (one encoded spool line, rows in it)
# Up to this many rows a model call takes well under a millisecond: it runs on the event loop,
# since a hop to a worker thread would cost more than the call. Larger inputs go to a thread.
INLINE_SCORING_MAX_ROWS = 256


async def score_off_loop_if_large(scorer: Scorer, inputs: Sequence[Features]) -> list[ScoredRecords]:
    """`score_many`, inline for small inputs and in a worker thread for large ones."""
    if sum(len(x) for x in inputs) <= INLINE_SCORING_MAX_ROWS:
        return score_many(scorer, inputs)
    return await asyncio.to_thread(score_many, scorer, inputs)


def bearer_token_ok(authorization: str | None, expected: str) -> bool:
    """True when the header is `Bearer <expected>`; the comparison takes constant time."""
    if not authorization or not expected:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


def is_json_content_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_limited(chunks: AsyncIterator[bytes], declared_length: str | None, limit: int) -> bytes:
    """Read a body of at most `limit` bytes; 413 as soon as it is known to be larger."""
    too_large = RequestError(413, f"request body is larger than the limit of {limit} bytes; send fewer records")
    if declared_length is not None:
        try:
            if int(declared_length) > limit:
                raise too_large
        except ValueError:
            raise RequestError(400, "Content-Length header is not a number") from None
    body = bytearray()
    async for chunk in chunks:
        body.extend(chunk)
        if len(body) > limit:
            raise too_large
    return bytes(body)


@dataclass(frozen=True)
class LoadError:
    """Why the replica could not load a version: a stable code and one line for people.

    The exception itself (with its traceback) goes to the replica log only: its text can hold
    paths, URIs or store internals that an HTTP answer must not show.
    """

    code: str  # no_model_configured | model_version_not_found | artifact_integrity_failed | model_load_failed
    message: str

    def body(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


NO_MODEL_CONFIGURED = LoadError("no_model_configured", "no model version configured yet; the replica is starting")


def classify_load_failure(ref: ModelRef, exc: BaseException) -> LoadError:
    """A stable code for a failed load, judged by the exception's type, never by its text."""
    from mlops_assets.registry.model_store import ModelIntegrityError

    what = ref.describe()
    if isinstance(exc, ModelIntegrityError):
        return LoadError("artifact_integrity_failed",
                         f"{what}: the model artifact failed its integrity check; not loaded")
    if isinstance(exc, LookupError) or getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
        return LoadError("model_version_not_found", f"{what} is not in the registry")
    return LoadError("model_load_failed", f"loading {what} failed; the replica log has the details")


@dataclass
class PredictResult:
    request_id: str
    model_version: str
    predictions: list[dict[str, Any]]

    def body(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "model_version": self.model_version, "predictions": self.predictions}


class ServiceCore:
    """State of one replica: the spec, the current scorer, the prediction log and metrics."""

    def __init__(
        self,
        *,
        spec: DatasetSpec,
        options: ServiceOptions,
        token: str,
        metrics: ServingMetrics,
        log_writer: PredictionLogWriter | None,
        loader: Callable[[ModelRef], Scorer],
    ) -> None:
        if not token:
            raise ValueError("MLOPS_API_TOKEN is empty: refusing to serve /predict without authentication")
        self.spec = spec
        self.options = options
        self.metrics = metrics
        self.log = log_writer
        self.request_model = build_request_model(spec, options.max_records)
        self._token = token
        self._loader = loader
        self._reconfigure_lock = asyncio.Lock()
        self.scorer: Scorer | None = None
        self.requested: ModelRef | None = None
        self.load_error: LoadError | None = None
        self.score_fn: ScoreFn = self._score_direct

    # --- model ---------------------------------------------------------------------------

    async def reconfigure(self, ref: ModelRef) -> None:
        """Load `ref` and swap it in; on failure keep serving the current model.

        The load runs in a thread so requests keep flowing; the swap is one reference
        assignment, so each request is scored wholly by the old or wholly by the new model.
        Never raises: a replica without any model fails its health check instead.
        """
        async with self._reconfigure_lock:
            self.requested = ref
            if self.scorer is not None and ref.version and self.scorer.version == ref.version \
                    and self.scorer.info.get("model_name") == ref.model_name:
                self.load_error = None
                return
            try:
                scorer = await asyncio.to_thread(self._loader, ref)
            except Exception as exc:
                self.load_error = classify_load_failure(ref, exc)
                kept = f"still serving version {self.scorer.version}" if self.scorer else "no model loaded"
                # The whole exception, traceback included, for operators; clients get the code.
                logger.exception("%s [%s]; %s", self.load_error.message, self.load_error.code, kept)
                return
            previous = self.scorer.version if self.scorer else None
            self.scorer = scorer
            self.load_error = None
            self.metrics.model_loaded(scorer.version)
            logger.info("now serving %s version %s (was %s)", ref.model_name, scorer.version, previous)

    def _why_no_model(self) -> LoadError:
        return self.load_error or NO_MODEL_CONFIGURED

    def health(self) -> tuple[bool, dict[str, Any]]:
        if self.scorer is None:
            return False, {"status": "unavailable", "error": self._why_no_model().body()}
        body: dict[str, Any] = {"status": "ok", "model_version": self.scorer.version}
        if self.load_error:
            body["last_load_error"] = self.load_error.body()
        return True, body

    def check_health(self) -> None:
        """Ray's replica health check: raise when there is nothing to serve."""
        if self.scorer is None:
            why = self._why_no_model()
            raise RuntimeError(f"no model loaded [{why.code}]: {why.message}")

    def model_info(self) -> dict[str, Any]:
        if self.scorer is None:
            why = self._why_no_model()
            raise RequestError(503, f"no model loaded [{why.code}]: {why.message}")
        return {
            **self.scorer.info,
            "requested": self.requested.describe() if self.requested else None,
            "last_load_error": self.load_error.body() if self.load_error else None,
            "label_values": {str(k): v for k, v in self.spec.label_values.items()},
            "positive_class": self.spec.positive_class,
            "max_records": self.options.max_records,
            "features": feature_contract(self.spec),
        }

    # --- prediction ----------------------------------------------------------------------

    def authorize(self, authorization: str | None) -> None:
        if not bearer_token_ok(authorization, self._token):
            problem = "missing bearer token" if not authorization else "invalid bearer token"
            raise RequestError(401, f"{problem}: send 'Authorization: Bearer <MLOPS_API_TOKEN>'")

    async def _score_direct(self, matrix: np.ndarray) -> ScoredRecords:
        scorer = self.require_scorer()
        return (await score_off_loop_if_large(scorer, [matrix]))[0]

    def require_scorer(self) -> Scorer:
        scorer = self.scorer
        if scorer is None:
            why = self._why_no_model()
            raise RequestError(503, f"no model loaded [{why.code}]: {why.message}")
        return scorer

    async def predict(
        self, headers: Mapping[str, str], chunks: AsyncIterator[bytes], *,
        request_id: str | None = None, log_sink: LogSink | None = None,
    ) -> PredictResult:
        """Auth, content type, size, schema, score, log: each failure a RequestError naming it.

        `request_id` and `log_sink` come from the ingress when there is one: it keeps the id
        across retries on another replica and spools the log line itself, so a request is
        logged once, by the process that answered it. Without them, this replica's own log.
        """
        self.authorize(headers.get("authorization"))
        if not is_json_content_type(headers.get("content-type")):
            raise RequestError(415, f"Content-Type must be application/json, got {headers.get('content-type')!r}")
        raw = await read_limited(chunks, headers.get("content-length"), self.options.max_body_bytes)
        records, matrix = parse_predict_matrix(raw, self.request_model)
        self.require_scorer()
        try:
            # A deadline on this task, not `wait_for`, which wraps the call in a second task per request.
            async with asyncio.timeout(self.options.predict_timeout_s):
                scored = await self.score_fn(matrix)
        except TimeoutError:
            raise RequestError(
                504, f"prediction took longer than {self.options.predict_timeout_s}s; retry or send fewer records"
            ) from None
        request_id = request_id or uuid.uuid4().hex
        items = prediction_items(scored, self.spec)
        for label, n in Counter(scored.labels).items():
            self.metrics.predictions(self.spec.label_values[label], n)
        if not self.options.prediction_log:
            return PredictResult(request_id, scored.version, items)
        sink = log_sink or (self.log.append_encoded if self.log is not None else None)
        if sink is None:
            raise RuntimeError("this replica has no prediction log and the request brought no log sink")
        # Before the answer: once the line is spooled, a crash can no longer lose it.
        if isinstance(matrix, np.ndarray):  # integer codes: the raw-array frame
            line = encode_request(request_id=request_id, model_version=scored.version,
                                  columns=self.spec.feature_names, matrix=matrix, labels=scored.labels,
                                  probabilities=scored.probabilities)
        else:  # strings and floats: the rows as JSON
            line = encode_rows(prediction_rows(request_id=request_id, model_version=scored.version, records=records,
                                               labels=scored.labels, probabilities=scored.probabilities))
        sink(line, len(scored.labels))
        return PredictResult(request_id, scored.version, items)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
