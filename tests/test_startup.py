"""Start-up: ``infer.py`` answers ``-h``, a bad option and a missing input without importing torch
or transformers (seconds of imports, more on a loaded machine), and its logging set-up imports
neither."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from infer_runner import infer_imports


def run_infer(*args: str) -> tuple[dict, str]:
    res, proc = infer_imports(list(args), timeout=120)
    return res, proc.stderr


@pytest.mark.parametrize("case", ["help", "bad_option", "missing_input", "missing_inputs_with_logging"])
def test_help_bad_options_and_missing_inputs_answer_without_torch_or_transformers(tmp_path, case):
    out = str(tmp_path / "out")
    args = {"help": ["-h"],
            "bad_option": ["-i", "x.wav", "-o", out, "--no-such-option"],
            "missing_input": ["-i", str(tmp_path / "nope.wav"), "-o", out],
            "missing_inputs_with_logging": ["-i", str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "-o", out, "-v"],
            }[case]
    res, err = run_infer(*args)
    assert res["heavy"] == [], (res, err)
    if case == "help":
        assert res["code"] == 0
    elif case == "bad_option":
        assert res["code"] == 2 and "unknown option --no-such-option" in err
    else:
        assert res["code"] == 2 and "astsep: error: input not found" in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_quiet_logging_set_up_leaves_transformers_unimported_but_quiet():
    code = ("import argparse, os, sys\n"
            "from astsep.frontends.infer import _setup_logging\n"
            "_setup_logging(argparse.Namespace(quiet=False, verbose=0))\n"
            "assert 'transformers' not in sys.modules\n"
            "import transformers\n"
            "print(transformers.logging.get_verbosity() == transformers.logging.ERROR)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"})
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-1500:]
