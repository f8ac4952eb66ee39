"""Deliver sound events to the event backend without losing or duplicating any.

The pieces, from the bottom up:

* :func:`validate_url` / :func:`build_payload` turn configuration and an event record into the exact
  JSON body the reference backend (``Bentlytrucker/ast_source_sep``, ``POST /sound-events/``) takes.
* :class:`BackendClient` POSTs one payload with an ``Idempotency-Key`` header, retrying timeouts,
  connection errors, 408, 429 and 5xx with exponential backoff (honouring ``Retry-After`` on 429/503),
  and classifies the outcome as ``delivered``, ``retryable`` or ``rejected``.
* :class:`Outbox` is a durable, append-only JSON-lines journal of what still has to be sent. Every
  record is fsync'ed before the code moves on, so an event is on disk *before* its first POST and is
  only marked done *after* a 2xx. A process killed at any instant loses nothing; at worst the one
  request that was in flight is sent again with the same idempotency key, which the backend can
  deduplicate.
* :func:`deliver` (new events) and :func:`flush` (everything pending) tie them together and never
  raise for network problems; they return a JSON-serialisable :class:`DeliveryReport`.

Delivery semantics are therefore *at least once* on the wire and *exactly once* for a backend that
deduplicates on ``Idempotency-Key`` (the key is the event's stable ``event_id``).

Concurrency: two lock files next to the journal, both taken with ``fcntl.flock`` (released by the
kernel when a process dies). ``<outbox>.lock`` is held for the few milliseconds it takes to read or
append to the journal; ``<outbox>.send.lock`` is held for the whole of a send loop, so two processes
flushing the same outbox never send the same entry at the same time.

Command line::

    python -m astsep.backend flush --outbox PATH --backend-url URL [--timeout S] [-v]

The bearer token is read from an environment variable (default ``ASTSEP_BACKEND_TOKEN``) at request
time and is never stored on the client, written to the outbox, logged, or put in an exception.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import http.client
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping
from urllib.parse import urlsplit, urlunsplit

import requests

from .errors import BackendError

log = logging.getLogger("astsep.backend" if __name__ == "__main__" else __name__)

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
    "main",
    "validate_url",
]

DEFAULT_TOKEN_ENV = "ASTSEP_BACKEND_TOKEN"
MIN_DECIBEL = -120.0  # dBFS sent in place of -inf / NaN (digital silence) so the JSON stays valid
PLACEHOLDER = "string"  # what the reference sends for sound_icon and location_image_url
USER_AGENT = "astsep-backend/0.1"
ERROR_TEXT_LIMIT = 500  # characters of a response body / exception kept as the error text
SKIPPED_CATEGORY = "other"  # events of this category are never sent

DeliveryStatus = Literal["delivered", "retryable", "rejected"]


# --------------------------------------------------------------------------------------------------
# URL and payload
# --------------------------------------------------------------------------------------------------


def _redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` part replaced by ``***@`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def validate_url(url: str) -> str:
    """Check that ``url`` is an ``http://`` or ``https://`` URL with a host; return it stripped.

    Raises :class:`~astsep.errors.BackendError` with a one-line message otherwise (any credentials
    in the URL are redacted from the message).
    """
    if not isinstance(url, str) or not url.strip():
        raise BackendError("invalid backend URL: empty (expected http://host[:port]/path or https://...)")
    url = url.strip()
    shown = _redact_url(url)
    if any(c.isspace() for c in url):
        raise BackendError(f"invalid backend URL {shown!r}: contains whitespace")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a non-numeric / out-of-range port
    except ValueError as exc:
        raise BackendError(f"invalid backend URL {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        hint = ""
        if "://" not in url:
            hint = f" (did you mean 'http://{shown}'?)"
        what = f"scheme {scheme!r} is not supported" if scheme and "://" in url else "no http:// or https:// scheme"
        raise BackendError(f"invalid backend URL {shown!r}: {what}; use http:// or https://{hint}")
    if not parts.hostname:
        raise BackendError(f"invalid backend URL {shown!r}: no host")
    return url



def parse_iso_time(text: str) -> datetime:
    """An ISO-8601 time as an aware datetime: ``Z`` or an offset, else UTC. Raises ``ValueError``."""
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    when = datetime.fromisoformat(t)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)

def _format_time(occurred_at: datetime | str | float | None) -> str:
    """ISO-8601 UTC with second resolution, ``YYYY-MM-DDTHH:MM:SSZ``.

    ``None`` means now; a float is seconds since the Unix epoch; a naive datetime is taken as UTC;
    a string is parsed as ISO-8601 (``Z`` suffix allowed) and re-formatted.
    """
    if occurred_at is None:
        dt = datetime.now(timezone.utc)
    elif isinstance(occurred_at, datetime):
        dt = occurred_at if occurred_at.tzinfo else occurred_at.replace(tzinfo=timezone.utc)
    elif isinstance(occurred_at, (int, float)) and not isinstance(occurred_at, bool):
        if not math.isfinite(occurred_at):
            raise BackendError(f"occurred_at must be a finite epoch time, got {occurred_at!r}")
        dt = datetime.fromtimestamp(float(occurred_at), tz=timezone.utc)
    elif isinstance(occurred_at, str):
        try:
            dt = parse_iso_time(occurred_at)
        except ValueError:
            raise BackendError(f"occurred_at is not an ISO-8601 time: {occurred_at!r}") from None
    else:
        raise BackendError(f"occurred_at must be a datetime, ISO string or epoch seconds, got {type(occurred_at).__name__}")
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite_decibel(level_dbfs: Any) -> float:
    """Level in dBFS as a finite float rounded to 0.01 dB: NaN and -inf become :data:`MIN_DECIBEL`,
    +inf becomes 0.0 (full scale)."""
    try:
        value = float(level_dbfs)
    except (TypeError, ValueError):
        return MIN_DECIBEL
    if math.isnan(value) or value == -math.inf:
        return MIN_DECIBEL
    if value == math.inf:
        return 0.0
    return round(value, 2)


def _angle(angle: Any) -> int:
    """Direction of arrival in whole degrees, wrapped into 0..359."""
    try:
        value = float(angle)
    except (TypeError, ValueError):
        raise BackendError(f"angle must be a number of degrees, got {angle!r}") from None
    if not math.isfinite(value):
        raise BackendError(f"angle must be finite, got {angle!r}")
    return int(round(value)) % 360


def _user_id(user_id: Any) -> int:
    """``user_id`` as the int the reference backend takes; a string of digits is converted."""
    if isinstance(user_id, bool):
        raise BackendError(f"user_id must be an integer, got {user_id!r}")
    if isinstance(user_id, int):
        return user_id
    if isinstance(user_id, str) and user_id.strip().lstrip("-").isdigit():
        return int(user_id.strip())
    raise BackendError(f"user_id must be an integer, got {user_id!r}")


def build_payload(
    event: Mapping[str, Any],
    *,
    user_id: int | str,
    angle: float,
    occurred_at: datetime | str | float | None = None,
    sound_icon: str = PLACEHOLDER,
    location_image_url: str = PLACEHOLDER,
) -> dict[str, Any]:
    """The reference backend's JSON body for one event record.

    Fields (exactly these, nothing else):

    * ``user_id`` – an int, as the reference backend takes it (``"42"`` is sent as ``42``);
    * ``sound_type`` – ``event["category"]`` (``danger`` / ``help`` / ``warning`` / ``other``);
    * ``sound_detail`` – ``event["label"]`` (the AudioSet class name);
    * ``angle`` – direction of arrival in degrees, rounded and wrapped into 0..359;
    * ``occurred_at`` – ``YYYY-MM-DDTHH:MM:SSZ`` in UTC, now when ``occurred_at`` is None;
    * ``sound_icon`` / ``location_image_url`` – ``"string"`` by default, as the reference sends;
    * ``decibel`` – ``event["level_dbfs"]`` in dBFS as a finite float (-inf / NaN → -120.0).

    Raises :class:`~astsep.errors.BackendError` when the event lacks ``category`` or ``label`` or
    the angle / time cannot be interpreted.
    """
    missing = [k for k in ("category", "label") if k not in event]
    if missing:
        raise BackendError(f"event {event.get('event_id', '?')!r} lacks {', '.join(missing)}")
    return {
        "user_id": _user_id(user_id),
        "sound_type": str(event["category"]),
        "sound_detail": str(event["label"]),
        "angle": _angle(angle),
        "occurred_at": _format_time(occurred_at),
        "sound_icon": sound_icon,
        "location_image_url": location_image_url,
        "decibel": _finite_decibel(event.get("level_dbfs")),
    }


# --------------------------------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryResult:
    """Outcome of :meth:`BackendClient.post`.

    ``status``: ``delivered`` (2xx), ``retryable`` (timeouts, connection errors, 408/429/5xx after
    the retries ran out, or a 3xx redirect, which is never followed: try again later) or ``rejected``
    (other 4xx: the backend will not take this payload; do not resend it). ``http_status`` is the last HTTP status seen (None when no
    response came back), ``error`` a short one-line reason (None when delivered), ``attempts`` the
    number of HTTP requests made.
    """

    status: DeliveryStatus
    http_status: int | None = None
    error: str | None = None
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "delivered"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one_line(text: str, limit: int = ERROR_TEXT_LIMIT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds to wait (delta-seconds or an HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class BackendClient:
    """POST event payloads to the backend, with retries.

    Args:
        url: endpoint, e.g. ``http://host:8000/sound-events/`` (checked by :func:`validate_url`).
        timeout: seconds allowed for one request in all: connecting, sending and reading the whole
            response (a server that drips its answer cannot hold a request longer).
        retries: extra attempts after the first one for retryable failures (so ``retries + 1``
            requests at most per :meth:`post`).
        backoff: seconds before the first retry; doubles on each further retry.
        max_backoff: upper bound in seconds on any single wait, including a ``Retry-After``.
        token_env: name of the environment variable holding a bearer token; read on every request,
            never stored. Unset or empty → no ``Authorization`` header.
        verify_tls: verify the server's TLS certificate. Only an explicit ``False`` turns this off.
        session: a :class:`requests.Session` to use (it is not closed by :meth:`close`); by default
            the client makes and owns one.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        token_env: str = DEFAULT_TOKEN_ENV,
        verify_tls: bool = True,
        session: requests.Session | None = None,
    ) -> None:
        self.url = validate_url(url)
        if not (timeout > 0 and math.isfinite(timeout)):
            raise BackendError(f"backend timeout must be a positive number of seconds, got {timeout!r}")
        if int(retries) < 0:
            raise BackendError(f"backend retries must be >= 0, got {retries!r}")
        if backoff < 0 or max_backoff < 0:
            raise BackendError("backend backoff and max_backoff must be >= 0 seconds")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.token_env = token_env
        self.verify_tls = verify_tls is not False  # anything but an explicit False keeps verification on
        self._own_session = session is None
        self._session = session if session is not None else requests.Session()
        if not self.verify_tls:
            log.warning("TLS certificate verification is OFF for %s", _redact_url(self.url))

    def __repr__(self) -> str:
        return (
            f"BackendClient(url={_redact_url(self.url)!r}, timeout={self.timeout}, retries={self.retries}, "
            f"backoff={self.backoff}, max_backoff={self.max_backoff}, token_env={self.token_env!r}, "
            f"verify_tls={self.verify_tls})"
        )

    def __enter__(self) -> BackendClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session if this client created it."""
        if self._own_session:
            self._session.close()

    def _token(self) -> str | None:
        token = os.environ.get(self.token_env, "") if self.token_env else ""
        return token.strip() or None

    def _redact(self, text: str, token: str | None) -> str:
        if token:
            text = text.replace(token, "***")
        return _one_line(text)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        delay = retry_after if retry_after is not None else self.backoff * (2 ** (attempt - 1))
        return min(delay, self.max_backoff)

    def _post_within_deadline(self, body: bytes, headers: dict[str, str]) -> requests.Response:
        """One POST that returns its complete response within ``timeout`` seconds in all, or raises
        :class:`_DeadlinePassed`. requests' timeout bounds each socket read, so a server dripping a
        byte at a time would hold it forever; the request runs in a daemon thread, and one past the
        deadline is abandoned (its socket is closed with the session, or when the process ends)."""
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                resp = self._session.post(self.url, data=body, headers=headers, timeout=self.timeout,
                                          verify=self.verify_tls, allow_redirects=False)
                resp.content  # noqa: B018 - read the whole body inside the deadline
                box["resp"] = resp
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                box["exc"] = exc

        worker = threading.Thread(target=work, name="astsep-backend-post", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise _DeadlinePassed()
        if "exc" in box:
            raise box["exc"]
        return box["resp"]

    def post(self, payload: Mapping[str, Any], idempotency_key: str) -> DeliveryResult:
        """POST ``payload`` as JSON with ``Idempotency-Key: idempotency_key``; retry as configured.

        Never raises for network problems: every outcome is a :class:`DeliveryResult`. A payload
        that cannot be encoded as strict JSON (NaN / inf) is ``rejected`` without a request.
        """
        try:
            body = json.dumps(payload, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            return DeliveryResult("rejected", None, _one_line(f"payload is not valid JSON: {exc}"), 0)
        token = self._token()
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
            "Idempotency-Key": str(idempotency_key),
        }
        if token:
            headers["Authorization"] = f"Bearer {token}"

        status: int | None = None
        error = "no attempt made"
        attempts = 0
        for attempt in range(1, self.retries + 2):
            attempts = attempt
            retry_after: float | None = None
            try:
                resp = self._post_within_deadline(body, headers)
            except (requests.Timeout, _DeadlinePassed):
                status, error = None, f"timed out after {self.timeout:g} s (total time allowed per request)"
            except requests.ConnectionError as exc:
                status, error = None, self._redact(f"connection error: {_root_cause(exc)}", token)
            except (requests.RequestException, OSError, ValueError, http.client.HTTPException) as exc:
                # A local problem (bad header value, invalid URL parts...): retrying now will not
                # help, but the entry stays pending so a later flush with fixed settings can send it.
                error = self._redact(f"request failed: {type(exc).__name__}: {exc}", token)
                log.warning("backend request for %s failed: %s", idempotency_key, error)
                return DeliveryResult("retryable", None, error, attempt)
            else:
                status = resp.status_code
                try:
                    text = resp.text
                except Exception:  # noqa: BLE001 - an undecodable body is still just an error text
                    text = ""
                reason = resp.reason or ""
                retry_header = resp.headers.get("Retry-After")
                location = resp.headers.get("Location") or "?"
                resp.close()
                if 200 <= status < 300:
                    log.debug("delivered %s (HTTP %d, attempt %d)", idempotency_key, status, attempt)
                    return DeliveryResult("delivered", status, None, attempt)
                if 300 <= status < 400:
                    # The event was not taken, and the payload is fine: it stays pending for a flush
                    # to the right URL. Redirects are never followed (the bearer token must not go
                    # to whatever origin a redirect names).
                    error = self._redact(f"HTTP {status} {reason}: redirected to {_redact_url(location)}, not "
                                         "followed; the event stays pending: fix --backend-url and flush", token)
                    log.warning("backend redirected %s: %s", idempotency_key, error)
                    return DeliveryResult("retryable", status, error, attempt)
                error = self._redact(f"HTTP {status} {reason}: {text}".rstrip(": "), token)
                if status in (408, 429) or status >= 500:
                    if status in (429, 503):
                        retry_after = _parse_retry_after(retry_header)
                else:
                    log.warning("backend rejected %s: %s", idempotency_key, error)
                    return DeliveryResult("rejected", status, error, attempt)
            if attempt > self.retries:
                break
            delay = self._delay(attempt, retry_after)
            log.info(
                "attempt %d/%d for %s failed (%s); retrying in %.2f s",
                attempt, self.retries + 1, idempotency_key, error, delay,
            )
            if delay > 0:
                time.sleep(delay)
        log.warning("giving up on %s for now after %d attempt(s): %s", idempotency_key, attempts, error)
        return DeliveryResult("retryable", status, error, attempts)


class _DeadlinePassed(Exception):
    """A request did not complete within the client's total time allowed per request."""


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 connection error, e.g. ``[Errno 111] Connection refused``."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    last = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        last = cur
        nxt = getattr(cur, "reason", None)
        if not isinstance(nxt, BaseException):
            nxt = cur.__cause__ or cur.__context__
            if nxt is None and cur.args and isinstance(cur.args[0], BaseException):
                nxt = cur.args[0]
        cur = nxt
    text = str(last)
    # urllib3's NewConnectionError reads "<connection object>: Failed to establish ... [Errno 111] ..."
    if ": " in text and text.startswith("<"):
        text = text.split(": ", 1)[1]
    return text or type(last).__name__


