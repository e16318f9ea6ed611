"""Alerts: one log line always, and a JSON POST to a webhook when one is configured.

`send_alert` never raises: an alert that cannot be delivered is logged and reported in the
result, because the thing that calls it (a failure sensor, the post-deployment watch) must
keep running. The POST has a bounded timeout, never goes through an HTTP proxy from the
environment, and the webhook URL (which often embeds a secret) is never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from mlops_assets import constants as c

logger = logging.getLogger("mlops_assets.alerts")



@dataclass(frozen=True)
class AlertResult:
    posted: bool  # the webhook answered 2xx
    attempted: bool  # a webhook was configured
    status_code: int | None = None
    error: str | None = None


def alert_payload(kind: str, summary: str, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The webhook body: `text` for chat webhooks (Slack, Mattermost), the rest for machines."""
    return {
        "text": f"[mlops_assets] {kind}: {summary}",
        "kind": kind,
        "summary": summary,
        "details": {k: v for k, v in (details or {}).items()},
        "sent_at": datetime.now(UTC).isoformat(),
    }


def send_alert(
    kind: str,
    summary: str,
    details: Mapping[str, Any] | None = None,
    *,
    webhook_url: str | None = None,
    timeout_s: float = c.ALERT_WEBHOOK_TIMEOUT_S,
    log: logging.Logger | Any | None = None,
) -> AlertResult:
    """Log the alert, then POST it to `webhook_url` (the settings' MLOPS_ALERT_WEBHOOK_URL) if given."""
    out = log or logger
    out.error(f"ALERT {kind}: {summary}")
    url = webhook_url or None
    if not url:
        return AlertResult(posted=False, attempted=False)
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_s), trust_env=False) as client:
            response = client.post(url, json=alert_payload(kind, summary, details))
    except Exception as exc:  # unreachable, timeout, bad URL: reported, never raised
        error = f"{type(exc).__name__}: {exc}"[:300]
        out.warning(f"alert webhook failed ({error}); the alert is in this log only")
        return AlertResult(posted=False, attempted=True, error=error)
    if not 200 <= response.status_code < 300:
        out.warning(f"alert webhook answered {response.status_code}; the alert is in this log only")
        return AlertResult(posted=False, attempted=True, status_code=response.status_code,
                           error=f"HTTP {response.status_code}")
    return AlertResult(posted=True, attempted=True, status_code=response.status_code)
