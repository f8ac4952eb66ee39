#!/usr/bin/env python
"""Benchmark the baseline separator with a full-size AST (random weights, the published compute).

Prints, for ``../shared/data/examples/seed_recording_16k.wav`` (5.06 s):
- median end-to-end seconds with the model loaded (cold AST cache), seconds per stage, AST forwards,
  the share of time spent outside AST forwards;
- the fast options (bfloat16 or int8, and/or trimmed padding): median seconds, and how much logits
  and masks change against the default path (on this recording, and first-pass logits on 12
  ESC-50 clips);
- the warm-cache re-run time and the speed-up;
and for a 60 s file built from shared clips: seconds, forwards, and peak RSS of a child process
against a 10 s input (peak memory must not grow with input length beyond the output buffers).
With ``--throughput``: windows per second, 10.24 s windows batched across files.

Then what a command-line user waits for: ``python infer.py`` run as a fresh process on the same
recording with a full-size random AST saved as a model folder, default and ``--fast``, and with the real
EfficientAT mn04 tagger (``../shared/models/efficientat_mn04_as``, tagger in the loop): whole-process
wall time (interpreter, imports, model load, decoding, processing, writing) beside the processing
time the run reports, and how long ``infer.py -h`` and a missing input take to answer.
``--process-only`` prints only these. With ``--reference PATH/separator.py`` (a checkout of the
reference ``Bentlytrucker/ast_source_sep``, outside this repository), the reference runs the same
recording with the same random AST folder, interleaved, and its own processing time is printed
beside astsep's whole process.

    python benchmarks/bench_separator.py [--runs 5] [--device cpu|cuda] [--skip-long] [--throughput]
                                         [--process-runs 3] [--process-only] [--reference SEPARATOR_PY]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from astsep.audio import load_audio  # noqa: E402
from astsep.config import AstsepConfig  # noqa: E402
from astsep.guide import ASTGuide  # noqa: E402
from astsep.pipeline import Pipeline  # noqa: E402
from astsep.testing import full_ast  # noqa: E402
from shared_data import SHARED_DATA  # noqa: E402

SEED = SHARED_DATA / "examples" / "seed_recording_16k.wav"
TAGGER = SHARED_DATA.parent / "models" / "efficientat_mn04_as"  # real trained EfficientAT mn04 weights
ESC = SHARED_DATA / "esc50_one_per_class"


def long_input(seconds: float) -> torch.Tensor:
    """Shared ESC-50 clips, pairwise mixed and concatenated up to ``seconds``."""
    files = sorted(ESC.glob("*.flac"))
    parts, total, i = [], 0, 0
    while total < seconds * 16000:
        a, _ = load_audio(files[i % len(files)])
        b, _ = load_audio(files[(i + 7) % len(files)])
        n = min(a.numel(), b.numel())
        parts.append(a[:n] + 0.5 * b[:n])
        total += n
        i += 1
    return torch.cat(parts)[: int(seconds * 16000)]


def make_pipeline(model, device: str, dtype: str = "float32", trim: bool = False, pad_merge: int = 8) -> Pipeline:
    cfg = AstsepConfig()
    cfg.guide.device, cfg.guide.dtype, cfg.guide.trim_padding, cfg.guide.pad_merge = device, dtype, trim, pad_merge
    return Pipeline(cfg, ASTGuide(model, cfg.guide, name="full-size random AST"))


def timed_runs(pipe: Pipeline, x: torch.Tensor, runs: int, keep_traces: bool = False):
    times, last = [], None
    for _ in range(runs):
        pipe.guide.cache.mem.clear()  # cold cache each run
        t0 = time.perf_counter()
        last = pipe.run(x, "bench", keep_traces=keep_traces)
        times.append(time.perf_counter() - t0)
    return times, last


def fmt(v: float) -> str:
    return f"{v:.3f}"


def child_peak_rss(seconds: float, device: str) -> dict:
    """Run one separation in a fresh process and return its peak RSS (MiB)."""
    code = f"""
