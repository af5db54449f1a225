"""Whether the tests run under CI, where a missing dependency fails instead of skipping.

Kept apart from helpers.py (which needs httpx and the openai SDK) because the image tests
also run in the lean pillow-simd environment (scripts/test-images-pillow-simd.sh)."""

from __future__ import annotations

import os

import pytest

IN_CI = bool(os.environ.get("CI"))


def skip_unless_ci(why: str) -> None:
    """Skip on a developer's machine; fail under CI, where `why` is a broken setup."""
    if IN_CI:
        pytest.fail(f"{why} (CI is set: CI must not skip this test)")
    pytest.skip(why)
