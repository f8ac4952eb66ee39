"""Deliver sound events to the event backend without losing or duplicating any.

From the bottom up:

* :mod:`.payload` – :func:`validate_url` and :func:`build_payload`: configuration and an event
  record → the exact JSON body the reference backend takes;
* :mod:`.client` – :class:`BackendClient` POSTs one payload with an ``Idempotency-Key`` header,
  retried by urllib3's ``Retry`` (honouring ``Retry-After``), within a total deadline per request;
* :mod:`.outbox` – :class:`Outbox`, the durable queue: an SQLite table keyed by the idempotency
  key, with a state per entry (pending / delivered / rejected, reason, attempts);
* :mod:`.send` – :func:`deliver` (new events) and :func:`flush` (everything pending);
* ``python -m astsep.delivery flush`` – the command line.

The bearer token is read from an environment variable (default ``ASTSEP_BACKEND_TOKEN``) at request
time and is never stored on the client, written to the outbox, logged, or put in an exception.
Nothing here imports torch.
"""

from .client import DEFAULT_TOKEN_ENV, BackendClient, DeliveryResult
from .outbox import Outbox, OutboxBusy
from .payload import MIN_DECIBEL, build_payload, parse_iso_time, validate_url
from .send import DeliveryReport, deliver, flush

__all__ = [
    "DEFAULT_TOKEN_ENV",
    "MIN_DECIBEL",
    "BackendClient",
    "DeliveryReport",
    "DeliveryResult",
    "Outbox",
    "OutboxBusy",
    "build_payload",
    "deliver",
    "flush",
    "parse_iso_time",
    "validate_url",
]
