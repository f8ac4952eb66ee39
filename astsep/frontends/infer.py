"""``python infer.py``: separate recordings, classify every source, write files, deliver events."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from ..config import DEFAULT_MODEL, config_keys, type_name
from ..errors import AstsepError, AudioError, OutputError
from ..inputs import check_inputs_outside_outputs, output_names
from ..runtime import (RunOptions, build_config, build_delivery, build_export, build_pipeline, build_query,
                       build_refiner, check_queries, count_windows, default_outbox)

log = logging.getLogger("astsep")


def _iso_time(text: str) -> datetime:
    """``--recorded-at``: an ISO-8601 time; ``Z`` or an offset, else UTC."""
    from ..delivery import parse_iso_time

    try:
        return parse_iso_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r} (e.g. 2026-01-31T08:15:00Z)") from None


class _Parser(argparse.ArgumentParser):
    """argparse, except that a mistyped option is one line with the nearest option, not the usage."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            import difflib

            unknown = [t for t in message.split(":", 1)[1].split() if t.startswith("-")]
            if unknown:
                word = unknown[0].split("=", 1)[0]
                known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
                near = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
                hint = f" (did you mean {near[0]}?)" if near else ""
                self.exit(2, f"astsep: error: unknown option {word}{hint}; {self.prog} -h lists them\n")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """``infer.py``'s options. (Stays whole: a flat list of options, in the order ``-h`` shows them.)"""
    p = _Parser(
        prog="infer.py",
        description="Separate recordings into sources with the AST-guided separator, classify each source "
                    "(AudioSet label; danger / help / warning / other) and deliver the events to a backend.",
    )
    # required unless --live (checked in main(): argparse's own message)
    p.add_argument("-i", "--input", nargs="+", default=None, metavar="PATH",
                   help="audio file(s) or folder(s) of audio files (WAV, FLAC, Ogg, … any rate, any channels)")
    p.add_argument("-o", "--output", default=None, metavar="DIR",
                   help="output folder (one input: files go straight in; several: one subfolder per input)")
    p.add_argument("-m", "--model", default=None,
                   help=f"the guide: an AST (Hub id or local folder saved with save_pretrained; default {DEFAULT_MODEL}) "
                        "or an EfficientAT tagger folder (real weights: ../shared/models/efficientat_mn04_as)")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="separator config (default configs/separator.yaml when present); any key of it can also "
                        "be given as --section.key VALUE (listed below)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="device (default auto)")
    p.add_argument("--max-passes", type=int, default=None, help="separation passes per window (default 3)")
    p.add_argument("--min-eratio", type=float, default=None,
                   help="stop when a pass removes less than this share of the energy (default 0.001)")
    p.add_argument("--fast", action="store_true",
                   help="int8 AST on CPU (bfloat16 on GPU); the zero padding of inputs shorter than 10.24 s "
                        "is merged into a few tokens instead of run patch by patch")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="keep AST results on disk: re-running the same audio runs no AST forward")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle (pytorch_model.bin) model weights; only for folders you trust")
    p.add_argument("--debug", action="store_true", help="write debug_pass_K.png figures per pass")
    w = p.add_argument_group("written files")
    w.add_argument("--sample-rate", default=None, metavar="input|HZ",
                   help="rate of the written files: 'input' (the input's own, full band: what lies above 8 kHz "
                        "stays in the residual) or a rate in Hz (default 16000, the analysis rate)")
    w.add_argument("--format", default=None, choices=["float", "wav16", "wav24", "flac"],
                   help="sample format: float (32-bit float WAV, exact; default), wav16, wav24 or flac (24-bit)")
    w.add_argument("--crop", action="store_true", default=None,
                   help="cut each source to the span of its events (offsets in events.json); the residual stays "
                        "full length and the files still add up placed at their offsets")
    r = p.add_argument_group("trained refiner")
    r.add_argument("--refiner", default=None, metavar="CKPT",
                   help="refine every baseline source with a refiner checkpoint written by train.py; "
                        "without --model, the AST it was trained on is used")
    r.add_argument("--query", default=None, metavar="TEXT",
                   help="with --refiner: extract only this sound (e.g. 'a dog barking'), plus the rest")
    r.add_argument("--query-audio", default=None, metavar="FILE",
                   help="with --refiner: extract the sound that resembles this recording")
    r.add_argument("--negative", default=None, metavar="TEXT", help="with --query: a sound to leave out")
    r.add_argument("--negative-audio", default=None, metavar="FILE", help="with --query-audio: a sound to leave out")
    r.add_argument("--query-table", default=None, metavar="PT",
                   help="text embedding table from `python -m astsep.embed` (texts are looked up here first)")
    r.add_argument("--clap-ckpt", default=None, metavar="CKPT", help="laion-clap checkpoint to embed text and audio")
    p.add_argument("--backend-url", default=None, metavar="URL",
                   help="POST every non-'other' event here (http/https); token from $ASTSEP_BACKEND_TOKEN")
    p.add_argument("--user-id", type=int, default=0, help="user_id sent with events, an integer (default 0)")
    p.add_argument("--recorded-at", type=_iso_time, default=None, metavar="ISO8601",
                   help="when the recording started (e.g. 2026-01-31T08:15:00Z; no zone: UTC; the same for every "
                        "input); each event's occurred_at is this plus its start. Default: the file's "
                        "modification time minus its duration")
    p.add_argument("--angle", type=int, default=None,
                   help="direction of arrival in degrees sent with events (default 0; live: none unless a mic "
                        "array gives it)")
    p.add_argument("--outbox", default=None, metavar="PATH",
                   help=f"undelivered events wait here for a later run (default {default_outbox()})")
    p.add_argument("--require-delivery", action="store_true",
                   help="exit 6 when any event of this run was not delivered (the files are still written; "
                        "the events wait in the outbox)")
    p.add_argument("--backend-timeout", type=float, default=None,
                   help="seconds allowed per request in all, answer included (delivery.timeout, default 5)")
    _add_live_options(p)
    _add_config_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail (-vv for debug)")
    return p


