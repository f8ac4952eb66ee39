#!/usr/bin/env python
"""Live mode with a full-size AST (random weights, the published compute), its two stages measured apart.

A stream of quiet background (rain at -55 dBFS) with ``--sounds`` shared ESC-50 clips inserted
(``--sound-sec`` long, one every ``--spacing`` seconds, at -20 dBFS) is fed to
:class:`astsep.live.LiveListener` block by block **at real-time pace** (a live microphone's), with
the level trigger. The classifier is forced to *Siren* (``astsep.testing.force_class``; the compute
is unchanged), so every analysed sound is an alert and the alert stage fires on its first excerpt.
Per configuration (default, ``--fast``), for each stage (alert: one forward of the last
``alert_sec``; separation: Pipeline.run on the window) and for the first delivery of a sound
(whichever stage made it, the issue's "alert latency"):

- latency from the capture of a sound's onset (the block holding it arrived) to the stage's event
  (new or update) being handed to the outbox: median / p95 / max over the sounds it reported;
- sounds reported, excerpts / windows analysed and dropped, seconds per excerpt / window, busy share
  (seconds of work per second of stream: the real-time factor; > 1 is behind);
- occurrences (should equal the sounds: one per sound) and updates;
then, with ``--fast`` and the hop trigger (the alert stage beside it at its own hop while the
level is above the trigger; ``--hop-background-dbfs`` above -40 keeps it busy), the smallest
separation hop in ``--hops`` with no dropped window over ``--hop-windows`` analyses (starting
from the first hop not under the measured seconds per window; the next smaller hop is run too,
and stops at its first drop).

    python benchmarks/bench_live.py [--device cpu|cuda] [--sounds 20] [--spacing 3.5] [--threads 2]
                                    [--skip-default] [--max-passes N] [--hop-windows 6] [--no-alert-stage]
                                    [--all-passes] [--hops 2 2.5 ...] [--hop-background-dbfs -55]
                                    [--alert-sec 1] [--alert-hop 1] [--json out.json]

``--real`` adds the real mn04 tagger as the guide of both stages (no forced class) on a stream alternating
sounds an alert device must report (siren, crying baby, knock, alarm clock, breaking glass) and everyday ones
(dog, cat, car horn, typing, laughter, footsteps, engine, rooster, clapping, sneezing): latencies as above,
and the alert hit rate (an alert event within the sound's span; with a fitting label) and false-alarm rate.

``--device cuda`` runs the AST in bfloat16 (the guide's precision for a GPU; ``--fast`` adds the
trimmed padding there), ``--device cpu`` in float32 (default) or int8 (``--fast``) on ``--threads``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
from astsep.live import LiveListener, excerpt_probs  # noqa: E402
from astsep.pipeline import Pipeline  # noqa: E402
from astsep.testing import force_class, full_ast  # noqa: E402
from shared_data import SHARED_DATA  # noqa: E402

ESC = SHARED_DATA / "esc50_one_per_class"
SOUNDS = ("siren", "car_horn", "crying_baby", "door_wood_knock", "clock_alarm", "dog", "glass_breaking")
SIREN = 396
TAGGER = SHARED_DATA.parent / "models" / "efficientat_mn04_as"
# --real: sounds a sound-alert device must report (their fitting classes are in a danger / help / warning
# set) among everyday ones it must not, takes from both ESC-50 folders (esc50_more first: other recordings)
ALERTABLE = ("siren", "crying_baby", "door_wood_knock", "clock_alarm", "glass_breaking")
EVERYDAY = ("dog", "cat", "car_horn", "keyboard_typing", "laughing", "footsteps", "engine", "rooster", "clapping",
            "sneezing")


def _level(x: np.ndarray, dbfs: float) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    return (x * (10 ** (dbfs / 20) / max(rms, 1e-12))).astype(np.float32)


def real_sounds(count: int) -> list[tuple[str, Path]]:
    """``count`` (class, clip) pairs alternating alertable and everyday classes, other takes each round."""
    out = []
    for i in range(count):
        pool = ALERTABLE if i % 2 == 0 else EVERYDAY
        cls = pool[(i // 2) % len(pool)]
        takes = sorted((SHARED_DATA / "esc50_more").glob(f"{cls}__*.flac")) + sorted(ESC.glob(f"{cls}__*.flac"))
        out.append((cls, takes[(i // (2 * len(pool))) % len(takes)]))
    return out


def make_stream(sounds: int, spacing: float, sound_sec: float, lead: float = 2.0,
                background_dbfs: float = -55.0, clips: list[Path] | None = None) -> tuple[np.ndarray, list[float]]:
    """(samples, onset seconds): background + ``sounds`` clips (``clips``, else :data:`SOUNDS` in turn), the
    first at ``lead`` seconds."""
    total = lead + sounds * spacing + 1.0
    n = int(total * SAMPLE_RATE)
    bg, _ = load_audio(next(ESC.glob("rain__*.flac")))
    bg = np.tile(bg.numpy(), int(np.ceil(n / bg.numel())) + 1)[:n]
    x = _level(bg, background_dbfs)
    onsets = []
    for i in range(sounds):
        path = clips[i] if clips else next(ESC.glob(f"{SOUNDS[i % len(SOUNDS)]}__*.flac"))
        clip, _ = load_audio(path)
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


def pipeline(fast: bool, threads: int, max_passes: int | None = None, device: str = "cpu",
             alert_sec: float = 1.0) -> Pipeline:
    torch.set_num_threads(threads)
    cfg = AstsepConfig()
    cfg.guide.device = device
    if device.startswith("cuda"):
        cfg.guide.dtype = "bfloat16"
    if max_passes:
        cfg.separator.max_passes = max_passes
    if fast:
        use_fast_settings(cfg.guide)
    model = full_ast()
    force_class(model, SIREN)
    pipe = Pipeline(cfg, ASTGuide(model, cfg.guide, name="full-size random AST (Siren)"))
    noise = torch.zeros(int(4.096 * SAMPLE_RATE)).uniform_(-0.1, 0.1)
    pipe.run(noise, "warm-up")
    excerpt_probs(pipe.guide, noise[: int(alert_sec * SAMPLE_RATE)])  # the alert stage's shape
    return pipe


def real_pipeline(threads: int, model: str, device: str = "cpu", alert_sec: float = 1.0,
                  alert_threshold: float | None = None) -> Pipeline:
    """The pipeline on a real guide (``model``: the mn04 tagger folder), warmed up like :func:`pipeline`'s."""
    from astsep.guide_loader import load_guide

    torch.set_num_threads(threads)
    cfg = AstsepConfig()
    cfg.guide.device = device
    if alert_threshold is not None:
        cfg.tagger.alert_threshold = alert_threshold
    pipe = Pipeline(cfg, load_guide(cfg, model))
    noise = torch.zeros(int(4.096 * SAMPLE_RATE)).uniform_(-0.1, 0.1)
    pipe.run(noise, "warm-up")
    excerpt_probs(pipe.guide, noise[: int(alert_sec * SAMPLE_RATE)])
    return pipe


