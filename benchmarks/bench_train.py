"""Training throughput: steps/s, peak memory, and the share of step time the frozen baseline takes,
with its results computed (cache cold) and read from the cache (cache warm).

    python benchmarks/bench_train.py [--config configs/refiner_dev.yaml] [--pool 64] [--epochs 2] [extra CLI args]

Runs ``train.py fit`` (no logger, no checkpoints, no validation) over a training pool of ``--pool``
examples for ``--epochs`` epochs and prints, per epoch, steps/s and the baseline's share of the wall
time. The first epoch computes every example's baseline (what every step cost before the cache:
the same share an uncached run pays at every step); later epochs read it from the cache
(:mod:`astsep.refiner.cache`). ``--no-cache`` turns the cache off for comparison. Peak memory: RSS
on CPU, ``max_memory_allocated`` on CUDA. Configs with an AudioCaps data module draw new random
mixtures every epoch, so their cache never hits.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: no spinning threads on shared cores

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402


class EpochClock(Callback):
    """Wall time and baseline seconds of the training steps of each epoch."""

    def __init__(self):
        self.epochs: list[dict] = []

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer, module):
        self._sync()
        self.epochs.append({"t0": time.perf_counter(), "b0": module.baseline_seconds, "steps": 0,
                            "h0": module.baseline_cache.hits, "m0": module.baseline_cache.misses})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.epochs[-1]["steps"] += 1

    def on_train_epoch_end(self, trainer, module):
        self._sync()
        e = self.epochs[-1]
        e["wall"] = time.perf_counter() - e["t0"]
        e["baseline"] = module.baseline_seconds - e["b0"]
        e["hits"], e["misses"] = module.baseline_cache.hits - e["h0"], module.baseline_cache.misses - e["m0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "refiner_dev.yaml"))
    p.add_argument("--pool", type=int, default=64, help="training examples per epoch (class-split configs)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--no-cache", action="store_true", help="compute the baseline at every step")
    p.add_argument("--threads", type=int, default=2)
    args, extra = p.parse_known_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as train.py
    clock = EpochClock()
    data = ([f"--data.train_examples={args.pool}"] if "refiner_dev" in args.config or "classsplit" in args.config
            else [f"--data.epoch_size={args.pool}"])
    cli = train.cli(["--config", args.config, "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                     "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
                     "--trainer.max_steps=-1", "--trainer.max_time=null", f"--trainer.max_epochs={args.epochs}",
                     f"--model.cache_train_baseline={'false' if args.no_cache else 'true'}", *data, *extra], run=False)
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    dm = cli.datamodule
    print(f"config: {Path(args.config).name}, batch {dm.batch_size} x {dm.segment_seconds:g} s, "
          f"refiner {sum(p.numel() for p in cli.model.refiner.parameters()):,} parameters, "
          f"threads {torch.get_num_threads()}, device {cli.model.device}, cache {'off' if args.no_cache else 'on'}")
    for i, e in enumerate(clock.epochs):
        state = "cache off" if args.no_cache else ("cache cold" if i == 0 else "cache warm")
        print(f"epoch {i + 1} ({state}, {e['hits']} hits / {e['misses']} misses): steps/s {e['steps'] / e['wall']:.2f} "
              f"({e['steps']} steps in {e['wall']:.1f} s); baseline share of step time "
              f"{100 * e['baseline'] / e['wall']:.1f} % ({e['baseline'] / max(1, e['steps']) * 1000:.0f} ms/step)")
    if torch.cuda.is_available():
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    else:
        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
