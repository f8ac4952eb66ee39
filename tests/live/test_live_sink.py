"""astsep.live.sink: an event is in the SQLite outbox before the callback (or stdout) sees it, and
sending is a separate step reading the outbox. Real SQLite, a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import pytest

from astsep.config import LiveConfig
from astsep.delivery import BackendClient, Outbox
from astsep.live import LiveListener, ManualClock
from live_streams import Backend, Stepper, forced_pipe, siren_pipe, siren_stream  # noqa: F401 - siren_pipe: a fixture


def test_every_event_is_in_the_outbox_when_the_callback_sees_it_and_sent_from_there(siren_pipe, tmp_path, shared):
    backend = Backend()
    path = tmp_path / "outbox.sqlite3"
    seen: list[tuple[str, str | None]] = []

    def on_event(ev: dict) -> None:  # what a printer sees: the outbox already holds it
        key = f"{ev['event_id']}.r{ev['revision']}" if ev["revision"] else ev["event_id"]
        seen.append((ev["stage"], (Outbox(path).entry(key) or {}).get("state")))

    try:
        lst = LiveListener(siren_pipe, LiveConfig(), on_event=on_event, client=BackendClient(backend.url),
                           outbox=Outbox(path), user_id=3, clock=ManualClock())
        lst.alert_stage.pipe = forced_pipe(400, "fire alarm tiny AST", runner_up=396)  # the update changes the label: resent
        stats = Stepper(lst, siren_stream()).run()  # never started: close() makes the one send
    finally:
        backend.close()
    assert seen == [("alert", "pending"), ("separation", "pending")], seen
    assert stats.delivery["final_flush"]["delivered"] == 2 and stats.delivery["this_run"]["committed"] == 2
    assert [r[1]["sound_detail"] for r in backend.requests] == ["Fire alarm", "Siren"]
    assert {e["state"] for e in Outbox(path).pending()} == set()


def test_the_sender_thread_sends_what_the_outbox_holds_while_listening(siren_pipe, tmp_path, shared):
    from astsep.capture import ArraySource

    backend = Backend()
    path = tmp_path / "outbox.sqlite3"
    try:
        lst = LiveListener(siren_pipe, LiveConfig(), client=BackendClient(backend.url), outbox=Outbox(path))
        stats = lst.run(ArraySource(siren_stream(6.0, sirens=(1.0,)), realtime=False))
    finally:
        backend.close()
    d = stats.delivery
    assert d["final_flush"]["outbox_pending"] == 0 and d["this_run"]["committed"] == stats.events == 1
    assert len(backend.requests) == 1  # the update changes nothing the backend shows: not resent
