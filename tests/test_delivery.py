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
    BackendClient,
    DeliveryReport,
    Outbox,
    build_payload,
    deliver,
    flush,
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
            action = state.next_action()
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
# 8. migration of the JSON-lines journal of earlier versions
# --------------------------------------------------------------------------------------------------


def write_legacy_journal(path: Path) -> None:
    """A journal as the JSON-lines outbox wrote it: adds, a done, a rejected, a compaction tombstone
    (a done without its add) and, last, the torn half of an add cut by a killed writer."""
    def payload(i: int) -> dict[str, Any]:
        return build_payload(make_event(i), user_id=6, angle=0, occurred_at="2026-01-31T08:15:00Z")

    records = [
        {"op": "done", "key": "old-tombstone", "status": 201, "at": "2026-01-30T10:00:00Z"},
        {"op": "add", "key": "k0", "payload": payload(0), "at": "2026-01-31T08:15:01Z"},
        {"op": "add", "key": "k1", "payload": payload(1), "at": "2026-01-31T08:15:02Z"},
        {"op": "add", "key": "k2", "payload": payload(2), "at": "2026-01-31T08:15:03Z"},
        {"op": "add", "key": "k3", "payload": payload(3), "at": "2026-01-31T08:15:04Z"},
        {"op": "done", "key": "k1", "status": 201, "at": "2026-01-31T08:15:05Z"},
        {"op": "rejected", "key": "k2", "status": 400, "error": "HTTP 400 Bad Request: nope",
         "at": "2026-01-31T08:15:06Z"},
    ]
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    torn = json.dumps({"op": "add", "key": "k4", "payload": payload(4), "at": "2026-01-31T08:15:07Z"})
    path.write_text(text + torn[: len(torn) // 2])


def test_a_json_lines_outbox_migrates_in_place_on_first_open(
    server: FakeBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.jsonl"
    write_legacy_journal(path)
    original = path.read_bytes()

    with caplog.at_level(logging.WARNING, logger="astsep.delivery"):
        outbox = Outbox(path)
    assert "torn last line" in caplog.text
    assert path.read_bytes().startswith(b"SQLite format 3\x00")
    assert (tmp_path / "outbox.jsonl.migrated").read_bytes() == original  # the journal is kept as it was
    assert rows(path) == [
        ("old-tombstone", "delivered", 201, 0, None),
        ("k0", "pending", None, 0, None),
        ("k1", "delivered", 201, 0, None),
        ("k2", "rejected", 400, 0, "HTTP 400 Bad Request: nope"),
        ("k3", "pending", None, 0, None),
    ]  # the torn k4 was never acknowledged by its writer and is not invented
    assert [e["key"] for e in outbox.pending()] == ["k0", "k3"]
    assert outbox.pending()[0]["payload"]["occurred_at"] == "2026-01-31T08:15:00Z"
    assert outbox.rejected()[0]["payload"]["sound_detail"] == "Siren"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    # Delivered and rejected keys stay known, and what was pending is delivered once.
    assert not outbox.add("k1", {"i": 1}) and not outbox.add("old-tombstone", {}) and not outbox.add("k2", {})
    report = flush(Outbox(path), make_client(server.url))
    assert (report.delivered, report.outbox_pending) == (2, 0)
    assert server.keys() == ["k0", "k3"]
    assert Outbox(path).state("k0") == "delivered"
    assert not (tmp_path / "outbox.jsonl.migrated.2").exists()  # reopening does not migrate again


def test_the_previous_default_journal_migrates_into_a_new_database(tmp_path: Path) -> None:
    old = tmp_path / "outbox.jsonl"
    write_legacy_journal(old)
    new = tmp_path / "outbox.sqlite3"
    outbox = Outbox(new, migrate_from=old)
    assert [e["key"] for e in outbox.pending()] == ["k0", "k3"]
    assert not old.exists() and (tmp_path / "outbox.jsonl.migrated").is_file()
    write_legacy_journal(old)  # a journal appearing later is not imported over an existing database
    assert [e["key"] for e in Outbox(new, migrate_from=old).pending()] == ["k0", "k3"] and old.exists()


def test_a_file_that_is_no_outbox_is_refused_in_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "notes.txt"
    garbage.write_text("shopping list\n")
    with pytest.raises(BackendError, match="neither an SQLite database nor a JSON-lines") as exc:
        Outbox(garbage)
    assert "\n" not in str(exc.value) and garbage.read_text() == "shopping list\n"
    other_db = tmp_path / "other.db"
    with sqlite3.connect(other_db) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(BackendError, match="not an astsep outbox"):
        Outbox(other_db)


def test_cli_flush_migrates_a_json_lines_outbox_and_delivers_it(server: FakeBackend, tmp_path: Path) -> None:
    box = tmp_path / "ob.jsonl"
    write_legacy_journal(box)
    res = _cli("flush", "--outbox", str(box), "--backend-url", server.url, "--timeout", "2")
    assert res.returncode == 0, res.stderr  # nothing left pending (k2 was rejected before, not by this flush)
    assert "delivered 2/2" in res.stdout and "Traceback" not in res.stderr
    assert server.keys() == ["k0", "k3"]
    assert [r[1] for r in rows(box)] == ["delivered", "delivered", "delivered", "rejected", "delivered"]


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
