"""tests/conftest.py: without ../shared/data the tests that need it fail, with one clear line (CI goes
red, never green by skipping them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import ROOT


def test_missing_shared_data_fails_the_tests_that_need_it_and_says_where_it_looked(tmp_path):
    tests = tmp_path / "checkout" / "tests"
    tests.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", tests / "conftest.py")
    (tests / "test_uses_audio.py").write_text("def test_needs_audio(shared):\n    assert shared.is_dir()\n\n"
                                              "def test_needs_nothing():\n    assert True\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "1 passed, 1 error" in proc.stdout, proc.stdout[-2000:]
    assert f"shared test data not found at {tmp_path / 'shared' / 'data'}" in proc.stdout
