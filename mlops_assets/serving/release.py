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
  the candidate off the request path (fire-and-forget, at most `shadow_max_in_flight` mirrors
  queued or being scored at once; beyond that a mirror is dropped and counted, never queued
  without bound). The candidate's answer is logged with its version and `shadow = true`, beside
  the champion's.

  Mirrors are batched: the ingress queues them and sends them to the candidate in one handle call
  (`PredictionService.handle_many`, here `score_mirrors`) once `shadow_batch_max_size` have queued
  or `shadow_batch_wait_s` after the first; the candidate marks the log lines itself and, on its
  first batch, lowers its own CPU priority (`SHADOW_NICENESS`), so on a loaded machine the
  champion's replicas get the cores first. One call per batch instead of one per request is what
  keeps the shadow off the champion's latency (bench/shadow.py). With `ingress_scores` (the
  shipped default) the ingress also loads the candidate's version and scores each batch itself
  (`app.score_mirrors_here`: the features read from the champion's log frame, one model call), which takes the handle
  call, its copies and the candidate replica's request handling off the machine's cores; the
  candidate deployment scores them while the ingress has not loaded that version (or failed to).
  `shadow_sample_share` mirrors
  only a share of the requests (by a hash of the request id; default 1.0, every request); a
  sampled-out request is counted, not dropped. The shadow role's latency is its batch call's.

Every answer names the version that produced it (`model_version` in the body, as before).
Routing is plain functions and one small class; `app.py` hooks it into the ingress.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from mlops_assets import constants as c
from mlops_assets.serving.config import ModelRef
from mlops_assets.serving.ingress import ForwardedRequest, ForwardedResponse
from mlops_assets.serving.prediction_log import mark_shadow_frame as mark_shadow

logger = logging.getLogger(__name__)

STRATEGIES = ("direct", "shadow", "canary")
CANDIDATE_DEPLOYMENT_NAME = "PredictionCandidate"
# Between releases the candidate deployment has no replica (Serve takes no num_replicas of 0, so it
# scales to zero; nothing routes to it then). A release pins its num_replicas and clears this.
IDLE_CANDIDATE_AUTOSCALING = {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
                              "downscale_delay_s": 2.0, "upscale_delay_s": 0.0}
DEFAULT_STICKY_HEADER = "x-client-key"
DEFAULT_CANARY_SHARE = c.RELEASE_CANARY_SHARE
# A model call has a fixed cost (CatBoost builds a Pool per call) that 64 mirrors share better than
# 16 (bench/shadow.py); in flight room for four full batches, so a slow batch does not drop mirrors.
DEFAULT_SHADOW_MAX_IN_FLIGHT = 256
DEFAULT_SHADOW_BATCH_MAX_SIZE = 64  # mirrors per call to the candidate
DEFAULT_SHADOW_BATCH_WAIT_S = 0.5  # how long the first queued mirror waits for others
DEFAULT_SHADOW_SAMPLE_SHARE = 1.0  # every answered request is mirrored
SHADOW_DRAIN_TIMEOUT_S = 10.0  # of the ingress's 25 s graceful shutdown: the rest is for closing the log
SHADOW_NICENESS = 10  # added to the niceness of a candidate replica that scores mirrors
RELEASE_ROUTE = "/release"  # GET: the ingress's release state (answered by the ingress itself)
# Fields of ReleaseConfig that tune the ingress rather than describe a release: kept when one ends.
INGRESS_TUNING = ("sticky_header", "shadow_max_in_flight", "shadow_batch_max_size", "shadow_batch_wait_s",
                  "shadow_sample_share")
ROLE_CHAMPION, ROLE_CANDIDATE, ROLE_SHADOW = "champion", "candidate", "shadow"
# In the ingress's user_config beside the release: the champion's ModelRef, which an ingress built
# with `ingress_scores` loads and answers the champion's share of POST /predict with itself.
CHAMPION_REF_KEY = "champion"
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
    shadow_batch_max_size: int = DEFAULT_SHADOW_BATCH_MAX_SIZE
    shadow_batch_wait_s: float = DEFAULT_SHADOW_BATCH_WAIT_S
    shadow_sample_share: float = DEFAULT_SHADOW_SAMPLE_SHARE
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
        if int(self.shadow_batch_max_size) < 1:
            raise ReleaseConfigError(f"shadow_batch_max_size must be at least 1, got {self.shadow_batch_max_size}")
        wait = float(self.shadow_batch_wait_s)
        if not 0.0 <= wait <= 10.0:
            raise ReleaseConfigError(f"shadow_batch_wait_s must be in [0, 10] seconds, got {self.shadow_batch_wait_s}")
        sample = float(self.shadow_sample_share)
        if not 0.0 < sample <= 1.0:
            raise ReleaseConfigError(f"shadow_sample_share must be in (0, 1], got {self.shadow_sample_share}")
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
        for key in ("canary_share", "min_duration_s", "max_metric_drop", "max_error_rate_delta",
                    "shadow_batch_wait_s", "shadow_sample_share"):
            if key in raw:
                raw[key] = float(raw[key])
        for key in ("min_requests", "min_labelled", "shadow_max_in_flight", "shadow_batch_max_size"):
            if key in raw:
                raw[key] = int(raw[key])
        return cls(**raw)

    def ended(self) -> ReleaseConfig:
        """No release; the ingress's own tuning (`INGRESS_TUNING`) carries over to the next one."""
        return ReleaseConfig(**{name: getattr(self, name) for name in INGRESS_TUNING})

    def terms(self) -> Any:
        from mlops_assets.monitoring.comparison import ReleaseTerms

        return ReleaseTerms(self.min_requests, self.min_duration_s, self.max_metric_drop, self.max_error_rate_delta,
                            self.min_labelled)


def ingress_user_config(release: ReleaseConfig, champion: ModelRef | None) -> dict[str, Any]:
    """The ingress deployment's user_config: the release, and the champion's ModelRef when known."""
    out: dict[str, Any] = release.to_user_config()
    if champion is not None:
        out[CHAMPION_REF_KEY] = champion.to_user_config()
    return out


def split_ingress_config(raw: Mapping[str, Any] | None) -> tuple[ReleaseConfig, ModelRef | None]:
    """The ingress's user_config as (release, champion ModelRef or None)."""
    rest = dict(raw or {})
    champion = rest.pop(CHAMPION_REF_KEY, None)
    return ReleaseConfig.from_user_config(rest), (ModelRef.from_user_config(champion) if champion else None)


def bucket(key: str) -> float:
    """A stable number in [0, 1) for a key: the first 8 bytes of its sha256 (the same in every process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def chooses_candidate(config: ReleaseConfig, client_key: str | None, request_id: str) -> bool:
    """Does the candidate answer this request? Only in a canary, for a `canary_share` of keys."""
    if config.strategy != "canary":
        return False
    return bucket(client_key or request_id) < config.canary_share


def mirrors(config: ReleaseConfig, request_id: str) -> bool:
    """Is this answered request mirrored to the shadow? All of them unless `shadow_sample_share` < 1."""
    if config.strategy != "shadow":
        return False
    # Every request at the default share: no hash to compute on the champion's path.
    return config.shadow_sample_share >= 1.0 or bucket("shadow:" + request_id) < config.shadow_sample_share


def header(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    wanted = name.encode()
    for key, value in headers:
        if key.lower() == wanted:
            return value.decode("latin-1").strip() or None
    return None


Handle = Callable[[ForwardedRequest], Awaitable[ForwardedResponse]]
_lowered = False


def lower_priority(increment: int = SHADOW_NICENESS) -> bool:
    """Add `increment` to the niceness of every thread of this process (Linux); False where it cannot.

    `os.nice` alone would lower only the calling thread on Linux, not Ray's threads that
    (de)serialize the calls; each thread of /proc/self/task is set instead.
    """
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return False
    done = False
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
            done = True
        except OSError:  # a thread that ended meanwhile, or a platform without per-thread priorities
            pass
    return done


async def score_mirrors(handle: Handle, requests: list[ForwardedRequest], *,
                        lower: bool = True) -> list[ForwardedResponse]:
    """In the candidate replica: a batch of mirrors, each answered as `handle` answers it, log lines marked shadow.

    The first batch lowers this replica's CPU priority unless `lower` is False (only a replica that
    scores mirrors is lowered; a canary's candidate, which answers clients, never gets here).
    """
    global _lowered
    if lower and not _lowered:
        _lowered = True
        if lower_priority():
            logger.info("shadow: this candidate replica runs at niceness +%d", SHADOW_NICENESS)
    answers = await asyncio.gather(*(handle(r) for r in requests), return_exceptions=True)
    out = []
    for request, answer in zip(requests, answers, strict=True):
        if isinstance(answer, BaseException):
            logger.warning("shadow: scoring mirror %s failed (%s)", request.request_id, type(answer).__name__)
            out.append(ForwardedResponse(500, [], b'{"error":"the candidate failed on this mirror"}'))
            continue
        marked = [mark_shadow(line) for line, _ in answer.log_lines] if answer.status == 200 else []
        out.append(ForwardedResponse(answer.status, [], answer.body, marked, model_version=answer.model_version))
    return out


class ReleaseMetrics(Protocol):
    def answered(self, role: str, version: str, status: int, latency_s: float, count: int = 1) -> None: ...
    def shadow_dropped(self) -> None: ...
    def flush(self) -> None: ...


class NoMetrics:
    def answered(self, role: str, version: str, status: int, latency_s: float, count: int = 1) -> None:
        pass

    def shadow_dropped(self) -> None:
        pass

    def flush(self) -> None:
        pass


@dataclass
class ReleaseCounts:
    """What this ingress replica saw of the release (its `GET /release` shows them)."""

    answered: dict[str, int] = field(default_factory=dict)  # role -> answers
    failed: dict[str, int] = field(default_factory=dict)  # role -> 5xx or dead replica
    fallbacks: int = 0  # canary requests the champion answered because the candidate failed
    shadow_dropped: int = 0
    shadow_in_flight: int = 0  # mirrors queued in this ingress or in a call to the candidate
    shadow_sampled_out: int = 0  # answered requests `shadow_sample_share` left unmirrored
    shadow_batches: int = 0  # calls to the candidate
    shadow_batches_here: int = 0  # of those, scored by the ingress itself (app.score_mirrors_here)


Send = Callable[[Any], Awaitable[tuple[ForwardedResponse, int]]]  # handle -> (answer, tries)
SendMirrors = Callable[[list[ForwardedRequest]], Awaitable[list[ForwardedResponse]]]  # one answer per mirror
LogLine = Callable[[bytes, int], None]


def batch_call(deployment: Any) -> SendMirrors:
    """Mirrors to a Serve handle of the candidate deployment, in one `handle_many` call."""
    async def send(batch: list[ForwardedRequest]) -> list[ForwardedResponse]:
        # The candidate replica parses each body itself: the champion's frames stay here.
        return list(await deployment.handle_many.remote([replace(r, champion_lines=[]) for r in batch]))
    return send


def _version_of(response: ForwardedResponse) -> str:
    import json

    if response.status != 200:
        return "none"
    if response.model_version is not None:
        return response.model_version
    try:
        return str(json.loads(response.body).get("model_version", "none"))
    except (ValueError, AttributeError):
        return "none"


class ReleaseRouter:
    """Routes the ingress's requests between the champion and candidate deployments."""

    def __init__(self, champion: Any, candidate: Any | None, metrics: ReleaseMetrics | None = None,
                 send_mirrors: SendMirrors | None = None) -> None:
        self.champion = champion
        self.candidate = candidate
        self.config = ReleaseConfig()
        self.counts = ReleaseCounts()
        self.metrics: ReleaseMetrics = metrics or NoMetrics()
        self._send_mirrors = send_mirrors or (batch_call(candidate) if candidate is not None else None)
        self._queue: list[ForwardedRequest] = []
        self._timer: asyncio.TimerHandle | None = None
        self._queued_log: LogLine | None = None
        self._shadows: set[asyncio.Task[None]] = set()

    def reconfigure(self, user_config: Mapping[str, Any] | None) -> None:
        config = split_ingress_config(user_config)[0]
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

    def _note_batch(self, answers: list[ForwardedResponse | None], start: float) -> None:
        """A shadow batch's answers: counted one by one, one metrics call per (version, status)."""
        latency_s = time.perf_counter() - start
        groups: dict[tuple[str, int], int] = {}
        for answer in answers:
            status = answer.status if answer is not None else 503
            bucket_ = self.counts.failed if status >= 500 else self.counts.answered
            bucket_[ROLE_SHADOW] = bucket_.get(ROLE_SHADOW, 0) + 1
            key = (_version_of(answer) if answer is not None else "none", status)
            groups[key] = groups.get(key, 0) + 1
        for (version, status), count in groups.items():
            self.metrics.answered(ROLE_SHADOW, version, status, latency_s, count)

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
            self._mirror(replace(request, champion_lines=answer.log_lines), log)
        return answer, tries

    def _mirror(self, request: ForwardedRequest, log: LogLine) -> None:
        """Queue `request` for the candidate (the champion's request id, so both answers join the same labels)."""
        config = self.config
        if not mirrors(config, request.request_id):
            self.counts.shadow_sampled_out += 1
            return
        if self.counts.shadow_in_flight >= config.shadow_max_in_flight:
            self.counts.shadow_dropped += 1
            self.metrics.shadow_dropped()
            return
        self.counts.shadow_in_flight += 1
        self._queue.append(request)
        self._queued_log = log
        if len(self._queue) >= config.shadow_batch_max_size:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(config.shadow_batch_wait_s, self._flush)

    def _flush(self) -> None:
        """One call to the candidate with every queued mirror."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._queue = self._queue, []
        log = self._queued_log
        if not batch or log is None:
            return
        self.counts.shadow_batches += 1
        task = asyncio.get_running_loop().create_task(self._shadow(batch, log))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def drain(self) -> None:
        """Send the queued mirrors now and wait for every batch in flight (tests; a replica's shutdown)."""
        self._flush()
        while self._shadows:
            await asyncio.gather(*list(self._shadows), return_exceptions=True)

    async def close(self, timeout_s: float = SHADOW_DRAIN_TIMEOUT_S) -> bool:
        """Shutdown: the queued mirrors go now and are waited for up to `timeout_s`; False if some were not.

        Bounded because the replica has a graceful-shutdown budget: a candidate that hangs must not
        keep the ingress from closing its prediction log, which holds the champion's answers.
        """
        try:
            await asyncio.wait_for(self.drain(), timeout_s)
            return True
        except TimeoutError:
            logger.warning("shadow: %d mirrors still in flight after %.0fs of shutdown; their answers are not logged",
                           self.counts.shadow_in_flight, timeout_s)
            return False

    async def _shadow(self, batch: list[ForwardedRequest], log: LogLine) -> None:
        start = time.perf_counter()
        answers: list[ForwardedResponse | None] = [None] * len(batch)
        try:
            assert self._send_mirrors is not None  # a shadow needs a candidate (reconfigure checks)
            got = await self._send_mirrors(batch)
            if len(got) != len(batch):
                raise ValueError(f"the candidate answered {len(got)} of {len(batch)} mirrors")
            answers = list(got)
        except Exception as exc:  # never the client's problem: counted against the candidate
            logger.warning("shadow: candidate failed on a batch of %d (%s)", len(batch), type(exc).__name__)
        finally:
            self.counts.shadow_in_flight -= len(batch)
        # Every answered mirror's lines (marked `shadow = true` by the candidate) in one spool write:
        # frames are self-delimiting, so a batch's frames joined are a valid line.
        lines = [line for answer in answers if answer is not None and answer.status == 200
                 for line in answer.log_lines]
        if lines:
            try:
                log(b"".join(line for line, _ in lines), sum(rows for _, rows in lines))
            except Exception:
                logger.exception("shadow: the prediction log refused a batch of %d mirrors' lines", len(lines))
        self._note_batch(answers, start)


def without_log_lines(response: ForwardedResponse) -> ForwardedResponse:
    return replace(response, log_lines=[])


class RayServeReleaseMetrics:
    """Per-version answers and latency of a release, as Ray metrics (created in the ingress replica)."""

    def __init__(self) -> None:
        from ray.serve import metrics as m

        from mlops_assets.serving.metrics import LATENCY_BOUNDARIES_MS, PREFIX, buffered_counter

        self._answers = buffered_counter(PREFIX + "release_answers_total", "Release answers by role, version and status.",
                                         ("role", "version", "status"))
        self._latency = m.Histogram(PREFIX + "release_latency_ms", "Latency of each role's answer in the ingress, ms.",
                                    boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("role",))
        self._dropped = m.Counter(PREFIX + "release_shadow_dropped_total", "Mirrors dropped: too many in flight.")

    def answered(self, role: str, version: str, status: int, latency_s: float, count: int = 1) -> None:
        """`count` answers of one latency (a shadow batch: its call's), counted each and timed once."""
        self._answers.inc(count, role, version, str(status))
        self._latency.observe(latency_s * 1000.0, {"role": role})

    def shadow_dropped(self) -> None:
        self._dropped.inc(1)

    def flush(self) -> None:
        self._answers.flush()
