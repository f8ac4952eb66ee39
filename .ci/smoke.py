#!/usr/bin/env python
"""Seconds after install: does the installed set import and separate? Fails before the long test suite.

1. the core dependencies load (torch, torchaudio, transformers, soundfile, lightning);
2. every module of the astsep package imports;
3. ``infer.py`` separates the shared seed recording with a tiny random AST saved as a model folder, exits 0, writes events.json,
   and its files add back up to the input.

Run from the repository root: ``python .ci/smoke.py`` (``../shared/data`` beside the checkout).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no shard bar in the CI log
ROOT = Path(__file__).resolve().parents[1]
RECORDING = ROOT.parent / "shared" / "data" / "examples" / "seed_recording_16k.wav"


def fail(step: str, message: str) -> None:
    print(f"SMOKE FAILED at {step}: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from astsep.deps import DependencyError, check, installed_version

    try:
        check(("torch", "torchaudio", "transformers", "soundfile", "lightning"))
    except DependencyError as err:
        fail("dependencies", str(err))
    versions = ", ".join(f"{p} {installed_version(p)}" for p in ("torch", "torchaudio", "transformers", "lightning"))
    print(f"smoke: dependencies load ({versions}) [{time.perf_counter() - t0:.1f} s]")

    import astsep

    names = [m.name for m in pkgutil.walk_packages(astsep.__path__, "astsep.")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure to import is what this step reports
            fail("import", f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())}")
    print(f"smoke: {len(names)} modules of astsep import [{time.perf_counter() - t0:.1f} s]")

    if not RECORDING.is_file():
        fail("infer.py", f"{RECORDING} is missing: put the shared data beside the checkout (../shared/data)")
    with tempfile.TemporaryDirectory() as tmp:
        from astsep.testing import tiny_ast

        model_dir = Path(tmp) / "tiny_ast"  # config.json + model.safetensors: infer.py's real loading path
        tiny_ast(seed=0).save_pretrained(model_dir)
        out = Path(tmp) / "out"
        cmd = [sys.executable, str(ROOT / "infer.py"), "-i", str(RECORDING), "-o", str(out), "--model", str(model_dir),
               "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            fail("infer.py", f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        events = json.loads((out / "events.json").read_text())
        import numpy as np
        import soundfile as sf

        x, _ = sf.read(RECORDING, dtype="float32")
        x = x if x.ndim == 1 else x.mean(axis=1)
        wavs = sorted(out.glob("*.wav"))
        total = sum(sf.read(w, dtype="float32")[0] for w in wavs)
        err = float(np.sum((total - x) ** 2)) / max(float(np.sum(x**2)), 1e-20)
        snr = -10 * np.log10(max(err, 1e-30))
        if snr < 60:
            fail("infer.py", f"the {len(wavs)} written files add up to the input at only {snr:.1f} dB")
        print(f"smoke: infer.py --model <tiny AST folder> wrote {len(wavs)} files and {len(events['events'])} events; "
              f"they add up to the input ({snr:.0f} dB) [{time.perf_counter() - t0:.1f} s]")


if __name__ == "__main__":
    main()
