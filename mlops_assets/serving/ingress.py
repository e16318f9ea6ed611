"""The thin HTTP ingress in front of the scoring replicas: forward, retry on replica death, spool.

Ray Serve's router retries a request only until a replica accepts it; once accepted, the death
of that replica (SIGKILL, OOM) fails the request, and the HTTP proxy answers 500. Every route of
the service is idempotent (a prediction is a pure function of the version and the inputs), so
the ingress sends the request again, to another replica, when the one it chose dies.

The ingress also spools the answered request's log line, written by the scoring replica, before
it answers: a request is logged by the process that answered it, once, whichever scorer ran it
and however often it was retried. The request id is chosen here, so it is the same on every try.

The scorer runs the service's FastAPI app in process (`call_asgi`), so the app's routes, error
handlers and metrics are the same with and without the ingress.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

JSON_HEADERS = [(b"content-type", b"application/json")]
ATTEMPTS_HEADER = b"x-mlops-attempts"  # on answers that took more than one try: visible to operators and tests
# Tries per request when replicas die: the first, then two more on other replicas.
DEFAULT_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.05  # doubled per retry; Serve needs a moment to drop a dead replica from its set


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    request_id: str
    # On a shadow's mirror: the champion's log frames of its answer, which hold the features it
    # parsed (an ingress that scores the mirror reads them instead of parsing the body again).
    champion_lines: list[tuple[bytes, int]] = field(default_factory=list)


@dataclass
class ForwardedResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    log_lines: list[tuple[bytes, int]] = field(default_factory=list)  # (spool line, rows) to log on answer
    # The version that answered, where the answer was made in this process: the release counts it
    # without parsing the body again (None: read it from the body).
    model_version: str | None = None


async def read_capped(chunks: AsyncIterator[bytes], cap: int) -> bytes:
    """At most `cap` bytes of a body: the scorer enforces the real limit (and says so in a 413)."""
    body = bytearray()
    async for chunk in chunks:
        body.extend(chunk)
        if len(body) >= cap:
            return bytes(body[:cap])
    return bytes(body)


async def call_asgi(app: Any, request: ForwardedRequest, state: dict[str, Any]) -> ForwardedResponse:
    """Run one request through an ASGI app in this process; `state` becomes `request.state`."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
        "method": request.method, "path": request.path, "raw_path": request.path.encode(),
        "root_path": "", "query_string": request.query_string, "headers": request.headers,
        "client": None, "server": None, "state": state,
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects from an in-process call
        raise AssertionError("unreachable")

    out = ForwardedResponse(500, [], b"")
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out.status = int(message["status"])
            out.headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    out.body = b"".join(chunks)
    return out


def replica_died(exc: BaseException) -> bool:
    """True for the errors a handle raises when the replica running the request is gone."""
    from ray.exceptions import RayActorError  # ActorDiedError and ActorUnavailableError

    return isinstance(exc, RayActorError)


async def call_with_retry(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff_s: float = RETRY_BACKOFF_S,
    retryable: Callable[[BaseException], bool] = replica_died,
    what: str = "request",
) -> tuple[T, int]:
    """`call()`, again (after a short backoff) when it fails with a retryable error; (result, tries)."""
    for attempt in range(1, attempts + 1):
        try:
            return await call(), attempt
        except Exception as exc:
            if attempt == attempts or not retryable(exc):
                raise
            logger.warning("%s: replica died (%s), retrying on another replica (try %d of %d)",
                           what, type(exc).__name__, attempt + 1, attempts)
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