def _add_live_options(p: argparse.ArgumentParser) -> None:
    """``--live``: listen continuously (astsep.live). Each value is a shortcut of a ``live.*`` (or
    ``doa.*``) config key, set by :func:`astsep.frontends.live.live_overrides` and checked by the dataclass."""
    g = p.add_argument_group("live mode (listen continuously; events as JSON lines on stdout)")
    g.add_argument("--live", nargs="?", const="mic", default=None, metavar="-|FILE",
                   help="listen until Ctrl-C: the default microphone, '-' for a WAV or raw stream on stdin, or an "
                        "audio FILE played at real-time pace (as a microphone would hear it)")
    g.add_argument("--realtime", action="store_true",
                   help="with --live -: read stdin at its real-time pace (a file piped in arrives faster than "
                        "it plays; without this, windows that arrive while one is analysed are dropped)")
    g.add_argument("--device-in", default=None, metavar="N", help="sound card input (index or name)")
    g.add_argument("--channels", type=int, default=1, help="sound card channels to capture (default 1)")
    g.add_argument("--mic-geometry", default=None, metavar="NAME|YAML",
                   help="microphone positions for the direction of arrival: respeaker4, respeaker6, linear2 or a "
                        "YAML file with 'mics: [[x, y], ...]' in metres, in channel order")
    g.add_argument("--doa-method", default=None, help="pyroomacoustics DOA algorithm (doa.method): SRP (SRP-PHAT, default), "
                                                       "MUSIC, NormMUSIC, TOPS, CSSM, WAVES")
    g.add_argument("--raw-format", default=None, metavar="TYPE:RATE:CH",
                   help="stdin is raw PCM of this format, e.g. s16le:16000:1 (default: a WAV stream)")
    g.add_argument("--trigger", default=None, choices=["level", "hop"],
                   help="level: analyse when the level rises above --trigger-dbfs, then every --live-hop while "
                        "it stays loud (default); hop: analyse every --live-hop seconds")
    g.add_argument("--trigger-dbfs", type=float, default=None, help="level trigger threshold (default -40 dBFS)")
    # --live-hop / --live-window: live.hop_sec / live.window_sec (--hop / --window: their earlier names)
    g.add_argument("--live-hop", "--hop", dest="hop", type=float, default=None, metavar="SEC",
                   help="seconds between analyses (live.hop_sec, default 2)")
    g.add_argument("--live-window", "--window", dest="window", type=float, default=None, metavar="SEC",
                   help="seconds of audio per analysis (live.window_sec, default 4.096, as the reference records)")
    g.add_argument("--hold-off", type=float, default=None, metavar="SEC",
                   help="the same class again within this many seconds is the same sound (default 2)")
    g.add_argument("--alert-hop", type=float, default=None, metavar="SEC",
                   help="fast alert stage: seconds between classifications of the latest excerpt while loud "
                        "(above --trigger-dbfs, with either trigger) (default 1)")
    g.add_argument("--alert-sec", type=float, default=None, metavar="SEC",
                   help="fast alert stage: seconds of audio per excerpt, one AST forward without separation "
                        "(default 1)")
    g.add_argument("--alert-threshold", type=float, default=None, metavar="P",
                   help="fast alert stage: alert when a danger/help/warning class of the excerpt's top 5 has at "
                        "least this probability (default 0.5)")
    g.add_argument("--no-alert-stage", action="store_true",
                   help="no fast alert stage: events come from the separated windows only")
    g.add_argument("--no-retract", action="store_true",
                   help="never retract a provisional alert (default: one a complete separation of its excerpt does "
                        "not confirm is retracted: an event with \"retracted\": true)")
    g.add_argument("--all-passes", action="store_true",
                   help="every window runs all its separation passes, even when a newer window waits (then "
                        "windows are dropped instead); default: a window behind stops after the pass in progress")
    g.add_argument("--record", default=None, metavar="DIR", help="keep each analysed window and its sources here")
    g.add_argument("--record-max-mb", type=float, default=None, help="size cap of --record (default 200 MB)")


