"""Tie the outbox and the client together: :func:`deliver` (new events) and :func:`flush` (everything
pending). Neither raises for network problems; both return a JSON-serialisable :class:`DeliveryReport`.

Delivery is *at least once* on the wire and *exactly once* for a backend that deduplicates on
``Idempotency-Key`` (the key is the event's stable ``event_id``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

from ..errors import BackendError
from .client import BackendClient
from .outbox import Outbox, OutboxBusy
from .payload import SKIPPED_CATEGORY, build_payload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """When an entry that was not delivered is tried again, and when it is parked.

    Each entry has its own schedule: after its n-th failed send round it waits
    ``min(max_delay, base_delay * 2**(n-1))`` seconds before the next one (the client's own
    retries within a round, with urllib3's backoff, come on top), so one entry the backend keeps
    failing never holds back the others. An entry that has been failing for ``park_after``
    seconds or more is parked: kept with its reason, left alone by :func:`flush`, retried by
    ``flush(..., include_parked=True)`` (``python -m astsep.delivery flush --all``). Never dropped.
    """

    base_delay: float = 2.0
    max_delay: float = 300.0
    park_after: float = 24 * 3600.0

    def __post_init__(self) -> None:
        for name in ("base_delay", "max_delay", "park_after"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise BackendError(f"retry policy {name} must be a finite number of seconds >= 0, got {value!r}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed round (``failures`` ≥ 1)."""
        return min(self.max_delay, self.base_delay * 2.0 ** max(0, failures - 1))


DEFAULT_POLICY = RetryPolicy()


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
    * ``outbox_pending``: entries pending in the whole outbox after the call (parked ones included);
    * ``parked``: of those, entries parked after failing for longer than the policy's ``park_after``;
    * ``waiting``: entries left untried because their own retry time had not come;
    * ``busy``: another process held the send lock, so nothing was sent;
    * ``unreachable``: a request got no HTTP answer at all (refused, timed out), so the send loop
      stopped there: the backend is down, the rest would wait through the same timeouts;
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
    parked: int = 0
    waiting: int = 0
    busy: bool = False
    unreachable: bool = False
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
        if self.parked:
            text += f" ({self.parked} parked after failing too long: python -m astsep.delivery status)"
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
    policy: RetryPolicy,
    include_parked: bool = False,
    ignore_schedule: bool = False,
    now_keys: Iterable[str] = (),
) -> None:
    """POST the entries among ``keys`` that are pending and due, in order, recording each outcome.
    (Stays whole: one loop under the outbox's send lock, every branch updating the same entry and report.)

    A retryable answer (5xx, 429, a redirect) gives that entry its next retry time and the loop goes
    on with the next entry: one entry the backend keeps failing cannot hold back the others. A
    request that got no HTTP answer (connection refused, timeout) ends the loop: the backend is
    unreachable, and every further entry would wait through the same retries for nothing.
    ``now_keys`` go out whatever their own retry time (a run that made the event again names it).
    """
    now_keys = set(now_keys)
    try:
        with outbox.sending(lock_timeout):
            for key in keys:
                entry = outbox.entry(key)  # read under the send lock: another sender may have finished it
                if entry is None or entry["state"] != "pending":
                    continue
                now = time.time()
                if entry.get("parked_at") and not include_parked:
                    continue
                if entry.get("next_at") and entry["next_at"] > now and not (ignore_schedule or key in now_keys):
                    report.waiting += 1
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
                    now = time.time()
                    failures = int(entry.get("failures") or 0) + 1
                    since = entry.get("failing_since") or now
                    park = now - since >= policy.park_after
                    outbox.note_failure(key, result.http_status, result.error, result.attempts,
                                        retry_at=now + policy.delay(failures), park=park, now=now)
                    if park and not entry.get("parked_at"):
                        log.warning("outbox: parked %s after failing for %.0f s: %s (retry with flush --all)",
                                    key, now - since, result.error)
                    report.last_error = result.error
                    if result.http_status is None:
                        report.unreachable = True
                        break
    except OutboxBusy as exc:
        report.busy = True
        report.last_error = str(exc)
        log.info("%s", exc)
    pending = outbox.pending_keys()
    report.pending = len(set(keys) & set(pending))
    report.outbox_pending = len(pending)
    report.parked = outbox.counts()["parked"]
    if report.delivered:
        try:
            outbox.prune()
        except BackendError as exc:  # housekeeping; never fail a delivery for it
            log.warning("could not prune outbox %s: %s", outbox.path, exc)


