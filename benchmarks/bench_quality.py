"""Separation quality of the deterministic separator on the seeded dev mixtures (``astsep.devset``).

For an oracle guide (perfect, then spoiled step by step), a full-size random AST and a real guide (``--model``,
default the shared EfficientAT mn04 tagger: real trained weights) it runs
``infer.py``'s pipeline on every mixture and prints SI-SDRi and SDRi (mean, median) of

- ``pass 1``: the first pass's source (the oracle names the target first);
- ``written``: the written file labelled with the target's class (random AST: the best written file).

Beside them, on the same STFT: the ideal ratio mask (IRM), the ideal binary mask (IBM) and the best
rank-1 (time × frequency) mask. Writes ``quality.json`` and ``quality_vs_degradation.png`` to --out.

    python benchmarks/bench_quality.py                 # everything (~10 min on 2 cores)
    python benchmarks/bench_quality.py --skip-ast      # oracle conditions and ceilings only
    python benchmarks/bench_quality.py --limit 8       # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from astsep.config import AstsepConfig  # noqa: E402
from astsep.devset import dev_mixtures, label_id  # noqa: E402
from astsep.evaluate import oracle_irm  # noqa: E402
from astsep.features import apply_mask, stft  # noqa: E402
from astsep.metrics import sdri, si_sdri  # noqa: E402
from astsep.oracle import Degradation, OracleGuide  # noqa: E402
from astsep.pipeline import Pipeline  # noqa: E402
from astsep.testing import audioset_labels, full_ast  # noqa: E402
from shared_data import SHARED_DATA  # noqa: E402

TAGGER = SHARED_DATA.parent / "models" / "efficientat_mn04_as"  # real trained weights (EfficientAT mn04)

CONDITIONS = [  # (name, degradation spec); the figure's two sweeps are blur and noise
    ("oracle", ""), ("blur 0.5", "blur=0.5"), ("blur 1", "blur=1"), ("blur 2", "blur=2"),
    ("noise 20 dB", "noise_db=20"), ("noise 10 dB", "noise_db=10"), ("noise 5 dB", "noise_db=5"),
    ("gamma 0.5", "gamma=0.5"), ("gamma 2", "gamma=2"), ("gain 3 (saturated)", "gain=3"), ("floor 0.3", "floor=0.3"),
    ("blur 1 + noise 10 dB", "blur=1,noise_db=10"), ("random grid", "random"),
]


def rank1_mask(X: torch.Tensor, S: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """The best ``a(f)·b(t)`` mask in [0, 1] (weighted least squares on the complex error, alternating)."""
    w = X.abs().pow(2)
    m = (S * X.conj()).real / w.clamp_min(1e-20)
    a, b = torch.ones(X.shape[-2]), torch.full((X.shape[-1],), 0.5)
    for _ in range(iterations):
        a = ((w * m * b).sum(-1) / (w * b * b).sum(-1).clamp_min(1e-20)).clamp(0, 1)
        b = ((w * m * a[:, None]).sum(-2) / (w * (a * a)[:, None]).sum(-2).clamp_min(1e-20)).clamp(0, 1)
    return a[:, None] * b[None]


def gains(est: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> tuple[float, float]:
    return float(si_sdri(est, x, s)), float(sdri(est, x, s))


def summary(vals: list[float]) -> dict:
    return {"mean": statistics.fmean(vals), "median": statistics.median(vals),
            "share_ge_6db": sum(v >= 6 for v in vals) / len(vals)}


def ceilings(items, cfg) -> dict:
    st = cfg.stft
    out = {k: {"si_sdri": [], "sdri": []} for k in ("IRM", "IBM", "rank-1")}
    for it in items:
        x, s, n = it.mixture, it.target, it.interferer
        X, S, N = (stft(v.unsqueeze(0), st)[0] for v in (x, s, n))
        estimates = {"IRM": oracle_irm(x.unsqueeze(0), s.unsqueeze(0), st)[0]}
        for k, m in (("IBM", (S.abs() > N.abs()).float()), ("rank-1", rank1_mask(X, S))):
            estimates[k] = apply_mask(X.unsqueeze(0), m.unsqueeze(0), st, x.numel())[0]
        for k, est in estimates.items():
            a, b = gains(est, x, s)
            out[k]["si_sdri"].append(a)
            out[k]["sdri"].append(b)
    return {k: {m: summary(v) for m, v in d.items()} for k, d in out.items()}


def run_condition(items, cfg, labels, make_guide, best_written: bool) -> dict:
    res = {"pass1": {"si_sdri": [], "sdri": []}, "written": {"si_sdri": [], "sdri": []}, "names": []}
    sep_seconds = 0.0
    for it in items:
        guide = make_guide(it)
        pipe = Pipeline(cfg, guide)
        out = pipe.run(it.mixture, it.name, keep_traces=True)
        sep_seconds += out.stats["seconds"]["separate"] - out.stats["seconds"]["ast"]
        x, s = it.mixture, it.target
        item = out.traces[0][2]
        p1 = item["sources"][0] if item["traces"] and bool(item["traces"][0]["kept"]) else torch.zeros_like(x)
        files = out.sources
        if best_written:
            cands = list(files.values())
        else:
            tid = label_id(labels, it.target_label)
            cands = [tr.render(x.numel()) if tr.kind == "source" else out.residual
                     for tr in out.tracks if tr.class_id == tid] or [torch.zeros_like(x)]
        scored = [gains(c, x, s) for c in cands]
        w = max(scored)
        for key, (a, b) in (("pass1", gains(p1, x, s)), ("written", w)):
            res[key]["si_sdri"].append(a)
            res[key]["sdri"].append(b)
        res["names"].append(it.name)
    return {"pass1": {m: summary(v) for m, v in res["pass1"].items()},
            "written": {m: summary(v) for m, v in res["written"].items()},
            "per_item_pass1_si_sdri": dict(zip(res["names"], res["pass1"]["si_sdri"])),
            "separator_seconds_per_item": sep_seconds / len(items)}


def fmt(d: dict) -> str:
    return f"{d['mean']:6.2f} {d['median']:6.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_quality"))
    ap.add_argument("--limit", type=int, default=0, help="use only the first N mixtures")
    ap.add_argument("--skip-ast", action="store_true", help="no full-size random AST run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=str(TAGGER) if TAGGER.is_dir() else None,
                    help="a real guide to score too (best written file): default the shared mn04 tagger folder; "
                         "'none' to skip")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    items = dev_mixtures(SHARED_DATA)
    if args.limit:
        items = items[: args.limit]
    kinds = {k: sum(it.kind == k for it in items) for k in ("esc50", "speech", "music")}
    print(f"{len(items)} dev mixtures (5 s, 16 kHz): {kinds}; SNRs {sorted({it.snr_db for it in items})} dB")
    labels = [audioset_labels()[i] for i in range(527)]
    cfg = AstsepConfig()
    cfg.guide.device = "cpu"
    results: dict = {"n": len(items), "ceilings": ceilings(items, cfg), "conditions": {}}

    print("\nSI-SDRi / SDRi in dB, mean and median")
    print(f"{'method':28s} {'pass-1 SI-SDRi':>14s} {'>=6dB':>6s} {'pass-1 SDRi':>14s} {'written SI-SDRi':>16s} "
          f"{'written SDRi':>14s}  sep s/item")
    for name, d in results["ceilings"].items():
        print(f"{name + ' (same STFT)':28s} {fmt(d['si_sdri'])} {d['si_sdri']['share_ge_6db']:6.2f} {fmt(d['sdri'])}")

    def oracle_maker(spec):
        deg = Degradation.parse(spec)

        def make(it):
            ids = [label_id(labels, it.target_label), label_id(labels, it.interferer_label)]
            return OracleGuide(it.mixture, torch.stack([it.target, it.interferer]), ids, labels, deg, cfg.stft)
        return make

    for name, spec in CONDITIONS:
        t0 = time.perf_counter()
        r = run_condition(items, cfg, labels, oracle_maker(spec), best_written=False)
        r["spec"] = spec
        r["wall_seconds"] = time.perf_counter() - t0
        results["conditions"][name] = r
        print(f"{name:28s} {fmt(r['pass1']['si_sdri'])} {r['pass1']['si_sdri']['share_ge_6db']:6.2f} "
              f"{fmt(r['pass1']['sdri'])}   {fmt(r['written']['si_sdri'])} {fmt(r['written']['sdri'])}  "
              f"{r['separator_seconds_per_item']:.3f}", flush=True)
    gap = results["ceilings"]["rank-1"]["si_sdri"]["mean"] - results["conditions"]["oracle"]["pass1"]["si_sdri"]["mean"]
    results["gap_to_rank1_db"] = gap
    print(f"\ngap to the rank-1 ceiling under the oracle guide (rank-1 mean − pass-1 mean): {gap:.2f} dB")

    if not args.skip_ast:
        from astsep.guide import ASTGuide

        guide = ASTGuide(full_ast(seed=0), cfg.guide, name="full-size random AST")
        t0 = time.perf_counter()
        r = run_condition(items, cfg, labels, lambda it: guide, best_written=True)
        r["wall_seconds"] = time.perf_counter() - t0
        results["conditions"]["random full-size AST"] = r
        print(f"{'random full-size AST':28s} {fmt(r['pass1']['si_sdri'])} {r['pass1']['si_sdri']['share_ge_6db']:6.2f} "
              f"{fmt(r['pass1']['sdri'])}   {fmt(r['written']['si_sdri'])} {fmt(r['written']['sdri'])}  "
              f"{r['separator_seconds_per_item']:.3f}   (written = best written file)")

    if args.model and args.model != "none":
        from astsep.guide_loader import load_guide

        guide = load_guide(cfg, args.model)
        t0 = time.perf_counter()
        r = run_condition(items, cfg, labels, lambda it: guide, best_written=True)
        r["wall_seconds"] = time.perf_counter() - t0
        results["conditions"][f"real: {Path(args.model).name}"] = r
        print(f"{'real ' + Path(args.model).name:28s} {fmt(r['pass1']['si_sdri'])} "
              f"{r['pass1']['si_sdri']['share_ge_6db']:6.2f} {fmt(r['pass1']['sdri'])}   {fmt(r['written']['si_sdri'])} "
              f"{fmt(r['written']['sdri'])}  {r['separator_seconds_per_item']:.3f}   (written = best written file)")

    (out_dir / "quality.json").write_text(json.dumps(results, indent=2))
    figure(results, out_dir / "quality_vs_degradation.png")
    print(f"\nwrote {out_dir / 'quality.json'} and {out_dir / 'quality_vs_degradation.png'}")


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = results["conditions"]
    mean = lambda k: c[k]["pass1"]["si_sdri"]["mean"]  # noqa: E731
    fig, ax = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    ax[0].plot([0, 0.5, 1, 2], [mean(k) for k in ("oracle", "blur 0.5", "blur 1", "blur 2")], "o-", label="pass 1")
    ax[0].set_xlabel("grid blur σ (patches)")
    ax[1].plot([40, 20, 10, 5], [mean(k) for k in ("oracle", "noise 20 dB", "noise 10 dB", "noise 5 dB")], "o-",
               label="pass 1")
    ax[1].set_xlabel("grid SNR (dB; 40 = no noise)")
    ax[1].invert_xaxis()
    for a in ax:
        for name, style in (("IRM", "--"), ("rank-1", ":")):
            a.axhline(results["ceilings"][name]["si_sdri"]["mean"], linestyle=style, color="grey", label=name)
        a.axhline(mean("random grid"), linestyle="-.", color="tab:red", label="random grid")
        a.grid(alpha=0.3)
    ax[0].set_ylabel("SI-SDRi (dB), mean over the dev mixtures")
    ax[1].legend(fontsize=8)
    fig.suptitle(f"Pass-1 SI-SDRi against guidance degradation ({results['n']} dev mixtures)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
