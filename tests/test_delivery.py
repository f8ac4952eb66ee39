"""Event delivery against a real HTTP server on 127.0.0.1 (no mocks of the network layer).

The server (``FakeBackend``) records every request (server-side monotonic time, path, headers, JSON
body), can be scripted per request (status, delay, Retry-After, body) and, like a well-behaved
backend, deduplicates by ``Idempotency-Key``: ``processed`` counts how often each key was *acted
on* (must be 1), while ``requests`` keeps every raw request (resends included).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from astsep.delivery import (
    MEMORY,
    BackendClient,
    DeliveryReport,
    Outbox,
    RetryPolicy,
    build_payload,
    deliver,
    flush,
    open_outbox,
    queue_events,
    send_queued,
    validate_url,
)
from astsep.errors import BackendError

REPO = Path(__file__).resolve().parents[1]
PAYLOAD_FIELDS = {
    "user_id", "sound_type", "sound_detail", "angle", "occurred_at", "sound_icon", "location_image_url", "decibel",
}
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


# --------------------------------------------------------------------------------------------------
# A scriptable, recording backend
# --------------------------------------------------------------------------------------------------


@dataclass
class Action:
    """How the server answers one request."""

    status: int = 200
    delay: float = 0.0  # seconds to sleep before answering
    retry_after: str | None = None
    body: str | None = None  # default: {"ok": true} for 2xx, {"detail": "..."} otherwise
    echo_auth: bool = False  # put the received Authorization header in the body (a leaky backend)


@dataclass
class Request:
    t: float  # time.monotonic() when the server had read the request
    path: str
    headers: dict[str, str]
    body: Any
    key: str | None


@dataclass
class FakeBackend:
    url: str = ""
    script: collections.deque = field(default_factory=collections.deque)
    default: Action = field(default_factory=Action)
    requests: list[Request] = field(default_factory=list)
    processed: collections.Counter = field(default_factory=collections.Counter)
    poison: set = field(default_factory=set)  # keys always answered 500, whatever the script says
    lock: threading.Lock = field(default_factory=threading.Lock)

    def queue(self, *actions: Action) -> None:
        with self.lock:
            self.script.extend(actions)

    def next_action(self) -> Action:
        with self.lock:
            return self.script.popleft() if self.script else self.default

    def keys(self) -> list[str | None]:
        with self.lock:
            return [r.key for r in self.requests]

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


def _handler(state: FakeBackend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            key = self.headers.get("Idempotency-Key")
            with state.lock:
                state.requests.append(Request(time.monotonic(), self.path, dict(self.headers), body, key))
            action = Action(status=500) if key in state.poison else state.next_action()
            if action.delay:
                time.sleep(action.delay)
            if 200 <= action.status < 300 and key is not None:
                with state.lock:
                    state.processed[key] += 0 if key in state.processed else 1  # dedup by key
            if action.body is not None:
                text = action.body
            elif action.echo_auth:
                text = json.dumps({"detail": "bad request", "auth": self.headers.get("Authorization")})
            elif 200 <= action.status < 300:
                text = json.dumps({"ok": True})
            else:
                text = json.dumps({"detail": f"scripted {action.status}"})
            data = text.encode()
            try:
                self.send_response(action.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if action.retry_after is not None:
                    self.send_header("Retry-After", action.retry_after)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout) or was killed

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy may intercept 127.0.0.1, and no token from the developer's shell leaks in."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                "ASTSEP_BACKEND_TOKEN"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def start_server() -> Iterator[Callable[[], FakeBackend]]:
    """Factory: start a FakeBackend on 127.0.0.1 (ephemeral port) in a thread; all stopped at teardown."""
    servers: list[ThreadingHTTPServer] = []

    def start() -> FakeBackend:
        state = FakeBackend()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        state.url = f"http://127.0.0.1:{server.server_address[1]}/sound-events/"
        return state

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server(start_server: Callable[[], FakeBackend]) -> FakeBackend:
    return start_server()


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening on it (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_client(url: str, **kw: Any) -> BackendClient:
    opts: dict[str, Any] = {"timeout": 2.0, "retries": 2, "backoff": 0.05, "max_backoff": 2.0}
    opts.update(kw)
    return BackendClient(url, **opts)


def rows(path: Path) -> list[tuple[Any, ...]]:
    """The outbox table as any SQLite client sees it: (key, state, http_status, attempts, reason), queue order."""
    with sqlite3.connect(path) as db:
        return db.execute("SELECT key, state, http_status, attempts, reason FROM outbox ORDER BY rowid").fetchall()


def make_event(i: int, category: str = "danger", **extra: Any) -> dict[str, Any]:
    ev = {
        "event_id": f"ev-{i:04d}-{category}",
        "file": "in.wav",
        "pass": 1,
        "window": i,
        "start_sec": float(i),
        "end_sec": float(i) + 1.0,
        "label": "Siren" if category != "other" else "Music",
        "class_id": 396,
        "confidence": 0.9,
        "top5": [{"label": "Siren", "class_id": 396, "prob": 0.9}],
        "category": category,
        "level_dbfs": -23.456,
        "energy_share": 0.5,
        "input": "in.wav",
    }
    ev.update(extra)
    return ev


# --------------------------------------------------------------------------------------------------
# 1. success
# --------------------------------------------------------------------------------------------------


def test_success_payload_headers_and_other_skipped(server: FakeBackend, tmp_path: Path) -> None:
    events = [make_event(0, "danger"), make_event(1, "other"), make_event(2, "help"), make_event(3, "warning")]
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    report = deliver(events, make_client(server.url), outbox, user_id=6, angle=370.4,
                     occurred_at="2024-05-01T12:34:56.789+02:00")

    assert (report.sent, report.delivered, report.pending, report.rejected, report.skipped_other) == (3, 3, 0, 0, 1)
    assert report.requests == 3
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()
    assert [r.key for r in server.requests] == ["ev-0000-danger", "ev-0002-help", "ev-0003-warning"]
    first = server.requests[0]
    assert first.path == "/sound-events/"
    assert first.headers["Content-Type"] == "application/json"
    assert "Authorization" not in first.headers  # no token configured
    assert first.body == {
        "user_id": 6,
        "sound_type": "danger",
        "sound_detail": "Siren",
        "angle": 10,  # 370.4 degrees wrapped into 0..359
        "occurred_at": "2024-05-01T10:34:56Z",  # converted to UTC, second resolution
        "sound_icon": "string",
        "location_image_url": "string",
        "decibel": -23.46,
    }
    assert [r.body["sound_type"] for r in server.requests] == ["danger", "help", "warning"]
    assert outbox.pending() == [] and outbox.rejected() == []
    # Any SQLite client sees one delivered row per sent key, in queue order, with its HTTP status.
    assert rows(tmp_path / "outbox.sqlite3") == [(k, "delivered", 200, 1, None) for k in server.keys()]

    # The same events again: nothing is sent twice.
    again = deliver(events, make_client(server.url), Outbox(tmp_path / "outbox.sqlite3"), user_id=6, angle=0)
    assert (again.sent, again.duplicates, again.skipped_other) == (0, 3, 1)
    assert server.count() == 3


def test_build_payload_fields_and_non_finite_decibel() -> None:
    for level, expected in ((float("-inf"), -120.0), (float("nan"), -120.0), (None, -120.0), (-3.0, -3.0)):
        p = build_payload(make_event(0, level_dbfs=level), user_id=1, angle=-90)
        assert set(p) == PAYLOAD_FIELDS
        assert p["decibel"] == expected and math.isfinite(p["decibel"])
        assert p["angle"] == 270
        assert ISO_Z.match(p["occurred_at"])
        json.dumps(p, allow_nan=False)  # strict JSON
    with pytest.raises(BackendError):
        build_payload(make_event(0), user_id=1, angle=float("nan"))


# --------------------------------------------------------------------------------------------------
# 2. 500 then success
# --------------------------------------------------------------------------------------------------


def test_500_then_success_is_delivered_once(server: FakeBackend, tmp_path: Path) -> None:
    server.queue(Action(status=500))
    outbox = Outbox(tmp_path / "ob.sqlite3")
    report = deliver([make_event(0)], make_client(server.url), outbox, user_id=6, angle=0)

    assert server.count() == 2
    assert set(server.keys()) == {"ev-0000-danger"}
    assert server.processed == {"ev-0000-danger": 1}
    assert (report.sent, report.delivered, report.pending, report.requests) == (1, 1, 0, 2)
    assert outbox.pending() == []


# --------------------------------------------------------------------------------------------------
# 3. connection refused, then flush
# --------------------------------------------------------------------------------------------------


def test_connection_refused_queues_everything_then_flush_delivers_once(
    start_server: Callable[[], FakeBackend], tmp_path: Path
) -> None:
    events = [make_event(i) for i in range(5)] + [make_event(9, "other")]
    ids = {e["event_id"] for e in events if e["category"] != "other"}
    outbox = Outbox(tmp_path / "ob.sqlite3")
    dead = make_client(f"http://127.0.0.1:{free_port()}/sound-events/", retries=1)

    report = deliver(events, dead, outbox, user_id=6, angle=45)  # must not raise (its duration: bench_delivery.py)
    assert report.delivered == 0 and report.pending == 5 and report.outbox_pending == 5
    assert report.skipped_other == 1
    assert report.requests == 2  # the first event: one try and one retry; the rest wait for a flush
    assert report.last_error and "connection" in report.last_error.lower()
    assert {e["key"] for e in Outbox(tmp_path / "ob.sqlite3").pending()} == ids  # durable, visible on reopen

    server = start_server()
    report2 = flush(Outbox(tmp_path / "ob.sqlite3"), make_client(server.url))
    assert (report2.sent, report2.delivered, report2.pending, report2.outbox_pending) == (5, 5, 0, 0)
    assert server.count() == 5 and set(server.keys()) == ids
    assert all(n == 1 for n in server.processed.values())
    assert Outbox(tmp_path / "ob.sqlite3").pending() == []

    report3 = flush(Outbox(tmp_path / "ob.sqlite3"), make_client(server.url))
    assert report3.sent == 0 and server.count() == 5


# --------------------------------------------------------------------------------------------------
# 4. slow server
# --------------------------------------------------------------------------------------------------


def test_slow_server_is_retryable_then_flush_delivers_once(server: FakeBackend, tmp_path: Path) -> None:
    server.default = Action(delay=0.8)
    outbox = Outbox(tmp_path / "ob.sqlite3")
    client = make_client(server.url, timeout=0.3, retries=1)
    report = deliver([make_event(0), make_event(1)], client, outbox, user_id=6, angle=0)

    assert report.delivered == 0 and report.pending == 2
    assert "timed out" in (report.last_error or "")
    assert {e["key"] for e in outbox.pending()} == {"ev-0000-danger", "ev-0001-danger"}
    slow_requests = server.count()
    assert slow_requests == 2  # first event: 1 try + 1 retry; second event not attempted (backend down)

    server.default = Action()
    report2 = flush(outbox, make_client(server.url))
    assert report2.delivered == 2 and report2.outbox_pending == 0
    assert set(server.keys()[slow_requests:]) == {"ev-0000-danger", "ev-0001-danger"}
    assert server.count() - slow_requests == 2  # exactly one successful request per event
    assert outbox.pending() == []


# --------------------------------------------------------------------------------------------------
# 5. 503 + Retry-After
# --------------------------------------------------------------------------------------------------


def retry_waits(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """Record every wait the client's Retry takes from a ``Retry-After`` (seconds, after its cap)."""
    from astsep.delivery import client as client_module

    waits: list[float | None] = []
    real = client_module._Retry.get_retry_after

    def recorded(self: Any, response: Any) -> float | None:
        waits.append(real(self, response))
        return waits[-1]

    monkeypatch.setattr(client_module._Retry, "get_retry_after", recorded)
    return waits


