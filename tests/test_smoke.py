"""scripts/smoke.sh (the operators' curl check) passes against the real test server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import RunningServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_smoke_script_passes(family_server: RunningServer) -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "smoke.sh"), family_server.url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke test passed" in proc.stdout


def test_smoke_script_fails_when_nothing_listens() -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "smoke.sh"), "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "FAIL" in proc.stderr
