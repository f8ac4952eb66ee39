"""Portability: the package imports on platforms without POSIX-only modules (Windows has no fcntl)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_astsep_modules_import_without_fcntl():
    code = ("import sys; sys.modules['fcntl'] = None\n"  # `import fcntl` now raises ImportError, as on Windows
            "import astsep, astsep.pipeline, astsep.delivery, astsep.frontends.infer\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-1500:]
