"""Releases inside the Ray Serve application: which version answers a request, and the shadow path.

Three strategies, set on the `PredictionIngress` deployment's `user_config` (so starting,
promoting or ending a release is a `reconfigure` of running replicas, never a restart):

- `direct`: the champion deployment (`PredictionService`) answers everything (the default);
- `canary`: a share of `POST /predict` requests is answered by the candidate deployment
  (`PredictionCandidate`, the same class under another name). A request that sends a client key
  (header `x-client-key` by default) is routed by a stable hash of that key, so a client always
  gets the same version; without a key the request id is hashed. A candidate that fails (5xx,
  a dead replica) is never a failed response: the champion answers instead, and the failure counts
  against the candidate;
- `shadow`: the champion answers every request; after the answer, the same request is scored by
  the candidate off the request path (fire-and-forget, at most `shadow_max_in_flight` at once;
  beyond that a mirror is dropped and counted, never queued without bound). The candidate's
  answer is logged with its version and `shadow = true`, beside the champion's.

Every answer names the version that produced it (`model_version` in the body, as before).
Routing is plain functions and one small class; `app.py` hooks it into the ingress.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from mlops_assets import constants as c
from mlops_assets.serving.ingress import ForwardedRequest, ForwardedResponse
from mlops_assets.serving.prediction_log import decode_spool, encode_rows

logger = logging.getLogger(__name__)

STRATEGIES = ("direct", "shadow", "canary")
CANDIDATE_DEPLOYMENT_NAME = "PredictionCandidate"
# Between releases the candidate deployment has no replica (Serve takes no num_replicas of 0, so it
# scales to zero; nothing routes to it then). A release pins its num_replicas and clears this.
IDLE_CANDIDATE_AUTOSCALING = {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
                              "downscale_delay_s": 2.0, "upscale_delay_s": 0.0}
DEFAULT_STICKY_HEADER = "x-client-key"
DEFAULT_CANARY_SHARE = c.RELEASE_CANARY_SHARE
DEFAULT_SHADOW_MAX_IN_FLIGHT = 32
RELEASE_ROUTE = "/release"  # GET: the ingress's release state (answered by the ingress itself)
ROLE_CHAMPION, ROLE_CANDIDATE, ROLE_SHADOW = "champion", "candidate", "shadow"
SHADOW_FIELD = "shadow"  # the prediction-log column marking a candidate's mirrored answer


class ReleaseConfigError(ValueError):
    """A release configuration that cannot be routed (an unknown strategy, a share outside [0, 1])."""


@dataclass(frozen=True)
class ReleaseConfig:
    """The ingress's `user_config`: which strategy routes requests, and its parameters."""

    strategy: str = "direct"
    champion_version: str | None = None  # informational: what the champion deployment serves
    candidate_version: str | None = None
    canary_share: float = DEFAULT_CANARY_SHARE
    sticky_header: str = DEFAULT_STICKY_HEADER
    shadow_max_in_flight: int = DEFAULT_SHADOW_MAX_IN_FLIGHT
    release_id: str | None = None  # names the release in logs, run keys and the registry history
    started_at: str | None = None  # ISO UTC
    # The terms the release sensor judges it by (monitoring/comparison.py: ReleaseTerms).
    min_requests: int = c.RELEASE_MIN_REQUESTS
    min_duration_s: float = c.RELEASE_MIN_DURATION_S
    max_metric_drop: float = c.RELEASE_MAX_METRIC_DROP
    max_error_rate_delta: float = c.RELEASE_MAX_ERROR_RATE_DELTA
    min_labelled: int = c.RELEASE_MIN_LABELLED

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ReleaseConfigError(f"release strategy {self.strategy!r} is not one of {STRATEGIES}")
        share = float(self.canary_share)
        if not 0.0 <= share <= 1.0 or share != share:
            raise ReleaseConfigError(f"canary_share must be in [0, 1], got {self.canary_share}")
        if int(self.shadow_max_in_flight) < 1:
            raise ReleaseConfigError(f"shadow_max_in_flight must be at least 1, got {self.shadow_max_in_flight}")
        if self.strategy != "direct" and not self.candidate_version:
            raise ReleaseConfigError(f"a {self.strategy} release needs candidate_version")
        if not self.sticky_header or self.sticky_header.strip().lower() != self.sticky_header:
            raise ReleaseConfigError(f"sticky_header must be a lower-case header name, got {self.sticky_header!r}")

    @property
    def active(self) -> bool:
        return self.strategy != "direct"

    def to_user_config(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_user_config(cls, raw: Mapping[str, Any] | None) -> ReleaseConfig:
        raw = dict(raw or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ReleaseConfigError(f"unknown release setting(s) {unknown}; known: {sorted(known)}")
        for key in ("champion_version", "candidate_version"):
            if raw.get(key) not in (None, ""):
                raw[key] = str(raw[key])
        for key in ("canary_share", "min_duration_s", "max_metric_drop", "max_error_rate_delta"):
            if key in raw:
                raw[key] = float(raw[key])
        for key in ("min_requests", "min_labelled", "shadow_max_in_flight"):
            if key in raw:
                raw[key] = int(raw[key])
        return cls(**raw)

    def ended(self) -> ReleaseConfig:
        return ReleaseConfig(sticky_header=self.sticky_header, shadow_max_in_flight=self.shadow_max_in_flight)

    def terms(self) -> Any:
        from mlops_assets.monitoring.comparison import ReleaseTerms

        return ReleaseTerms(self.min_requests, self.min_duration_s, self.max_metric_drop, self.max_error_rate_delta,
                            self.min_labelled)


def bucket(key: str) -> float:
    """A stable number in [0, 1) for a key: the first 8 bytes of its sha256 (the same in every process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def chooses_candidate(config: ReleaseConfig, client_key: str | None, request_id: str) -> bool:
    """Does the candidate answer this request? Only in a canary, for a `canary_share` of keys."""
    if config.strategy != "canary":
        return False
    return bucket(client_key or request_id) < config.canary_share


def header(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    wanted = name.encode()
    for key, value in headers:
        if key.lower() == wanted:
            return value.decode("latin-1").strip() or None
    return None


def mark_shadow(line: bytes) -> tuple[bytes, int]:
    """A scorer's spool frame with every row marked `shadow = true` (a JSON-rows frame), and its rows."""
    rows = decode_spool(line)
    for row in rows:
        row[SHADOW_FIELD] = True
    return encode_rows(rows), len(rows)


class ReleaseMetrics(Protocol):
    def answered(self, role: str, version: str, status: int, latency_s: float) -> None: ...
    def shadow_dropped(self) -> None: ...


class NoMetrics:
    def answered(self, role: str, version: str, status: int, latency_s: float) -> None:
        pass

    def shadow_dropped(self) -> None:
        pass


@dataclass
class ReleaseCounts:
    """What this ingress replica saw of the release (its `GET /release` shows them)."""

    answered: dict[str, int] = field(default_factory=dict)  # role -> answers
    failed: dict[str, int] = field(default_factory=dict)  # role -> 5xx or dead replica
    fallbacks: int = 0  # canary requests the champion answered because the candidate failed
    shadow_dropped: int = 0
    shadow_in_flight: int = 0


Send = Callable[[Any], Awaitable[tuple[ForwardedResponse, int]]]  # handle -> (answer, tries)
LogLine = Callable[[bytes, int], None]


def _version_of(response: ForwardedResponse) -> str:
    import json

    if response.status != 200:
        return "none"
    try:
        return str(json.loads(response.body).get("model_version", "none"))
    except (ValueError, AttributeError):
        return "none"


class ReleaseRouter:
    """Routes the ingress's requests between the champion and candidate deployments."""

    def __init__(self, champion: Any, candidate: Any | None, metrics: ReleaseMetrics | None = None) -> None:
        self.champion = champion
        self.candidate = candidate
        self.config = ReleaseConfig()
        self.counts = ReleaseCounts()
        self.metrics: ReleaseMetrics = metrics or NoMetrics()
        self._shadows: set[asyncio.Task[None]] = set()

    def reconfigure(self, user_config: Mapping[str, Any] | None) -> None:
        config = ReleaseConfig.from_user_config(user_config)
        if config.active and self.candidate is None:
            raise ReleaseConfigError("this application has no candidate deployment to release to")
        if config.release_id != self.config.release_id:
            self.counts = ReleaseCounts(shadow_in_flight=self.counts.shadow_in_flight)
        self.config = config
        logger.info("release: %s (champion %s, candidate %s, canary share %s)", config.strategy,
                    config.champion_version, config.candidate_version, config.canary_share)

    def state(self) -> dict[str, Any]:
        return {**self.config.to_user_config(), "counts": asdict(self.counts)}

    def _note(self, role: str, response: ForwardedResponse | None, start: float) -> None:
        status = response.status if response is not None else 503
        bucket_ = self.counts.failed if status >= 500 else self.counts.answered
        bucket_[role] = bucket_.get(role, 0) + 1
        version = _version_of(response) if response is not None else "none"
        self.metrics.answered(role, version, status, time.perf_counter() - start)

    async def forward(self, request: ForwardedRequest, send: Send, log: LogLine) -> tuple[ForwardedResponse, int]:
        """Answer `request` as the current strategy says; the champion's failures propagate as before."""
        config = self.config
        if not config.active or self.candidate is None or request.method != "POST" or request.path != "/predict":
            return await send(self.champion)
        if chooses_candidate(config, header(request.headers, config.sticky_header), request.request_id):
            start = time.perf_counter()
            try:
                answer, tries = await send(self.candidate)
            except Exception as exc:  # a dead or missing candidate replica: the champion answers
                logger.warning("canary: candidate failed (%s); the champion answers", type(exc).__name__)
                answer, tries = None, 1
            self._note(ROLE_CANDIDATE, answer, start)
            if answer is not None and answer.status < 500:
                return answer, tries
            self.counts.fallbacks += 1
        start = time.perf_counter()
        answer, tries = await send(self.champion)
        self._note(ROLE_CHAMPION, answer, start)
        if config.strategy == "shadow" and answer.status == 200:
            self._mirror(request, send, log)
        return answer, tries

    def _mirror(self, request: ForwardedRequest, send: Send, log: LogLine) -> None:
        if self.counts.shadow_in_flight >= self.config.shadow_max_in_flight:
            self.counts.shadow_dropped += 1
            self.metrics.shadow_dropped()
            return
        self.counts.shadow_in_flight += 1
        task = asyncio.get_running_loop().create_task(self._shadow(request, send, log))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(self, request: ForwardedRequest, send: Send, log: LogLine) -> None:
        start = time.perf_counter()
        answer = None
        try:
            # The mirror carries the champion's request id, so both answers join the same labels.
            answer, _ = await send(self.candidate)
            if answer.status == 200:
                for line, _rows in answer.log_lines:
                    marked, rows = mark_shadow(line)
                    log(marked, rows)
        except Exception as exc:  # never the client's problem: counted against the candidate
            logger.warning("shadow: candidate failed (%s)", type(exc).__name__)
        finally:
            self.counts.shadow_in_flight -= 1
            self._note(ROLE_SHADOW, answer, start)


def without_log_lines(response: ForwardedResponse) -> ForwardedResponse:
    return replace(response, log_lines=[])


class RayServeReleaseMetrics:
    """Per-version answers and latency of a release, as Ray metrics (created in the ingress replica)."""

    def __init__(self) -> None:
        from ray.serve import metrics as m

        from mlops_assets.serving.metrics import LATENCY_BOUNDARIES_MS, PREFIX

        self._answers = m.Counter(PREFIX + "release_answers_total", "Release answers by role, version and status.",
                                  tag_keys=("role", "version", "status"))  # type: ignore[arg-type]
        self._latency = m.Histogram(PREFIX + "release_latency_ms", "Latency of each role's answer in the ingress, ms.",
                                    boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("role",))
        self._dropped = m.Counter(PREFIX + "release_shadow_dropped_total", "Mirrors dropped: too many in flight.")

    def answered(self, role: str, version: str, status: int, latency_s: float) -> None:
        self._answers.inc(1, {"role": role, "version": version, "status": str(status)})
        self._latency.observe(latency_s * 1000.0, {"role": role})

    def shadow_dropped(self) -> None:
        self._dropped.inc(1)
