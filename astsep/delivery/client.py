"""POST one payload to the backend: :class:`BackendClient`.

Retries come from urllib3's :class:`~urllib3.util.Retry` mounted on a requests ``HTTPAdapter``:
timeouts, connection errors, 408, 429 and 5xx are retried with urllib3's exponential backoff
(the first retry at once, the n-th after ``backoff * 2**(n-1)`` s, each wait at most
``max_backoff``), and a ``Retry-After`` on 429 / 503 is honoured (also capped by ``max_backoff``).

requests' timeout bounds each socket operation, so a server that drips its answer a byte at a time
could hold one request for ever. A watchdog armed on every request the adapter's pools make (one
timer per HTTP request, retries included) shuts that request's socket down once ``timeout`` seconds
have passed; urllib3 then sees a broken connection and retries or gives up as for any other.

A response body is never read whole: at most :data:`MAX_BODY_BYTES` of it (uncompressed: the
request asks for ``Accept-Encoding: identity``) is kept for the error text, and the connection is
closed on the rest (a body urllib3 skips before a retry is read in small chunks and discarded).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import socket
import threading
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal, Mapping

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, InvalidHeader, NewConnectionError, ReadTimeoutError
from urllib3.util.retry import Retry

from ..errors import BackendError
from .payload import redact_url, validate_url

log = logging.getLogger(__name__)

DEFAULT_TOKEN_ENV = "ASTSEP_BACKEND_TOKEN"
USER_AGENT = "astsep-backend/0.1"
ERROR_TEXT_LIMIT = 500  # characters of a response body / exception kept as the error text
MAX_BODY_BYTES = 4096  # bytes of any response body read: a backend answering 50 MB cannot cost 50 MB
RETRY_STATUSES = frozenset({408, 429, *range(500, 600)})

DeliveryStatus = Literal["delivered", "retryable", "rejected"]


@dataclass(frozen=True)
class DeliveryResult:
    """Outcome of :meth:`BackendClient.post`.

    ``status``: ``delivered`` (2xx), ``retryable`` (timeouts, connection errors, 408/429/5xx after
    the retries ran out, or a 3xx redirect, which is never followed: try again later) or ``rejected``
    (other 4xx: the backend will not take this payload; do not resend it). ``http_status`` is the
    last HTTP status seen (None when no response came back), ``error`` a short one-line reason
    (None when delivered), ``attempts`` the number of HTTP requests made.
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


class _Retry(Retry):
    """urllib3's Retry with every ``Retry-After`` capped by ``backoff_max`` (a backend asking for an
    hour must not stall a run for an hour), an unparsable one ignored (backoff applies), and the
    header honoured on 429 / 503 only (a 413 is the payload's fault, not a busy server's)."""

    RETRY_AFTER_STATUS_CODES = frozenset({429, 503})

    def get_retry_after(self, response: Any) -> float | None:
        try:
            seconds = super().get_retry_after(response)
        except InvalidHeader:
            return None
        return None if seconds is None else min(seconds, self.backoff_max)


# --------------------------------------------------------------------------------------------------
# The total deadline per HTTP request
# --------------------------------------------------------------------------------------------------


class _Call:
    """One :meth:`BackendClient.post`: how many HTTP requests it made, whether a deadline cut one."""

    def __init__(self) -> None:
        self.attempts = 0
        self.expired = False
        self.finished = False
        self.timers: list[threading.Timer] = []
        self.lock = threading.Lock()


