"""A dependency that is installed but cannot be loaded is one line naming it, exit code 3 (issue 19).

The broken package is real: the installed torchaudio copied beside the tests, its ``libtorchaudio``
shared library replaced by bytes the dynamic loader refuses and its metadata saying 2.11.1, the way
torchaudio 2.11.1 failed beside torch 2.11.0. It shadows the good one through PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from astsep.deps import DependencyError, check, diagnose

ROOT = Path(__file__).resolve().parents[1]
RECORDING = ROOT.parent / "shared" / "data" / "examples" / "seed_recording_16k.wav"


@pytest.fixture(scope="module")
def broken_torchaudio(tmp_path_factory) -> Path:
    import torchaudio

    site = tmp_path_factory.mktemp("broken_site")
    pkg = Path(torchaudio.__file__).parent
    shutil.copytree(pkg, site / "torchaudio", ignore=shutil.ignore_patterns("__pycache__"))
    libs = list((site / "torchaudio" / "lib").glob("libtorchaudio*.so"))
    assert libs, "torchaudio ships no libtorchaudio*.so to break"
    for lib in libs:
        lib.write_bytes(b"\x7fELF not a loadable library\n")
    dist = metadata.distribution("torchaudio")
    info = site / "torchaudio-2.11.1.dist-info"
    info.mkdir()
    text = (Path(dist._path) / "METADATA").read_text()  # noqa: SLF001 - the installed dist-info folder
    (info / "METADATA").write_text(text.replace(f"Version: {dist.version}", "Version: 2.11.1"))
    return site


def _run(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _assert_one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("astsep: error: torchaudio 2.11.1 cannot be loaded beside torch "), line
    assert 'pip install -e ".[dev]" -c constraints.txt' in line
    assert "internal error" not in line and "Traceback" not in proc.stderr
    return line


def test_infer_names_the_broken_torchaudio_in_one_line_and_writes_nothing(broken_torchaudio, tmp_path):
    out = tmp_path / "out"
    proc = _run([str(ROOT / "infer.py"), "-i", str(RECORDING), "-o", str(out)], broken_torchaudio, tmp_path)
    _assert_one_line(proc)
    assert not out.exists() or not any(out.iterdir())


def test_train_and_evaluate_name_the_broken_torchaudio_in_one_line(broken_torchaudio, tmp_path):
    _assert_one_line(_run([str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "refiner_tiny.yaml")],
                          broken_torchaudio, tmp_path))
    _assert_one_line(_run(["-m", "astsep.evaluate", "--help"], broken_torchaudio, tmp_path))


def test_infer_help_answers_without_loading_the_broken_package(broken_torchaudio, tmp_path):
    proc = _run([str(ROOT / "infer.py"), "-h"], broken_torchaudio, tmp_path)
    assert proc.returncode == 0 and "--input" in proc.stdout


def test_a_healthy_install_passes_the_check_and_an_unrelated_error_is_not_blamed_on_it():
    check()
    assert diagnose(ValueError("bad value")) is None
    assert diagnose(OSError("disk full")) is None  # every package loads, so the OSError is not theirs


def test_a_package_that_is_not_installed_says_so():
    with pytest.raises(DependencyError, match=r"astsep_no_such_package \(not installed\) cannot be loaded"):
        check(("astsep_no_such_package",))
