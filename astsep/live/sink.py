"""Delivery in live mode: every event for the backend is in the outbox before anyone sees it.

:meth:`OutboxSink.commit` writes the event to the SQLite outbox (one transaction, ``synchronous=FULL``:
on disk when it returns); the listener calls it before the event is printed, handed to a callback
or sent. Sending is a separate step that reads from the outbox: the sender thread
(:meth:`OutboxSink.start`) runs :func:`astsep.delivery.flush`, woken by each commit and every
``retry_sec`` while entries wait. A process killed at any moment (``kill -9``, a second Ctrl-C)
therefore loses nothing it has shown: what was printed is in the outbox, and the next run (or
``python -m astsep.delivery flush``) sends it.

Both go through an :class:`astsep.delivery.Dispatcher`: an outbox that fails mid-run (its disk
full, the file damaged) gives way to an in-memory one holding the events not yet delivered, so a
commit never fails for the outbox's sake and the events still go out; ``degraded`` says so. The
sender thread sends what is due (new entries first, each failing entry on its own schedule).
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

REPORT_KEYS = ("sent", "delivered", "pending", "rejected", "requests")


class OutboxSink:
    """Commits live events to ``outbox`` and sends them to ``client`` from its own thread.

    ``user_id`` and ``angle`` (degrees; an event's own ``angle`` wins; None: 0) go into each
    payload (:func:`astsep.delivery.build_payload`)."""

    def __init__(self, client, outbox, user_id: int = 0, angle: float | None = None, retry_sec: float = 5.0):
        from ..delivery import Dispatcher

        self.client, self.user_id, self.angle = client, user_id, angle
        # a Dispatcher built by astsep.runtime.build_delivery (its retry policy and payload fields) is used as is
        self.dispatcher = outbox if isinstance(outbox, Dispatcher) else Dispatcher(client, outbox, user_id=user_id,
                                                                                    angle=angle)
        self.retry_sec = retry_sec
        self.committed = 0
        self.reports: list[dict] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def outbox(self):
        """The outbox in use (an in-memory one once the file gave out; see ``degraded``)."""
        return self.dispatcher.outbox

    @property
    def degraded(self) -> list[str]:
        """One line per step delivery degraded by; empty: none."""
        return self.dispatcher.degraded

    def commit(self, ev: dict) -> None:
        """Durably queue ``ev`` (category ``other`` is never queued). An outbox that cannot be
        written gives way to an in-memory one (never an error); raises
        :class:`~astsep.errors.BackendError` only for an event that is not one. Wakes the sender."""
        self.committed += len(self.dispatcher.queue([ev]))
        self._wake.set()

    def start(self) -> "OutboxSink":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="astsep-live-delivery", daemon=True)
            self._thread.start()
        return self

    def _flush(self, everything: bool = False):
        """Send what is due (``everything``: every pending entry now, as a last flush)."""
        from ..delivery import flush
        from ..errors import BackendError

        report = None
        if everything:
            try:
                report = flush(self.outbox, self.client)
            except BackendError as exc:  # the outbox gave out: the dispatcher moves to memory and sends
                log.warning("final flush of %s failed: %s", self.outbox.path, exc)
        if report is None:
            report = self.dispatcher.send()
        self.reports.append(report.to_dict())
        log.info("live delivery: %s", report.summary())
        return report

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.retry_sec)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001 - delivery must never end the live run
                log.error("live delivery failed (the events stay in the outbox): %s", exc)

    def close(self, timeout: float | None = None) -> dict:
        """Stop the sender (after the request in flight, within ``timeout`` seconds), then one last
        flush of the outbox. Returns ``{"this_run": {...}, "final_flush": {...}}``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        final = self._flush(everything=True)
        total = {k: sum(r.get(k, 0) for r in self.reports) for k in REPORT_KEYS}
        total["pending"] = final.outbox_pending
        total["committed"] = self.committed
        return {"this_run": total, "final_flush": final.to_dict(), "degraded": list(self.degraded)}