def alert_scores(got: list[tuple[dict, float]], onsets: list[float], classes: list[str], sound_sec: float,
                 labels: list[str]) -> dict:
    """Per inserted sound: was an alert (an event whose category is not ``other``) reported within its span,
    and did its label fit the sound? Hit rate over the alertable sounds, false alarms over the everyday ones."""
    from astsep.devset import ESC50_FITTING

    hits, right, false = 0, 0, 0
    n_alert = sum(c in ALERTABLE for c in classes)
    for onset, cls in zip(onsets, classes):
        evs = [ev for ev, _ in got if ev.get("category", "other") != "other"
               and onset - 0.5 <= (ev.get("start_sec") or -1) <= onset + sound_sec]
        if cls in ALERTABLE:
            hits += bool(evs)
            right += any(ev.get("label") in ESC50_FITTING[cls] for ev in evs)
        else:
            false += bool(evs)
    n_every = len(classes) - n_alert
    return {"alertable": n_alert, "hit_rate": round(hits / max(1, n_alert), 3),
            "hit_rate_right_label": round(right / max(1, n_alert), 3), "everyday": n_every,
            "false_alarm_rate": round(false / max(1, n_every), 3)}


# the training side of the class split (astsep.data.classsplit.HELD_OUT holds siren, knock, cat, typing, laughter)
CALIBRATE_ALERTABLE = ("crying_baby", "clock_alarm", "glass_breaking")
CALIBRATE_EVERYDAY = ("dog", "car_horn", "footsteps", "engine", "rooster", "clapping", "sneezing", "pouring_water",
                      "toilet_flush")


def alert_curve(pipe: Pipeline, thresholds=(0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5)) -> dict:
    """The alert stage's decision on the loudest second of every clip (both ESC-50 folders) of the training-side
    classes: the share of alertable / everyday clips whose best alertable class reaches each threshold."""
    alert_ids = [i for ids in pipe.cfg.categories.sets.values() for i in ids]
    best = {}
    for group, classes in (("alertable", CALIBRATE_ALERTABLE), ("everyday", CALIBRATE_EVERYDAY)):
        vals = []
        for cls in classes:
            for f in sorted((SHARED_DATA / "esc50_more").glob(f"{cls}__*.flac")) + sorted(ESC.glob(f"{cls}__*.flac")):
                x = load_audio(f)[0].numpy()
                m = SAMPLE_RATE
                s0 = int(np.argmax(np.convolve(x ** 2, np.ones(m), "valid"))) if x.size > m else 0
                p = excerpt_probs(pipe.guide, torch.from_numpy(x[s0:s0 + m]))
                vals.append(float(p[alert_ids].max()))
        best[group] = np.asarray(vals)
    return {"clips": {g: int(v.size) for g, v in best.items()},
            "curve": [{"threshold": t, "hit": round(float((best["alertable"] >= t).mean()), 3),
                       "false_alarm": round(float((best["everyday"] >= t).mean()), 3)} for t in thresholds]}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def _stats(lat: list[float]) -> dict:
    return {"median": round(statistics.median(lat), 3) if lat else None,
            "p95": round(float(np.percentile(lat, 95)), 3) if lat else None,
            "max": round(max(lat), 3) if lat else None, "n": len(lat)}


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


