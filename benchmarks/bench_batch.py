#!/usr/bin/env python
"""Benchmark the batch mode (``batch.py``): files per second with 1, 2, … processes.

For each process count, one fresh ``python batch.py`` command separates the same list of shared
ESC-50 clips (5 s each) into a new output folder, with a full-size random AST saved as a model
folder (``--model tiny`` for a quick check). Printed per count: the whole command's wall time
(interpreter, imports, process launch, one model load per process, separation, writing) and the
time ``batch_report.json`` reports (from the Trainer's start to the last folder written), both as
files per second, and the speed-up over one process.

    python benchmarks/bench_batch.py [--files 12] [--processes 1 2] [--fast] [--model full|tiny]
                                     [--accelerator cpu] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from astsep.testing import full_ast, tiny_ast  # noqa: E402
from shared_data import SHARED_DATA  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=12)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--fast", action="store_true", help="pass --fast (int8 on CPUs, bfloat16 on GPUs)")
    ap.add_argument("--model", choices=["full", "tiny"], default="full")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--repeat", type=int, default=1, help="commands per process count (median)")
    args = ap.parse_args()

    clips = sorted((SHARED_DATA / "esc50_one_per_class").glob("*.flac"))[: args.files]
    if len(clips) < args.files:
        raise SystemExit(f"only {len(clips)} shared clips")
    print(f"{len(clips)} ESC-50 clips (5 s each), {args.model} random AST, {'--fast' if args.fast else 'fp32'}, "
          f"accelerator {args.accelerator}, {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory(prefix="astsep-bench-batch-") as tmp:
        model_dir = Path(tmp) / "model"
        (full_ast() if args.model == "full" else tiny_ast()).save_pretrained(model_dir)
        listing = Path(tmp) / "files.txt"
        listing.write_text("".join(f"{c}\n" for c in clips))
        base = None
        for n in args.processes:
            walls, inside = [], []
            for r in range(args.repeat):
                out = Path(tmp) / f"out_{n}_{r}"
                cmd = [sys.executable, str(ROOT / "batch.py"), "--list", str(listing), "-o", str(out), "-m",
                       str(model_dir), "--accelerator", args.accelerator, "--devices", str(n), "-q"]
                if n > 1:
                    cmd += ["--strategy", "ddp"]
                if args.fast:
                    cmd.append("--fast")
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
                walls.append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise SystemExit(f"batch.py failed: {proc.stderr.strip()[-800:]}")
                report = json.loads((out / "batch_report.json").read_text())
                if len(report["done"]) != len(clips):
                    raise SystemExit(f"batch.py separated {len(report['done'])} of {len(clips)} files")
                inside.append(report["seconds"])
            wall, run = statistics.median(walls), statistics.median(inside)
            base = base or (wall, run)
            print(f"{n} process(es): whole command {wall:.2f} s = {len(clips) / wall:.3f} files/s "
                  f"({base[0] / wall:.2f}x one process); predict loop (report) {run:.2f} s = "
                  f"{len(clips) / run:.3f} files/s ({base[1] / run:.2f}x)")


if __name__ == "__main__":
    main()