class _Watchdog:
    """Shuts down the socket of any request still running ``seconds`` after it was sent."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._local = threading.local()  # urllib3 sends from the caller's thread

    @contextmanager
    def call(self) -> Iterator[_Call]:
        call = _Call()
        self._local.call = call
        try:
            yield call
        finally:
            self._local.call = None
            with call.lock:
                call.finished = True
            for timer in call.timers:
                timer.cancel()

    def arm(self, conn: HTTPConnection) -> None:
        self.disarm(conn)
        call: _Call | None = getattr(self._local, "call", None)
        if call is None:
            return
        call.attempts += 1
        timer = threading.Timer(self.seconds, self._expire, (call, conn))
        timer.daemon = True
        conn._astsep_timer = timer  # type: ignore[attr-defined]
        call.timers.append(timer)
        timer.start()

    @staticmethod
    def disarm(conn: Any) -> None:
        timer = getattr(conn, "_astsep_timer", None)
        if timer is not None:
            timer.cancel()
            conn._astsep_timer = None

    @staticmethod
    def _expire(call: _Call, conn: HTTPConnection) -> None:
        with call.lock:
            sock = conn.sock
            if call.finished or sock is None:
                return
            call.expired = True
        with suppress(OSError):  # the plain-socket shutdown, also under TLS: it unblocks a reader
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _WatchedPool:
    """Connection-pool mixin: arms the watchdog for each HTTP request it makes (connecting and a TLS
    handshake included), and disarms it when the connection comes back with its response read."""

    watchdog: _Watchdog

    def _make_request(self, conn: Any, *args: Any, **kwargs: Any) -> Any:
        self.watchdog.arm(conn)
        return super()._make_request(conn, *args, **kwargs)  # type: ignore[misc]

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            _Watchdog.disarm(conn)
        super()._put_conn(conn)  # type: ignore[misc]


class _DeadlineAdapter(HTTPAdapter):
    """A requests adapter whose connection pools arm :class:`_Watchdog` on every request."""

    def __init__(self, watchdog: _Watchdog, **kwargs: Any) -> None:
        ns = {"watchdog": watchdog}  # set before super().__init__, which builds the pool manager
        self._pools = {"http": type("WatchedHTTPConnectionPool", (_WatchedPool, HTTPConnectionPool), ns),
                       "https": type("WatchedHTTPSConnectionPool", (_WatchedPool, HTTPSConnectionPool), ns)}
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(self._pools)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS pools are urllib3's own: requests' timeouts only
            manager.pool_classes_by_scheme = dict(self._pools)
        return manager


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------


def _one_line(text: str, limit: int = ERROR_TEXT_LIMIT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read_text(resp: requests.Response, limit: int = MAX_BODY_BYTES) -> str:
    """At most ``limit`` bytes of a streamed response's body, decoded leniently as text."""
    try:
        data = resp.raw.read(limit, decode_content=True) or b""
    except Exception:  # noqa: BLE001 - a broken body only costs the error text its detail
        return ""
    try:
        return data.decode(resp.encoding or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        return data.decode("utf-8", "replace")


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the reasons / causes it wraps, outermost first (requests → urllib3 → socket)."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not c for c in chain):
        chain.append(cur)
        nxt = getattr(cur, "reason", None)
        if not isinstance(nxt, BaseException):
            nxt = cur.__cause__ or cur.__context__
            if nxt is None and cur.args and isinstance(cur.args[0], BaseException):
                nxt = cur.args[0]
        cur = nxt
    return chain


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 connection error, e.g. ``[Errno 111] Connection refused``."""
    last = _causes(exc)[-1]
    text = str(last)
    # urllib3's NewConnectionError reads "<connection object>: Failed to establish ... [Errno 111] ..."
    if ": " in text and text.startswith("<"):
        text = text.split(": ", 1)[1]
    return text or type(last).__name__


class BackendClient:
    """POST event payloads to the backend, with retries.

    Args:
        url: endpoint, e.g. ``http://host:8000/sound-events/`` (checked by :func:`validate_url`).
        timeout: seconds allowed for one HTTP request in all: connecting, sending and reading the
            whole response (a server that drips its answer cannot hold a request longer).
        retries: extra requests after the first one for retryable failures (so ``retries + 1``
            requests at most per :meth:`post`).
        backoff: urllib3's ``backoff_factor``: the first retry goes at once, the n-th after
            ``backoff * 2**(n-1)`` seconds.
        max_backoff: upper bound in seconds on any single wait, including a ``Retry-After``.
        token_env: name of the environment variable holding a bearer token; read on every request,
            never stored. Unset or empty → no ``Authorization`` header.
        verify_tls: verify the server's TLS certificate. Only an explicit ``False`` turns this off.
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
        retry = _Retry(
            total=self.retries,
            redirect=0,  # never followed: the bearer token must not go to whatever origin a redirect names
            allowed_methods=None,  # POST too: the Idempotency-Key makes a resend safe
            status_forcelist=RETRY_STATUSES,
            backoff_factor=self.backoff,
            backoff_max=self.max_backoff,
            raise_on_status=False,  # the last answer comes back, so its status and text can be reported
            respect_retry_after_header=True,
        )
        self._watchdog = _Watchdog(self.timeout)
        self._session = requests.Session()
        adapter = _DeadlineAdapter(self._watchdog, max_retries=retry)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        if not self.verify_tls:
            log.warning("TLS certificate verification is OFF for %s", redact_url(self.url))

    def __repr__(self) -> str:
        return (
            f"BackendClient(url={redact_url(self.url)!r}, timeout={self.timeout}, retries={self.retries}, "
            f"backoff={self.backoff}, max_backoff={self.max_backoff}, token_env={self.token_env!r}, "
            f"verify_tls={self.verify_tls})"
        )

    def __enter__(self) -> BackendClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session (its pooled connections)."""
        self._session.close()

    def _token(self) -> str | None:
        token = os.environ.get(self.token_env, "") if self.token_env else ""
        return token.strip() or None

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

        def redact(text: str) -> str:
            return _one_line(text.replace(token, "***") if token else text)

        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
            "Idempotency-Key": str(idempotency_key),
        }
        if token:
            headers["Authorization"] = f"Bearer {token}"
        with self._watchdog.call() as call:
            try:
                resp = self._session.post(self.url, data=body, headers=headers, timeout=self.timeout,
                                          verify=self.verify_tls, allow_redirects=False, stream=True)
                try:
                    status = resp.status_code
                    text = _read_text(resp) if not 200 <= status < 300 else ""
                finally:
                    resp.close()  # the rest of a long body is never read: the connection goes
            except (requests.RequestException, OSError, ValueError, http.client.HTTPException) as exc:
                error = self._failure(exc, call.expired, redact)
                log.warning("giving up on %s for now after %d request(s): %s", idempotency_key, call.attempts, error)
                return DeliveryResult("retryable", None, error, call.attempts)
        attempts = call.attempts
        if 200 <= status < 300:
            log.debug("delivered %s (HTTP %d, %d request(s))", idempotency_key, status, attempts)
            return DeliveryResult("delivered", status, None, attempts)
        reason = resp.reason or ""
        if 300 <= status < 400:
            # The event was not taken, and the payload is fine: it stays pending for a flush to the
            # right URL.
            location = redact_url(resp.headers.get("Location") or "?")
            error = redact(f"HTTP {status} {reason}: redirected to {location}, not followed; "
                           "the event stays pending: fix --backend-url and flush")
            log.warning("backend redirected %s: %s", idempotency_key, error)
            return DeliveryResult("retryable", status, error, attempts)
        error = redact(f"HTTP {status} {reason}: {text}".rstrip(": "))
        if status in RETRY_STATUSES:
            log.warning("giving up on %s for now after %d request(s): %s", idempotency_key, attempts, error)
            return DeliveryResult("retryable", status, error, attempts)
        log.warning("backend rejected %s: %s", idempotency_key, error)
        return DeliveryResult("rejected", status, error, attempts)

    def _failure(self, exc: BaseException, expired: bool, redact: Any) -> str:
        """The one-line reason for a request that got no answer."""
        timed_out = (ReadTimeoutError, ConnectTimeoutError, socket.timeout, requests.Timeout)
        # NewConnectionError subclasses ConnectTimeoutError in urllib3, but a refused connection is no timeout
        if expired or any(isinstance(c, timed_out) and not isinstance(c, NewConnectionError) for c in _causes(exc)):
            return f"timed out after {self.timeout:g} s (total time allowed per request)"
        if isinstance(exc, requests.ConnectionError):
            return redact(f"connection error: {_root_cause(exc)}")
        # A local problem (bad header value, invalid URL parts...): the entry stays pending so a
        # later flush with fixed settings can send it.
        return redact(f"request failed: {type(exc).__name__}: {exc}")