import json, resource, sys, time, torch
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
from bench_separator import long_input, make_pipeline
from astsep.testing import full_ast
x = long_input({seconds})
pipe = make_pipeline(full_ast(), {device!r})
def peak_mib():  # this process's own high-water mark: ru_maxrss would also count the forked parent's RSS
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak_mib()
t0 = time.perf_counter(); r = pipe.run(x, "long"); dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "peak_rss_mib": peak_mib(),
                  "rss_before_run_mib": base, "windows": r.stats["windows"], "ast_forwards": r.stats["ast_forwards"],
                  "sources": len(r.tracks), "output_buffers_mib": (len(r.tracks) + 1) * x.numel() * 4 / 2**20}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


AGREEMENT_CLIPS = 12


def agreement(ref, fast, clips) -> dict:
    """First-pass logits of ``fast`` against ``ref`` (two guides) on real clips."""
    same, overlap, diff, std = 0, 0, 0.0, 0.0
    for c in clips:
        a, b = ref(c.unsqueeze(0)).logits[0], fast(c.unsqueeze(0)).logits[0]
        ta, tb = a.topk(5).indices.tolist(), b.topk(5).indices.tolist()
        same += ta[0] == tb[0]
        overlap += len(set(ta) & set(tb))
        diff = max(diff, float((a - b).abs().max()))
        std += float(a.std()) / len(clips)
    return {"clips": len(clips), "top1_same": same, "top5_overlap": overlap / len(clips), "max_diff": diff,
            "logit_std": std}


def merge_sensitivity(model, device: str, clips) -> None:
    """How faithful is the trimmed forward when padded patches differ more than in a random model?

    A random AST's position embeddings are tiny (std 0.02), so its padded patches are nearly equal
    tokens and merging them is nearly exact. Trained checkpoints learn larger, smooth embeddings;
    this adds a 2-D sin-cos embedding of growing scale and compares first-pass logits (fp32)."""
    import copy

    m = copy.deepcopy(model)
    pos = m.audio_spectrogram_transformer.embeddings.position_embeddings
    grid = make_pipeline(m, device).guide  # the patch grid, as the guide computes it
    fp_, tp_ = grid.freq_patches, grid.time_patches
    d = m.config.hidden_size // 4
    omega = 1.0 / (10000 ** (torch.arange(d) / d))
    f, t = torch.arange(fp_)[:, None] * omega, torch.arange(tp_)[:, None] * omega
    sincos = torch.cat([torch.cat([f.sin(), f.cos()], 1)[:, None].expand(fp_, tp_, 2 * d),
                        torch.cat([t.sin(), t.cos()], 1)[None].expand(fp_, tp_, 2 * d)], -1).reshape(-1, 4 * d)
    base = pos.data.clone()
    print("\n== trimmed padding under larger position embeddings (first-pass logits vs full window, fp32) ==")
    for scale in (0.1, 0.5):
        with torch.no_grad():
            pos.data[0, 2:] = base[0, 2:] + scale * sincos
        ref = make_pipeline(m, device).guide
        for group in (0, 16, 8, 4):
            a = agreement(ref, make_pipeline(m, device, "float32", True, group).guide, clips)
            what = "dropped" if group == 0 else f"merged {group} per token"
            print(f"added sin-cos scale {scale}: padding {what}: top-1 same {a['top1_same']}/{a['clips']}, "
                  f"mean top-5 overlap {a['top5_overlap']:.1f}/5, max |diff| {a['max_diff']:.4f} "
                  f"(logit std {a['logit_std']:.3f})")