def test_503_retry_after_is_honoured(server: FakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    waits = retry_waits(monkeypatch)
    server.queue(Action(status=503, retry_after="1"))
    report = deliver([make_event(0)], make_client(server.url, backoff=0.01, max_backoff=5.0),
                     Outbox(tmp_path / "ob.sqlite3"), user_id=6, angle=0)
    assert report.delivered == 1
    assert server.count() == 2
    assert 1.0 in waits  # the server's 1 s, not the 0.01 s backoff
    gap = server.requests[1].t - server.requests[0].t  # a lower bound only: a busy machine only adds to it
    assert gap >= 0.9, f"client retried after {gap:.3f} s despite Retry-After: 1"


def test_retry_after_is_capped_by_max_backoff(server: FakeBackend, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    waits = retry_waits(monkeypatch)
    server.queue(Action(status=429, retry_after="30"))
    report = deliver([make_event(0)], make_client(server.url, max_backoff=0.2),
                     Outbox(tmp_path / "ob.sqlite3"), user_id=6, angle=0)
    assert report.delivered == 1 and server.count() == 2
    assert 0.2 in waits and max(w for w in waits if w is not None) <= 0.2  # 30 s asked, 0.2 s waited


# --------------------------------------------------------------------------------------------------
# 6. 400 is rejected
# --------------------------------------------------------------------------------------------------


def test_400_is_rejected_not_retried_and_kept(server: FakeBackend, tmp_path: Path) -> None:
    server.queue(Action(status=400, body='{"detail":"sound_type must be one of danger/help/warning"}'))
    outbox = Outbox(tmp_path / "ob.sqlite3")
    report = deliver([make_event(0), make_event(1)], make_client(server.url), outbox, user_id=6, angle=0)

    assert server.keys() == ["ev-0000-danger", "ev-0001-danger"]  # exactly 1 request for the rejected one
    assert (report.delivered, report.rejected, report.pending) == (1, 1, 0)
    rejected = Outbox(tmp_path / "ob.sqlite3").rejected()
    assert len(rejected) == 1
    assert rejected[0]["key"] == "ev-0000-danger"
    assert rejected[0]["status"] == 400
    assert "sound_type must be one of" in rejected[0]["error"]
    assert rejected[0]["payload"]["sound_detail"] == "Siren"
    table = rows(tmp_path / "ob.sqlite3")
    assert [r[:4] for r in table] == [("ev-0000-danger", "rejected", 400, 1), ("ev-0001-danger", "delivered", 200, 1)]
    assert "sound_type must be one of" in table[0][4]

    # A rejected entry is never resent, neither by flush nor by delivering the same event again.
    assert flush(outbox, make_client(server.url)).sent == 0
    again = deliver([make_event(0)], make_client(server.url), outbox, user_id=6, angle=0)
    assert again.sent == 0 and again.duplicates == 1
    assert server.count() == 2


# --------------------------------------------------------------------------------------------------
# 7. client killed mid-delivery
# --------------------------------------------------------------------------------------------------

_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from astsep.delivery import BackendClient, Outbox, deliver
events = json.load(open(sys.argv[3]))
deliver(events, BackendClient(sys.argv[2], timeout=10, retries=0), Outbox(sys.argv[4]), user_id=6, angle=90)
"""


def test_client_killed_mid_delivery_loses_nothing(server: FakeBackend, tmp_path: Path) -> None:
    n = 60
    events = [make_event(i) for i in range(n)]
    ids = {e["event_id"] for e in events}
    (tmp_path / "events.json").write_text(json.dumps(events))
    box = tmp_path / "ob.sqlite3"
    server.default = Action(delay=0.1)

    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(REPO), server.url, str(tmp_path / "events.json"), str(box)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while server.count() < 8 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, f"child exited early: {proc.communicate()[1].decode()[-2000:]}"
        assert server.count() >= 8, "child never reached the server"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    before = server.count()
    assert before < n, "child finished before it was killed"

    server.default = Action()
    outbox = Outbox(box)
    assert len(outbox.pending()) >= n - before  # everything not yet acknowledged is still queued
    report = flush(outbox, make_client(server.url), lock_timeout=5)

    received = server.keys()
    resends = len(received) - len(set(received))
    lost = ids - set(received)
    msg = f"killed after {before} requests; {len(received)} requests in all, {resends} raw resend(s), {len(lost)} lost"
    print(msg)  # visible with -s / -rP
    assert not lost, msg
    assert set(received) == ids, msg
    assert set(server.processed) == ids and all(v == 1 for v in server.processed.values()), msg
    assert resends <= 1, msg  # only the one request in flight at the kill can be sent twice
    assert report.outbox_pending == 0 and Outbox(box).pending() == [], msg
    assert flush(Outbox(box), make_client(server.url)).sent == 0, msg


# --------------------------------------------------------------------------------------------------
# 8. files that are no outbox, pruning, the send lock
# --------------------------------------------------------------------------------------------------


def test_a_file_that_is_no_outbox_is_refused_in_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "notes.txt"
    garbage.write_text("shopping list\n")
    with pytest.raises(BackendError, match="is not an SQLite database") as exc:
        Outbox(garbage)
    assert "\n" not in str(exc.value) and garbage.read_text() == "shopping list\n"
    other_db = tmp_path / "other.db"
    with sqlite3.connect(other_db) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(BackendError, match="not an astsep outbox"):
        Outbox(other_db)


def test_only_the_most_recent_delivered_rows_are_kept(server: FakeBackend, tmp_path: Path) -> None:
    path = tmp_path / "ob.sqlite3"
    server.queue(Action(status=400))
    report = deliver([make_event(i) for i in range(5)], make_client(server.url), Outbox(path, keep_delivered=2),
                     user_id=6, angle=0)
    assert (report.delivered, report.rejected) == (4, 1)
    assert [(k, state) for k, state, *_ in rows(path)] == [
        ("ev-0000-danger", "rejected"), ("ev-0003-danger", "delivered"), ("ev-0004-danger", "delivered")]
    again = deliver([make_event(4)], make_client(server.url), Outbox(path), user_id=6, angle=0)
    assert again.sent == 0 and again.duplicates == 1 and server.count() == 5


def test_outbox_send_lock_excludes_a_second_sender(server: FakeBackend, tmp_path: Path) -> None:
    path = tmp_path / "ob.sqlite3"
    Outbox(path).add("ev-x", build_payload(make_event(0), user_id=6, angle=0))
    holder = Outbox(path)
    with holder.sending():
        report = flush(Outbox(path), make_client(server.url), lock_timeout=0.2)
    assert report.busy and report.sent == 0 and server.count() == 0
    assert report.outbox_pending == 1
    assert flush(Outbox(path), make_client(server.url)).delivered == 1


# --------------------------------------------------------------------------------------------------
# 9. token
# --------------------------------------------------------------------------------------------------


def test_token_sent_as_bearer_but_never_leaked(
    server: FakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-T0KEN-value-1234567890"
    monkeypatch.setenv("ASTSEP_BACKEND_TOKEN", secret)
    caplog.set_level(logging.DEBUG)
    server.queue(Action(), Action(status=400, echo_auth=True), Action(status=500, echo_auth=True))
    path = tmp_path / "ob.sqlite3"
    outbox = Outbox(path)
    client = make_client(server.url, retries=0)
    report = deliver([make_event(i) for i in range(3)], client, outbox, user_id=6, angle=0)

    assert [r.headers.get("Authorization") for r in server.requests] == [f"Bearer {secret}"] * 3
    assert (report.delivered, report.rejected, report.pending) == (1, 1, 1)
    # a leaky backend echoed the header; the stored / reported error text is redacted
    assert "***" in outbox.rejected()[0]["error"]
    # also a network error with the token set
    deliver([make_event(7)], make_client(f"http://127.0.0.1:{free_port()}/", retries=0),
            Outbox(tmp_path / "other.sqlite3"), user_id=6, angle=0)

    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("ob.sqlite3"))  # db + WAL
    texts = {
        "outbox database": stored.decode("latin-1"),
        "captured logs": caplog.text + "".join(str(r.args) for r in caplog.records),
        "repr(client)": repr(client) + str(vars(client)),
        "report": json.dumps(report.to_dict()),
    }
    for where, text in texts.items():
        assert secret not in text, f"token leaked into {where}"
    assert caplog.records, "expected DEBUG/INFO logging from the delivery"


# --------------------------------------------------------------------------------------------------
# 10. invalid URLs and the CLI
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://example.com/x", "localhost:8000", "", "   ", "http://", "http:///path",
                                 "https://host:notaport/"])
def test_invalid_urls_raise_backend_error(url: str) -> None:
    with pytest.raises(BackendError) as exc:
        validate_url(url)
    assert "\n" not in str(exc.value)
    with pytest.raises(BackendError):
        BackendClient(url)


def test_valid_urls_and_credentials_redacted() -> None:
    assert validate_url(" https://api.example.com:8443/sound-events/ ") == "https://api.example.com:8443/sound-events/"
    with pytest.raises(BackendError) as exc:
        validate_url("ftp://user:hunter2@example.com/")
    assert "hunter2" not in str(exc.value)
    assert "hunter2" not in repr(BackendClient("http://user:hunter2@127.0.0.1:9/x"))


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    for var in ("HTTP_PROXY", "http_proxy", "ASTSEP_BACKEND_TOKEN"):
        full_env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "astsep.delivery", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=60)


def test_cli_bad_url_and_missing_outbox_exit_2_with_one_line(tmp_path: Path) -> None:
    box = tmp_path / "ob.sqlite3"
    box.write_text("")
    for args, needle in (
        (["flush", "--outbox", str(box), "--backend-url", "ftp://example.com/"], "invalid backend URL"),
        (["flush", "--outbox", str(box), "--backend-url", "localhost:8000"], "invalid backend URL"),
        (["flush", "--outbox", str(tmp_path / "nope.sqlite3"), "--backend-url", "http://127.0.0.1:9/"], "outbox not found"),
    ):
        res = _cli(*args)
        assert res.returncode == 2, res
        assert "Traceback" not in res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], res.stderr


def test_cli_flush_delivers_and_prints_one_line(server: FakeBackend, tmp_path: Path) -> None:
    box = tmp_path / "ob.sqlite3"
    outbox = Outbox(box)
    for i in range(3):
        outbox.add(f"ev-{i}", build_payload(make_event(i), user_id=6, angle=0))
    res = _cli("flush", "--outbox", str(box), "--backend-url", server.url, "--timeout", "2")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) == 1 and "delivered 3/3" in res.stdout
    assert set(server.keys()) == {"ev-0", "ev-1", "ev-2"} and server.count() == 3
    assert Outbox(box).pending() == []


def test_deliver_send_false_only_queues(server: FakeBackend, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "ob.sqlite3")
    report = deliver([make_event(0), make_event(1)], make_client(server.url), outbox, user_id=6, angle=0, send=False)
    assert (report.sent, report.pending, report.outbox_pending) == (0, 2, 2) and server.count() == 0
    assert flush(outbox, make_client(server.url)).delivered == 2 and server.count() == 2


def test_report_is_json_serialisable() -> None:
    rep = DeliveryReport(sent=1, delivered=1)
    assert json.loads(json.dumps(rep.to_dict()))["delivered"] == 1
    assert "delivered 1/1" in rep.summary()


# --------------------------------------------------------------------------------------------------
# issue 12: ints, event times, redirects, dripping servers
# --------------------------------------------------------------------------------------------------


def test_user_id_goes_out_as_an_int_and_a_non_integer_is_refused() -> None:
    body = build_payload(make_event(0), user_id="42", angle=0)
    assert body["user_id"] == 42 and isinstance(body["user_id"], int)
    with pytest.raises(BackendError, match="user_id"):
        build_payload(make_event(0), user_id="bob", angle=0)


def test_each_event_is_sent_with_the_time_its_sound_happened(server: FakeBackend, tmp_path: Path) -> None:
    events = [make_event(0, occurred_at="2026-01-31T08:15:02.500Z"), make_event(1, occurred_at="2026-01-31T08:15:09Z")]
    with make_client(server.url) as client:
        report = deliver(events, client, Outbox(tmp_path / "outbox.sqlite3"), user_id=7, angle=0)
    assert report.delivered == 2
    sent = {r.key: r.body["occurred_at"] for r in server.requests}
    assert sent == {events[0]["event_id"]: "2026-01-31T08:15:02Z", events[1]["event_id"]: "2026-01-31T08:15:09Z"}


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_keeps_the_event_pending_with_the_reason(server: FakeBackend, tmp_path: Path, status: int) -> None:
    server.queue(Action(status=status))
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    with make_client(server.url, retries=2) as client:
        report = deliver([make_event(0)], client, outbox, user_id=1, angle=0)
    assert report.delivered == 0 and report.rejected == 0 and report.pending == 1
    assert outbox.state(make_event(0)["event_id"]) == "pending" and not outbox.rejected()
    (key, state, http_status, attempts, reason), = rows(tmp_path / "outbox.sqlite3")
    assert (state, http_status, attempts) == ("pending", status, 1) and "not followed" in reason
    assert f"HTTP {status}" in report.last_error and "not followed" in report.last_error
    assert server.count() == 1  # a redirect is not retried at once: the URL is wrong, not the backend busy
    with make_client(server.url) as client:  # the next flush (to the right URL) sends it
        assert flush(outbox, client).delivered == 1


def test_a_server_dripping_its_answer_cannot_hold_a_request_past_the_timeout(tmp_path: Path) -> None:
    """One byte every 0.3 s of a complete 201 answer (about 20 s in all) against a 1 s timeout:
    every byte arrives well within requests' per-read timeout, so only a total deadline stops it."""
    answer = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    stop = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                for i in range(len(answer)):
                    if stop.wait(0.3):
                        return
                    try:
                        conn.sendall(answer[i:i + 1])
                    except OSError:
                        break

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/sound-events/"
        with make_client(url, timeout=1.0, retries=0) as client:
            result = client.post(build_payload(make_event(0), user_id=1, angle=0), "k1")
    finally:
        stop.set()
        t.join(5)
        listener.close()
    assert result.status == "retryable" and result.http_status is None
    assert "timed out" in result.error


# --------------------------------------------------------------------------------------------------
# issue 21: no head-of-line blocking, parking, status, flush --all
# --------------------------------------------------------------------------------------------------


def _queue(outbox: Outbox, *indices: int) -> list[str]:
    return queue_events([make_event(i) for i in indices], outbox, user_id=6, angle=0)


def test_a_poison_entry_does_not_hold_back_the_others(server: FakeBackend, tmp_path: Path) -> None:
    """The issue's reproduction: one entry the backend always answers 500 ahead of five others. Before,
    every flush stopped at it ("delivered 0/1 sent, 5 pending", all requests for the first entry)."""
    outbox = Outbox(tmp_path / "ob.sqlite3")
    keys = _queue(outbox, *range(6))
    server.poison.add(keys[0])
    with make_client(server.url, retries=1) as client:
        report = flush(outbox, client)
    assert (report.sent, report.delivered, report.pending) == (6, 5, 1), report.summary()
    assert set(server.processed) == set(keys[1:])
    poison = outbox.entry(keys[0])
    assert (poison["state"], poison["http_status"], poison["failures"]) == ("pending", 500, 1)
    assert poison["next_at"] > time.time() and poison["failing_since"] is not None
    assert "HTTP 500" in poison["reason"]


def test_a_new_alert_is_sent_before_an_old_failing_entry_and_that_one_waits_its_own_turn(
    server: FakeBackend, tmp_path: Path
) -> None:
    """A later run with a danger event (the issue: ``attempts=0``): its event goes first; the failing
    entry is retried only once its own backoff step has passed, so it costs the new alert nothing."""
    outbox = Outbox(tmp_path / "ob.sqlite3")
    poison = _queue(outbox, 0)[0]
    server.poison.add(poison)
    policy = RetryPolicy(base_delay=0.5, max_delay=10, park_after=3600)
    with make_client(server.url, retries=0) as client:
        flush(outbox, client, policy=policy)  # the poison's first failed round
        assert outbox.entry(poison)["failures"] == 1
        new = queue_events([make_event(1)], outbox, user_id=6, angle=0)
        report = send_queued(new, client, outbox, policy=policy)  # new first, then whatever is due
        assert report.delivered == 1 and outbox.state(new[0]) == "delivered"
        assert server.keys() == [poison, new[0]]  # the poison was not due: not retried
        assert report.waiting == 0 and outbox.due_keys() == []
        # once its step has passed it is due again, and tried after anything that never failed
        later = outbox.entry(poison)["next_at"] + 0.01
        newer = _queue(outbox, 2)
        assert outbox.due_keys(now=later) == [newer[0], poison]
        while time.time() < later:
            time.sleep(0.05)
        report = send_queued(newer, client, outbox, policy=policy)
    assert server.keys() == [poison, new[0], newer[0], poison]
    assert outbox.entry(poison)["failures"] == 2
    # the second step is twice the first
    entry = outbox.entry(poison)
    assert entry["next_at"] - time.time() == pytest.approx(1.0, abs=0.3)


def test_a_run_that_makes_a_waiting_event_again_sends_it_now_and_leaves_other_waiting_ones(
    start_server: Callable[[], FakeBackend], tmp_path: Path
) -> None:
    """CI's flake, made exact: run 1 meets a dead backend, so its first event waits for its retry
    time; run 2 (same audio, same ids) starts within that time, backend up. All of run 2's events go
    out now; an entry of some other run that is still waiting keeps its own schedule."""
    outbox = Outbox(tmp_path / "ob.sqlite3")
    policy = RetryPolicy(base_delay=600, max_delay=600, park_after=3600)
    dead = make_client(f"http://127.0.0.1:{free_port()}/sound-events/", retries=0)
    other = deliver([make_event(9)], dead, outbox, user_id=6, angle=0, policy=policy)
    events = [make_event(i) for i in range(3)]
    run1 = deliver(events, dead, outbox, user_id=6, angle=0, policy=policy)
    assert run1.delivered == 0 and other.delivered == 0
    waiting = [e["key"] for e in outbox.pending() if (e.get("next_at") or 0) > time.time()]
    assert len(waiting) == 2  # make_event(9) and run 1's first event, each after one failed round

    server = start_server()
    with make_client(server.url) as client:
        run2 = deliver(events, client, outbox, user_id=6, angle=0, policy=policy, flush_due=True)
    ids = [e["event_id"] for e in events]
    assert run2.delivered == 3 and sorted(server.keys()) == sorted(ids)
    assert [outbox.state(k) for k in ids] == ["delivered"] * 3
    assert outbox.state(make_event(9)["event_id"]) == "pending"  # not sent: sorted(server.keys()) above


def test_each_entry_has_its_own_backoff_schedule() -> None:
    policy = RetryPolicy(base_delay=2, max_delay=60, park_after=10)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5, 6, 7)] == [2, 4, 8, 16, 32, 60, 60]
    for bad in (-1, math.nan, math.inf):
        with pytest.raises(BackendError, match="retry policy"):
            RetryPolicy(base_delay=bad)