class _ConfigKey(argparse.Action):
    """``--section.key VALUE``: collected as ``{"section.key": "VALUE"}`` in ``args.config_keys``, in
    command-line order; typed and checked by the dataclasses in :func:`_config`."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = dict(getattr(namespace, self.dest) or {})
        given[self.const] = values
        setattr(namespace, self.dest, given)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One ``--section.key`` option per field of :class:`astsep.config.AstsepConfig`, made from the
    dataclasses themselves (their names, types and defaults): nothing is listed twice.

    argparse, not jsonargparse (which ``train.py`` uses on the same dataclasses): importing it and
    building its parser for these dataclasses costs ~0.26 s, more than ``infer.py -h`` takes in all
    (~0.15 s), and argparse's messages and exit codes are pinned by the tests. Values are typed by
    :func:`astsep.config.parse_value` and checked by the dataclasses (:func:`_config`)."""
    g = p.add_argument_group(
        "config keys (each overrides that key of --config; the options above override these)")
    for dotted, (tp, default) in config_keys().items():
        shown = ("YAML mapping" if isinstance(default, dict) else
                 f"default {'null' if default is None else str(default).lower() if isinstance(default, bool) else default}")
        g.add_argument(f"--{dotted}", dest="config_keys", action=_ConfigKey, const=dotted, default=None,
                       metavar=type_name(tp).upper().replace(" ", ""), help=shown)


