"""Helpers of the live-mode tests: real shared clips as streams, pipelines with a tiny AST forced
to one class, a real HTTP backend on 127.0.0.1, and a driver that steps a listener on a
:class:`~astsep.live.ManualClock` (time moves by the audio fed, never by sleeping)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import soundfile as sf

from astsep.config import AstsepConfig
from astsep.guide import ASTGuide
from astsep.live import ManualClock
from astsep.pipeline import Pipeline
from astsep.testing import force_class, tiny_ast
from conftest import ROOT, clip

SR = 16000
SIREN_AT = 3.0  # seconds into the stream


def level(x: np.ndarray, dbfs: float) -> np.ndarray:
    return (x * 10 ** (dbfs / 20) / np.sqrt(np.mean(x.astype(np.float64) ** 2))).astype(np.float32)


def siren_stream(seconds: float = 8.0, sirens: tuple[float, ...] = (SIREN_AT,), siren_sec: float = 2.0,
                 rain_dbfs: float = -55.0) -> np.ndarray:
    """Quiet rain (-55 dBFS, under the -40 dBFS trigger) with the shared siren clip at -20 dBFS
    inserted at each time in ``sirens``. Onsets: the siren clip starts loud (checked below)."""
    n = int(seconds * SR)
    rain = clip("rain").numpy()
    x = level(np.tile(rain, n // rain.size + 1)[:n], rain_dbfs)
    siren = clip("siren").numpy()
    seg = level(siren[: int(siren_sec * SR)], -20.0)
    assert 10 * np.log10(np.mean(seg[:800] ** 2)) > -40, "the siren clip must start at once"
    for t in sirens:
        x[int(t * SR):int(t * SR) + seg.size] += seg
    return x


def forced_pipe(class_id: int, name: str, runner_up: int | None = None) -> Pipeline:
    """A pipeline whose tiny AST answers ``class_id`` for everything (probability ~0.88 with a
    ``runner_up`` at ~0.12, else ~1)."""
    import torch

    m = tiny_ast(seed=1)
    force_class(m, class_id)
    if runner_up is not None:
        with torch.no_grad():
            m.classifier.dense.bias[runner_up] = 18.0
    cfg = AstsepConfig()
    return Pipeline(cfg, ASTGuide.from_model(m, cfg.guide, name=name))



@pytest.fixture(scope="module")
def siren_pipe():
    """A pipeline whose tiny AST names every sound *Siren* (danger): every source is an alert.
    A test module that imports this fixture gets one per module."""
    return forced_pipe(396, "siren tiny AST")


class Stepper:
    """Feeds ``x`` to a listener that was never started, block by block, moving ``clock`` by each
    block's duration before it arrives, and analyses what is queued after each block (an analysis
    takes no time unless a stand-in spends some with :meth:`spend`, during which capture goes on)."""

    def __init__(self, listener, x: np.ndarray, block: int = 512):
        self.lst, self.x, self.block, self.pos = listener, x, block, 0
        self.clock: ManualClock = listener.clock

    def spend(self, seconds: float) -> None:
        """``seconds`` of analysis: the stream goes on meanwhile (blocks arrive, items are queued)."""
        stop = min(self.x.shape[0], self.pos + int(round(seconds * SR)))
        while self.pos < stop:
            n = min(self.block, stop - self.pos)
            self.clock.advance(n / SR)
            self.lst.feed(self.x[self.pos:self.pos + n])
            self.pos += n

    def run(self):
        while self.pos < self.x.shape[0]:
            self.spend(self.block / SR)
            self.lst.process_pending()
        self.lst.finish_stream()
        self.lst.process_pending()
        return self.lst.close()


class Backend:
    """A real HTTP server on 127.0.0.1 that records every POST and answers 201, after ``delay`` seconds."""

    def __init__(self, delay: float = 0.0):
        self.requests: list[tuple[dict, dict]] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                state.requests.append((dict(self.headers), body))
                if delay:
                    time.sleep(delay)  # a slow backend (the server's side, not an assertion)
                data = b'{"ok": true}'
                try:
                    self.send_response(201)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed meanwhile
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/sound-events/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wav_stream_bytes(x: np.ndarray) -> tuple[bytes, bytes]:
    """(header, data) of a 16-bit WAV stream whose header says 0xFFFFFFFF bytes, as arecord writes to a pipe."""
    buf = io.BytesIO()
    sf.write(buf, (np.clip(x, -1, 1) * 32767).astype("<i2"), SR, format="WAV", subtype="PCM_16")
    wav = buf.getvalue()
    head, data = bytearray(wav[:44]), wav[44:]
    head[4:8] = head[40:44] = b"\xff\xff\xff\xff"
    return bytes(head), data


def start_live(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, str(ROOT / "infer.py"), "--live", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)


def feed_all(proc: subprocess.Popen, head: bytes, data: bytes, ready: threading.Event, close: bool = True) -> None:
    """Write the header, wait until infer.py listens, then every sample at once (a piped file)."""
    try:
        proc.stdin.write(head)
        proc.stdin.flush()
        ready.wait(300)
        proc.stdin.write(data)
        proc.stdin.flush()
        if close:
            proc.stdin.close()
    except (BrokenPipeError, ValueError):
        pass


def read_stderr(proc: subprocess.Popen, ready: threading.Event, lines: list[str]) -> None:
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        lines.append(line)
        if "listening to" in line:
            ready.set()
    ready.set()
