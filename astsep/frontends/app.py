"""``python -m astsep.frontends.app``: a web demo (Gradio) over the same pipeline as ``infer.py``.

Upload (or record) a file, optionally give a text or audio query when a refiner is loaded, and get
every separated source (label, category, confidence, time span; play, download), a zip of all
files with ``events.json``, the debug figure of each pass and the events table.

Two layers: :class:`Demo` is plain Python (model loading as the CLI does it, one separation into a
folder, the zip) and is tested without a browser; :func:`build_ui` is the Gradio page over it.
Separations go through Gradio's queue into two lanes that share the one model: files up to
``--short-sec`` (30 s) run in the short lane, longer ones in the long lane, one job per lane at a
time, so a visitor's short file never waits behind another's long one (only behind other short
ones). A file longer than ``--max-minutes`` (10) is refused at once with one line. Every
session writes into its own folder inside Gradio's cache; the folder and the session's uploads
are removed when the session ends (tab closed), and ``delete_cache`` removes anything older than
``--keep-minutes`` in any case.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import DEFAULT_MODEL
from ..errors import AstsepError, AudioError
from ..runtime import RunOptions, build_config, build_pipeline, build_query, build_refiner, check_queries, count_windows

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from a local demo
try:  # at module level: Gradio reads the event functions' annotations (gr.Request) from these globals
    import gradio as gr
except ImportError:  # main() says how to install it
    gr = None

log = logging.getLogger("astsep.app")

EVENT_COLUMNS = ["kind", "label", "category", "confidence", "start_sec", "end_sec", "pass", "window", "file"]
DEFAULT_MAX_MINUTES = 10.0
DEFAULT_SHORT_SEC = 30.0
QUEUE_WORKERS = 8  # Gradio workers for separations: the lanes, not Gradio, make jobs wait for the model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m astsep.frontends.app",
                                description="Web demo of the astsep separator (Gradio): upload or record a "
                                            "file, listen to and download every separated source.")
    p.add_argument("-m", "--model", default=None,
                   help=f"AST model: Hub id or local folder saved with save_pretrained (default {DEFAULT_MODEL})")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="separator config (default configs/separator.yaml when present)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="device (default auto)")
    p.add_argument("--max-passes", type=int, default=None, help="separation passes per window (default 3)")
    p.add_argument("--min-eratio", type=float, default=None,
                   help="stop when a pass removes less than this share of the energy (default 0.001)")
    p.add_argument("--fast", action="store_true", help="as infer.py --fast (int8 AST on CPU, bfloat16 on GPU)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="keep AST results on disk (as infer.py)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle (pytorch_model.bin) model weights; only for folders you trust")
    p.add_argument("--refiner", default=None, metavar="CKPT",
                   help="refiner checkpoint from train.py: refines every source and enables text/audio queries")
    p.add_argument("--query-table", default=None, metavar="PT",
                   help="text embedding table from `python -m astsep.embed` (for text queries)")
    p.add_argument("--clap-ckpt", default=None, metavar="CKPT", help="laion-clap checkpoint to embed text and audio")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-upload-mb", type=int, default=200, help="largest upload accepted, in MB (default 200)")
    p.add_argument("--max-minutes", type=float, default=DEFAULT_MAX_MINUTES,
                   help=f"longest audio accepted, minutes (default {DEFAULT_MAX_MINUTES:g}): a longer file is "
                        "refused at once instead of holding its lane for a long time")
    p.add_argument("--short-sec", type=float, default=DEFAULT_SHORT_SEC,
                   help=f"files up to this many seconds run in their own lane, never behind a longer one "
                        f"(default {DEFAULT_SHORT_SEC:g})")
    p.add_argument("--keep-minutes", type=float, default=60.0,
                   help="delete any file of the demo older than this even while its session is open (default 60)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail (-vv for debug)")
    return p


# --- the demo without a page -----------------------------------------------------------------
@dataclass
class SourceView:
    """One output file as the page shows it."""

    file: Path
    label: str
    kind: str  # "source" | "residual"
    category: str
    confidence: float | None
    spans: list[tuple[float, float]]

    @property
    def caption(self) -> str:
        conf = "n/a" if self.confidence is None else f"{self.confidence:.3f}"
        spans = ", ".join(f"{a:.2f}–{b:.2f} s" for a, b in self.spans) or "silent"
        return f"{self.label} · {self.category} · confidence {conf} · {spans}"


@dataclass
class DemoRun:
    """What one separation gave: the folder written by ``SeparationResult.write``, views of it."""

    out_dir: Path
    sources: list[SourceView]
    events: list[dict]
    figures: list[Path]
    zip_path: Path
    seconds: float = field(default=0.0)

    def event_rows(self) -> list[list]:
        return [[e.get(c) for c in EVENT_COLUMNS] for e in self.events]


class Demo:
    """The model (loaded once, as ``infer.py`` loads it) and one separation into a folder."""

    def __init__(self, opts: RunOptions, max_seconds: float = DEFAULT_MAX_MINUTES * 60,
                 short_seconds: float = DEFAULT_SHORT_SEC):
        from ..pipeline import Pipeline

        if not max_seconds > 0 or not short_seconds >= 0:
            raise AstsepError(f"--max-minutes must be > 0 and --short-sec >= 0 (got {max_seconds / 60:g}, {short_seconds:g})")
        self.opts = opts
        self.cfg = build_config(opts)
        self.refiner = build_refiner(opts)
        self.pipe = build_pipeline(opts, self.cfg, self.refiner)
        self.max_seconds, self.short_seconds = float(max_seconds), float(short_seconds)
        # two lanes over the one model (as live mode's two stages share it): a pipeline each, one job
        # at a time in each, so a short file never waits behind a long one
        self.lanes = {"long": (self.pipe, threading.Lock()),
                      "short": (Pipeline(self.cfg, self.pipe.guide, refiner=self.refiner), threading.Lock())}

    def lane(self, seconds: float) -> str:
        """``"short"`` for audio up to ``short_seconds`` long, else ``"long"``."""
        return "short" if seconds <= self.short_seconds else "long"

    def check_duration(self, seconds: float, name: str) -> None:
        """One :class:`AudioError` line for audio longer than ``max_seconds``."""
        if seconds > self.max_seconds:
            raise AudioError(f"{name} is {seconds / 60:.1f} min long; this demo separates at most "
                             f"{self.max_seconds / 60:g} min (--max-minutes): cut it, or use infer.py")

    def run(self, path: str | os.PathLike, out_dir: Path, name: str | None = None, query: str | None = None,
            query_audio: str | os.PathLike | None = None, debug: bool = True,
            progress: Callable[[int, int], None] | None = None) -> DemoRun:
        """Separate the audio file ``path`` into the new folder ``out_dir`` (files, figures,
        ``events.json``) and zip it beside as ``<stem>_astsep.zip``.

        ``name``: what the user called the file (the upload's own name; ``path`` is a temporary
        copy), used in ``events.json`` and in error messages. ``progress(done, total)`` counts
        windows. Raises :class:`AstsepError` (one line) for bad input or queries."""
        import time

        from ..audio import load_audio
        from ..events import stamp_occurred_at

        name = name or Path(path).name
        query = (query or "").strip() or None
        qopts = dataclasses.replace(self.opts, query=query, query_audio=str(query_audio) if query_audio else None)
        check_queries(qopts)
        t0 = time.perf_counter()
        try:
            header_seconds = _header_duration(path)
            self.check_duration(header_seconds, name)  # at once, before the file waits for a lane
            pipe, lock = self.lanes[self.lane(header_seconds)]
            with lock:
                check_queries(qopts, self.refiner)
                x, info = load_audio(path)
                self.check_duration(info.duration_sec, name)  # a header may understate the length
                q = build_query(qopts, pipe)
                total = count_windows(self.cfg, x.numel())
                done = [0]

                def advance(windows: int) -> None:
                    done[0] += windows
                    if progress is not None:
                        progress(done[0], total)

                if progress is not None:
                    progress(0, total)
                result = pipe.run(x, name, info, keep_traces=debug, progress=advance, query=q)
            # the upload's time is not the recording's: occurred_at stays unknown, as for a queued event
            stamp_occurred_at(result.events, None, "queued")
            manifest_path = result.write(out_dir, debug=debug, config=self.cfg)
        except AstsepError as exc:
            raise type(exc)(_rename_paths(str(exc), {str(path): name, str(query_audio): Path(str(query_audio)).name}
                                          if query_audio else {str(path): name})) from exc
        import json

        manifest = json.loads(manifest_path.read_text())
        zip_path = out_dir.parent / f"{Path(name).stem or 'audio'}_astsep.zip"
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in manifest["files"] + [manifest_path.name]:
                zf.write(out_dir / f, arcname=f)
        return DemoRun(out_dir=out_dir, sources=_views(result, out_dir), events=result.events,
                       figures=[out_dir / f for f in manifest["files"] if f.endswith(".png")], zip_path=zip_path,
                       seconds=time.perf_counter() - t0)


def _header_duration(path: str | os.PathLike) -> float:
    """Seconds of audio ``path``'s header announces (0 when it cannot be read: decoding will say why)."""
    import soundfile as sf

    try:
        return float(sf.info(os.fsencode(path)).duration)
    except Exception:  # noqa: BLE001 - any unreadable file is reported by load_audio
        return 0.0


