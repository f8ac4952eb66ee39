"""Write ``benchmarks/quality.md``: SDRi / SI-SDRi of mixture, baseline, refined and oracle IRM.

    python benchmarks/make_quality_report.py [--refiner CKPT] [--config configs/refiner_tiny.yaml]

Without ``--refiner`` it first trains the given config (the tiny CPU config by default) on the
shared ESC-50 clips. It then scores 0 dB mixtures of 2 s made only from clips the refiner never
saw in training (held out), and, for contrast, new mixtures of the training clips.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from astsep.data.audiocaps import ClipReader, mix_at_snr  # noqa: E402
from astsep.evaluate import EvalItem, evaluate, load_refiner, markdown  # noqa: E402
from astsep.testing import SHARED_DATA  # noqa: E402


def make_items(clips, n: int, seconds: float, seed: int) -> list[EvalItem]:
    rng = np.random.default_rng(seed)
    reader = ClipReader()
    items = []
    while len(items) < n:
        i, j = rng.choice(len(clips), 2, replace=False)
        s = reader.read(clips[i], float(rng.uniform(0, clips[i].seconds - seconds)), seconds)
        v = reader.read(clips[j], float(rng.uniform(0, clips[j].seconds - seconds)), seconds)
        if s.pow(2).mean() < 1e-7 or v.pow(2).mean() < 1e-7:
            continue
        x, s = mix_at_snr(s, v, 0.0, 0.0)
        items.append(EvalItem(f"{Path(clips[i].path).stem}+{Path(clips[j].path).stem}", x, s, clips[i].caption))
    return items


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "configs" / "refiner_tiny.yaml"))
    p.add_argument("--refiner", default=None)
    p.add_argument("--mixtures", type=int, default=40)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "quality.md"))
    args, extra = p.parse_known_args()
    manifest = SHARED_DATA / "esc50_one_per_class" / "manifest.csv"
    with tempfile.TemporaryDirectory() as tmp:
        cli = train.cli(["--config", args.config, f"--data.train_csv={manifest}", "--trainer.logger=false",
                         "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false",
                         f"--trainer.default_root_dir={tmp}", *extra], run=False)
        dm = cli.datamodule
        dm.setup("fit")
        t0 = time.perf_counter()
        if args.refiner:
            module, ckpt = load_refiner(args.refiner), args.refiner
        else:
            cli.trainer.fit(cli.model, dm)
            path = Path(tmp) / "refiner.ckpt"
            cli.trainer.save_checkpoint(path)
            module, ckpt = load_refiner(path), f"{Path(args.config).name}, {cli.trainer.global_step} steps"
        train_s = time.perf_counter() - t0
    train_paths = {c.path for c in dm.train_clips}
    from astsep.data.audiocaps import read_clip_csv

    held_out = [c for c in read_clip_csv(manifest) if c.path not in train_paths]
    sections = []
    for title, clips, seed in (("Held-out clips (never seen in training)", held_out, 11),
                               ("Training clips, new mixtures", dm.train_clips, 12)):
        res = evaluate(make_items(clips, args.mixtures, args.seconds, seed), module=module, progress=False)
        sections.append(markdown(res, title).replace("# ", "## ", 1))
    head = (f"# Refiner quality\n\nRefiner: {ckpt} (guide `{module.hparams.guide_model}`, "
            f"query `{module.hparams.query_source}`); training took {train_s:.0f} s on "
            f"{torch.get_num_threads()} CPU threads. Mixtures: {args.mixtures} per table, {args.seconds:g} s, "
            "0 dB, from the shared ESC-50 clips (`../shared/data/esc50_one_per_class`). Baseline: the separator's "
            "source with the best SI-SDR (oracle selection). Oracle IRM: ideal ratio mask on the same STFT.\n"
            "Written by `python benchmarks/make_quality_report.py`.\n\n")
    Path(args.out).write_text(head + "\n".join(sections))
    sys.stdout.write(Path(args.out).read_text())


if __name__ == "__main__":
    main()