def test_an_entry_failing_too_long_is_parked_kept_shown_by_status_and_sent_by_flush_all(
    server: FakeBackend, tmp_path: Path
) -> None:
    box = tmp_path / "ob.sqlite3"
    outbox = Outbox(box)
    keys = _queue(outbox, 0, 1)
    server.poison.add(keys[0])
    never_wait = RetryPolicy(base_delay=0, max_delay=0, park_after=0)  # parked at its first failure
    with make_client(server.url, retries=0) as client:
        report = flush(outbox, client, policy=never_wait)
    assert (report.delivered, report.parked, report.outbox_pending) == (1, 1, 1)
    assert "1 parked" in report.summary()
    assert outbox.state(keys[0]) == "parked" and outbox.parked()[0]["key"] == keys[0]
    assert outbox.counts() == {"pending": 1, "delivered": 1, "rejected": 0, "parked": 1}
    with make_client(server.url, retries=0) as client:  # a normal flush leaves it alone, even when due
        again = flush(outbox, client, policy=never_wait)
    assert again.sent == 0 and server.count() == 2

    res = _cli("status", "--outbox", str(box))
    assert res.returncode == 1, res  # something is parked: needs attention
    lines = res.stdout.strip().splitlines()
    assert "1 pending (1 parked), 1 delivered, 0 rejected" in lines[0]
    assert len(lines) == 2 and keys[0] in lines[1] and "parked since" in lines[1] and "HTTP 500" in lines[1]
    as_json = json.loads(_cli("status", "--outbox", str(box), "--json").stdout)
    assert as_json["counts"]["parked"] == 1 and as_json["pending"][0]["parked_at"]

    server.poison.clear()
    res = _cli("flush", "--outbox", str(box), "--backend-url", server.url, "--timeout", "2")
    assert res.returncode == 1 and "0/0 sent" in res.stdout and "1 parked" in res.stdout, res
    res = _cli("flush", "--all", "--outbox", str(box), "--backend-url", server.url, "--timeout", "2")
    assert res.returncode == 0 and "delivered 1/1" in res.stdout, res
    assert Outbox(box).counts() == {"pending": 0, "delivered": 2, "rejected": 0, "parked": 0}
    assert _cli("status", "--outbox", str(box)).returncode == 0
    assert server.processed == collections.Counter({keys[0]: 1, keys[1]: 1})