# Runs the reference separator (its separator.py, given by path; never part of this repository) as
# its own command line runs it, with the same full-size random AST folder in place of the Hub
# download, and prints the processing time it reports itself ("Processing completed in X s": passes,
# residual classification and its file writes, after the model load) and its AST calls.
REFERENCE_RUN = r"""
import contextlib, importlib.util, io, json, re, sys
import soundfile as sf, torch, torchaudio, transformers
ref_path, model_dir, wav, out, device = sys.argv[1:6]

def load(path, *a, **k):  # torchaudio.load needs torchcodec, absent here: the same samples via soundfile
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    return torch.from_numpy(x.T.copy()), sr

def save(path, w, sr, *a, **k):
    sf.write(path, w.reshape(-1).numpy(), sr)

torchaudio.load, torchaudio.save = load, save
calls = [0]

class Extractor:  # the published checkpoint's feature extractor settings are ASTFeatureExtractor's defaults
    @staticmethod
    def from_pretrained(*a, **k):
        return transformers.ASTFeatureExtractor()

class Model:
    @staticmethod
    def from_pretrained(name, **k):
        m = transformers.ASTForAudioClassification.from_pretrained(model_dir, **k)
        m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return m

spec = importlib.util.spec_from_file_location("reference_separator", ref_path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.ASTFeatureExtractor, mod.ASTForAudioClassification = Extractor, Model
sys.argv = ["separator.py", "--input", wav, "--output", out, "--no-debug", "--device", device]
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    mod.main()
m = re.search(r"Processing completed in ([0-9.]+)s", buf.getvalue())
print(json.dumps({"processing": float(m.group(1)), "ast_calls": calls[0]}))
"""


