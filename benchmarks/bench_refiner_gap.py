"""How much a trained refiner gains where it was trained, on new crops of those sounds, and on held-out sounds.

    python benchmarks/bench_refiner_gap.py --refiner CKPT [--config configs/refiner_dev.yaml] [-n 96] [--val 32] [--test 32]

A diagnosis for ``configs/refiner_dev.yaml``-style runs (issue 20): it rebuilds the run's data module
from the config and scores, through the checkpoint's Lightning module (the training path, not
``infer.py``'s), the baseline and the refined pass-1 source (SI-SDRi, dB) on

- the first ``-n`` examples of the *training pool* (examples the refiner was trained on, each seen
  once per epoch),
- the validation mixtures (training sounds, other crops, pairs and degradations),
- the held-out test mixtures (sounds no training step saw),

split by what the example's degradation is (exact, random grid, blur below / from 1 patch, with grid
noise below / from 15 dB). A refiner that gains much more on the first set than on the others is
held back by generalisation; one that gains little even there, by what it can learn from its inputs
at this budget. ``python -m astsep.evaluate --heldout`` remains the held-out score of record.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from astsep.data import ClassSplitDataModule  # noqa: E402
from astsep.lit import RefinerModule  # noqa: E402
from astsep.metrics import best_source, separation_metrics  # noqa: E402
from astsep.oracle import parse_guide_spec  # noqa: E402


def kind(spec: str) -> str:
    """A coarse name for an ``oracle:...`` degradation spec."""
    d = parse_guide_spec(spec)
    if d.random:
        return "random grid"
    if d.blur == 0 and d.noise_db is None and d.gamma == 1 and d.floor == 0:
        return "exact"
    name = "blur < 1" if d.blur < 1 else "blur >= 1"
    if d.noise_db is not None:
        name += ", noise < 15 dB" if d.noise_db < 15 else ", noise >= 15 dB"
    return name


@torch.no_grad()
def score(module: RefinerModule, dataset, n: int, batch: int = 4) -> list[tuple[str, float, float]]:
    rows = []
    for start in range(0, min(n, len(dataset)), batch):
        items = [dataset[i] for i in range(start, min(n, len(dataset), start + batch))]
        b = default_collate(items)
        out = module.common_step(b, 0)
        base, _ = best_source(out.sources, out.kept, b["mixture"], b["target"])
        sb = separation_metrics(base, b["mixture"], b["target"])["si_sdri"].tolist()
        sr = separation_metrics(out.estimate, b["mixture"], b["target"])["si_sdri"].tolist()
        rows += [(kind(it["degradation"]), x, y) for it, x, y in zip(items, sb, sr)]
    return rows


def report(name: str, rows: list[tuple[str, float, float]]) -> None:
    def line(label: str, sel: list) -> str:
        b = sum(r[1] for r in sel) / len(sel)
        r = sum(r[2] for r in sel) / len(sel)
        better = sum(r_[2] > r_[1] for r_ in sel) / len(sel)
        return f"| {label} | {len(sel)} | {b:.2f} | {r:.2f} | {r - b:+.2f} | {better:.0%} |"

    print(f"\n{name}\n\n| degradation | n | baseline | refined | gain | refined better |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    print(line("**all**", rows))
    for k in sorted({r[0] for r in rows}):
        print(line(k, [r for r in rows if r[0] == k]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--refiner", required=True, metavar="CKPT")
    p.add_argument("--config", default=str(ROOT / "configs" / "refiner_dev.yaml"))
    p.add_argument("--shared-dir", default=None, help="default: the config's data.shared_dir, from the repository root")
    p.add_argument("-n", "--train", type=int, default=96, help="training-pool examples")
    p.add_argument("--val", type=int, default=32)
    p.add_argument("--test", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    for what, path in (("checkpoint", args.refiner), ("config", args.config)):
        if not Path(path).is_file():
            print(f"bench_refiner_gap: error: {what} not found: {path}", file=sys.stderr)
            return 2
    cfg = yaml.safe_load(Path(args.config).read_text()).get("data") or {}
    if cfg.get("class_path", "").rsplit(".", 1)[-1] != "ClassSplitDataModule":
        print(f"bench_refiner_gap: error: {args.config} does not train on ClassSplitDataModule", file=sys.stderr)
        return 2
    init = dict(cfg.get("init_args") or {})
    shared = Path(args.shared_dir or init.get("shared_dir", "../shared/data"))
    init["shared_dir"] = str(shared if shared.is_absolute() or args.shared_dir else (ROOT / shared).resolve())
    dm = ClassSplitDataModule(**init)
    module = RefinerModule.load_from_checkpoint(args.refiner, map_location="cpu").eval()
    t0 = time.perf_counter()
    print(f"# Refiner gain where it was trained and beyond\n\n`{Path(args.refiner).name}`, data from {args.config}")
    report(f"## Training pool (the first {args.train} examples, trained on)", score(module, dm.train_dataset(), args.train))
    report("## Validation (training sounds, new crops)", score(module, dm.val_dataset(), args.val))
    report("## Held-out sounds (test mixtures)", score(module, dm.test_dataset(), args.test))
    print(f"\n({time.perf_counter() - t0:.0f} s on {args.threads} CPU thread{'s' if args.threads != 1 else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
