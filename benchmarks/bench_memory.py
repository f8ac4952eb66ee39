"""Peak memory of ``infer.py`` on a 1-minute and a 1-hour recording (6 channels, 48 kHz, 16-bit).

Builds a tiny random AST folder, generates the inputs block by block (noise bursts, tones, clicks
and silence, so the separator has something to do), then runs each case in its own child process
and reads that child's peak RSS with ``os.wait4`` (``ru_maxrss``). Also measures decoding alone:
``astsep.audio.load_audio`` (block-wise decode + downmix + streaming resample) against reading the
whole file at once with ``soundfile.read`` as the decoder did before.

    python benchmarks/bench_memory.py                 # 1 min and 1 h (needs ~2.1 GB of disk, ~10 min)
    python benchmarks/bench_memory.py --minutes 1 10  # other lengths
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_input(path: Path, minutes: float, sr: int = 48000, channels: int = 6) -> None:
    rng = np.random.default_rng(0)
    block = 10 * sr
    total = int(minutes * 60 * sr)
    with sf.SoundFile(path, "w", sr, channels, subtype="PCM_16", format="WAV") as f:
        done = 0
        while done < total:
            n = min(block, total - done)
            t = (done + np.arange(n)) / sr
            kind = (done // block) % 4
            if kind == 0:
                mono = 0.3 * np.sin(2 * np.pi * (600 + 300 * np.sin(2 * np.pi * 0.5 * t)) * t)  # siren-like
            elif kind == 1:
                mono = 0.1 * rng.standard_normal(n) * (np.sin(2 * np.pi * 2 * t) > 0)  # noise bursts
            elif kind == 2:
                mono = np.zeros(n)
                mono[:: sr // 3] = 0.9  # clicks
            else:
                mono = 0.001 * rng.standard_normal(n)  # near silence
            gains = 0.4 + 0.1 * np.arange(channels)
            f.write((mono[:, None] * gains[None, :]).astype(np.float32))
            done += n


def run_child(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run ``cmd``; return (exit code, peak RSS in MiB, wall seconds, stderr tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024.0, time.perf_counter() - t0, err[-500:]


DECODE_NEW = "import sys; from astsep.audio import load_audio; x, i = load_audio(sys.argv[1]); print(x.numel())"
DECODE_OLD = ("import sys, soundfile as sf, torch, torchaudio.functional as AF; d, sr = sf.read(sys.argv[1], "
              "dtype='float32', always_2d=True); x = AF.resample(torch.from_numpy(d.mean(axis=1)), sr, 16000)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 60])
    ap.add_argument("--workdir", default=None, help="where the inputs go (default: a temporary folder)")
    ap.add_argument("--skip-old-decoder", action="store_true", help="do not measure the whole-file decoder")
    args = ap.parse_args()

    from astsep.testing import tiny_ast

    work = Path(args.workdir or tempfile.mkdtemp(prefix="astsep-bench-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny_ast"
    if not (model / "config.json").is_file():
        tiny_ast(seed=0).save_pretrained(model)
    print(f"workdir {work}; tiny random AST; inputs: 6 channels, 48 kHz, PCM_16 WAV")
    print(f"{'input':>8} | {'file MB':>8} | {'stage':<28} | {'peak RSS MiB':>12} | {'seconds':>8} | rc")
    for minutes in args.minutes:
        path = work / f"in_{minutes:g}min.wav"
        if not path.is_file():
            make_input(path, minutes)
        size = path.stat().st_size / 1e6
        label = f"{minutes:g} min"
        stages = [("decode: load_audio (blocks)", [sys.executable, "-c", DECODE_NEW, str(path)])]
        if not args.skip_old_decoder:
            stages.append(("decode: whole file (before)", [sys.executable, "-c", DECODE_OLD, str(path)]))
        stages.append(("infer.py end to end", [sys.executable, str(ROOT / "infer.py"), "-i", str(path), "-o",
                                               str(work / f"out_{minutes:g}min"), "-m", str(model), "-q"]))
        for name, cmd in stages:
            rc, peak, secs, err = run_child(cmd)
            print(f"{label:>8} | {size:8.0f} | {name:<28} | {peak:12.0f} | {secs:8.1f} | {rc}"
                  + (f"  {err.strip().splitlines()[-1]}" if rc and err.strip() else ""), flush=True)


if __name__ == "__main__":
    main()
