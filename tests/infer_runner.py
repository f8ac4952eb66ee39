"""Running ``python infer.py`` as a user does, for the tests of every room that needs it."""

from __future__ import annotations

import json
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


# ``python infer.py ARGS`` as a user runs it, in one process that then reports its exit code, the heavy
# modules it imported ("heavy") and every transformers module among them ("transformers")
RUN_INFER = """
import json, runpy, sys
sys.argv = ["infer.py"] + json.loads(sys.argv[1])
code = 0
try:
    runpy.run_path("infer.py", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules),
                  "transformers": sorted(m for m in sys.modules if m.split(".")[0] == "transformers")}))
"""


def infer_imports(args: list[str], timeout: float = 600) -> tuple[dict, subprocess.CompletedProcess]:
    """Run ``infer.py args`` (:data:`RUN_INFER`): ``({"code", "heavy", "transformers"}, the process)``."""
    proc = subprocess.run([sys.executable, "-c", RUN_INFER, json.dumps(list(args))], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc
