#!/usr/bin/env python
"""The delivery fault matrix (issue 21): does any alert get lost, duplicated, or badly delayed?

Every row runs real code against a real HTTP backend on 127.0.0.1 (a ``ThreadingHTTPServer`` that
answers 2xx to every request it accepts and records, per idempotency key, the time of each 2xx),
with a real SQLite outbox, real child processes for kill -9 and full-disk rows (``RLIMIT_FSIZE``,
``SIGXFSZ`` ignored: writes fail with ``EFBIG`` as on a full disk). Alerts go through
:class:`astsep.delivery.Dispatcher` (queue, then send) as a front end sends them; after the fault,
the row's *recovery* is what a user or the next run does (``flush``; ``flush --all`` for parked
entries) with the backend healthy.

Per row: alerts produced; delivered (distinct keys the backend took); lost (produced, never taken);
duplicated (keys the backend took more than once: only a request in flight at a kill may be);
worst delay (from the moment an alert was produced to the backend taking it, recovery included).

The two live rows run ``infer.py --live -`` (a tiny random AST forced to answer *Siren*, bursts of
noise on stdin) and stop it hard once two alerts are printed; produced there = alerts printed.

    python benchmarks/bench_faults.py [--alerts 20] [--json] [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shared_data  # noqa: E402,F401 - the tiny AST's label names (its forced class is Siren, a danger)
from astsep.delivery import BackendClient, Dispatcher, Outbox, RetryPolicy, flush  # noqa: E402

for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(var, None)


# --------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int = 201
    delay: float = 0.0
    retry_after: str | None = None
    body_bytes: int = 2
    location: str | None = None
    drip: float = 0.0  # seconds between bytes of the answer


@dataclass
class Backend:
    """Answers each request with ``rule(key, n)`` (n: how many requests this key had before). A 2xx
    is recorded as *taken* once its delay has passed, before the answer is written: as a real
    backend acts on a request whether or not the client is still waiting for the answer."""

    rule: Callable[[str, int], Answer] = lambda key, n: Answer()
    taken: dict[str, list[float]] = field(default_factory=dict)  # key -> monotonic times of its 2xx answers
    seen: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sound-events/"

    def start(self, port: int = 0) -> "Backend":
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = self.headers.get("Idempotency-Key") or "?"
                with state.lock:
                    n = state.seen.get(key, 0)
                    state.seen[key] = n + 1
                    state.requests += 1
                a = state.rule(key, n)
                if a.delay:
                    time.sleep(a.delay)
                if 200 <= a.status < 300:  # acted on now, whether or not the client is still there
                    with state.lock:
                        state.taken.setdefault(key, []).append(time.monotonic())
                head = f"HTTP/1.1 {a.status} X\r\nContent-Length: {a.body_bytes}\r\nConnection: close\r\n"
                if a.retry_after:
                    head += f"Retry-After: {a.retry_after}\r\n"
                if a.location:
                    head += f"Location: {a.location}\r\n"
                data = (head + "\r\n").encode()
                try:
                    if a.drip:
                        for i in range(len(data)):
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                            time.sleep(a.drip)
                    else:
                        self.wfile.write(data)
                    left, chunk = a.body_bytes, b"x" * 65536
                    while left > 0:
                        self.wfile.write(chunk[:left])
                        left -= len(chunk)
                    self.wfile.flush()
                except OSError:
                    pass  # the client gave up (timeout, kill): the backend took the event all the same
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def event(key: str) -> dict:
    return {"event_id": key, "category": "danger", "label": "Smoke detector, smoke alarm", "level_dbfs": -18.0}


def client(url: str, **kw) -> BackendClient:
    opts = {"timeout": 1.0, "retries": 2, "backoff": 0.05, "max_backoff": 0.5}
    opts.update(kw)
    return BackendClient(url, **opts)


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    fault: str
    produced: dict[str, float]  # key -> monotonic time it was produced
    backend: Backend
    note: str = ""

    def figures(self) -> dict:
        taken = self.backend.taken
        delivered = [k for k in self.produced if k in taken]
        lost = [k for k in self.produced if k not in taken]
        dups = [k for k in self.produced if len(taken.get(k, ())) > 1]
        delays = [taken[k][0] - t for k, t in self.produced.items() if k in taken]
        return {"fault": self.fault, "produced": len(self.produced), "delivered": len(delivered), "lost": len(lost),
                "duplicated": len(dups), "worst_delay_s": round(max(delays), 2) if delays else None,
                "note": self.note}


def produce(dispatcher: Dispatcher, keys: list[str], produced: dict[str, float], gap: float = 0.0) -> None:
    for key in keys:
        produced[key] = time.monotonic()
        dispatcher.deliver([event(key)])
        if gap:
            time.sleep(gap)


def recover(box: Path | Outbox, url: str, include_parked: bool = False) -> None:
    outbox = box if isinstance(box, Outbox) else Outbox(box)
    with client(url) as c:
        flush(outbox, c, include_parked=include_parked, lock_timeout=30)


def keys_for(tag: str, n: int) -> list[str]:
    return [f"{tag}-{i:03d}" for i in range(n)]


def row_healthy(tmp: Path, n: int) -> Row:
    b = Backend().start()
    produced: dict[str, float] = {}
    produce(Dispatcher(client(b.url), tmp / "healthy.sqlite3", user_id=6), keys_for("ok", n), produced)
    b.stop()
    return Row("backend healthy", produced, b)


def row_down_then_up(tmp: Path, n: int) -> Row:
    port = free_port()
    url = f"http://127.0.0.1:{port}/sound-events/"
    box = tmp / "down.sqlite3"
    produced: dict[str, float] = {}
    produce(Dispatcher(client(url), box, user_id=6), keys_for("down", n), produced, gap=0.05)
    b = Backend().start(port)  # the backend comes back
    recover(box, b.url)
    b.stop()
    return Row("backend down (refused), then up", produced, b, "delay = downtime until the flush")


def fault_for(tmp: Path, n: int, name: str, seconds: float, fault: Answer, title: str, note: str) -> Row:
    """The backend answers ``fault`` for ``seconds``, then normally: ``n`` events produced with no
    retries meanwhile, then the outbox flushed once the fault is over."""
    until = time.monotonic() + seconds
    b = Backend(rule=lambda key, k: fault if time.monotonic() < until else Answer()).start()
    box = tmp / f"{name}.sqlite3"
    produced: dict[str, float] = {}
    produce(Dispatcher(client(b.url, retries=0), box, user_id=6), keys_for(name, n), produced)
    while time.monotonic() < until:
        time.sleep(0.05)
    recover(box, b.url)
    b.stop()
    return Row(title, produced, b, note)


def row_slow(tmp: Path, n: int) -> Row:
    return fault_for(tmp, n, "slow", 3.0, Answer(delay=4.0), "backend answering after 4 s (timeout 1 s) for 3 s",
                     "the backend took requests the client had given up on; the resends carry the same key")


def row_500_then_200(tmp: Path, n: int) -> Row:
    b = Backend(rule=lambda key, k: Answer(500) if k == 0 else Answer()).start()
    produced: dict[str, float] = {}
    produce(Dispatcher(client(b.url), tmp / "500.sqlite3", user_id=6), keys_for("e500", n), produced)
    b.stop()
    return Row("500 on each first try, then 201", produced, b)


def row_429(tmp: Path, n: int) -> Row:
    b = Backend(rule=lambda key, k: Answer(429, retry_after="30") if k == 0 else Answer()).start()
    produced: dict[str, float] = {}
    produce(Dispatcher(client(b.url, max_backoff=0.2), tmp / "429.sqlite3", user_id=6), keys_for("e429", n), produced)
    b.stop()
    return Row("429 + Retry-After: 30 on each first try", produced, b, "Retry-After capped at max_backoff 0.2 s")


def row_poison(tmp: Path, n: int) -> Row:
    poison = "poison-000"
    fixed = threading.Event()
    b = Backend(rule=lambda key, k: Answer(500) if key == poison and not fixed.is_set() else Answer()).start()
    box = tmp / "poison.sqlite3"
    produced: dict[str, float] = {}
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0, park_after=3.0)
    dispatcher = Dispatcher(client(b.url, retries=1), box, user_id=6, policy=policy)
    produce(dispatcher, [poison], produced)
    produce(dispatcher, keys_for("after-poison", n - 1), produced, gap=0.4)
    others = max(b.taken[k][0] - t for k, t in produced.items() if k != poison and k in b.taken)
    state = Outbox(box).state(poison)
    fixed.set()  # the backend is fixed; the parked entry goes out with flush --all
    recover(box, b.url, include_parked=True)
    b.stop()
    return Row("one entry always 500 (poison) ahead of the rest", produced, b,
               f"newer alerts' worst delay {others:.2f} s; poison was '{state}' until flush --all")


def row_redirect(tmp: Path, n: int) -> Row:
    b = Backend().start()
    wrong = Backend(rule=lambda key, k: Answer(301, location="http://elsewhere.invalid/")).start()
    box = tmp / "redirect.sqlite3"
    produced: dict[str, float] = {}
    produce(Dispatcher(client(wrong.url), box, user_id=6), keys_for("moved", n), produced)
    recover(box, b.url)  # the user fixes --backend-url and flushes
    wrong.stop()
    b.stop()
    return Row("301 redirect (never followed), flushed to the right URL", produced, b)


def row_drip(tmp: Path, n: int) -> Row:
    return fault_for(tmp, n, "drip", 2.0, Answer(drip=0.3), "backend dripping its answer (1 byte / 0.3 s) for 2 s",
                     "cut at the 1 s total deadline; the backend had taken them: resends carry the same key")


def row_huge_body(tmp: Path, n: int) -> Row:
    import resource

    b = Backend(rule=lambda key, k: Answer(500, body_bytes=50 * 2**20) if k == 0 else Answer()).start()
    produced: dict[str, float] = {}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    produce(Dispatcher(client(b.url, timeout=10.0), tmp / "huge.sqlite3", user_id=6), keys_for("huge", n), produced)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    b.stop()
    return Row("50 MB response body on each first try (500)", produced, b, f"peak RSS grew {grew:.0f} MiB")


_KILL_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from astsep.delivery import BackendClient, Dispatcher
dispatcher = Dispatcher(BackendClient(sys.argv[2], timeout=10, retries=0), sys.argv[3], user_id=6)
times = open(sys.argv[4], "a")
for i in range(int(sys.argv[5])):
    key = "kill-%03d" % i
    times.write(json.dumps([key, time.monotonic()]) + "\n"); times.flush()
    dispatcher.deliver([{"event_id": key, "category": "danger", "label": "Smoke detector", "level_dbfs": -18}])
"""


