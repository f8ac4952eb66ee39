"""Training throughput: steps/s, peak memory, and the share of step time the frozen baseline takes.

    python benchmarks/bench_train.py [--config configs/refiner_tiny.yaml] [--steps 60] [extra CLI args]

Runs ``train.py fit`` (no logger, no checkpoints) for ``--steps`` optimiser steps after a few
warm-up steps, and prints one line per figure. Peak memory: RSS on CPU, ``max_memory_allocated``
on CUDA.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from astsep.testing import SHARED_DATA  # noqa: E402


class StepClock(Callback):
    """Wall time of training steps after ``warmup`` steps, and the baseline's part of it."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.b0, self.steps = warmup, None, 0.0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.t0 is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.t0, self.b0 = time.perf_counter(), module.baseline_seconds

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.t0 is not None:
            self.steps += 1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "configs" / "refiner_tiny.yaml"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    args, extra = p.parse_known_args()
    clock = StepClock(args.warmup)
    cli = train.cli(["--config", args.config, f"--data.train_csv={SHARED_DATA / 'esc50_one_per_class' / 'manifest.csv'}",
                     "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
                     "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
                     f"--trainer.max_steps={args.steps + args.warmup}", "--trainer.max_epochs=-1", *extra], run=False)
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - clock.t0
    base = cli.model.baseline_seconds - clock.b0
    dm = cli.datamodule
    print(f"config: {Path(args.config).name}, batch {dm.batch_size} x {dm.segment_seconds:g} s, "
          f"refiner {sum(p.numel() for p in cli.model.refiner.parameters()):,} parameters, "
          f"threads {torch.get_num_threads()}, device {cli.model.device}")
    print(f"steps/s: {clock.steps / wall:.2f} ({clock.steps} steps in {wall:.1f} s)")
    print(f"baseline share of step time: {100 * base / wall:.0f} % ({base / clock.steps * 1000:.0f} ms/step)")
    if torch.cuda.is_available():
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    else:
        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
