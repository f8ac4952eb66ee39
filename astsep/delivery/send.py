"""Tie the outbox and the client together: :func:`deliver` (new events) and :func:`flush` (everything
pending). Neither raises for network problems; both return a JSON-serialisable :class:`DeliveryReport`.

Delivery is *at least once* on the wire and *exactly once* for a backend that deduplicates on
``Idempotency-Key`` (the key is the event's stable ``event_id``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

from ..errors import BackendError
from .client import BackendClient
from .outbox import Outbox, OutboxBusy
from .payload import SKIPPED_CATEGORY, build_payload

log = logging.getLogger(__name__)


@dataclass
class DeliveryReport:
    """What one :func:`deliver` / :func:`flush` call did. Counts are numbers of entries (events),
    except ``requests`` (HTTP requests made, retries included).

    * ``sent``: entries POSTed at least once in this call;
    * ``delivered``: entries the backend accepted (2xx) and that were marked delivered;
    * ``pending``: entries of this call left in the outbox to retry later;
    * ``rejected``: entries the backend refused in this call (kept in ``Outbox.rejected()``);
    * ``skipped_other``: events of category ``other`` (never sent);
    * ``duplicates``: events whose ``event_id`` the outbox already had as delivered or rejected;
    * ``outbox_pending``: entries pending in the whole outbox after the call;
    * ``busy``: another process held the send lock, so nothing was sent;
    * ``last_error``: the last retryable error seen, if any.
    """

    sent: int = 0
    delivered: int = 0
    pending: int = 0
    rejected: int = 0
    skipped_other: int = 0
    duplicates: int = 0
    requests: int = 0
    outbox_pending: int = 0
    busy: bool = False
    last_error: str | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for humans."""
        text = (
            f"delivered {self.delivered}/{self.sent} sent, {self.pending} pending, {self.rejected} rejected, "
            f"{self.requests} request(s); outbox now holds {self.outbox_pending} pending"
        )
        if self.skipped_other or self.duplicates:
            text += f" (skipped: {self.skipped_other} 'other', {self.duplicates} already handled)"
        if self.busy:
            text += "; outbox busy (another process is sending), nothing sent"
        elif self.last_error and self.pending:
            text += f"; last error: {self.last_error}"
        return text


def _send(
    keys: list[str],
    client: BackendClient,
    outbox: Outbox,
    report: DeliveryReport,
    *,
    lock_timeout: float | None,
    stop_on_retryable: bool,
) -> None:
    """POST the pending entries among ``keys`` in order, recording each outcome in the outbox."""
    try:
        with outbox.sending(lock_timeout):
            for key in keys:
                entry = outbox.entry(key)  # read under the send lock: another sender may have finished it
                if entry is None or entry["state"] != "pending":
                    continue
                result = client.post(entry["payload"] or {}, key)
                report.sent += 1
                report.requests += result.attempts
                if result.status == "delivered":
                    outbox.mark_delivered(key, result.http_status, result.attempts)
                    report.delivered += 1
                elif result.status == "rejected":
                    outbox.mark_rejected(key, result.http_status, result.error, result.attempts)
                    report.rejected += 1
                    if result.error:
                        report.errors.append(f"{key}: {result.error}")
                else:
                    outbox.note_failure(key, result.http_status, result.error, result.attempts)
                    report.last_error = result.error
                    if stop_on_retryable:
                        # The backend is down or overloaded: the rest would most likely fail the same
                        # way, each after its full retry budget. Leave them pending for the next flush.
                        break
    except OutboxBusy as exc:
        report.busy = True
        report.last_error = str(exc)
        log.info("%s", exc)
    pending = outbox.pending_keys()
    report.pending = len(set(keys) & set(pending))
    report.outbox_pending = len(pending)
    if report.delivered:
        try:
            outbox.prune()
        except BackendError as exc:  # housekeeping; never fail a delivery for it
            log.warning("could not prune outbox %s: %s", outbox.path, exc)


