#!/usr/bin/env python
"""Live mode with a full-size AST (random weights, the published compute) on 2 CPU threads.

A stream of quiet background (rain at -55 dBFS) with ``--sounds`` shared ESC-50 clips inserted
(``--sound-sec`` long, one every ``--spacing`` seconds, at -20 dBFS) is fed to
:class:`astsep.live.LiveListener` block by block **at real-time pace** (a live microphone's), with
the level trigger. The classifier is forced to *Siren* (``astsep.testing.force_class``; the compute
is unchanged), so every analysed sound is an alert. Per configuration (default, ``--fast``):

- alert latency: from the capture of a sound's onset (the block holding it arrived) to its event
  being handed to the outbox, median / p95 / max over the sounds that were detected;
- sounds detected, events (should equal sounds: one per occurrence), windows analysed / dropped;
- analysis seconds per window (median) and the real-time factor (that / the analysis hop);
then, with ``--fast`` and the hop trigger, the smallest hop in ``--hops`` with no dropped window.

    python benchmarks/bench_live.py [--sounds 20] [--spacing 4] [--threads 2] [--skip-default]
                                    [--hops 8 6 4 3 2 1.5 1 0.5] [--hop-stream 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from astsep.audio import load_audio  # noqa: E402
from astsep.capture import ArraySource  # noqa: E402
from astsep.config import SAMPLE_RATE, AstsepConfig, LiveConfig  # noqa: E402
from astsep.guide import ASTGuide, use_fast_settings  # noqa: E402
from astsep.live import LiveListener  # noqa: E402
from astsep.pipeline import Pipeline  # noqa: E402
from astsep.testing import SHARED_DATA, force_class, full_ast  # noqa: E402

ESC = SHARED_DATA / "esc50_one_per_class"
SOUNDS = ("siren", "car_horn", "crying_baby", "door_wood_knock", "clock_alarm", "dog", "glass_breaking")
SIREN = 396


def _level(x: np.ndarray, dbfs: float) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    return (x * (10 ** (dbfs / 20) / max(rms, 1e-12))).astype(np.float32)


def make_stream(sounds: int, spacing: float, sound_sec: float, lead: float = 2.0) -> tuple[np.ndarray, list[float]]:
    """(samples, onset seconds): background + ``sounds`` clips, the first at ``lead`` seconds."""
    total = lead + sounds * spacing + 1.0
    n = int(total * SAMPLE_RATE)
    bg, _ = load_audio(next(ESC.glob("rain__*.flac")))
    bg = np.tile(bg.numpy(), int(np.ceil(n / bg.numel())) + 1)[:n]
    x = _level(bg, -55.0)
    onsets = []
    for i in range(sounds):
        clip, _ = load_audio(next(ESC.glob(f"{SOUNDS[i % len(SOUNDS)]}__*.flac")))
        c = clip.numpy()
        # the clip's loudest sound_sec (ESC-50 clips often start with silence)
        m = int(sound_sec * SAMPLE_RATE)
        energy = np.convolve(c ** 2, np.ones(m), "valid") if c.size > m else np.array([0.0])
        s0 = int(np.argmax(energy)) if c.size > m else 0
        seg = _level(c[s0:s0 + m], -20.0)
        # the onset: the first 10 ms frame within 20 dB of the segment's loudest
        frames = seg[: seg.size // 160 * 160].reshape(-1, 160)
        db = 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-20)
        first = int(np.argmax(db >= db.max() - 20)) * 160
        at = int((lead + i * spacing) * SAMPLE_RATE)
        x[at:at + seg.size] += seg
        onsets.append((at + first) / SAMPLE_RATE)
    return x, onsets


def pipeline(fast: bool, threads: int) -> Pipeline:
    torch.set_num_threads(threads)
    cfg = AstsepConfig()
    cfg.guide.device = "cpu"
    if fast:
        use_fast_settings(cfg.guide)
    model = full_ast()
    force_class(model, SIREN)
    pipe = Pipeline(cfg, ASTGuide(model, cfg.guide, name="full-size random AST (Siren)"))
    pipe.run(torch.zeros(int(4.096 * SAMPLE_RATE)).uniform_(-0.1, 0.1), "warm-up")
    return pipe


def run_stream(pipe: Pipeline, x: np.ndarray, lcfg: LiveConfig,
               drain: bool = True) -> tuple[LiveListener, list[tuple[dict, float]]]:
    got: list[tuple[dict, float]] = []
    listener = LiveListener(pipe, lcfg, on_event=lambda ev: got.append((ev, time.monotonic())))
    listener.run(ArraySource(x, block_sec=lcfg.block_sec, realtime=True), drain=drain)
    return listener, got


def latency_case(pipe: Pipeline, name: str, args) -> dict:
    x, onsets = make_stream(args.sounds, args.spacing, args.sound_sec)
    lcfg = LiveConfig(hop_sec=args.hop, hold_off_sec=args.hold_off)
    listener, got = run_stream(pipe, x, lcfg)
    lat, detected = [], 0
    for onset in onsets:
        match = [(ev, t) for ev, t in got if onset - 0.5 <= ev["start_sec"] <= onset + args.sound_sec]
        if not match:
            continue
        detected += 1
        ev, t = min(match, key=lambda m: m[1])
        t_cap = listener.captured_at(int(onset * SAMPLE_RATE))
        lat.append(t - t_cap)
    st = listener.stats
    per_window = st.analysis_sec / max(1, st.windows_analysed)
    out = {
        "case": name, "stream_sec": round(st.stream_sec, 1), "sounds": len(onsets), "detected": detected,
        "events": st.events, "windows_analysed": st.windows_analysed, "windows_dropped": st.windows_dropped,
        "latency_median": round(statistics.median(lat), 3) if lat else None,
        "latency_p95": round(float(np.percentile(lat, 95)), 3) if lat else None,
        "latency_max": round(max(lat), 3) if lat else None,
        "analysis_sec_per_window": round(per_window, 3),
        "busy_share": round(st.analysis_sec / max(st.stream_sec, 1e-9), 3),
        "rtf_window": round(per_window / lcfg.window_sec, 3),
        "ast_forwards": st.ast_forwards,
    }
    print(json.dumps(out), flush=True)
    return out


def hop_case(pipe: Pipeline, hop: float, seconds: float) -> dict:
    seconds = max(seconds, 3 * hop)
    x, _ = make_stream(max(1, int(seconds // 4)), 4.0, 1.0)
    x = x[: int(seconds * SAMPLE_RATE)]
    lcfg = LiveConfig(trigger="hop", hop_sec=hop, align_sec=min(0.1, hop))
    # a window still waiting when the stream ends was not kept up with: dropped, not drained
    listener, _ = run_stream(pipe, x, lcfg, drain=False)
    st = listener.stats
    per_window = st.analysis_sec / max(1, st.windows_analysed)
    out = {"case": f"fast, hop trigger {hop} s", "stream_sec": round(st.stream_sec, 1),
           "windows_queued": st.windows_queued, "windows_analysed": st.windows_analysed,
           "windows_dropped": st.windows_dropped, "analysis_sec_per_window": round(per_window, 3),
           "rtf_hop": round(per_window / hop, 3)}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sounds", type=int, default=20)
    p.add_argument("--spacing", type=float, default=4.0, help="seconds between inserted sounds")
    p.add_argument("--sound-sec", type=float, default=1.0)
    p.add_argument("--hop", type=float, default=2.0, help="level trigger: seconds between analyses while loud")
    p.add_argument("--hold-off", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-default", action="store_true", help="only --fast")
    p.add_argument("--hops", type=float, nargs="*", default=[8.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5],
                   help="hop-trigger hops tried with --fast, largest first, until one drops windows")
    p.add_argument("--hop-stream", type=float, default=16.0, help="seconds of stream per hop tried")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = {"args": vars(args), "live_config": dataclasses.asdict(LiveConfig()), "cases": []}
    t0 = time.perf_counter()
    for fast in ([True] if args.skip_default else [False, True]):
        pipe = pipeline(fast, args.threads)
        results["cases"].append(latency_case(pipe, "fast" if fast else "default", args))
        if fast:
            for hop in args.hops:
                r = hop_case(pipe, hop, args.hop_stream)
                results["cases"].append(r)
                if r["windows_dropped"]:
                    break
        del pipe
    no_drop = [c for c in results["cases"] if c["case"].startswith("fast, hop") and not c["windows_dropped"]]
    results["smallest_hop_without_drops"] = min((float(c["case"].split()[-2]) for c in no_drop), default=None)
    results["wall_sec"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"smallest_hop_without_drops": results["smallest_hop_without_drops"],
                      "wall_sec": results["wall_sec"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