def _rename_paths(message: str, names: dict[str, str]) -> str:
    """The temporary path of an upload, in a message, replaced by the name the user gave it."""
    for tmp, name in names.items():
        message = message.replace(tmp, name)
    return message


def _views(result, out_dir: Path) -> list[SourceView]:
    views = []
    for tr in result.tracks:
        evs = [e for e in result.events if e["file"] == tr.filename]
        cats = list(dict.fromkeys(e["category"] for e in evs)) or ["other"]
        confs = [e["confidence"] for e in evs if e.get("confidence") is not None]
        spans = [(e["start_sec"], e["end_sec"]) for e in evs if e.get("start_sec") is not None]
        views.append(SourceView(file=out_dir / tr.filename, label=tr.label, kind=tr.kind, category="/".join(cats),
                                confidence=max(confs) if confs else None, spans=sorted(spans)))
    return views


class PageClosed(Exception):
    """The session's page was closed while its file was being separated."""


class Sessions:
    """A folder per browser session inside ``root``, and the uploads the session sent; both go
    when the session ends (:meth:`close`) or the server stops (:meth:`close_all`)."""

    def __init__(self, root: Path, keep_seconds: float = 3600.0):
        self.root = Path(root)
        self.keep_seconds = keep_seconds
        self._dirs: dict[str, Path] = {}
        self._uploads: dict[str, set[Path]] = {}
        self._closed: set[str] = set()  # session ids are random per page load: never reopened
        self._lock = threading.Lock()

    def new_run_dir(self, session: str, stem: str) -> Path:
        """A new, not yet existing output folder for one run of ``session``."""
        from ..events import safe_name

        self.sweep()
        with self._lock:
            if session in self._closed:  # a queued job of a page closed meanwhile
                raise PageClosed
            d = self._dirs.get(session)
            if d is None:
                d = self._dirs[session] = self.root / secrets.token_hex(16)  # unguessable: served by URL
                d.mkdir(parents=True)
            return Path(tempfile.mkdtemp(prefix="run", dir=d)) / safe_name(stem, "audio")

    def sweep(self) -> None:
        """Remove every session's runs older than ``keep_seconds`` (a page left open for days);
        Gradio's ``delete_cache`` ages out the files it served, this the rest (``events.json``)."""
        import time

        limit = time.time() - self.keep_seconds
        for run in self.root.glob("*/run*"):
            try:
                if run.stat().st_mtime < limit:
                    shutil.rmtree(run, ignore_errors=True)
            except OSError:
                pass

    def is_open(self, session: str) -> bool:
        """False once :meth:`close` ran for ``session`` (its page was closed)."""
        with self._lock:
            return session not in self._closed

    def remember_upload(self, session: str, path: str | os.PathLike) -> None:
        with self._lock:
            self._uploads.setdefault(session, set()).add(Path(path))

    def close(self, session: str) -> None:
        with self._lock:
            self._closed.add(session)
            d = self._dirs.pop(session, None)
            # Gradio files uploads by content: an open session that sent the same file still needs it
            uploads = self._uploads.pop(session, set()).difference(*self._uploads.values())
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
        for p in uploads:
            _remove_upload(p)

    def close_all(self) -> None:
        for s in list(set(self._dirs) | set(self._uploads)):
            self.close(s)
        shutil.rmtree(self.root, ignore_errors=True)


