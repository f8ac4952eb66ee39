"""``python infer.py --live [-]``: listen to a sound card or stdin, events as JSON lines on stdout.

The options are ``infer.py``'s (its parser, :mod:`astsep.frontends.infer`, hands over here); the
model, the config and delivery come from :mod:`astsep.runtime`, the listening from :mod:`astsep.live`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys

from ..config import SAMPLE_RATE, AstsepConfig, LiveConfig, apply_overrides
from ..errors import ConfigError
from ..runtime import RunOptions, build_config, build_delivery, build_pipeline

log = logging.getLogger("astsep")


def live_overrides(args, live: LiveConfig) -> dict[str, object]:
    """``{"live.KEY": value, "doa.method": ...}`` for the ``--live`` shortcut options given, on top of
    ``live`` (the config's section so far): a shorter window or excerpt also bounds how long after an
    onset its analysis waits, and a hop shorter than the grid makes the grid the hop."""
    values = {"trigger": args.trigger, "trigger_dbfs": args.trigger_dbfs, "hop_sec": args.hop,
              "window_sec": args.window, "hold_off_sec": args.hold_off, "record_dir": args.record,
              "record_max_mb": args.record_max_mb, "alert_sec": args.alert_sec, "alert_hop_sec": args.alert_hop,
              "alert_threshold": args.alert_threshold}
    if args.no_alert_stage:
        values["alert_stage"] = False
    if args.all_passes:
        values["cut_passes_when_behind"] = False
    if args.no_retract:
        values["retract_unconfirmed"] = False
    if args.window is not None:  # post_trigger_sec is bounded by the window
        values["post_trigger_sec"] = min(live.post_trigger_sec, args.window)
    if args.alert_sec is not None:  # and alert_post_trigger_sec by the excerpt
        values["alert_post_trigger_sec"] = min(live.alert_post_trigger_sec, args.alert_sec)
    if args.hop is not None and args.hop < live.align_sec:
        values["align_sec"] = args.hop
    out: dict[str, object] = {f"live.{k}": v for k, v in values.items() if v is not None}
    if args.doa_method is not None:
        out["doa.method"] = args.doa_method
    return out


def live_config(args) -> AstsepConfig:
    """The run's config for ``infer.py --live``: :func:`astsep.runtime.build_config`, then the
    ``--live`` shortcut options (:func:`live_overrides`), each checked by its dataclass."""
    cfg = build_config(RunOptions.from_values(args))
    return apply_overrides(cfg, live_overrides(args, cfg.live))


def check_source_options(args) -> None:
    """The capture options that can be refused before the model loads, one line each."""
    if args.live == "-":
        return
    if getattr(args, "realtime", False):
        raise ConfigError("--realtime paces stdin: use it with --live - (a --live FILE is always played in real time)")
    if args.raw_format:
        raise ConfigError("--raw-format describes stdin: use it with --live -")
    if args.live != "mic" and not os.path.isfile(args.live):
        raise ConfigError(f"--live takes no value (the microphone), '-' (stdin) or an audio file; "
                          f"{args.live!r} is not a file (a sound card is chosen with --device-in)")


def open_source(args, block_sec: float):
    """The capture source of ``--live``: stdin (``-``) or a sound card."""
    from ..capture import FileSource, Paced, SoundDeviceSource, StreamSource

    check_source_options(args)
    if args.live == "-":
        source = StreamSource(sys.stdin.buffer, args.raw_format, block_sec)
        return Paced(source) if getattr(args, "realtime", False) else source
    if args.live != "mic":
        return Paced(FileSource(args.live, block_sec))
    device: int | str | None = args.device_in
    if isinstance(device, str) and device.isdigit():
        device = int(device)
    return SoundDeviceSource(device, args.channels, SAMPLE_RATE, block_sec)


def _direction(args, geometry, source, cfg: AstsepConfig):
    """The DOA estimator for the ``--mic-geometry`` ``geometry`` (None without one); checks the channels."""
    if geometry is None:
        if source.channels > 1:
            log.warning("%d channels without --mic-geometry: no direction of arrival, the channels are averaged",
                        source.channels)
        return None
    from ..doa import DOAEstimator

    if geometry.shape[1] != source.channels:
        raise ConfigError(f"--mic-geometry {args.mic_geometry} has {geometry.shape[1]} mics but the input "
                          f"has {source.channels} channel(s)")
    return DOAEstimator(geometry, cfg.doa)


def _print_event(ev: dict) -> None:
    sys.stdout.write(json.dumps(ev, allow_nan=False) + "\n")
    sys.stdout.flush()


def _summary(stats, lcfg: LiveConfig) -> str:
    d = stats.delivery
    sent = f"; delivery: {d['this_run']}, outbox pending {d['final_flush']['outbox_pending']}" if d else ""
    alerts = (f"alert stage: {stats.alert_windows_analysed} excerpt(s) analysed, {stats.alert_windows_dropped} "
              f"dropped, {stats.alert_events} alert(s), {stats.updates} updated by separation; "
              if lcfg.alert_stage else "")
    return (f"astsep live: {stats.stream_sec:.1f} s listened; {alerts}separation: {stats.windows_analysed} "
            f"window(s) analysed ({stats.windows_cut} cut short), {stats.windows_dropped} dropped; "
            f"{stats.events} event(s){' (stopped)' if stats.interrupted else ''}{sent}")


class _StopHandler:
    """Ctrl-C / SIGTERM: the first stops capture cleanly (``KeyboardInterrupt``: the window in
    progress is finished, the outbox flushed); the next one exits at once, code 130. Nothing is
    lost by that: every event printed was committed to the outbox before it was printed."""

    stops = 0

    def __call__(self, signum, frame) -> None:
        _StopHandler.stops += 1
        if _StopHandler.stops == 1:
            raise KeyboardInterrupt
        try:
            sys.stdout.flush()
        finally:
            os.write(2, b"astsep: interrupted again: exiting now (the events shown are in the outbox)\n")
            os._exit(130)


def run_live(args) -> int:
    """``infer.py --live``: events as JSON lines on stdout, a summary on stderr; Ctrl-C / SIGTERM stop
    capture, finish the window in progress, flush the outbox and exit 0."""
    from ..live import LiveListener

    opts = RunOptions.from_values(args)
    cfg = live_config(args)
    lcfg = cfg.live
    check_source_options(args)
    if args.live == "mic":  # before the model loads: a missing extra is one line at once
        from ..capture import check_sound_card_support

        check_sound_card_support()
    geometry = None
    if args.mic_geometry:  # a bad geometry is refused before the model loads
        from ..doa import load_geometry

        geometry = load_geometry(args.mic_geometry)
    sink = build_delivery(opts, cfg)

    old = {sig: signal.signal(sig, _StopHandler()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        pipe = build_pipeline(opts, cfg)  # before capture: a stream must not wait in a pipe while the model loads
        source = open_source(args, lcfg.block_sec)
        try:
            doa = _direction(args, geometry, source, cfg)
        except ConfigError:
            source.close()
            raise
        if not args.quiet:
            print(f"astsep live: listening to {source.name} ({source.channels} channel(s) at {source.sample_rate} Hz"
                  f"{', DOA ' + doa.name if doa else ''}); model {cfg.guide.model} on {pipe.guide.device}; "
                  "Ctrl-C stops", file=sys.stderr, flush=True)
        listener = LiveListener(pipe, lcfg, channels=source.channels, doa=doa, angle=args.angle,
                                on_event=_print_event, client=sink.client if sink else None,
                                outbox=sink, user_id=args.user_id)
        stats = listener.run(source)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if not args.quiet:
        print(_summary(stats, lcfg), file=sys.stderr)
    degraded = list(sink.degraded) if sink is not None else []
    # the outbox giving out during the run (the listener's sink shares the dispatcher: each line once)
    degraded += [ln for ln in (stats.delivery or {}).get("degraded", []) if ln not in degraded]
    for line in degraded:  # said even with -q: an alert may not have reached the backend
        print(f"astsep: warning: delivery degraded: {line}", file=sys.stderr)
    if degraded:
        from ..delivery import EXIT_DEGRADED

        return EXIT_DEGRADED
    return 0
