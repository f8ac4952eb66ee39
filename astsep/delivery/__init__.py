"""Deliver sound events to the event backend without losing or duplicating any.

From the bottom up:

* :mod:`.payload` – :func:`validate_url` and :func:`build_payload`: configuration and an event
  record → the exact JSON body the reference backend takes;
* :mod:`.client` – :class:`BackendClient` POSTs one payload with an ``Idempotency-Key`` header,
  retried by urllib3's ``Retry`` (honouring ``Retry-After``), within a total deadline per request;
* :mod:`.outbox` – :class:`Outbox`, the durable queue: an SQLite table keyed by the idempotency
  key, with a state per entry (pending / parked / delivered / rejected, reason, attempts, its own
  retry schedule), and :func:`open_outbox`, which opens one that cannot stop a run (a bad file is
  moved aside, a fresh one opened; an in-memory one where no file can be written);
* :mod:`.send` – :func:`queue_events` (commit new events), :func:`send_queued` (send them, then
  whatever is due), :func:`deliver` (both) and :func:`flush` (everything pending), with a
  :class:`RetryPolicy` per entry;
* :mod:`.dispatch` – :class:`Dispatcher`, what a front end holds: events committed the moment they
  are known, sent from the outbox; outbox trouble degrades to an in-memory outbox, never stops it;
* ``python -m astsep.delivery flush|status`` – the command line.

The bearer token is read from an environment variable (default ``ASTSEP_BACKEND_TOKEN``) at request
time and is never stored on the client, written to the outbox, logged, or put in an exception.
Nothing here imports torch.
"""

from .client import DEFAULT_TOKEN_ENV, BackendClient, DeliveryResult
from .dispatch import EXIT_DEGRADED, Dispatcher
from .outbox import MEMORY, Outbox, OutboxBusy, OutboxUnusable, open_outbox
from .payload import MIN_DECIBEL, build_payload, parse_iso_time, validate_url
from .send import (
    DEFAULT_POLICY,
    DeliveryReport,
    RetryPolicy,
    add_batch,
    build_batch,
    deliver,
    flush,
    queue_events,
    send_queued,
)

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_TOKEN_ENV",
    "EXIT_DEGRADED",
    "MEMORY",
    "MIN_DECIBEL",
    "BackendClient",
    "DeliveryReport",
    "DeliveryResult",
    "Dispatcher",
    "Outbox",
    "OutboxBusy",
    "OutboxUnusable",
    "RetryPolicy",
    "add_batch",
    "build_batch",
    "build_payload",
    "deliver",
    "flush",
    "open_outbox",
    "parse_iso_time",
    "queue_events",
    "send_queued",
    "validate_url",
]