def deliver(
    events: Iterable[Mapping[str, Any]],
    client: BackendClient,
    outbox: Outbox,
    *,
    user_id: int | str,
    angle: float,
    occurred_at: datetime | str | float | None = None,
    lock_timeout: float | None = 10.0,
    stop_on_retryable: bool = True,
    send: bool = True,
) -> DeliveryReport:
    """Send every event whose ``category`` is not ``other`` to the backend, via the outbox.

    Each event is first committed to ``outbox`` under its ``event_id`` (the idempotency key), with
    the payload from :func:`build_payload` (so a later resend carries the same ``occurred_at``), and
    only then POSTed. 2xx → marked delivered; rejected → kept in ``outbox.rejected()``; retryable →
    left pending (with the reason) for :func:`flush`. Events whose id the outbox already holds as
    delivered or rejected are not sent again; ones it holds as pending are (re)sent.

    ``angle`` is in degrees (an event's own ``"angle"`` key, if present, wins); likewise an event's
    own ``"occurred_at"`` (when its sound happened) wins over ``occurred_at`` (None: now). ``lock_timeout`` is
    how many seconds to wait for another process's send loop to finish (None: forever); when it
    does not, the events stay queued and the report says ``busy``. With ``stop_on_retryable``, the
    first entry that is still failing after its retries ends the send loop (the rest stay pending).
    With ``send=False`` the events are only queued (e.g. when a :func:`flush` just found the backend
    unreachable), to be sent by the next :func:`flush`.

    Never raises for network problems. Raises :class:`~astsep.errors.BackendError` for an event
    without an ``event_id`` / ``category`` / ``label`` (before anything is queued or sent) or when
    the outbox cannot be written.
    """
    events = list(events)
    for i, ev in enumerate(events):
        if not isinstance(ev, Mapping):
            raise BackendError(f"event #{i} is not a mapping but {type(ev).__name__}")
        if not isinstance(ev.get("event_id"), str) or not ev.get("event_id"):
            raise BackendError(f"event #{i} has no event_id (a non-empty string is required)")
        if "category" not in ev:
            raise BackendError(f"event {ev['event_id']!r} has no category")
    report = DeliveryReport()
    batch: dict[str, dict[str, Any]] = {}
    for ev in events:
        if ev["category"] == SKIPPED_CATEGORY:
            report.skipped_other += 1
            continue
        key = ev["event_id"]
        if key in batch:
            report.duplicates += 1
            continue
        when = ev.get("occurred_at") or occurred_at  # the event's own time (when the sound happened) wins
        batch[key] = build_payload(ev, user_id=user_id, angle=ev.get("angle", angle), occurred_at=when)
    added = outbox.add_many(batch.items())  # committed BEFORE the first request
    pending = set(outbox.pending_keys()) if not all(added) else set()
    to_send: list[str] = []
    for key, was_added in zip(batch, added):
        if was_added or key in pending:
            to_send.append(key)
        else:
            report.duplicates += 1
    if to_send and send:
        _send(to_send, client, outbox, report, lock_timeout=lock_timeout, stop_on_retryable=stop_on_retryable)
    else:
        report.pending = len(to_send)
        report.outbox_pending = len(outbox.pending_keys())
    log.info("deliver: %s", report.summary())
    return report


def flush(
    outbox: Outbox,
    client: BackendClient,
    *,
    lock_timeout: float | None = 10.0,
    stop_on_retryable: bool = True,
) -> DeliveryReport:
    """Send every pending entry of ``outbox`` (oldest first), with the same rules as :func:`deliver`.

    Never raises for network problems; see :func:`deliver` for ``lock_timeout`` (seconds) and
    ``stop_on_retryable``.
    """
    report = DeliveryReport()
    _send(outbox.pending_keys(), client, outbox, report, lock_timeout=lock_timeout, stop_on_retryable=stop_on_retryable)
    log.info("flush: %s", report.summary())
    return report
