"""Helpers of the tests that run ``python infer.py`` as a user does (a subprocess of this checkout)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def infer(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    e = dict(os.environ, HF_HUB_OFFLINE="1", XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME", "/tmp/astsep-test-cache"))
    e.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=str(ROOT))


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]
