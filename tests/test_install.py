"""The install the README describes is the one CI runs, and the tests run on the locked versions (issue 19)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt line {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _readme_setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_the_readme_set_up_is_two_commands_and_ci_runs_both_through_the_lock():
    install, tests = _readme_setup_commands()
    assert install == 'pip install -e ".[dev]" -c constraints.txt'
    assert tests == "python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[dev]" -c constraints.txt' in ci
    assert "PIP_NO_CACHE_DIR=1" in ci and "rm -rf .ci-venv\n" in ci  # fresh venv, no cached wheel
    assert ci.index("python .ci/smoke.py") < ci.index(tests)  # the smoke test fails first, in seconds


def test_the_lock_pins_the_tested_torch_pair():
    pins = _pins()
    assert pins["torch"] == "2.11.0"
    assert pins["torchaudio"] == "2.11.0"  # 2.11.1 does not load beside torch 2.11.0 (pyproject.toml)


def test_the_tests_run_on_the_versions_the_lock_pins():
    """CI installs through constraints.txt, so a mismatch means the lock is not what was tested."""
    wrong = []
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        pinned = _pins().get(name)
        if pinned is not None and pinned != dist.version:
            wrong.append(f"{name} {dist.version} (lock: {pinned})")
    assert not wrong, "installed versions differ from constraints.txt: " + ", ".join(sorted(wrong)) + \
        '; install with pip install -e ".[dev]" -c constraints.txt, or refresh the lock: bash scripts/refresh-lock'