def row_kill(tmp: Path, n: int) -> Row:
    b = Backend(rule=lambda key, k: Answer(delay=0.1)).start()
    box, times = tmp / "kill.sqlite3", tmp / "kill.times"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(ROOT), b.url, str(box), str(times), str(n)])
    deadline = time.monotonic() + 60
    while b.requests < n // 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    produced = {k: t for k, t in (json.loads(line) for line in times.read_text().splitlines())}
    b.rule = lambda key, k: Answer()
    recover(box, b.url)
    b.stop()
    return Row("client kill -9 mid-delivery (backend 0.1 s per answer)", produced, b,
               f"killed after {len(produced)} produced; the kill took the rest of the run with it")


_SENDER_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from astsep.delivery import BackendClient, Dispatcher
dispatcher = Dispatcher(BackendClient(sys.argv[2], timeout=10, retries=1), sys.argv[3], user_id=6, lock_timeout=30)
out = {}
for i in range(int(sys.argv[5])):
    key = "%s-%03d" % (sys.argv[4], i)
    out[key] = time.monotonic()
    dispatcher.deliver([{"event_id": key, "category": "danger", "label": "Smoke detector", "level_dbfs": -18}])
print(json.dumps(out))
"""


def row_two_senders(tmp: Path, n: int) -> Row:
    b = Backend(rule=lambda key, k: Answer(delay=0.02)).start()
    box = tmp / "two.sqlite3"
    procs = [subprocess.Popen([sys.executable, "-c", _SENDER_CHILD, str(ROOT), b.url, str(box), tag, str(n // 2)],
                              stdout=subprocess.PIPE, text=True) for tag in ("senderA", "senderB")]
    produced: dict[str, float] = {}
    for p in procs:
        out, _ = p.communicate(timeout=120)
        produced.update(json.loads(out))
    recover(box, b.url)
    b.stop()
    return Row("two processes sending from one outbox", produced, b)


def row_corrupt(tmp: Path, n: int, kind: str) -> Row:
    box = tmp / f"{kind}.sqlite3"
    if kind == "malformed":
        outbox = Outbox(box)
        outbox.add_many((f"old{i}", {"pad": "x" * 500}) for i in range(200))
        with sqlite3.connect(box) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        data = bytearray(box.read_bytes())
        for off in range(4096 + 100, len(data), 4096):
            data[off:off + 64] = b"\xde\xad\xbe\xef" * 16
        box.write_bytes(bytes(data))
    else:
        box.write_text("not a database\n")
    b = Backend().start()
    produced: dict[str, float] = {}
    dispatcher = Dispatcher(client(b.url), box, user_id=6)
    produce(dispatcher, keys_for(kind, n), produced)
    b.stop()
    kept = [p.name for p in tmp.iterdir() if p.name.startswith(f"{kind}.sqlite3.unusable-") and not p.name.endswith(("-wal", "-shm"))]
    what = "corrupted outbox (malformed pages)" if kind == "malformed" else "outbox file that is not a database"
    return Row(what, produced, b, f"moved aside as {len(kept)} file(s), fresh outbox; degraded={bool(dispatcher.degraded)}")


_FULL_CHILD = r"""
import json, resource, signal, sys, time
sys.path.insert(0, sys.argv[1])
from astsep.delivery import BackendClient, Dispatcher
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
at_open = sys.argv[4] == "open"
if at_open:
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
dispatcher = Dispatcher(BackendClient(sys.argv[2], timeout=5, retries=1), sys.argv[3], user_id=6)
out = {}
for i in range(int(sys.argv[5])):
    if not at_open and i == int(sys.argv[5]) // 2:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # the disk fills up mid-run
    key = "full-%s-%03d" % (sys.argv[4], i)
    out[key] = time.monotonic()
    dispatcher.deliver([{"event_id": key, "category": "danger", "label": "Smoke detector", "level_dbfs": -18}])
