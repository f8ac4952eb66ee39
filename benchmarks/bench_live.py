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
then, with ``--fast`` and the hop trigger, the smallest hop in ``--hops`` with no dropped window
over ``--hop-windows`` analyses (starting from the first hop not under the measured seconds per
window; the next smaller hop is run too, and stops at its first drop).

    python benchmarks/bench_live.py [--sounds 20] [--spacing 3.5] [--threads 2] [--skip-default]
                                    [--max-passes N] [--hop-windows 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import threading
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


def pipeline(fast: bool, threads: int, max_passes: int | None = None) -> Pipeline:
    torch.set_num_threads(threads)
    cfg = AstsepConfig()
    cfg.guide.device = "cpu"
    if max_passes:
        cfg.separator.max_passes = max_passes
    if fast:
        use_fast_settings(cfg.guide)
    model = full_ast()
    force_class(model, SIREN)
    pipe = Pipeline(cfg, ASTGuide(model, cfg.guide, name="full-size random AST (Siren)"))
    pipe.run(torch.zeros(int(4.096 * SAMPLE_RATE)).uniform_(-0.1, 0.1), "warm-up")
    return pipe


def run_stream(pipe: Pipeline, x: np.ndarray, lcfg: LiveConfig,
               stop_on_drop: bool = False) -> tuple[LiveListener, list[tuple[dict, float]]]:
    got: list[tuple[dict, float]] = []
    listener = LiveListener(pipe, lcfg, on_event=lambda ev: got.append((ev, time.monotonic())))
    stop = threading.Event()
    done = threading.Event()

    def watch() -> None:  # a hop that drops is known at its first drop: stop there
        while not done.wait(0.1):
            if stop_on_drop and listener.stats.windows_dropped:
                stop.set()
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        listener.run(ArraySource(x, block_sec=lcfg.block_sec, realtime=True), stop)
    finally:
        done.set()
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


def hop_case(pipe: Pipeline, hop: float, windows: int) -> dict:
    """The hop trigger at ``hop`` seconds over ``windows`` hops of stream: dropped windows (queue
    overflow while the stream runs; windows still queued at its end are analysed, not counted)."""
    seconds = windows * hop + 0.05
    x, _ = make_stream(max(1, int(seconds // 4)), 4.0, 1.0)
    x = x[: int(seconds * SAMPLE_RATE)]
    lcfg = LiveConfig(trigger="hop", hop_sec=hop, align_sec=min(0.1, hop))
    listener, _ = run_stream(pipe, x, lcfg, stop_on_drop=True)
    st = listener.stats
    per_window = st.analysis_sec / max(1, st.windows_analysed)
    out = {"case": f"fast, hop trigger {hop} s", "stream_sec": round(st.stream_sec, 1),
           "windows_queued": st.windows_queued, "windows_analysed": st.windows_analysed,
           "windows_dropped": st.windows_dropped, "analysis_sec_per_window": round(per_window, 3),
           "max_queue_wait_sec": round(st.max_queue_wait_sec, 3), "rtf_hop": round(per_window / hop, 3)}
    print(json.dumps(out), flush=True)
    return out


def smallest_hop(pipe: Pipeline, per_window: float, hops: list[float], windows: int) -> tuple[float | None, list]:
    """Try the smallest hop in ``hops`` not under ``per_window`` seconds, then larger ones until one
    keeps up, and the next smaller one (which should drop)."""
    hops = sorted(hops)
    i = next((k for k, h in enumerate(hops) if h >= per_window), len(hops) - 1)
    cases, best, first = [], None, i
    while i < len(hops):
        r = hop_case(pipe, hops[i], windows)
        cases.append(r)
        if not r["windows_dropped"]:
            best = hops[i]
            break
        i += 1
    if best is not None and i == first and i > 0:  # the first one tried kept up: is a smaller one fine too?
        cases.append(hop_case(pipe, hops[i - 1], windows))
        if not cases[-1]["windows_dropped"]:
            best = hops[i - 1]
    return best, cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sounds", type=int, default=20)
    p.add_argument("--spacing", type=float, default=3.5, help="seconds between inserted sounds")
    p.add_argument("--sound-sec", type=float, default=1.0)
    p.add_argument("--hop", type=float, default=2.0, help="level trigger: seconds between analyses while loud")
    p.add_argument("--hold-off", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-default", action="store_true", help="only --fast")
    p.add_argument("--hops", type=float, nargs="*", default=[0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20],
                   help="hop-trigger hops to choose from for the smallest hop without drops (--fast)")
    p.add_argument("--hop-windows", type=int, default=6, help="analyses (hops) of stream per hop tried")
    p.add_argument("--max-passes", type=int, default=None, help="separation passes per window (default: the config's 3)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = {"args": vars(args), "live_config": dataclasses.asdict(LiveConfig()), "cases": [],
               "smallest_hop_without_drops": None}
    t0 = time.perf_counter()
    for fast in ([True] if args.skip_default else [False, True]):
        pipe = pipeline(fast, args.threads, args.max_passes)
        res = latency_case(pipe, "fast" if fast else "default", args)
        results["cases"].append(res)
        if fast and args.hops:
            best, cases = smallest_hop(pipe, res["analysis_sec_per_window"], args.hops, args.hop_windows)
            results["cases"] += cases
            results["smallest_hop_without_drops"] = best
        del pipe
    results["wall_sec"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"smallest_hop_without_drops": results["smallest_hop_without_drops"],
                      "wall_sec": results["wall_sec"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