def _setup_logging(args) -> None:
    level = logging.ERROR if args.quiet else (logging.DEBUG if args.verbose > 1 else
                                              logging.INFO if args.verbose == 1 else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if level > logging.INFO:  # urllib3 warns on every delivery retry; astsep says once when it gives up
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    if not args.verbose:
        warnings.filterwarnings("ignore")
        # without importing transformers (seconds): it reads this when the model loads, and
        # Pipeline hides its progress bars while it does
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if "transformers" in sys.modules:  # already imported (astsep used from Python): set it directly
            sys.modules["transformers"].logging.set_verbosity_error()


def _recording_start(args, path: Path, info) -> tuple[datetime | None, str]:
    """When the recording of ``path`` started, and how we know: ``--recorded-at``, else the file's
    modification time minus its duration (a recorder writes the file until it stops)."""
    if args.recorded_at is not None:
        return args.recorded_at, "recorded_at"
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None, "queued"
    return datetime.fromtimestamp(mtime - info.duration_sec, tz=timezone.utc), "file_mtime"


def _find_inputs(raw_inputs: list[str], failures: list[int]) -> list[Path]:
    """Every ``-i`` expanded on its own; a bad one is reported (one line) and skipped like a bad file."""
    from ..inputs import find_inputs

    inputs: list[Path] = []
    for raw in raw_inputs:
        try:
            inputs.extend(find_inputs([raw]))
        except AstsepError as exc:
            failures.append(exc.exit_code)
            print(f"astsep: error: {exc}", file=sys.stderr)
    return inputs


class _Progress:
    """The seconds-of-audio bar on stderr (only where stderr is a terminal, never with ``-q``) and
    the error lines printed through it."""

    def __init__(self, durations: list[float], quiet: bool):
        self.bar = None
        if not quiet and durations:
            from tqdm import tqdm

            # disable=None: a bar only where stderr is a terminal; -v logs a line per input instead
            self.bar = tqdm(total=round(sum(durations), 1), unit="s", desc="audio separated", disable=None,
                            file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}]")
            if self.bar.disable:
                self.bar = None

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def update(self, seconds: float) -> None:
        if self.bar is not None:
            self.bar.update(seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Batch:
    """One ``infer.py -i ... -o ...`` run after its options are checked: the model is loaded at the
    first input that decodes (a bad file fails in milliseconds), each input is separated, its events
    committed to the outbox, its files written, then its events sent (whether the writing worked or not)."""

    def __init__(self, args, opts: RunOptions, cfg, refiner, sink, progress: _Progress):
        self.args, self.opts, self.cfg, self.refiner, self.sink = args, opts, cfg, refiner, sink
        self.export = build_export(opts)
        self.queued: list[str] = []  # outbox keys of this run's events (delivery's closing line)
        self.progress = progress
        self.pipe = self.query = None
        self.t_model = 0.0

    def _load_model(self) -> None:
        t0 = time.perf_counter()
        self.pipe = build_pipeline(self.opts, self.cfg, self.refiner)
        self.query = build_query(self.opts, self.pipe)
        self.t_model = time.perf_counter() - t0
        log.info("model %s loaded on %s in %.2f s", self.cfg.guide.model, self.pipe.guide.device, self.t_model)

    def separate(self, path: Path, out_dir: Path, duration: float, label: str) -> str:
        """Separate, write and deliver ``path`` (``duration`` seconds on the bar, advanced in full
        whatever happens); returns the summary line."""
        done = [0.0]
        try:
            summary = self._separate(path, out_dir, duration, label, done)
        except (AstsepError, OSError):  # this input failed: its seconds count as handled
            self.progress.update(max(0.0, duration - done[0]))
            raise
        # Ctrl-C (KeyboardInterrupt) leaves the bar where the work stopped, never at 100 %
        self.progress.update(max(0.0, duration - done[0]))
        return summary

    def _separate(self, path: Path, out_dir: Path, duration: float, label: str, done: list[float]) -> str:
        from ..audio import load_audio
        from ..events import stamp_occurred_at

        t0 = time.perf_counter()
        x, info = load_audio(path)
        t_dec = time.perf_counter() - t0
        if self.pipe is None:
            self._load_model()
        total = count_windows(self.cfg, x.numel())
        log.info("%s: separating %.1f s of audio (%d window(s)) %s", path, info.duration_sec, total, label)

        def advance(windows: int) -> None:
            step = duration * windows / total
            done[0] += step
            self.progress.update(step)

        result = self.pipe.run(x, str(path), info, keep_traces=self.args.debug, progress=advance, query=self.query)
        result.stats["seconds"]["decode"] = round(t_dec, 4)
        result.stats["seconds"]["model_load"] = round(self.t_model, 4)
        stamp_occurred_at(result.events, *_recording_start(self.args, path, info))
        if self.sink is None:
            result.write(out_dir, debug=self.args.debug, config=self.cfg, options=self.export)
            return _summary(path, out_dir, result)
        # the events are committed to the outbox as soon as they are known, before the files are
        # written (a full disk there must not lose them), and sent whatever the writing did
        t0 = time.perf_counter()
        keys = self.sink.queue(result.events)
        self.queued += keys
        manifest = None
        try:
            manifest = result.write(out_dir, debug=self.args.debug, config=self.cfg, options=self.export)
        finally:
            _deliver(result, self.sink, keys, manifest, t0)
        return _summary(path, out_dir, result)


def _summary(path: Path, out_dir: Path, result) -> str:
    counts: dict[tuple[str, str], int] = {}
    for e in result.events:
        if e["kind"] == "source":
            counts[(e["label"], e["category"])] = counts.get((e["label"], e["category"]), 0) + 1
    summary = ", ".join(f"{lab} ({cat}){f' x{c}' if c > 1 else ''}" for (lab, cat), c in counts.items())
    log.info("%s: %d source(s)%s -> %s", path, len(result.labels), f": {summary}" if summary else "", out_dir)
    return f"{path} -> {out_dir}: {summary or 'no separated source'}"


def run(args) -> int:
    """``infer.py -i ... -o ...``: exit code 0, or the one failure's code, or 1 for a mix."""
    opts = RunOptions.from_values(args)
    cfg = build_config(opts)
    check_queries(opts)
    build_export(opts)  # a bad --sample-rate is one line before any work
    failures: list[int] = []
    inputs = _find_inputs(args.input, failures)
    multi = len(inputs) + len(failures) > 1
    # Output folders are checked before any decoding or model work: a bad one is refused at once.
    out_root = Path(args.output)
    if out_root.exists() and not out_root.is_dir():
        raise OutputError(f"--output {out_root} exists and is not a folder")
    if not inputs:  # every input was bad (each said why): done before torch is even imported
        return failures[0] if len(set(failures)) == 1 else 1
    from ..outputs import check_output_folder  # torch, transformers: only now that there is work to do

    out_dirs = [out_root / name for name in output_names(inputs)] if multi else [out_root] * len(inputs)
    check_inputs_outside_outputs(inputs, out_dirs)  # a run replaces its output folders as a whole
    for d in dict.fromkeys(out_dirs):
        check_output_folder(d)
    refiner = build_refiner(opts)
    sink = build_delivery(opts, cfg)
    durations = [_duration(p) for p in inputs]
    progress = _Progress(durations, args.quiet)
    batch = _Batch(args, opts, cfg, refiner, sink, progress)
    summaries: list[str] = []  # printed once the bar is closed, never through it
    try:
        for n, path in enumerate(inputs):
            try:
                summaries.append(batch.separate(path, out_dirs[n], durations[n], f"[{n + 1}/{len(inputs)}]"))
            except (AudioError, OutputError) as exc:  # this input only: report, go on with the others
                failures.append(exc.exit_code)
                progress.say(f"astsep: error: {exc}")
    finally:
        progress.close()
    if not args.quiet:
        for line in summaries:
            print(line, file=sys.stderr)
    degraded = sink.degraded if sink is not None else []
    for line in degraded:  # said even with -q: an alert may not have reached the backend
        print(f"astsep: warning: delivery degraded: {line}", file=sys.stderr)
    waiting = _undelivered(sink, batch.queued, args.backend_url) if sink is not None else 0
    if not failures:
        if degraded:
            from ..delivery import EXIT_DEGRADED

            return EXIT_DEGRADED  # every input written; delivery went on without its outbox file
        if waiting and args.require_delivery:
            return EXIT_UNDELIVERED
        return 0
    if not summaries and len(set(failures)) == 1:
        return failures[0]  # nothing succeeded, for one reason: its code (2 input, 4 output folder)
    return 1  # some inputs failed (each said why above), the others were written


EXIT_UNDELIVERED = 6  # --require-delivery: every input written, but some of this run's events still wait


def _undelivered(sink, keys: list[str], url: str) -> int:
    """This run's events still waiting in the outbox; one closing line says how many, where and how to
    send them (even with -q: a script or a person must know an alert has not reached the backend)."""
    outbox = sink.outbox
    waiting = [k for k in keys if outbox.state(k) in ("pending", "parked")]
    if waiting:
        where = ("memory only (lost at exit: the outbox file was unusable)" if outbox.in_memory
                 else f"the outbox {outbox.path}")
        how = "" if outbox.in_memory else (f"; send them later: python -m astsep.delivery flush --outbox "
                                           f"{outbox.path} --backend-url {url}")
        print(f"astsep: {len(waiting)} event(s) not delivered yet wait in {where}{how}", file=sys.stderr)
    return len(waiting)


def _deliver(result, sink, keys: list[str], manifest: Path | None, t0: float) -> None:
    """Send this input's queued events (then whatever else in the outbox is due), and add the report
    to its ``events.json`` when that was written. Never raises for outbox or network trouble."""
    from ..audio import write_bytes_atomic
    from ..outputs import output_lock

    report = sink.send(keys)
    result.stats["delivery"] = {"this_run": report.to_dict(), "seconds": round(time.perf_counter() - t0, 4)}
    log.info("delivery: %s", report.summary())
    if manifest is None:
        return
    # add the report to this run's events.json, under the folder's lock, and only if no later run
    # has replaced the folder since
    try:
        with output_lock(manifest.parent):
            data = json.loads(manifest.read_text())
            if [e.get("event_id") for e in data.get("events", [])] == [e["event_id"] for e in result.events]:
                data["stats"]["delivery"] = result.stats["delivery"]
                write_bytes_atomic(manifest, json.dumps(data, indent=2, allow_nan=False).encode())
    except (OutputError, OSError, ValueError) as exc:
        log.warning("delivery report not added to %s: %s", manifest, exc)


def _duration(path: Path) -> float:
    """Seconds of audio in ``path`` from its header (0 when unreadable: decoding will say why)."""
    import soundfile as sf

    try:
        return float(sf.info(str(path)).duration)
    except Exception:  # noqa: BLE001 - any unreadable file is reported later, by load_audio
        return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.live is None and (args.input is None or args.output is None):
        parser.error("the following arguments are required: -i/--input, -o/--output (or --live)")
    if args.live is not None and (args.input is not None or args.output is not None):
        parser.error("--live listens to a microphone or stdin: leave out -i/--input and -o/--output")
    _setup_logging(args)
    try:
        if args.live is not None:
            from .live import run_live

            return run_live(args)
        return run(args)
    except AstsepError as exc:
        print(f"astsep: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("astsep: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a bad input: still one line unless -v
        from ..deps import diagnose

        dep = diagnose(exc)  # torch / torchaudio / transformers / soundfile that cannot be loaded: exit 3
        if dep is not None:
            print(f"astsep: error: {dep}", file=sys.stderr)
            return dep.exit_code
        if args.verbose:
            raise
        print(f"astsep: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
