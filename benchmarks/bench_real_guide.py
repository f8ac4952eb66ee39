"""Separation and labels with a real, trained tagger as the guide, on class-split dev mixtures.

Every row goes through ``infer.py``'s pipeline (:class:`astsep.pipeline.Pipeline`) with the EfficientAT
mn04 guide (``--model``, default ``../shared/models/efficientat_mn04_as``), once per guidance
candidate (``--candidates``, each ``name=key:value,key:value`` over the ``tagger`` config section), beside
the exact oracle guide and the ideal ratio mask on the same mixtures.

Mixtures (:func:`astsep.data.classsplit.class_split_dev`): 0 dB, 5 s, both ESC-50 folders plus speech
and music; ``--part train`` (the sounds to tune on) or ``--part held_out`` (the sounds scored, never
tuned on). Per mixture and candidate, SI-SDRi in dB:

- ``pass 1 (target)``: the first pass's source against the target (the issue's figure; the target is
  either sound of the pair at random, so a guide that names the interferer first loses here);
- ``pass 1 (named)``: the first pass's source against the reference it is closer to (either sound of the
  pair: what a user gets as the first separated sound);
- ``best file``: the written file (a class's sources, or the residual) closest to the target.

Labels: for each sound of a mixture (target and interferer), the written file closest to it (a source or
the residual, as a user gets them): its event's label fits the sound (top-1) / a fitting class is in its top 3 (:func:`astsep.devset.fitting_labels`),
beside the tagger on the unseen mixture alone (a fitting class of that sound in the mixture's top 1 / 3).

    python benchmarks/bench_real_guide.py --part held_out -n 200            # the table in benchmarks/README.md
    python benchmarks/bench_real_guide.py --part train -n 64 --candidates loop classmap "s2=sharpness:2"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from astsep.config import AstsepConfig, apply_overrides, load_config, parse_value  # noqa: E402
from astsep.data.classsplit import class_split_dev  # noqa: E402
from astsep.devset import label_id  # noqa: E402
from astsep.evaluate import oracle_irm  # noqa: E402
from astsep.guide_loader import load_guide  # noqa: E402
from astsep.metrics import si_sdri  # noqa: E402
from astsep.oracle import OracleGuide  # noqa: E402
from astsep.pipeline import Pipeline  # noqa: E402

DEFAULT_MODEL = str(ROOT.parent / "shared" / "models" / "efficientat_mn04_as")
DEFAULT_CANDIDATES = ("loop", "classmap")


def parse_candidate(text: str) -> tuple[str, dict]:
    """``"name=key:value,key:value"`` (or a bare method name, ``loop`` / ``classmap``) → (name, overrides)."""
    name, sep, rest = text.partition("=")
    if not sep:
        return name, {"tagger.method": name}
    over = {}
    for part in filter(None, rest.split(",")):
        k, _, v = part.partition(":")
        key = f"tagger.{k.strip()}"
        over[key] = parse_value(key, v.strip())  # typed by the field, as infer.py's --tagger.key options
    return name, over


def db(est: torch.Tensor, mix: torch.Tensor, ref: torch.Tensor) -> float:
    return float(si_sdri(est.view(1, -1), mix.view(1, -1), ref.view(1, -1))[0])


def fits(ids: list[int], labels: list[str], fitting: tuple[str, ...]) -> bool:
    return any(i >= 0 and labels[i] in fitting for i in ids)


def score_run(pipe: Pipeline, m) -> dict:
    """One mixture through ``pipe``: the SI-SDRi figures and the label checks of the module docstring."""
    res = pipe.run(m.mixture, m.name, keep_traces=True)
    item = res.traces[0][2]
    srcs, traces = item["sources"].float(), item["traces"]
    x, refs = m.mixture, (m.target, m.interferer)
    kept = [bool(tr["kept"]) for tr in traces]
    pass1 = srcs[0] if kept and kept[0] else torch.zeros_like(x)
    files = list(res.sources.values())
    row = {"name": m.name, "pass1_target": db(pass1, x, m.target), "pass1_named": max(db(pass1, x, r) for r in refs),
           "best_file": max(db(f, x, m.target) for f in files), "kept": sum(kept),
           "pass1_whole": bool(kept and kept[0] and float(traces[0]["eratio"]) > 0.97),
           "labels": [pipe.guide.labels[int(tr["class_id"])] for tr, k in zip(traces, kept) if k]}
    labels = pipe.guide.labels
    by_file = {}
    for e in res.events:  # a file's label and top classes: its first event's (a residual's: its class)
        by_file.setdefault(e["file"], [t["class_id"] for t in e.get("top5", [])] or [int(e.get("class_id", -1))])
    names = [tr.filename for tr in res.tracks]
    for side, ref, fitting in (("target", m.target, m.target_fitting), ("interferer", m.interferer, m.interferer_fitting)):
        _, k = max((db(f, x, ref), k) for k, f in enumerate(files))
        top = by_file.get(names[k], [-1])
        row[f"{side}_top1"] = fits(top[:1], labels, fitting)
        row[f"{side}_top3"] = fits(top[:3], labels, fitting)
        retag = pipe.guide.classify(files[k].view(1, -1))[0].topk(3).indices.tolist()
        row[f"{side}_retag_top3"] = fits(retag, labels, fitting)
    return row


def ceiling(guide, m) -> dict:
    """What limits the loop on one mixture (SI-SDRi against the closer reference, the guide's own mask, no
    separator): the components given by their true target share (> 1/2: the best any split of these NMF
    components can do) beside the embedding clustering's split."""
    from astsep.features import apply_mask, stft

    x = m.mixture.view(1, -1)
    n = x.shape[-1]
    X, P, C, _ = guide.decompose(x, int(guide.tcfg.seed))
    _, emb = guide.tag_components(X, C, n)
    mask, _, _, _ = guide.cluster(X, C, P, emb, n, one_sound=2.0)  # never "one sound": the split itself
    S = stft(m.target.view(1, -1), guide.stft_cfg).abs().pow(2)
    Nz = stft(m.interferer.view(1, -1), guide.stft_cfg).abs().pow(2)
    own = S / (S + Nz).clamp_min(1e-20)
    energy = (C * P.unsqueeze(1)).sum(dim=(2, 3)).clamp_min(1e-20)
    share = (C * (own * P).unsqueeze(1)).sum(dim=(2, 3)) / energy  # (1, K) true target share
    best = torch.einsum("bk,bkft->bft", (share > 0.5).float(), C)

    def named(M):
        est = apply_mask(X, M, guide.stft_cfg, n)[0]
        return max(db(est, m.mixture, m.target), db(est, m.mixture, m.interferer))

    return {"oracle_components": named(best), "cluster": named(mask)}