def live_config(args, **kw) -> LiveConfig:
    return LiveConfig(alert_stage=not args.no_alert_stage, alert_sec=args.alert_sec, alert_hop_sec=args.alert_hop,
                      alert_post_trigger_sec=min(0.5, args.alert_sec),
                      cut_passes_when_behind=not args.all_passes, **kw)


def latency_case(pipe: Pipeline, name: str, args, real: list[tuple[str, Path]] | None = None) -> dict:
    x, onsets = make_stream(args.sounds, args.spacing, args.sound_sec, clips=[p for _, p in real] if real else None)
    lcfg = live_config(args, hop_sec=args.hop, hold_off_sec=args.hold_off)
    load0 = load()
    listener, got = run_stream(pipe, x, lcfg)
    lat: dict[str, list[float]] = {"first": [], "alert": [], "separation": []}
    for onset in onsets:
        match = [(ev, t) for ev, t in got if onset - 0.5 <= ev["start_sec"] <= onset + args.sound_sec]
        t_cap = listener.captured_at(int(onset * SAMPLE_RATE))
        for stage in lat:
            m = [t for ev, t in match if stage == "first" or ev.get("stage") == stage]
            if m:
                lat[stage].append(min(m) - t_cap)
    st = listener.stats
    per_window = st.analysis_sec / max(1, st.windows_analysed)
    per_excerpt = st.alert_sec / max(1, st.alert_windows_analysed)
    out = {
        "case": name, "device": args.device, "stream_sec": round(st.stream_sec, 1), "sounds": len(onsets),
        "occurrences": st.events, "updates": st.updates, "updates_sent": st.updates_sent,
        "retractions": st.retractions,
        "latency_first": _stats(lat["first"]),
        "alert": {"reported": len(lat["alert"]), "latency": _stats(lat["alert"]),
                  "excerpts_analysed": st.alert_windows_analysed, "excerpts_dropped": st.alert_windows_dropped,
                  "sec_per_excerpt": round(per_excerpt, 3), "busy_share": round(st.alert_real_time_factor, 3)},
        "separation": {"reported": len(lat["separation"]), "latency": _stats(lat["separation"]),
                       "windows_analysed": st.windows_analysed, "windows_dropped": st.windows_dropped,
                       "windows_cut": st.windows_cut,
                       "passes_per_window": round(st.passes_run / max(1, st.windows_analysed), 2),
                       "sec_per_window": round(per_window, 3), "busy_share": round(st.real_time_factor, 3),
                       "rtf_window": round(per_window / lcfg.window_sec, 3), "ast_forwards": st.ast_forwards,
                       "max_queue_wait_sec": round(st.max_queue_wait_sec, 3)},
        "load_avg_1min": [load0, load()],
    }
    if real:
        out["alerts"] = alert_scores(got, onsets, [c for c, _ in real], args.sound_sec, pipe.guide.labels)
    print(json.dumps(out), flush=True)
    out["per_sound"] = {k: [round(v, 3) for v in lat[k]] for k in lat}  # in the --json file only
    out["events"] = [{k: ev.get(k) for k in ("stage", "revision", "start_sec", "end_sec", "window_end_sec",
                                           "latency_sec")} for ev, _ in got]
    return out