print(json.dumps({"produced": out, "degraded": dispatcher.degraded}))
"""


def row_full_disk(tmp: Path, n: int, when: str) -> Row:
    b = Backend().start()
    box = tmp / f"full-{when}.sqlite3"
    res = subprocess.run([sys.executable, "-c", _FULL_CHILD, str(ROOT), b.url, str(box), when, str(n)],
                         capture_output=True, text=True, timeout=120)
    out = json.loads(res.stdout)
    b.stop()
    what = "outbox on a full disk (from the start)" if when == "open" else "outbox disk fills up mid-run"
    return Row(what, out["produced"], b, f"in-memory outbox; degraded lines: {len(out['degraded'])}")


def _siren_model(tmp: Path) -> Path:
    """A tiny random AST forced to answer 396 "Siren" (category danger) for everything, saved."""
    from astsep.testing import force_class, tiny_ast

    d = tmp / "siren_ast"
    if not d.is_dir():
        m = tiny_ast(seed=1)
        force_class(m, 396)
        m.save_pretrained(d)
    return d


def _burst_stream(bursts: tuple[float, ...], seconds: float) -> tuple[bytes, bytes]:
    """(header, data) of a 16-bit WAV stream (length 0xFFFFFFFF, as arecord writes to a pipe): quiet
    noise at -55 dBFS with a 1 s noise burst at -20 dBFS at each time in ``bursts``."""
    import io

    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    x = rng.standard_normal(int(seconds * 16000)).astype(np.float32) * 10 ** (-55 / 20)
    for t in bursts:
        i = int(t * 16000)
        x[i:i + 16000] += rng.standard_normal(16000).astype(np.float32) * 10 ** (-20 / 20)
    buf = io.BytesIO()
    sf.write(buf, (np.clip(x, -1, 1) * 32767).astype("<i2"), 16000, format="WAV", subtype="PCM_16")
    wav = buf.getvalue()
    head = bytearray(wav[:44])
    head[4:8] = head[40:44] = b"\xff\xff\xff\xff"
    return bytes(head), wav[44:]


def row_live_stop(tmp: Path, n: int, how: str) -> Row:
    """``infer.py --live -`` with a backend answering after 4 s: two alerts printed, then kill -9 or
    two SIGINTs 0.3 s apart. Produced: the alerts printed on stdout (category not other)."""
    b = Backend(rule=lambda key, k: Answer(delay=4.0)).start()
    box = tmp / f"live-{how}.sqlite3"
    head, data = _burst_stream((1.0, 4.5), 8.0)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "infer.py"), "--live", "-", "-m", str(_siren_model(tmp)),
                             "--backend-url", b.url, "--outbox", str(box)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    listening = threading.Event()

    def read_err() -> None:
        for line in proc.stderr:
            if b"listening to" in line:
                listening.set()
        listening.set()

    def feed() -> None:  # the header, then every sample at once; stdin stays open (a microphone)
        try:
            proc.stdin.write(head)
            proc.stdin.flush()
            listening.wait(300)
            proc.stdin.write(data)
            proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    threading.Thread(target=read_err, daemon=True).start()
    threading.Thread(target=feed, daemon=True).start()
    produced: dict[str, float] = {}
    while len(produced) < 2:
        line = proc.stdout.readline()
        if not line:
            break
        ev = json.loads(line)
        if ev.get("category") != "other" and not ev.get("revision") and not ev.get("retracted"):
            produced.setdefault(ev["event_id"], time.monotonic())
    if how == "kill":
        proc.kill()
    else:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
    rc = proc.wait(60)
    b.rule = lambda key, k: Answer()
    recover(box, b.url)
    time.sleep(4.5)  # a request in flight at the stop is still being answered (4 s): let the backend finish it
    b.stop()
    what = "live: kill -9 while a 4 s backend holds a request" if how == "kill" else \
        "live: two SIGINTs 0.3 s apart, 4 s backend"
    return Row(what, produced, b, f"exit {rc}; produced = alerts printed on stdout")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alerts", type=int, default=20, help="alerts per row (default 20)")
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    ap.add_argument("--only", default=None, help="run only the rows whose function name contains this")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # each row's expected warnings (timeouts, redirects…) are its point
    n = args.alerts
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        matrix = [("healthy", row_healthy), ("down", row_down_then_up), ("slow", row_slow),
                  ("500", row_500_then_200), ("429", row_429), ("poison", row_poison), ("redirect", row_redirect),
                  ("drip", row_drip), ("huge_body", row_huge_body), ("kill", row_kill),
                  ("two_senders", row_two_senders),
                  ("corrupt", lambda t, k: row_corrupt(t, k, "malformed")),
                  ("not_a_db", lambda t, k: row_corrupt(t, k, "not_a_db")),
                  ("full_disk_open", lambda t, k: row_full_disk(t, k, "open")),
                  ("full_disk_midrun", lambda t, k: row_full_disk(t, k, "midrun")),
                  ("live_kill", lambda t, k: row_live_stop(t, k, "kill")),
                  ("live_sigint", lambda t, k: row_live_stop(t, k, "sigint"))]
        for name, make in matrix:
            if args.only is None or args.only in name:
                rows.append(make(tmp, n))
    figures = [r.figures() for r in rows]
    print("| fault | alerts produced | delivered | lost | duplicated | worst delay (s) | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for f in figures:
        print(f"| {f['fault']} | {f['produced']} | {f['delivered']} | {f['lost']} | {f['duplicated']} | "
              f"{f['worst_delay_s']} | {f['note']} |")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