# --------------------------------------------------------------------------------------------------
# Outbox
# --------------------------------------------------------------------------------------------------


class OutboxBusy(BackendError):
    """Another process holds the outbox's send lock (it is flushing or delivering right now)."""


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a file created or renamed in it survives a crash (best effort)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class _Entry:
    key: str
    payload: dict[str, Any] | None  # None: a "done" tombstone kept by compact()
    added_at: str | None = None
    state: Literal["pending", "done", "rejected"] = "pending"
    http_status: int | None = None
    error: str | None = None
    finished_at: str | None = None


class _FileLock:
    """An exclusive ``fcntl.flock`` on a lock file, re-entrant within one object (and thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._depth = 0
        self._mutex = threading.RLock()

    @contextlib.contextmanager
    def hold(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock; wait at most ``timeout`` seconds (None: forever), else raise TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        if not self._mutex.acquire(timeout=-1 if deadline is None else max(0.0, timeout)):  # type: ignore[arg-type]
            raise TimeoutError(str(self.path))
        try:
            if self._depth == 0:
                self._acquire(deadline)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._release()
        finally:
            self._mutex.release()

    def _acquire(self, deadline: float | None) -> None:
        import fcntl  # POSIX only; imported here so that `import astsep` works on Windows

        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if deadline is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise TimeoutError(str(self.path)) from None
                        time.sleep(0.02)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


class Outbox:
    """A durable on-disk queue of deliveries: an append-only JSON-lines journal.

    Records (one JSON object per line, each fsync'ed before the call returns)::

        {"op": "add", "key": K, "payload": {...}, "at": "...Z"}
        {"op": "done", "key": K, "status": 201, "at": "...Z"}
        {"op": "rejected", "key": K, "status": 400, "error": "HTTP 400 ...", "at": "...Z"}

    Opening the outbox replays the journal. A line that is not valid JSON (the torn last line of a
    process killed mid-write) is skipped with a warning; the next append first terminates it with a
    newline so later records stay intact. :meth:`compact` rewrites the journal atomically (temp file,
    fsync, ``os.replace``) keeping pending and rejected entries and, for the ``keep_done`` most
    recent delivered ones, a payload-free ``done`` tombstone, so an event delivered earlier is not
    queued again when it is passed to :func:`deliver` a second time. :func:`deliver` and
    :func:`flush` compact whenever nothing is pending any more.

    Args:
        path: the journal file; created (with its folder) on first use. Lock files ``<path>.lock``
            and ``<path>.send.lock`` live next to it.
        keep_done: how many delivered keys compaction remembers (older ones are forgotten; the
            backend can still deduplicate them by ``Idempotency-Key``).
    """

    def __init__(self, path: str | os.PathLike[str], *, keep_done: int = 100_000) -> None:
        self.path = Path(path)
        self.keep_done = max(0, int(keep_done))
        if self.path.is_dir():
            raise BackendError(f"outbox path is a folder, not a file: {self.path}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create the outbox folder {self.path.parent}: {exc.strerror or exc}") from None
        self._journal_lock = _FileLock(self.path.with_name(self.path.name + ".lock"))
        self._send_lock = _FileLock(self.path.with_name(self.path.name + ".send.lock"))
        self._entries: dict[str, _Entry] = {}
        self._skipped_lines = 0
        with self._journal():
            self._replay()

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r})"

    # -- locking -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _journal(self) -> Iterator[None]:
        """Hold the (short) journal lock."""
        try:
            with self._journal_lock.hold():
                yield
        except OSError as exc:
            raise BackendError(f"cannot use the outbox {self.path}: {exc.strerror or exc}") from None

    @contextlib.contextmanager
    def sending(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the send lock for a send loop, so no other process sends from this outbox meanwhile.

        Waits at most ``timeout`` seconds (None: forever), then raises :class:`OutboxBusy`. On entry the
        in-memory state is re-read from the journal so entries another process finished are skipped.
        """
        try:
            with self._send_lock.hold(timeout):
                self.reload()
                yield
        except TimeoutError:
            raise OutboxBusy(f"outbox {self.path} is busy: another process is sending from it") from None

    # -- journal -----------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the journal from disk (picks up what other processes appended or compacted)."""
        with self._journal():
            self._replay()

    def _replay(self) -> None:
        entries: dict[str, _Entry] = {}
        skipped = 0
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            data = b""
        lines = data.split(b"\n")
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
                op, key = rec["op"], str(rec["key"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                skipped += 1
                torn = lineno == len(lines)
                log.warning(
                    "outbox %s line %d is not a valid record (%s); skipping it",
                    self.path, lineno, "torn last line" if torn else "corrupt",
                )
                continue
            if op == "add":
                if key not in entries and isinstance(rec.get("payload"), dict):
                    entries[key] = _Entry(key, rec["payload"], rec.get("at"))
            elif op in ("done", "rejected"):
                entry = entries.get(key)
                if entry is None:  # a tombstone left by compact() (or an add lost to a crash)
                    entry = entries[key] = _Entry(key, None)
                if entry.state != "pending":
                    continue
                entry.state = op  # type: ignore[assignment]
                entry.http_status = rec.get("status")
                entry.error = rec.get("error")
                entry.finished_at = rec.get("at")
            else:
                skipped += 1
                log.warning("outbox %s line %d has unknown op %r; skipping it", self.path, lineno, op)
        self._entries = entries
        self._skipped_lines = skipped

    def _append(self, record: Mapping[str, Any]) -> None:
        """Append one record and fsync it. Caller holds the journal lock."""
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
        created = not self.path.exists()
        fd = os.open(str(self.path), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # terminate a torn last line left by a killed process
            view = memoryview(line)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)

    # -- public API --------------------------------------------------------------------------------

    def add(self, key: str, payload: Mapping[str, Any]) -> bool:
        """Durably queue ``payload`` under idempotency ``key``.

        Returns False (and writes nothing) when ``key`` is already in the outbox, whatever its state.
        """
        return self.add_many([(key, payload)])[0]

    def add_many(self, items: Iterable[tuple[str, Mapping[str, Any]]]) -> list[bool]:
        """:meth:`add` for several entries under one lock and one journal replay (one fsync per
        record all the same). Returns, per item, whether it was added."""
        items = [(str(k), p) for k, p in items]
        if any(not k for k, _ in items):
            raise BackendError("outbox key must be a non-empty string")
        added: list[bool] = []
        with self._journal():
            self._replay()
            for key, payload in items:
                if key in self._entries:
                    added.append(False)
                    continue
                payload = dict(payload)
                at = _now_iso()
                self._append({"op": "add", "key": key, "payload": payload, "at": at})
                self._entries[key] = _Entry(key, payload, at)
                added.append(True)
        return added

    def _finish(self, key: str, op: Literal["done", "rejected"], status: int | None, error: str | None) -> bool:
        key = str(key)
        with self._journal():
            entry = self._entries.get(key)
            if entry is None or entry.state != "pending":
                self._replay()
                entry = self._entries.get(key)
            if entry is None or entry.state != "pending":
                log.debug("outbox: %s is not pending; not marking it %s", key, op)
                return False
            at = _now_iso()
            rec: dict[str, Any] = {"op": op, "key": key, "status": status, "at": at}
            if op == "rejected":
                rec["error"] = error
            self._append(rec)
            entry.state, entry.http_status, entry.error, entry.finished_at = op, status, error, at
            return True

    def mark_done(self, key: str, status: int | None = None) -> bool:
        """Record that ``key`` was delivered (call only after a 2xx). False if it was not pending."""
        return self._finish(key, "done", status, None)

    def mark_rejected(self, key: str, status: int | None = None, error: str | None = None) -> bool:
        """Record that the backend refused ``key`` (HTTP ``status``, ``error`` text); it is kept for
        inspection in :meth:`rejected` and never resent. False if it was not pending."""
        return self._finish(key, "rejected", status, error)

    def _pending_entries(self) -> list[_Entry]:
        return [e for e in self._entries.values() if e.state == "pending"]

    def pending(self) -> list[dict[str, Any]]:
        """Entries still to deliver, oldest first: ``{"key", "payload", "added_at"}`` each."""
        self.reload()
        return [
            {"key": e.key, "payload": dict(e.payload or {}), "added_at": e.added_at} for e in self._pending_entries()
        ]

    def rejected(self) -> list[dict[str, Any]]:
        """Entries the backend refused: ``{"key", "payload", "status", "error", "added_at", "rejected_at"}``."""
        self.reload()
        return [
            {
                "key": e.key,
                "payload": dict(e.payload) if e.payload is not None else None,
                "status": e.http_status,
                "error": e.error,
                "added_at": e.added_at,
                "rejected_at": e.finished_at,
            }
            for e in self._entries.values()
            if e.state == "rejected"
        ]

    def state(self, key: str) -> str | None:
        """``pending`` / ``done`` / ``rejected`` for a key in the journal, None if it is not there."""
        entry = self._entries.get(str(key))
        return entry.state if entry else None

    def compact(self) -> bool:
        """Rewrite the journal as its current state: pending and rejected entries in full, and a
        payload-free ``done`` tombstone for each of the ``keep_done`` most recent delivered keys.

        Atomic: a temp file in the same folder is written and fsync'ed, then ``os.replace``'d over
        the journal. Returns True if the file was rewritten, False when there was nothing to drop
        (no delivered payloads, corrupt lines or excess tombstones).
        """
        with self._journal():
            self._replay()
            done = [e for e in self._entries.values() if e.state == "done"]
            forget = {e.key for e in done[: max(0, len(done) - self.keep_done)]}
            if not forget and self._skipped_lines == 0 and all(e.payload is None for e in done):
                return False

            def line(rec: dict[str, Any]) -> bytes:
                return json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"

            out: list[bytes] = []
            for e in self._entries.values():
                if e.key in forget:
                    continue
                if e.payload is not None and e.state != "done":
                    out.append(line({"op": "add", "key": e.key, "payload": e.payload, "at": e.added_at}))
                if e.state == "done":
                    out.append(line({"op": "done", "key": e.key, "status": e.http_status, "at": e.finished_at}))
                elif e.state == "rejected":
                    out.append(line({"op": "rejected", "key": e.key, "status": e.http_status, "error": e.error,
                                     "at": e.finished_at}))
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=str(self.path.parent))
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(b"".join(out))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(self.path.parent)
            self._replay()
            log.debug("compacted outbox %s (%d entries kept)", self.path, len(self._entries))
            return True


# --------------------------------------------------------------------------------------------------
# deliver / flush
# --------------------------------------------------------------------------------------------------


@dataclass
class DeliveryReport:
    """What one :func:`deliver` / :func:`flush` call did. Counts are numbers of entries (events),
    except ``requests`` (HTTP requests made, retries included).

    * ``sent``: entries POSTed at least once in this call;
    * ``delivered``: entries the backend accepted (2xx) and that were marked done;
    * ``pending``: entries of this call left in the outbox to retry later;
    * ``rejected``: entries the backend refused in this call (kept in ``Outbox.rejected()``);
    * ``skipped_other``: events of category ``other`` (never sent);
    * ``duplicates``: events whose ``event_id`` the outbox already had as done or rejected;
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
    """POST the pending entries among ``keys`` in order, journaling each outcome."""
    try:
        with outbox.sending(lock_timeout):
            stopped = False
            for key in keys:
                entry = outbox._entries.get(key)
                if entry is None or entry.state != "pending" or stopped:
                    continue
                result = client.post(entry.payload or {}, key)
                report.sent += 1
                report.requests += result.attempts
                if result.status == "delivered":
                    outbox.mark_done(key, result.http_status)
                    report.delivered += 1
                elif result.status == "rejected":
                    outbox.mark_rejected(key, result.http_status, result.error)
                    report.rejected += 1
                    if result.error:
                        report.errors.append(f"{key}: {result.error}")
                else:
                    report.last_error = result.error
                    # The backend is down or overloaded: the rest would most likely fail the same
                    # way, each after its full retry budget. Leave them pending for the next flush.
                    stopped = stop_on_retryable
    except OutboxBusy as exc:
        report.busy = True
        report.last_error = str(exc)
        log.info("%s", exc)
    report.pending = sum(1 for k in dict.fromkeys(keys) if outbox.state(k) == "pending")
    report.outbox_pending = len(outbox._pending_entries())
    if report.outbox_pending == 0 and not report.busy:
        try:
            outbox.compact()
        except (OSError, BackendError) as exc:  # compaction is housekeeping; never fail delivery for it
            log.warning("could not compact outbox %s: %s", outbox.path, exc)


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

    Each event is first added durably to ``outbox`` under its ``event_id`` (the idempotency key),
    with the payload from :func:`build_payload` (so a later resend carries the same ``occurred_at``),
    and only then POSTed. 2xx → marked done; rejected → kept in ``outbox.rejected()``; retryable →
    left pending for :func:`flush`. Events whose id the outbox already holds as done or rejected are
    not sent again; ones it holds as pending are (re)sent.

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
    added = outbox.add_many(batch.items())  # durably queued BEFORE the first request
    to_send: list[str] = []
    for key, was_added in zip(batch, added):
        if was_added or outbox.state(key) == "pending":
            to_send.append(key)
        else:
            report.duplicates += 1
    if to_send and send:
        _send(to_send, client, outbox, report, lock_timeout=lock_timeout, stop_on_retryable=stop_on_retryable)
    else:
        report.pending = len(to_send)
        report.outbox_pending = len(outbox.pending())
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
    keys = [e["key"] for e in outbox.pending()]
    report = DeliveryReport()
    _send(keys, client, outbox, report, lock_timeout=lock_timeout, stop_on_retryable=stop_on_retryable)
    log.info("flush: %s", report.summary())
    return report


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m astsep.backend",
        description="Deliver queued sound events to the event backend.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("flush", help="send every pending entry of an outbox")
    f.add_argument("--outbox", required=True, help="outbox journal file (JSON lines)")
    f.add_argument("--backend-url", required=True, help="endpoint, e.g. http://host:8000/sound-events/")
    f.add_argument("--timeout", type=float, default=5.0, help="seconds allowed per request in all (default 5)")
    f.add_argument("--retries", type=int, default=3, help="retries per entry (default 3)")
    f.add_argument("--token-env", default=DEFAULT_TOKEN_ENV, help=f"env var holding a bearer token (default {DEFAULT_TOKEN_ENV})")
    f.add_argument("--lock-timeout", type=float, default=10.0, help="seconds to wait for another sender (default 10)")
    f.add_argument("--json", action="store_true", help="print the report as JSON instead of a summary line")
    f.add_argument("-v", "--verbose", action="store_true", help="log each request to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. Exit codes: 0 nothing left pending and nothing rejected; 1 entries remain
    pending or were rejected (or the outbox was busy); 2 usage / configuration error."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("urllib3").setLevel(logging.WARNING)
    try:
        url = validate_url(args.backend_url)
        path = Path(args.outbox)
        if not path.is_file():
            raise BackendError(f"outbox not found: {path}")
        if not (args.timeout > 0 and math.isfinite(args.timeout)):
            raise BackendError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        with BackendClient(url, timeout=args.timeout, retries=args.retries, token_env=args.token_env) as client:
            report = flush(Outbox(path), client, lock_timeout=args.lock_timeout)
    except BackendError as exc:
        print(f"astsep: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    return 0 if (report.outbox_pending == 0 and report.rejected == 0 and not report.busy) else 1


if __name__ == "__main__":
    sys.exit(main())