def test_an_outbox_of_the_first_sqlite_schema_gets_the_schedule_columns(server: FakeBackend, tmp_path: Path) -> None:
    box = tmp_path / "ob.sqlite3"
    with sqlite3.connect(box) as db:
        db.execute("CREATE TABLE outbox (key TEXT PRIMARY KEY, payload TEXT, state TEXT NOT NULL DEFAULT 'pending', "
                   "http_status INTEGER, reason TEXT, attempts INTEGER NOT NULL DEFAULT 0, added_at TEXT, updated_at TEXT)")
        db.execute("INSERT INTO outbox (key, payload) VALUES (?, ?)",
                   ("k0", json.dumps(build_payload(make_event(0), user_id=6, angle=0))))
    assert flush(Outbox(box), make_client(server.url)).delivered == 1 and server.keys() == ["k0"]


# --------------------------------------------------------------------------------------------------
# issue 21: an unusable outbox never stops a run
# --------------------------------------------------------------------------------------------------


def _corrupt_outbox(path: Path) -> None:
    """A real outbox with rows, whose pages are then overwritten (what a torn disk write leaves)."""
    outbox = Outbox(path)
    outbox.add_many((f"k{i}", {"i": i, "pad": "x" * 500}) for i in range(200))
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    for off in range(4096 + 100, len(data), 4096):
        data[off:off + 64] = b"\xde\xad\xbe\xef" * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["text_file", "other_sqlite_db", "malformed_db"])
