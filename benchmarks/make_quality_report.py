"""Write ``benchmarks/quality.md``: the refiner against the baseline and the IRM on held-out sounds.

    python benchmarks/make_quality_report.py --refiner CKPT [-n 48] [--note "trained by ..."]

It runs exactly ``python -m astsep.evaluate --heldout --guide sweep --refiner CKPT`` (the held-out
classes of the class split, six oracle-guide degradations, the refiner loaded and run as
``infer.py --refiner`` does), and writes its report under a short header naming the checkpoint, the
command and how long the evaluation took. Train the checkpoint first:
``python train.py fit --config configs/refiner_dev.yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: no spinning threads on shared cores

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from astsep import evaluate  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--refiner", required=True, metavar="CKPT")
    p.add_argument("-n", "--num-mixtures", type=int, default=48)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--note", default="", help="a line about how the checkpoint was trained (config, steps, time)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "quality.md"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    argv = ["--heldout", "-n", str(args.num_mixtures), "--seconds", f"{args.seconds:g}", "--guide", "sweep",
            "--refiner", args.refiner]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        code = evaluate.main([*argv, "--out", tmp])
        took = time.perf_counter() - t0
        if code:
            return code
        report = (Path(tmp) / "report.md").read_text()
    threads = torch.get_num_threads()
    shown = " ".join(a if a != args.refiner else Path(args.refiner).name for a in argv)
    head = ("# Refiner quality on held-out sounds\n\n"
            f"Written by `python benchmarks/make_quality_report.py -n {args.num_mixtures} --seconds {args.seconds:g} "
            f"--refiner {Path(args.refiner).name}`, which runs\n"
            f"`python -m astsep.evaluate {shown} --out DIR` ({took / 60:.1f} min on {threads} "
            f"CPU thread{'s' if threads != 1 else ''}, shared machine).\n" + (f"{args.note}\n" if args.note else "") + "\n")
    body = report.replace("# Separation quality", "## Held-out sounds, six guide conditions", 1)
    Path(args.out).write_text(head + body)
    sys.stdout.write(head + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
