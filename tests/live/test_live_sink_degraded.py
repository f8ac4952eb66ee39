"""astsep.live.sink when the outbox gives out mid-run (issue 21, item 3 in live mode): an event the
listener shows is still delivered, through an in-memory outbox, and the run says delivery degraded.
Before, the commit raised, the error was logged, and the event shown was never queued nor sent."""

from __future__ import annotations

import pytest

from astsep.config import LiveConfig
from astsep.delivery import BackendClient, Outbox
from astsep.live import LiveListener, ManualClock
from live_streams import Backend, Stepper, siren_pipe, siren_stream  # noqa: F401 - siren_pipe: a fixture


def test_an_outbox_damaged_mid_run_still_delivers_every_event_shown(siren_pipe, tmp_path, shared):
    backend = Backend()
    path = tmp_path / "outbox.sqlite3"
    shown: list[str] = []
    try:
        lst = LiveListener(siren_pipe, LiveConfig(), on_event=lambda ev: shown.append(ev["event_id"]),
                           client=BackendClient(backend.url), outbox=Outbox(path), user_id=3, clock=ManualClock())
        for f in tmp_path.glob("outbox.sqlite3*"):  # the file is damaged under the running listener
            f.write_bytes(b"no longer a database" * 64)
        stats = Stepper(lst, siren_stream()).run()
    finally:
        backend.close()
    assert shown, "the listener showed no event"
    keys = {h["Idempotency-Key"] for h, _ in backend.requests}
    assert set(shown) <= keys, (shown, keys)
    degraded = stats.delivery["degraded"]
    assert len(degraded) == 1 and "kept in memory only" in degraded[0] and "\n" not in degraded[0]
    assert stats.delivery["this_run"]["committed"] >= 1