def _remove_upload(path: Path) -> None:
    """Remove an uploaded file and the per-upload folder Gradio made for it (when now empty)."""
    try:
        path.unlink()
        path.parent.rmdir()
    except OSError:
        pass


# --- the page --------------------------------------------------------------------------------
def build_ui(demo: Demo, sessions: Sessions, keep_seconds: float):
    has_refiner = demo.refiner is not None
    with gr.Blocks(title="astsep", delete_cache=(max(60, int(keep_seconds // 4)), max(60, int(keep_seconds)))) as ui:
        gr.Markdown(f"## astsep: sound separation\nModel `{demo.pipe.model_name}`. Upload a recording (WAV, FLAC, "
                    "Ogg, …) or record one, then **Separate**. Files are deleted when you close this page.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Audio file", file_count="single", type="filepath", elem_id="upload")
                record = gr.Audio(label="…or record", sources=["microphone"], type="filepath", elem_id="record")
                # hidden without a refiner: the event keeps one signature either way
                query = gr.Textbox(label="Text query (optional): extract only this sound", elem_id="query",
                                   visible=has_refiner)
                query_clip = gr.File(label="…or a query clip (optional)", file_count="single", type="filepath",
                                     elem_id="query_clip", visible=has_refiner)
                debug = gr.Checkbox(value=True, label="debug figures (one per pass)", elem_id="debug")
                go = gr.Button("Separate", variant="primary", elem_id="separate")
            with gr.Column(scale=2):
                status = gr.HTML("", elem_id="status")
                everything = gr.File(label="Everything (zip: sources, figures, events.json)", elem_id="zip",
                                     interactive=False)
                sources_state = gr.State([])

                @gr.render(inputs=sources_state)
                def show_sources(views: list[dict]):
                    for v in views:
                        gr.Audio(value=v["file"], label=v["caption"], interactive=False, type="filepath",
                                 buttons=["download"], elem_classes=["astsep-source"])

        events = gr.Dataframe(headers=EVENT_COLUMNS, label="Events", interactive=False, elem_id="events")
        figures = gr.Gallery(label="Debug figures (one per pass)", columns=3, elem_id="figures")

        separate = _separate_handler(demo, sessions)
        go.click(separate, inputs=[upload, record, query, query_clip, debug],
                 outputs=[status, sources_state, everything, events, figures],
                 concurrency_limit=QUEUE_WORKERS, concurrency_id="separate")

        def end_session(request: gr.Request):
            sessions.close(request.session_hash or "anonymous")

        ui.unload(end_session)
    return ui


def _separate_handler(demo: Demo, sessions: Sessions):
    """The Separate button's event: one run of ``demo`` into a folder of the session, the page's
    outputs (status, sources, zip, events, figures) as Gradio takes them."""

    def separate(upload_path, record_path, q_text, q_clip, want_debug, request: gr.Request,
                 progress=gr.Progress()):
        session = request.session_hash or "anonymous"
        path = upload_path or record_path
        for p in (upload_path, record_path, q_clip):
            if p:
                sessions.remember_upload(session, p)
        empty = ("", [], None, None, [])
        if not path:
            return (_status("astsep: error: upload a file or record one first", error=True),) + empty[1:]
        name = Path(upload_path).name if upload_path else "recording.wav"

        def report(done: int, total: int) -> None:
            if not sessions.is_open(session):  # the page was closed: stop after this window
                log.info("page closed: stopped separating %s after %d of %d windows", name, done, total)
                raise PageClosed
            progress((done, total), desc=f"separating {name}", unit="windows")

        run_dir = None
        try:
            run_dir = sessions.new_run_dir(session, Path(name).stem)
            run = demo.run(path, run_dir, name=name, query=q_text, query_audio=q_clip, debug=want_debug,
                           progress=report)
            if not sessions.is_open(session):
                raise PageClosed
        except PageClosed:
            if run_dir is not None:
                shutil.rmtree(run_dir.parent, ignore_errors=True)  # nobody is left to download it
            return ("",) + empty[1:]
        except AstsepError as exc:
            return (_status(f"astsep: error: {_one_line(str(exc))}", error=True),) + empty[1:]
        except Exception as exc:  # noqa: BLE001 - a bug, not a bad input: one line, the traceback in the log
            log.exception("separating %s failed", name)
            return (_status(f"astsep: internal error: {type(exc).__name__}: {_one_line(str(exc))}", error=True),
                    ) + empty[1:]
        views = [{"file": str(v.file), "caption": f"{i:02d} {v.caption}"} for i, v in enumerate(run.sources)]
        n_src = sum(1 for v in run.sources if v.kind == "source")
        msg = f"{name}: {n_src} source(s) and the residual in {run.seconds:.1f} s"
        return (_status(msg), views, str(run.zip_path), run.event_rows(),
                [(str(f), f.name) for f in run.figures])

    return separate


def _status(line: str, error: bool = False) -> str:
    import html

    style = "color:#b91c1c;font-weight:600" if error else "color:inherit"
    kind = "error" if error else "done"
    return f'<p class="astsep-{kind}" style="{style}">{html.escape(line)}</p>'


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        import warnings

        warnings.filterwarnings("ignore")
    if gr is None:
        print('astsep: error: the web demo needs Gradio: pip install -e ".[app]"', file=sys.stderr)
        return 2
    from ..deps import require

    require()  # torch / torchaudio / transformers / soundfile that cannot be loaded: one line, exit 3
    try:
        demo = Demo(RunOptions.from_values(args), max_seconds=args.max_minutes * 60, short_seconds=args.short_sec)
    except AstsepError as exc:
        print(f"astsep: error: {exc}", file=sys.stderr)
        return exc.exit_code
    from gradio.utils import get_upload_folder

    sessions = Sessions(Path(get_upload_folder()) / "astsep-sessions", keep_seconds=args.keep_minutes * 60)
    ui = build_ui(demo, sessions, args.keep_minutes * 60)
    ui.queue(default_concurrency_limit=QUEUE_WORKERS)
    import signal

    def stop(signum, frame):  # a service manager's SIGTERM: stop as on Ctrl-C, removing every session's files
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    font = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page works offline
    try:
        ui.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, quiet=args.verbose == 0,
                  max_file_size=f"{args.max_upload_mb}mb", footer_links=[],
                  theme=gr.themes.Default(font=font, font_mono=["ui-monospace", "monospace"]))
    except KeyboardInterrupt:
        pass
    finally:
        sessions.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
