"""What the tests of an outside service (PostgreSQL, an S3 server) do when it cannot be had here."""

from __future__ import annotations

import os

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str, why_required_on_ci: str) -> None:
    """Skip on a developer's machine; under CI, fail: CI provides the service, so its absence is ours."""
    if on_ci():
        pytest.fail(f"{reason} (CI=true: {why_required_on_ci})")
    pytest.skip(reason)