def build_batch(
    events: Iterable[Mapping[str, Any]],
    *,
    user_id: int | str,
    angle: float,
    occurred_at: datetime | str | float | None = None,
    report: DeliveryReport | None = None,
    fields: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{event_id: payload}`` for every event whose ``category`` is not ``other`` (counted in
    ``report.skipped_other``; a repeated id in ``report.duplicates``), payloads from
    :func:`build_payload`. ``angle`` in degrees (an event's own ``"angle"`` key wins),
    ``occurred_at`` as in :func:`build_payload` (an event's own wins); ``fields``: ``sound_icon`` /
    ``location_image_url`` for :func:`build_payload` (config ``delivery.*``). Touches no outbox.

    Raises :class:`~astsep.errors.BackendError` for an event without an ``event_id`` /
    ``category`` / ``label`` or with an angle or time that cannot be read.
    """
    events = list(events)
    report = report if report is not None else DeliveryReport()
    for i, ev in enumerate(events):
        if not isinstance(ev, Mapping):
            raise BackendError(f"event #{i} is not a mapping but {type(ev).__name__}")
        if not isinstance(ev.get("event_id"), str) or not ev.get("event_id"):
            raise BackendError(f"event #{i} has no event_id (a non-empty string is required)")
        if "category" not in ev:
            raise BackendError(f"event {ev['event_id']!r} has no category")
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
        batch[key] = build_payload(ev, user_id=user_id, angle=ev.get("angle", angle), occurred_at=when,
                                   **dict(fields or {}))
    return batch


def add_batch(batch: Mapping[str, Mapping[str, Any]], outbox: Outbox, report: DeliveryReport | None = None) -> list[str]:
    """Commit ``batch`` (from :func:`build_batch`) to ``outbox`` in one transaction; returns the keys
    to send: those newly added and those the outbox already held as pending (ones it held as
    delivered or rejected are counted in ``report.duplicates``). Raises
    :class:`~astsep.errors.BackendError` when the outbox cannot be written."""
    if not batch:
        return []
    added = outbox.add_many(batch.items())  # committed BEFORE the first request
    pending = set(outbox.pending_keys()) if not all(added) else set()
    to_send: list[str] = []
    for key, was_added in zip(batch, added):
        if was_added or key in pending:
            to_send.append(key)
        elif report is not None:
            report.duplicates += 1
    return to_send


def queue_events(
    events: Iterable[Mapping[str, Any]],
    outbox: Outbox,
    *,
    user_id: int | str,
    angle: float,
    occurred_at: datetime | str | float | None = None,
    report: DeliveryReport | None = None,
) -> list[str]:
    """Commit every event whose ``category`` is not ``other`` to ``outbox`` (one transaction,
    on disk) under its ``event_id``; send nothing. :func:`build_batch` then :func:`add_batch`.

    Call it as soon as events are known, before anything else that can fail (writing files,
    printing): from then on a crash cannot lose them. Returns the keys to send.
    """
    report = report if report is not None else DeliveryReport()
    batch = build_batch(events, user_id=user_id, angle=angle, occurred_at=occurred_at, report=report)
    return add_batch(batch, outbox, report)


def send_queued(
    keys: Iterable[str],
    client: BackendClient,
    outbox: Outbox,
    *,
    lock_timeout: float | None = 10.0,
    policy: RetryPolicy = DEFAULT_POLICY,
    flush_due: bool = True,
    report: DeliveryReport | None = None,
) -> DeliveryReport:
    """Send the entries ``keys`` (just queued by :func:`queue_events`) first, each now even when an
    earlier failure gave it a later retry time (this call made the event again: a run re-processing
    the same audio after the backend came back delivers all of its events), then, with
    ``flush_due``, every other pending entry whose own retry time has come; never raises for
    network problems. See :func:`deliver`."""
    report = report if report is not None else DeliveryReport()
    first = list(dict.fromkeys(keys))
    chosen = set(first)
    rest = [k for k in outbox.due_keys() if k not in chosen] if flush_due else []
    if first or rest:
        _send(first + rest, client, outbox, report, lock_timeout=lock_timeout, policy=policy,
              ignore_schedule=False, now_keys=first)
        report.pending = len(set(first) & set(outbox.pending_keys()))
    else:
        report.outbox_pending = len(outbox.pending_keys())
    return report


def deliver(
    events: Iterable[Mapping[str, Any]],
    client: BackendClient,
    outbox: Outbox,
    *,
    user_id: int | str,
    angle: float,
    occurred_at: datetime | str | float | None = None,
    lock_timeout: float | None = 10.0,
    send: bool = True,
    flush_due: bool = False,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> DeliveryReport:
    """Send every event whose ``category`` is not ``other`` to the backend, via the outbox.

    Each event is first committed to ``outbox`` (:func:`queue_events`) and only then POSTed.
    2xx → marked delivered; rejected → kept in ``outbox.rejected()``; retryable → left pending with
    the reason and its own next retry time (``policy``) for a later :func:`flush`. Events whose id
    the outbox already holds as delivered or rejected are not sent again; ones it holds as pending
    are (re)sent now, even before their own retry time (parked ones excepted). With ``flush_due``, the other pending entries whose retry time has come are sent
    after this call's events (a new alert is never queued behind an old failing one).

    ``lock_timeout`` is how many seconds to wait for another process's send loop to finish (None:
    forever); when it does not, the events stay queued and the report says ``busy``. A request that
    gets no HTTP answer at all ends the send loop (``report.unreachable``); the rest stay pending.
    With ``send=False`` the events are only queued, to be sent by the next :func:`flush`.

    Never raises for network problems. Raises :class:`~astsep.errors.BackendError` for an event
    without an ``event_id`` / ``category`` / ``label`` (before anything is queued or sent) or when
    the outbox cannot be written.
    """
    report = DeliveryReport()
    to_send = queue_events(events, outbox, user_id=user_id, angle=angle, occurred_at=occurred_at, report=report)
    if send:
        send_queued(to_send, client, outbox, lock_timeout=lock_timeout, policy=policy, flush_due=flush_due,
                    report=report)
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
    policy: RetryPolicy = DEFAULT_POLICY,
    due_only: bool = False,
    include_parked: bool = False,
) -> DeliveryReport:
    """Send the pending entries of ``outbox``, with the same rules as :func:`deliver`: entries that
    never failed first (oldest first), then the failed ones.

    ``due_only``: only entries whose own retry time has come (what an automatic, repeated flush
    wants); otherwise every pending entry is tried once now (what a person running ``flush`` wants).
    Parked entries only with ``include_parked`` (``flush --all``). Never raises for network problems.
    """
    report = DeliveryReport()
    keys = outbox.due_keys(include_parked=include_parked, ignore_schedule=not due_only)
    _send(keys, client, outbox, report, lock_timeout=lock_timeout, policy=policy,
          include_parked=include_parked, ignore_schedule=not due_only)
    log.info("flush: %s", report.summary())
    return report
