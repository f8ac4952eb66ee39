"""With the backend unreachable, infer.py still succeeds, and says in one closing line what waits where
and how to send it; --require-delivery turns that into exit code 6 (issue 19 item 11)."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import ROOT, SEED_RECORDING
from infer_runner import infer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_undelivered_events_are_named_with_their_outbox_and_the_flush_command(tmp_path, siren_model_dir, shared):
    url = f"http://127.0.0.1:{_closed_port()}/sound-events/"
    outbox = tmp_path / "outbox.sqlite3"
    args = ["-i", str(SEED_RECORDING), "-m", str(siren_model_dir), "--backend-url", url, "--outbox", str(outbox),
            "--backend-timeout", "0.5", "-q"]
    proc = infer(*args, "-o", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr  # separation succeeded: the files are written
    lines = [ln for ln in proc.stderr.splitlines() if "not delivered yet" in ln]
    assert len(lines) == 1, proc.stderr
    m = re.fullmatch(r"astsep: (\d+) event\(s\) not delivered yet wait in the outbox (\S+); send them later: (.+)",
                     lines[0])
    assert m and int(m.group(1)) >= 1 and m.group(2) == str(outbox), lines[0]
    assert json.loads((tmp_path / "a" / "events.json").read_text())["events"]

    required = infer(*args, "-o", str(tmp_path / "b"), "--require-delivery")
    assert required.returncode == 6, required.stderr

    received: list[dict] = []

    class Backend(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # the printed command, pointed at a backend that is up now, delivers what waited
        cmd = shlex.split(m.group(3))
        assert cmd[:3] == ["python", "-m", "astsep.delivery"]
        cmd[cmd.index("--backend-url") + 1] = f"http://127.0.0.1:{server.server_port}/sound-events/"
        flushed = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert flushed.returncode == 0, flushed.stderr
    finally:
        server.shutdown()
    assert len(received) >= int(m.group(1))