def test_an_unusable_outbox_is_moved_aside_and_a_fresh_one_opened(
    server: FakeBackend, tmp_path: Path, kind: str
) -> None:
    box = tmp_path / "ob.sqlite3"
    if kind == "text_file":
        box.write_text("shopping list\n")
    elif kind == "other_sqlite_db":
        with sqlite3.connect(box) as db:
            db.execute("CREATE TABLE t (x)")
    else:
        _corrupt_outbox(box)
    original = box.read_bytes()
    outbox, degraded = open_outbox(box)
    assert degraded is not None and "\n" not in degraded and "moved aside" in degraded, degraded
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("ob.sqlite3.unusable-") and not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == 1 and kept[0].read_bytes() == original  # kept, never deleted
    assert outbox.path == box and not outbox.in_memory and outbox.counts()["pending"] == 0
    report = deliver([make_event(0)], make_client(server.url), outbox, user_id=6, angle=0)
    assert report.delivered == 1 and Outbox(box).state("ev-0000-danger") == "delivered"
    again, degraded = open_outbox(box)  # the fresh one is fine from then on
    assert degraded is None and again.state("ev-0000-danger") == "delivered"


def test_a_good_outbox_opens_as_it_is(tmp_path: Path) -> None:
    box = tmp_path / "ob.sqlite3"
    Outbox(box).add("k", {"a": 1})
    outbox, degraded = open_outbox(box)
    assert degraded is None and outbox.pending_keys() == ["k"]
    assert [p.name for p in tmp_path.iterdir() if "unusable" in p.name] == []


