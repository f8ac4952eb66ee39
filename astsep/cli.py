"""``python infer.py``: separate recordings, classify every source, write files, deliver events."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from .config import DEFAULT_MODEL, SAMPLE_RATE, load_config
from .errors import AstsepError

log = logging.getLogger("astsep")

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "separator.yaml"


def default_outbox() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "astsep" / "outbox.jsonl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py",
        description="Separate recordings into sources with the AST-guided separator, classify each source "
                    "(AudioSet label; danger / help / warning / other) and deliver the events to a backend.",
    )
    p.add_argument("-i", "--input", nargs="+", required=True, metavar="PATH",
                   help="audio file(s) or folder(s) of audio files (WAV, FLAC, Ogg, … any rate, any channels)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output folder (one input: files go straight in; several: one subfolder per input)")
    p.add_argument("-m", "--model", default=None,
                   help=f"AST model: Hub id or local folder saved with save_pretrained (default {DEFAULT_MODEL})")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="separator config (default configs/separator.yaml when present)")
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
    r = p.add_argument_group("trained refiner")
    r.add_argument("--refiner", default=None, metavar="CKPT",
                   help="refine every baseline source with a refiner checkpoint written by train.py")
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
    p.add_argument("--user-id", default="0", help="user_id sent with events (default 0)")
    p.add_argument("--angle", type=int, default=0, help="direction of arrival in degrees sent with events")
    p.add_argument("--outbox", default=None, metavar="PATH",
                   help=f"undelivered events wait here for a later run (default {default_outbox()})")
    p.add_argument("--backend-timeout", type=float, default=5.0, help="seconds per request (default 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail (-vv for debug)")
    return p


def _setup_logging(args) -> None:
    level = logging.ERROR if args.quiet else (logging.DEBUG if args.verbose > 1 else
                                              logging.INFO if args.verbose == 1 else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        warnings.filterwarnings("ignore")
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass


def _config(args):
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    overrides = {
        "guide.model": args.model, "guide.device": args.device, "guide.cache_dir": args.cache_dir,
        "separator.max_passes": args.max_passes, "separator.min_eratio": args.min_eratio,
    }
    cfg = load_config(path, overrides)
    if args.fast:
        from .guide import use_fast_settings

        use_fast_settings(cfg.guide)
    if args.allow_pickle:
        cfg.guide.allow_pickle = True
    if cfg.separator.max_passes < 1:
        raise AstsepError("--max-passes must be at least 1")
    if not 0 <= cfg.separator.min_eratio < 1:
        raise AstsepError("--min-eratio must be in [0, 1)")
    return cfg


def run(args) -> int:
    from .audio import find_inputs, load_audio
    from .pipeline import Pipeline, window_starts

    cfg = _config(args)
    if (args.query or args.query_audio or args.negative or args.negative_audio) and not args.refiner:
        raise AstsepError("--query/--query-audio/--negative need a trained refiner: pass --refiner CKPT")
    if args.query and args.query_audio:
        raise AstsepError("give either --query or --query-audio, not both")
    refiner = None
    if args.refiner:
        from .refine import Refiner

        refiner = Refiner.load(args.refiner, table=args.query_table, clap_ckpt=args.clap_ckpt)
    client = outbox = None
    if args.backend_url:
        from .backend import BackendClient, Outbox

        client = BackendClient(args.backend_url, timeout=args.backend_timeout)
        outbox = Outbox(Path(args.outbox) if args.outbox else default_outbox())

    inputs = find_inputs(args.input)
    out_root = Path(args.output)
    if out_root.exists() and not out_root.is_dir():
        raise AstsepError(f"--output {out_root} exists and is not a folder")
    stems = [p.stem for p in inputs]
    multi = len(inputs) > 1

    # Decode the first input before loading the model: a bad file fails in milliseconds.
    t0 = time.perf_counter()
    first = load_audio(inputs[0])
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe = Pipeline(cfg, refiner=refiner)
    query = _query(args, pipe) if refiner is not None else None
    t_model = time.perf_counter() - t0
    log.info("model %s loaded on %s in %.2f s", cfg.guide.model, pipe.guide.device, t_model)

    failures = 0
    durations = [_duration(p) for p in inputs]
    show_bar = not args.quiet and (multi or sum(durations) > 30)
    bar = None
    if show_bar:
        from tqdm import tqdm

        bar = tqdm(total=round(sum(durations), 1), unit="s", desc="audio separated", disable=None, file=sys.stderr,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}]")
    for n, path in enumerate(inputs):
        try:
            t0 = time.perf_counter()
            x, info = first if n == 0 else load_audio(path)
            t_dec = t_first if n == 0 else time.perf_counter() - t0
            done = [0.0]
            win_total = len(window_starts(x.numel(), int(round(cfg.window.window_sec * SAMPLE_RATE)),
                                          int(round(cfg.window.overlap_sec * SAMPLE_RATE))))

            def advance(windows: int, dur=durations[n], done=done, total=win_total) -> None:
                if bar is not None:
                    step = dur * windows / total
                    done[0] += step
                    bar.update(step)

            result = pipe.run(x, str(path), info, keep_traces=args.debug, progress=advance, query=query)
            result.stats["seconds"]["decode"] = round(t_dec, 4)
            result.stats["seconds"]["model_load"] = round(t_model, 4)
            sub = stems[n] if stems.count(stems[n]) == 1 else f"{stems[n]}_{n}"
            out_dir = out_root / sub if multi else out_root
            manifest = result.write(out_dir, debug=args.debug, config=cfg)
            if client is not None:
                _deliver(result, client, outbox, args, manifest)
            counts: dict[tuple[str, str], int] = {}
            for e in result.events:
                if e["kind"] == "source":
                    counts[(e["label"], e["category"])] = counts.get((e["label"], e["category"]), 0) + 1
            summary = ", ".join(f"{lab} ({cat}){f' x{c}' if c > 1 else ''}" for (lab, cat), c in counts.items())
            log.info("%s: %d source(s)%s -> %s", path, len(result.labels), f": {summary}" if summary else "", out_dir)
            if not args.quiet:
                print(f"{path} -> {out_dir}: {summary or 'no separated source'}", file=sys.stderr)
        except AstsepError as exc:
            failures += 1
            print(f"astsep: error: {exc}", file=sys.stderr)
            if not multi:
                return exc.exit_code
        finally:
            if bar is not None and n < len(durations):
                bar.update(max(0.0, durations[n] - (done[0] if "done" in locals() else 0.0)))
    if bar is not None:
        bar.close()
    return 1 if failures else 0


def _deliver(result, client, outbox, args, manifest: Path) -> None:
    """Deliver after the files are written: delivery never blocks or loses separation output."""
    from .audio import write_bytes_atomic
    from .backend import deliver, flush

    t0 = time.perf_counter()
    earlier = flush(outbox, client)
    # when the flush just found the backend unreachable, queue this run's events without waiting
    # through another round of retries
    backend_down = bool(earlier.pending) and not earlier.busy
    report = deliver(result.events, client, outbox, user_id=args.user_id, angle=args.angle, send=not backend_down)
    result.stats["delivery"] = {"earlier": earlier.to_dict(), "this_run": report.to_dict(),
                                "seconds": round(time.perf_counter() - t0, 4)}
    # add the report to this run's events.json, under the folder's lock, and only if no later run
    # has replaced the folder since
    from .errors import OutputError
    from .pipeline import output_lock

    try:
        with output_lock(manifest.parent):
            data = json.loads(manifest.read_text())
            if [e.get("event_id") for e in data.get("events", [])] == [e["event_id"] for e in result.events]:
                data["stats"]["delivery"] = result.stats["delivery"]
                write_bytes_atomic(manifest, json.dumps(data, indent=2, allow_nan=False).encode())
    except (OutputError, OSError, ValueError) as exc:
        log.warning("delivery report not added to %s: %s", manifest, exc)
    log.info("delivery: %s", report.summary())


def _query(args, pipe):
    """The --query / --query-audio embedding (with its negative), or None."""
    from .audio import load_audio
    from .refine import Query

    ref = pipe.refiner
    if not (args.query or args.query_audio):
        return None

    def audio_embedding(path: str):
        x, _ = load_audio(path)
        x = x[: int(round(pipe.cfg.window.window_sec * SAMPLE_RATE))].unsqueeze(0)
        if ref.query_source == "target_audio":
            return ref._check_dim(pipe.guide.embed(x.to(pipe.guide.device)).cpu()[0], "AST audio")
        if ref.text_encoder is None:
            raise AstsepError("this refiner takes CLAP queries: pass --clap-ckpt CKPT to embed an audio query")
        return ref._check_dim(ref.text_encoder.encode_audio(x)[0], "CLAP audio")

    def text_embedding(text: str):
        if ref.query_source == "target_audio":
            raise AstsepError("this refiner was trained with audio (AST embedding) queries: use --query-audio FILE")
        return ref.embed_text([text])[0]

    if args.query:
        pos, text = text_embedding(args.query), args.query
    else:
        pos, text = audio_embedding(args.query_audio), Path(args.query_audio).stem
    neg = neg_text = None
    if args.negative:
        neg, neg_text = text_embedding(args.negative), args.negative
    elif args.negative_audio:
        neg, neg_text = audio_embedding(args.negative_audio), Path(args.negative_audio).stem
    return Query(pos, text, neg, neg_text)


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
    _setup_logging(args)
    try:
        return run(args)
    except AstsepError as exc:
        print(f"astsep: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("astsep: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a bad input: still one line unless -v
        if args.verbose:
            raise
        print(f"astsep: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