def whole_process(runs: int, device: str, reference: str | None = None) -> None:
    """``python infer.py`` as a user runs it: a fresh process per run, full-size AST from a folder.

    With ``reference`` (the path of the reference's ``separator.py``), the reference runs once per
    round too, interleaved with astsep's paths so that all share the machine's state, and its own
    processing time is set beside astsep's whole process."""
    import tempfile

    print("\n== whole process: python infer.py (fresh process each run, full-size random AST folder) ==")
    with tempfile.TemporaryDirectory(prefix="astsep-bench-") as tmp:
        model_dir = Path(tmp) / "full_ast"
        full_ast().save_pretrained(model_dir)
        infer = [sys.executable, str(ROOT / "infer.py")]

        def wall(args: list[str]) -> float:
            t0 = time.perf_counter()
            subprocess.run(infer + args, capture_output=True, text=True, cwd=tmp)
            return time.perf_counter() - t0

        quick = {"-h": ["-h"], "missing input": ["-i", "missing.wav", "-o", "out"]}
        for name, args in quick.items():
            times = [wall(args) for _ in range(runs)]
            print(f"infer.py {name}: answered in {fmt(statistics.median(times))} s median (min {fmt(min(times))})")
        paths = {"default": [], "--fast": ["--fast"]}
        if TAGGER.is_dir():  # the real mn04 tagger as the guide (tagger in the loop), in the same rounds
            paths["mn04 tagger"] = ["-m", str(TAGGER)]
        walls: dict[str, list[float]] = {name: [] for name in paths}
        stages: dict[str, list[dict]] = {name: [] for name in paths}
        ref_runs: list[dict] = []
        for r in range(runs):  # interleaved: one run of every path per round
            for name, extra in paths.items():
                out = Path(tmp) / f"out_{name.strip('-')}_{r}"
                args = ["-i", str(SEED), "-o", str(out), "-m", str(model_dir), "--device", device, "-q", *extra]
                t0 = time.perf_counter()
                proc = subprocess.run(infer + args, capture_output=True, text=True, cwd=tmp)
                walls[name].append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise SystemExit(f"infer.py failed: {proc.stderr.strip()[-500:]}")
                stages[name].append(json.loads((out / "events.json").read_text())["stats"]["seconds"])
            if reference:
                out = Path(tmp) / f"out_reference_{r}"
                out.mkdir()
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", REFERENCE_RUN, reference, str(model_dir), str(SEED),
                                       str(out), device], capture_output=True, text=True, cwd=tmp)
                if proc.returncode != 0:
                    raise SystemExit(f"the reference failed: {proc.stderr.strip()[-800:]}")
                ref_runs.append({**json.loads(proc.stdout.strip().splitlines()[-1]),
                                 "wall": time.perf_counter() - t0})
        for name in paths:
            med = statistics.median(walls[name])
            i = min(range(runs), key=lambda k: abs(walls[name][k] - med))  # the run nearest the median
            st = stages[name][i]
            inside = st["decode"] + st["model_load"] + st["total"] + st.get("write", 0.0)
            rest = [w - s["total"] for w, s in zip(walls[name], stages[name])]
            print(f"{name}: whole process {fmt(med)} s median of {runs} "
                  f"(min {fmt(min(walls[name]))}); in that run: processing {fmt(st['total'])} s "
                  f"(guide {fmt(st['ast'])} s), model load {fmt(st['model_load'])} s, decode {fmt(st['decode'])} s, "
                  f"write {fmt(st.get('write', 0.0))} s, interpreter + imports + rest {fmt(walls[name][i] - inside)} s; "
                  f"processing is {100 * st['total'] / walls[name][i]:.0f} % of the wait; "
                  f"whole process minus processing {fmt(statistics.median(rest))} s median")
        if ref_runs:
            ref_proc = statistics.median(r["processing"] for r in ref_runs)
            print(f"reference separator: processing {fmt(ref_proc)} s median of {runs} (its own figure; "
                  f"min {fmt(min(r['processing'] for r in ref_runs))}), {ref_runs[0]['ast_calls']} AST calls, "
                  f"whole process {fmt(statistics.median(r['wall'] for r in ref_runs))} s")
            for name in paths:
                print(f"astsep {name} whole process is {ref_proc / statistics.median(walls[name]):.2f}x faster than "
                      f"the reference's processing alone")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--batch", type=int, default=64, help="windows per batch for --throughput")
    ap.add_argument("--merge-sensitivity", action="store_true",
                    help="also: trimmed padding (merged or dropped) under larger, smooth position embeddings")
    ap.add_argument("--process-runs", type=int, default=3, help="fresh infer.py processes per path")
    ap.add_argument("--process-only", action="store_true",
                    help="only the whole-process figures of python infer.py (start-up, model load, processing)")
    ap.add_argument("--reference", metavar="SEPARATOR_PY",
                    help="the reference's separator.py (a checkout of Bentlytrucker/ast_source_sep, kept outside "
                         "this repository): run it interleaved with infer.py in the whole-process figures")
    args = ap.parse_args()
    if args.process_only:
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
        whole_process(args.process_runs, args.device, args.reference)
        return

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    t0 = time.perf_counter()
    model = full_ast()
    print(f"full-size AST built: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
          f"in {time.perf_counter() - t0:.1f} s")
    x, _ = load_audio(SEED)
    print(f"input: {SEED.name}, {x.numel() / 16000:.2f} s")

    pipe = make_pipeline(model, args.device)
    pipe.run(x, "warm-up")  # first call pays for lazy init (kernels, mel banks)
    times, res = timed_runs(pipe, x, args.runs, keep_traces=True)
    med = statistics.median(times)
    st = res.stats
    ast_share = st["seconds"]["ast"] / st["seconds"]["total"]
    print("\n== default path (fp32, SDPA, full 10.24 s window) ==")
    print(f"end-to-end median {fmt(med)} s over {args.runs} runs (min {fmt(min(times))}, max {fmt(max(times))})")
    print(f"stages (last run): {json.dumps(st['seconds'])}")
    print(f"AST forwards: {st['ast_forwards']} (separation {st['ast_forwards_separation']}, "
          f"residual {st['ast_forwards_residual']}), batches {st['ast_batches']}")
    print(f"time outside AST forwards: {100 * (1 - ast_share):.1f} %")

    t0 = time.perf_counter()
    warm = pipe.run(x, "warm")
    t_warm = time.perf_counter() - t0
    print(f"\n== warm cache re-run ==\n{fmt(t_warm)} s, {warm.stats['ast_forwards']} forwards, "
          f"{warm.stats['cache_hits']} cache hits: {med / t_warm:.1f}x faster than the cold median")

    ref_traces = res.traces[0][2]["traces"]
    clips = [load_audio(f)[0] for f in sorted((SHARED_DATA / "esc50_one_per_class").glob("*.flac"))[:AGREEMENT_CLIPS]]
    # trim: padded patches merged 8 to a token (the default); "drop": padded patches left out
    variants = [("bf16", "bfloat16", False, 8), ("trim", "float32", True, 8), ("bf16+trim", "bfloat16", True, 8)]
    if torch.device(pipe.guide.device).type == "cpu":  # int8 Linear layers run on the CPU only
        variants += [("int8", "int8", False, 8), ("int8+trim (--fast on CPU)", "int8", True, 8),
                     ("int8+trim, padding dropped (pad_merge 0)", "int8", True, 0)]
    for name, dtype, trim, pad_merge in variants:
        fp = make_pipeline(model, args.device, dtype, trim, pad_merge)
        fp.run(x, "warm-up")
        ftimes, fres = timed_runs(fp, x, args.runs, keep_traces=True)
        # change against the default path: first-pass logits on the same input, masks of every pass
        g_ref = pipe.guide._forward(x.unsqueeze(0).to(pipe.guide.device))["logits"].float().cpu()
        g_fast = fp.guide._forward(x.unsqueeze(0).to(fp.guide.device))["logits"].float().cpu()
        ref_top = g_ref.topk(5).indices[0].tolist()
        fast_top = g_fast.topk(5).indices[0].tolist()
        ftr = fres.traces[0][2]["traces"]
        mask_diff = [float((a["mask"] - b["mask"]).abs().mean()) for a, b in zip(ref_traces, ftr)
                     if bool(a["ran"]) and bool(b["ran"])]
        same_labels = res.labels == fres.labels
        print(f"\n== fast option: {name} ==")
        print(f"end-to-end median {fmt(statistics.median(ftimes))} s (min {fmt(min(ftimes))}); "
              f"speed-up {med / statistics.median(ftimes):.2f}x; AST forwards {fres.stats['ast_forwards']} "
              f"({fres.stats['seconds']['ast'] / max(fres.stats['ast_forwards'], 1):.3f} s each, last run)")
        print(f"logits vs default: max |diff| {float((g_ref - g_fast).abs().max()):.4f}, "
              f"top-1 same: {ref_top[0] == fast_top[0]}, top-5 overlap {len(set(ref_top) & set(fast_top))}/5")
        print(f"masks vs default: mean |diff| per pass {[round(v, 4) for v in mask_diff]}; "
              f"same source labels: {same_labels}")
        a = agreement(pipe.guide, fp.guide, clips)
        print(f"logits vs default on {a['clips']} ESC-50 clips: top-1 same {a['top1_same']}/{a['clips']}, "
              f"mean top-5 overlap {a['top5_overlap']:.1f}/5, max |diff| {a['max_diff']:.4f} "
              f"(logit std {a['logit_std']:.3f})")

    if args.merge_sensitivity:
        merge_sensitivity(model, args.device, [x] + clips)

    if not args.skip_long:
        print("\n== long input (child processes, peak RSS) ==")
        for secs in (10.0, 60.0):
            r = child_peak_rss(secs, args.device)
            print(f"{secs:.0f} s input: {fmt(r['seconds'])} s, {r['windows']} windows, {r['ast_forwards']} forwards, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB (before the run {r['rss_before_run_mib']:.0f} MiB; "
                  f"output buffers {r['output_buffers_mib']:.1f} MiB)")

    if args.throughput:
        dev = torch.device(args.device)
        cfg = AstsepConfig()
        cfg.guide.device, cfg.guide.dtype = args.device, "bfloat16" if dev.type == "cuda" else "float32"
        g = ASTGuide(model, cfg.guide)
        from astsep.separator import Separator

        sep = Separator(cfg, g)
        wins = long_input(10.24 * args.batch / 4)
        w = 163840
        batch = torch.stack([torch.roll(wins, i * 4001)[:w] for i in range(args.batch)]).to(dev)
        sep.separate_batch(batch)  # warm-up
        g.cache.mem.clear()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = 3
        for r in range(reps):
            g.cache.mem.clear()
            sep.separate_batch(batch + 1e-6 * r)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"\n== throughput ==\n{reps * args.batch / dt:.1f} ten-second windows per second "
              f"(batch {args.batch}, {cfg.guide.dtype}, 3 passes each, {g.forwards} AST window-forwards)")
    whole_process(args.process_runs, args.device, args.reference)
    print(f"\nprocess peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