def test_where_no_outbox_file_can_be_made_events_go_through_an_in_memory_one(
    server: FakeBackend, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("")
    outbox, degraded = open_outbox(tmp_path / "file" / "ob.sqlite3")  # its folder is a regular file
    assert outbox.in_memory and degraded and "kept in memory only" in degraded and "\n" not in degraded
    report = deliver([make_event(0), make_event(1)], make_client(server.url), outbox, user_id=6, angle=0)
    assert report.delivered == 2 and set(server.processed) == {"ev-0000-danger", "ev-0001-danger"}
    assert Outbox(MEMORY).pending_keys() == []  # each in-memory outbox is its own


_FULL_DISK_CHILD = r"""
import json, resource, signal, sys
sys.path.insert(0, sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # the disk is full: no file can grow
from astsep.delivery import BackendClient, deliver, open_outbox
outbox, degraded = open_outbox(sys.argv[3])
events = [{"event_id": "full-%d" % i, "category": "danger", "label": "Smoke detector", "level_dbfs": -20}
          for i in range(3)]
report = deliver(events, BackendClient(sys.argv[2], timeout=5, retries=0), outbox, user_id=6, angle=0)
print(json.dumps({"degraded": degraded, "in_memory": outbox.in_memory, "delivered": report.delivered}))
"""


def test_an_outbox_on_a_full_disk_does_not_stop_delivery(server: FakeBackend, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(REPO), server.url, str(tmp_path / "ob.sqlite3")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["in_memory"] and out["delivered"] == 3 and "kept in memory only" in out["degraded"], out
    assert set(server.processed) == {"full-0", "full-1", "full-2"}


# --------------------------------------------------------------------------------------------------
# issue 21: response bodies are read a few KiB at most
# --------------------------------------------------------------------------------------------------


def _huge_body_server(status: int, size: int) -> tuple[socket.socket, threading.Event, list[int]]:
    """A raw server answering every request with ``status`` and a ``size``-byte body; counts the bytes it
    managed to send per request."""
    stop = threading.Event()
    sent: list[int] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    chunk = b"x" * 65536

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(f"HTTP/1.1 {status} Oops\r\nContent-Length: {size}\r\n"
                                 "Content-Type: text/plain\r\nConnection: close\r\n\r\n".encode())
                    n = 0
                    while n < size and not stop.is_set():
                        conn.sendall(chunk)
                        n += len(chunk)
                except OSError:
                    pass
                sent.append(n)

    threading.Thread(target=serve, daemon=True).start()
    return listener, stop, sent


@pytest.mark.parametrize("status", [400, 500])
def test_a_huge_response_body_is_never_read_whole(status: int) -> None:
    import tracemalloc

    size = 50 * 1024 * 1024
    listener, stop, _ = _huge_body_server(status, size)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/sound-events/"
    try:
        with make_client(url, timeout=10.0, retries=1, backoff=0) as client:
            tracemalloc.start()
            result = client.post(build_payload(make_event(0), user_id=1, angle=0), "k1")
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    finally:
        stop.set()
        listener.close()
    assert result.http_status == status and result.status == ("rejected" if status == 400 else "retryable")
    assert result.error.startswith(f"HTTP {status} Oops: xxx") and len(result.error) <= 500
    assert peak < 2 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB of Python allocations for one post"


# --------------------------------------------------------------------------------------------------
# issue 21: the Dispatcher a front end holds
# --------------------------------------------------------------------------------------------------


def test_the_dispatcher_commits_an_event_before_anything_is_sent(server: FakeBackend, tmp_path: Path) -> None:
    from astsep.delivery import Dispatcher

    box = tmp_path / "ob.sqlite3"
    dispatcher = Dispatcher(make_client(server.url), box, user_id=6)
    keys = dispatcher.queue([make_event(0), make_event(1, "other")])
    assert keys == ["ev-0000-danger"] and server.count() == 0
    assert rows(box) == [("ev-0000-danger", "pending", None, 0, None)]  # on disk, any reader sees it
    report = dispatcher.send(keys)
    assert report.delivered == 1 and Outbox(box).state(keys[0]) == "delivered" and dispatcher.degraded == []


def test_an_outbox_that_fails_mid_run_degrades_to_memory_and_loses_nothing(server: FakeBackend, tmp_path: Path) -> None:
    from astsep.delivery import Dispatcher

    box = tmp_path / "ob.sqlite3"
    server.default = Action(status=503)
    dispatcher = Dispatcher(make_client(server.url, retries=0), box, user_id=6)
    first = dispatcher.queue([make_event(0)])
    assert dispatcher.send(first).delivered == 0  # the backend is busy: it stays pending
    for side in tmp_path.glob("ob.sqlite3*"):
        side.write_bytes(b"this is no longer a database" * 100)  # the file is damaged under the run
    second = dispatcher.queue([make_event(1)])  # never raises: an in-memory outbox takes over
    assert dispatcher.outbox.in_memory and len(dispatcher.degraded) == 1 and "\n" not in dispatcher.degraded[0]
    assert "failed" in dispatcher.degraded[0] and "kept in memory only" in dispatcher.degraded[0]
    server.default = Action()
    report = dispatcher.send(second)
    assert report.delivered == 2  # the new event, and the one the damaged file held
    assert set(server.processed) == {"ev-0000-danger", "ev-0001-danger"}


_FILLS_UP_CHILD = r"""
import json, os, resource, signal, sys
sys.path.insert(0, sys.argv[1])
from astsep.delivery import BackendClient, Dispatcher
box = sys.argv[3]
dispatcher = Dispatcher(BackendClient(sys.argv[2], timeout=5, retries=0), box, user_id=6)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))   # from now on the disk is full
events = [{"event_id": "late-%d" % i, "category": "danger", "label": "Smoke detector",
           "level_dbfs": -20, "pad": "x"} for i in range(50)]
delivered = 0
for ev in events:
    delivered += dispatcher.deliver([ev]).delivered
print(json.dumps({"delivered": delivered, "degraded": dispatcher.degraded, "memory": dispatcher.outbox.in_memory}))
"""


def test_an_outbox_on_a_disk_that_fills_up_mid_run_still_delivers(server: FakeBackend, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", _FILLS_UP_CHILD, str(REPO), server.url, str(tmp_path / "ob.sqlite3")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["delivered"] == 50 and out["memory"] and len(out["degraded"]) == 1, out
    assert set(server.processed) == {f"late-{i}" for i in range(50)}


_OPENER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from astsep.delivery import open_outbox
box, degraded = open_outbox(sys.argv[2])
box.add("k" + sys.argv[3], {"i": 1})
print(degraded or "")
"""


def test_processes_creating_one_outbox_at_once_never_take_it_for_an_unusable_one(tmp_path: Path) -> None:
    """A database another process is creating (SQLite header written, table not yet) is not 'not an
    astsep outbox': it is waited for, never moved aside."""
    for round_ in range(6):
        box = tmp_path / f"ob{round_}.sqlite3"
        procs = [subprocess.Popen([sys.executable, "-c", _OPENER, str(REPO), str(box), str(i)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
        outs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert all(not out.strip() for out, _ in outs), outs  # nobody degraded
        assert sorted(Outbox(box).pending_keys()) == ["k0", "k1", "k2", "k3"]
    assert not [p for p in tmp_path.iterdir() if "unusable" in p.name]