def mixture_labels(guide, m) -> dict:
    top = guide.classify(m.mixture.view(1, -1))[0].topk(3).indices.tolist()
    out = {}
    for side, fitting in (("target", m.target_fitting), ("interferer", m.interferer_fitting)):
        out[f"{side}_top1"] = fits(top[:1], guide.labels, fitting)
        out[f"{side}_top3"] = fits(top[:3], guide.labels, fitting)
    return out


def clean_labels(guide, m) -> dict:
    """The tagger on each sound of the pair alone (clean, 16 kHz): the most any separation could give it."""
    out = {}
    for side, ref, fitting in (("target", m.target, m.target_fitting), ("interferer", m.interferer, m.interferer_fitting)):
        top = guide.classify(ref.view(1, -1))[0].topk(3).indices.tolist()
        out[f"{side}_top1"] = fits(top[:1], guide.labels, fitting)
        out[f"{side}_top3"] = fits(top[:3], guide.labels, fitting)
    return out


def mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(float(r[key]) for r in rows)


def label_rate(rows: list[dict], k: int) -> float:
    return 100 * statistics.fmean([float(r[f"target_top{k}"]) for r in rows] + [float(r[f"interferer_top{k}"]) for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="the tagger folder (default: the shared mn04)")
    p.add_argument("--shared-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--part", choices=("train", "held_out"), default="held_out")
    p.add_argument("-n", type=int, default=200, help="mixtures (default 200)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--config", default=None, help="separator YAML (default: the package defaults)")
    p.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES),
                   help="guidance candidates: loop, classmap, or name=key:value,... over the tagger section")
    p.add_argument("--no-oracle", action="store_true", help="skip the exact-oracle and IRM rows")
    p.add_argument("--ceiling", action="store_true",
                   help="also print what limits the loop: the NMF components split by their true shares, beside "
                        "the embedding clustering's split (the guide's own masks, no separator)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every row of every candidate here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(args.config) if args.config else AstsepConfig()
    base.guide.device = "cpu"
    t0 = time.perf_counter()
    mixes = class_split_dev(args.shared_dir, args.part, args.n, args.seconds)
    print(f"{len(mixes)} class-split dev mixtures ({args.part} sounds), 0 dB, {args.seconds:g} s; model {args.model}")
    table = []
    for text in args.candidates:
        name, over = parse_candidate(text)
        cfg = apply_overrides(base, over)
        guide = load_guide(cfg, args.model)
        pipe = Pipeline(cfg, guide)
        t1 = time.perf_counter()
        rows = [score_run(pipe, m) for m in mixes]
        secs = (time.perf_counter() - t1) / len(mixes)
        table.append((name, rows, secs, over))
        print(f"  {name}: pass 1 (target) {mean(rows, 'pass1_target'):.2f}, pass 1 (named) {mean(rows, 'pass1_named'):.2f}, "
              f"best file {mean(rows, 'best_file'):.2f} dB; labels top-1 {label_rate(rows, 1):.0f} %, top-3 "
              f"{label_rate(rows, 3):.0f} %; {secs:.2f} s/mixture; file re-tagged top-3 "
              f"{100 * statistics.fmean([float(r['target_retag_top3']) for r in rows] + [float(r['interferer_retag_top3']) for r in rows]):.0f} %",
              flush=True)
    plain = load_guide(base, args.model)
    mix_rows = [mixture_labels(plain, m) for m in mixes]
    clean_rows = [clean_labels(plain, m) for m in mixes]
    print()
    print("| guide | pass 1 (target) | pass 1 (named) | best file | label top-1 | label top-3 | s / mixture |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rows, secs, over in table:
        desc = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in over.items())
        print(f"| mn04 {name} ({desc}) | {mean(rows, 'pass1_target'):.2f} | {mean(rows, 'pass1_named'):.2f} | "
              f"{mean(rows, 'best_file'):.2f} | {label_rate(rows, 1):.0f} % | {label_rate(rows, 3):.0f} % | {secs:.2f} |")
    print(f"| mn04 on the unseen mixture alone (no separation) | – | – | – | {label_rate(mix_rows, 1):.0f} % | "
          f"{label_rate(mix_rows, 3):.0f} % | – |")
    print(f"| mn04 on each clean sound alone (what separation could give it) | – | – | – | {label_rate(clean_rows, 1):.0f} % | "
          f"{label_rate(clean_rows, 3):.0f} % | – |")
    if args.ceiling:
        cl = [ceiling(plain, m) for m in mixes]
        print(f"| loop's own mask: NMF components split by their true shares (its ceiling) | – | "
              f"{mean(cl, 'oracle_components'):.2f} | | | | |")
        print(f"| loop's own mask: the embedding clustering's split | – | {mean(cl, 'cluster'):.2f} | | | | |")
    if not args.no_oracle:
        labels = plain.labels
        orows = []
        for i, m in enumerate(mixes):
            ids = [[label_id(labels, m.target_label), label_id(labels, m.interferer_label)]]
            og = OracleGuide(m.mixture.view(1, -1), torch.stack([m.target, m.interferer]).unsqueeze(0), ids, labels,
                             stft_cfg=base.stft)
            orows.append(score_run(Pipeline(base, og), m))
        irm = [db(oracle_irm(m.mixture.view(1, -1), m.target.view(1, -1), base.stft)[0], m.mixture, m.target)
               for m in mixes]
        print(f"| exact oracle (reference) | {mean(orows, 'pass1_target'):.2f} | {mean(orows, 'pass1_named'):.2f} | "
              f"{mean(orows, 'best_file'):.2f} | – | – | – |")
        print(f"| ideal ratio mask | {statistics.fmean(irm):.2f} | | | | | |")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({name: rows for name, rows, _, _ in table}, indent=1))
    print(f"\n{time.perf_counter() - t0:.0f} s in all; SI-SDRi means in dB over {len(mixes)} mixtures, labels over "
          f"{2 * len(mixes)} sounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
