#!/usr/bin/env python
"""How long delivery makes a run wait when the backend is down, busy or asks to wait.

The unit tests (``tests/test_delivery.py``) check what is sent, kept and retried, and that a
``Retry-After`` is honoured and capped, without wall-clock bounds; this prints the seconds:

- backend down (connection refused): ``deliver`` of 5 events with the CLI's retries;
- 503 with ``Retry-After: 1``: the gap between the server's two requests (about 1 s expected);
- 429 with ``Retry-After: 30`` and ``max_backoff=0.2``: the whole ``deliver`` (about 0.2 s expected).

    python benchmarks/bench_delivery.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from astsep.delivery import BackendClient, Outbox, deliver  # noqa: E402


class _Backend(BaseHTTPRequestHandler):
    """Answers each request with the next queued ``(status, retry_after)``, then 201; records times."""

    answers: list[tuple[int, str | None]] = []
    times: list[float] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).times.append(time.monotonic())
        status, retry_after = type(self).answers.pop(0) if type(self).answers else (201, None)
        self.send_response(status)
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def _event(i: int) -> dict:
    """A danger event as the pipeline makes it (the fields the payload reads)."""
    return {"event_id": f"bench-{i}", "file": "in.wav", "pass": 1, "window": i, "start_sec": float(i),
            "end_sec": float(i) + 1.0, "label": "Siren", "class_id": 396, "confidence": 0.9,
            "top5": [{"label": "Siren", "class_id": 396, "prob": 0.9}], "category": "danger", "level_dbfs": -20.0,
            "energy_share": 0.5, "input": "in.wav"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/sound-events/"
    down, gap, capped = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            dead = BackendClient(f"http://127.0.0.1:{_free_port()}/sound-events/", timeout=5.0)
            t0 = time.monotonic()
            deliver([_event(i) for i in range(5)], dead, Outbox(Path(tmp) / f"down{run}.sqlite3"), user_id=6, angle=0)
            down.append(time.monotonic() - t0)

            _Backend.answers, _Backend.times = [(503, "1")], []
            deliver([_event(0)], BackendClient(url, backoff=0.01, max_backoff=5.0),
                    Outbox(Path(tmp) / f"503-{run}.sqlite3"), user_id=6, angle=0)
            gap.append(_Backend.times[1] - _Backend.times[0])

            _Backend.answers = [(429, "30")]
            t0 = time.monotonic()
            deliver([_event(0)], BackendClient(url, max_backoff=0.2), Outbox(Path(tmp) / f"429-{run}.sqlite3"),
                    user_id=6, angle=0)
            capped.append(time.monotonic() - t0)
    server.shutdown()
    figures = {"backend_down_5_events_s": down, "retry_after_1_gap_s": gap, "retry_after_30_capped_0.2_s": capped}
    for name, values in figures.items():
        print(f"{name:32s} median {statistics.median(values):.3f}  max {max(values):.3f}")
    print(json.dumps({k: [round(v, 3) for v in vs] for k, vs in figures.items()}))


if __name__ == "__main__":
    main()
