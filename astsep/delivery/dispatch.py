"""What a front end holds to deliver events: :class:`Dispatcher` (outbox + client, set up once).

The rule it keeps: an event is committed to the outbox (one SQLite transaction, on disk) the moment
it is known (:meth:`Dispatcher.queue`), *before* it is printed, written to files, returned to a
callback or sent; sending (:meth:`Dispatcher.send`) is a separate step that reads from the outbox,
so a process killed at any instant has lost nothing it had announced.

Nothing about the outbox can stop the caller: a file that is unusable when opened is moved aside and
a fresh one opened (:func:`~.outbox.open_outbox`); an outbox that fails later (the disk fills up, the
file is damaged) is replaced by an in-memory one, into which the events not yet delivered are queued
again, so they still go out directly while the backend is up. Every such step is one line in
:attr:`Dispatcher.degraded`, and the front end's exit code says delivery degraded
(:data:`EXIT_DEGRADED`). Neither method raises for outbox or network trouble.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Iterable, Mapping

from ..errors import BackendError
from .client import BackendClient
from .outbox import MEMORY, Outbox, open_outbox
from .send import DEFAULT_POLICY, DeliveryReport, RetryPolicy, add_batch, build_batch, send_queued

log = logging.getLogger(__name__)

EXIT_DEGRADED = 5  # a front end's exit code when everything else succeeded but delivery degraded
MAX_UNSENT = 10_000  # payloads kept in memory to re-queue if the outbox fails (the oldest go first)


class Dispatcher:
    """Queue events durably as soon as they are known, send them from the outbox.

    Args:
        client: a :class:`~.client.BackendClient`.
        outbox: the outbox file (opened with :func:`~.outbox.open_outbox`), or an :class:`Outbox`.
        user_id: sent with each event.
        angle: degrees, for events without their own ``"angle"`` (None: 0).
        policy: each entry's retry schedule and when it is parked (:class:`~.send.RetryPolicy`).
        lock_timeout: seconds a send waits for another process's send loop (then ``busy``).
        fields: ``sound_icon`` / ``location_image_url`` of every payload (config ``delivery.*``).

    Thread-safe: one thread may :meth:`queue` while another sends.
    """

    def __init__(self, client: BackendClient, outbox: str | os.PathLike[str] | Outbox, *, user_id: int | str,
                 angle: float | None = None, policy: RetryPolicy = DEFAULT_POLICY,
                 lock_timeout: float | None = 10.0, fields: Mapping[str, str] | None = None) -> None:
        self.client = client
        self.fields = dict(fields or {})
        self.user_id = user_id
        self.angle = 0.0 if angle is None else float(angle)
        self.policy = policy
        self.lock_timeout = lock_timeout
        self.degraded: list[str] = []
        if isinstance(outbox, Outbox):
            self.outbox = outbox
        else:
            self.outbox, reason = open_outbox(outbox)
            if reason:
                self.degraded.append(reason)
        self._lock = threading.Lock()
        self._unsent: dict[str, dict[str, Any]] = {}  # payloads queued by this process, not yet settled

    def __repr__(self) -> str:
        return f"Dispatcher({self.client!r}, {self.outbox!r}, degraded={bool(self.degraded)})"

    # -- the outbox giving out ---------------------------------------------------------------------

    def _fall_back(self, failed: Outbox, reason: str) -> None:
        """Replace ``failed`` by an in-memory outbox holding the events this process has not settled."""
        with self._lock:
            if self.outbox is not failed:  # another thread did it already
                return
            line = (f"outbox {failed.path} failed ({reason}); events are sent directly and kept in memory only "
                    "while this process runs")
            log.warning("%s", line)
            self.degraded.append(line)
            memory = Outbox(MEMORY, keep_delivered=failed.keep_delivered)
            add_batch(self._unsent, memory)
            self.outbox = memory

    # -- queueing and sending ----------------------------------------------------------------------

    def queue(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Commit ``events`` (those whose category is not ``other``) to the outbox now; returns the
        keys to :meth:`send`. Raises :class:`~astsep.errors.BackendError` only for an event that is
        not one (no ``event_id`` / ``category`` / ``label``), before anything is queued."""
        batch = build_batch(events, user_id=self.user_id, angle=self.angle, fields=self.fields)
        with self._lock:
            self._unsent.update(batch)
            while len(self._unsent) > MAX_UNSENT:
                del self._unsent[next(iter(self._unsent))]
        box = self.outbox
        try:
            return add_batch(batch, box)
        except BackendError as exc:
            self._fall_back(box, str(exc))
            return add_batch(batch, self.outbox)

    def send(self, keys: Iterable[str] = ()) -> DeliveryReport:
        """Send ``keys`` (from :meth:`queue`) first, now even if an earlier failure set them a later
        retry time, then every other entry whose own retry time has come. Never raises: outbox trouble switches to an in-memory outbox and sends again."""
        keys = list(keys)
        for _ in range(2):
            box = self.outbox
            try:
                report = send_queued(keys, self.client, box, lock_timeout=self.lock_timeout, policy=self.policy)
            except BackendError as exc:
                if box.in_memory:
                    log.error("delivery failed: %s", exc)
                    return DeliveryReport(last_error=str(exc))
                self._fall_back(box, str(exc))
                continue
            self._settle(box)
            return report
        return DeliveryReport(last_error="delivery failed twice")

    def deliver(self, events: Iterable[Mapping[str, Any]]) -> DeliveryReport:
        """:meth:`queue` then :meth:`send`."""
        return self.send(self.queue(events))

    def _settle(self, box: Outbox) -> None:
        """Forget the events ``box`` no longer holds as pending (delivered or rejected)."""
        with self._lock:
            if not self._unsent:
                return
            try:
                pending = set(box.pending_keys())
            except BackendError:
                return
            for key in [k for k in self._unsent if k not in pending]:
                del self._unsent[key]

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()