def hop_case(pipe: Pipeline, hop: float, windows: int, args) -> dict:
    """The hop trigger at ``hop`` seconds over ``windows`` hops of stream: dropped windows (queue
    overflow while the stream runs; windows still queued at its end are analysed, not counted)."""
    seconds = windows * hop + 0.05
    x, _ = make_stream(max(1, int(seconds // 4)), 4.0, 1.0, background_dbfs=args.hop_background_dbfs)
    x = x[: int(seconds * SAMPLE_RATE)]
    lcfg = live_config(args, trigger="hop", hop_sec=hop, align_sec=min(0.1, hop))
    load0 = load()
    listener, _ = run_stream(pipe, x, lcfg, stop_on_drop=True)
    st = listener.stats
    per_window = st.analysis_sec / max(1, st.windows_analysed)
    out = {"case": f"fast, hop trigger {hop} s", "stream_sec": round(st.stream_sec, 1),
           "windows_queued": st.windows_queued, "windows_analysed": st.windows_analysed,
           "windows_dropped": st.windows_dropped, "windows_cut": st.windows_cut,
           "passes_per_window": round(st.passes_run / max(1, st.windows_analysed), 2),
           "analysis_sec_per_window": round(per_window, 3),
           "max_queue_wait_sec": round(st.max_queue_wait_sec, 3), "rtf_hop": round(per_window / hop, 3),
           "alert_excerpts_analysed": st.alert_windows_analysed, "alert_excerpts_dropped": st.alert_windows_dropped,
           "alert_sec_per_excerpt": round(st.alert_sec / max(1, st.alert_windows_analysed), 3),
           "load_avg_1min": [load0, load()]}
    print(json.dumps(out), flush=True)
    return out


def smallest_hop(pipe: Pipeline, per_window: float, hops: list[float], windows: int, args) -> tuple[float | None, list]:
    """Try the smallest hop in ``hops`` not under ``per_window`` seconds, then larger ones until one
    keeps up, and the next smaller one (which should drop)."""
    hops = sorted(hops)
    i = next((k for k, h in enumerate(hops) if h >= per_window), len(hops) - 1)
    cases, best, first = [], None, i
    while i < len(hops):
        r = hop_case(pipe, hops[i], windows, args)
        cases.append(r)
        if not r["windows_dropped"]:
            best = hops[i]
            break
        i += 1
    if best is not None and i == first and i > 0:  # the first one tried kept up: is a smaller one fine too?
        cases.append(hop_case(pipe, hops[i - 1], windows, args))
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
    p.add_argument("--device", default="cpu", help="cpu (float32; --fast: int8) or cuda (bfloat16)")
    p.add_argument("--alert-sec", type=float, default=1.0, help="alert stage: seconds per excerpt")
    p.add_argument("--alert-hop", type=float, default=1.0, help="alert stage: seconds between excerpts while loud")
    p.add_argument("--no-alert-stage", action="store_true",
                   help="the separation stage alone (as before issue 11's fix)")
    p.add_argument("--hop-background-dbfs", type=float, default=-55.0,
                   help="hop-trigger streams: the rain's level; above the trigger (-40) everything is loud, so the "
                        "alert stage classifies every --alert-hop seconds (the busiest case)")
    p.add_argument("--all-passes", action="store_true",
                   help="every window runs all its passes even when a newer one waits (as before: drops instead of cuts)")
    p.add_argument("--skip-default", action="store_true", help="only --fast")
    p.add_argument("--hops", type=float, nargs="*", default=[0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20],
                   help="hop-trigger hops to choose from for the smallest hop without drops (--fast)")
    p.add_argument("--hop-windows", type=int, default=6, help="analyses (hops) of stream per hop tried")
    p.add_argument("--max-passes", type=int, default=None, help="separation passes per window (default: the config's 3)")
    p.add_argument("--real", nargs="?", const=str(TAGGER), default=None, metavar="MODEL",
                   help="also run the real mn04 tagger (default folder: ../shared/models/efficientat_mn04_as) on a stream "
                        "of alertable sounds among everyday ones: latency, hit rate, false alarms")
    p.add_argument("--real-only", action="store_true", help="with --real: skip the forced-Siren AST cases")
    p.add_argument("--tagger-alert-threshold", type=float, default=None,
                   help="with --real: tagger.alert_threshold (default: the config's)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = {"args": vars(args), "live_config": dataclasses.asdict(live_config(args)), "cases": [],
               "smallest_hop_without_drops": None, "cpu_count": os.cpu_count(),
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    t0 = time.perf_counter()
    for fast in ([] if args.real_only else [True] if args.skip_default else [False, True]):
        pipe = pipeline(fast, args.threads, args.max_passes, args.device, args.alert_sec)
        res = latency_case(pipe, "fast" if fast else "default", args)
        results["cases"].append(res)
        if fast and args.hops:
            best, cases = smallest_hop(pipe, res["separation"]["sec_per_window"], args.hops, args.hop_windows, args)
            results["cases"] += cases
            results["smallest_hop_without_drops"] = best
        del pipe
    if args.real:
        real = real_sounds(args.sounds)
        pipe = real_pipeline(args.threads, args.real, args.device, args.alert_sec, args.tagger_alert_threshold)
        results["cases"].append(latency_case(pipe, "mn04 tagger", args, real))
        results["alert_curve"] = alert_curve(pipe)
        print(json.dumps({"alert_curve": results["alert_curve"]}), flush=True)
        del pipe
    results["wall_sec"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"smallest_hop_without_drops": results["smallest_hop_without_drops"],
                      "wall_sec": results["wall_sec"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
