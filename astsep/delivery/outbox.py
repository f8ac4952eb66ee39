"""The durable queue of deliveries: :class:`Outbox`, one SQLite table keyed by the idempotency key.

An event is committed here *before* its first POST and marked delivered only *after* a 2xx, so a
process killed at any instant loses nothing; at worst the one request in flight is sent again with
the same ``Idempotency-Key``, which the backend can deduplicate. Inspect it with any SQLite tool or
``python -m astsep.delivery status``::

    sqlite3 ~/.cache/astsep/outbox.sqlite3 "SELECT key, state, http_status, attempts, reason FROM outbox"

Each entry keeps its own retry schedule (``failures``, ``next_at``): one entry the backend keeps
failing never holds back the others. An entry failing for longer than the send policy allows is
*parked* (``parked_at`` set, state still ``pending``, reason kept): a normal flush leaves it alone,
``flush --all`` retries it; nothing is ever dropped.

:func:`open_outbox` opens an outbox that cannot stop a run: a file that is not an outbox or is
corrupt is moved aside (kept) and a fresh one opened; where no file can be written at all (a full
disk), an in-memory outbox stands in, and the reason is returned so the front end can say so.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from filelock import FileLock, Timeout

from ..errors import BackendError

log = logging.getLogger(__name__)

SQLITE_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 30.0  # how long a write waits for another process's transaction (each lasts milliseconds)
CREATE_LOCK_TIMEOUT_S = 60.0
STATES = ("pending", "delivered", "rejected")
MEMORY = ":memory:"

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    key           TEXT PRIMARY KEY,           -- the Idempotency-Key: the event's event_id
    payload       TEXT,                       -- the JSON body
    state         TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'rejected')),
    http_status   INTEGER,                    -- the last HTTP status seen; NULL: no answer (yet)
    reason        TEXT,                       -- why it is not delivered: the last error, or the rejection
    attempts      INTEGER NOT NULL DEFAULT 0, -- HTTP requests made for it, retries included
    added_at      TEXT,                       -- UTC, when it was queued
    updated_at    TEXT,                       -- UTC, when its last outcome was recorded
    failures      INTEGER NOT NULL DEFAULT 0, -- send rounds that ended without delivering it
    next_at       REAL,                       -- Unix time before which it is not retried; NULL: now
    failing_since REAL,                       -- Unix time of its first failed round; NULL: never failed
    parked_at     TEXT                        -- UTC, when it was parked (failing too long); NULL: not parked
);
CREATE INDEX IF NOT EXISTS outbox_by_state ON outbox (state);
"""
# columns added after the first SQLite outbox: added in place when an older file is opened
ADDED_COLUMNS = {"failures": "INTEGER NOT NULL DEFAULT 0", "next_at": "REAL", "failing_since": "REAL",
                 "parked_at": "TEXT"}
_memory_ids = itertools.count(1)


class OutboxBusy(BackendError):
    """Another process holds the outbox's send lock (it is flushing or delivering right now)."""


class OutboxUnusable(BackendError):
    """The outbox file exists but cannot be used: not an SQLite database, not an astsep outbox, corrupt."""


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _head(path: Path) -> bytes | None:
    """The first 16 bytes of ``path``; None if it does not exist."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return None


def _reason(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "strerror", None) or exc).split())


class _ThreadLock:
    """The send lock of an in-memory outbox: ``filelock``'s ``acquire(timeout=)`` / ``release`` on a
    ``threading.Lock`` (one process holds the only copy of the database anyway)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, timeout: float = -1) -> None:
        if not self._lock.acquire(timeout=timeout):
            raise Timeout("in-memory outbox")

    def release(self) -> None:
        self._lock.release()


class Outbox:
    """A durable on-disk queue of deliveries in an SQLite database (WAL mode, ``BEGIN IMMEDIATE``).

    Every method opens its own short connection, so an ``Outbox`` holds no open handle between calls
    and several processes can share one database; SQLite serialises their writes. Rows are kept in
    the order they were queued (``rowid``). Rejected rows are kept, and so are the ``keep_delivered``
    most recent delivered ones (:meth:`prune`), so an event delivered earlier is not queued again
    when it is passed to ``deliver`` a second time.

    Args:
        path: the database file; created (with its folder) on first use. The send lock
            ``<path>.send.lock`` lives next to it. ``":memory:"``: a database in this process's
            memory (nothing survives the process; what :func:`open_outbox` falls back to when no file
            can be written).
        keep_delivered: how many delivered rows :meth:`prune` keeps (the most recent; older keys are
            forgotten, and the backend can still deduplicate them by ``Idempotency-Key``).

    Raises :class:`OutboxUnusable` for a file that is not an astsep outbox, :class:`BackendError`
    when the folder or file cannot be created.
    """

    def __init__(self, path: str | os.PathLike[str], *, keep_delivered: int = 100_000) -> None:
        self.keep_delivered = max(0, int(keep_delivered))
        self.in_memory = str(path) == MEMORY
        self._keeper: sqlite3.Connection | None = None
        if self.in_memory:
            self.path = Path(MEMORY)
            self._uri = f"file:astsep-outbox-{os.getpid()}-{next(_memory_ids)}?mode=memory&cache=shared"
            self._keeper = sqlite3.connect(self._uri, uri=True, check_same_thread=False)  # keeps it alive
            self._keeper.executescript(SCHEMA)
            self._send_lock: Any = _ThreadLock()
            return
        self.path = Path(path)
        self._uri = None
        if self.path.is_dir():
            raise BackendError(f"outbox path is a folder, not a file: {self.path}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create the outbox folder {self.path.parent}: {_reason(exc)}") from None
        self._send_lock = FileLock(str(self.path) + ".send.lock")
        head = _head(self.path)
        if head and head != SQLITE_HEADER:
            raise OutboxUnusable(f"outbox {self.path} is not an SQLite database (first bytes {head[:8]!r})")
        if head != SQLITE_HEADER or not self._tables():
            # absent, empty, or a database another process is creating right now: create it (or wait
            # for the other one to finish), one process at a time
            try:
                with FileLock(str(self.path) + ".lock", timeout=CREATE_LOCK_TIMEOUT_S):
                    self._create()
            except Timeout:
                raise BackendError(f"outbox {self.path} is locked by another process (its .lock file)") from None
            except (OSError, sqlite3.Error) as exc:
                raise BackendError(f"cannot create the outbox {self.path}: {_reason(exc)}") from None
        self._check_schema()

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r})"

    # -- database ----------------------------------------------------------------------------------

    def _tables(self) -> set[str]:
        """The tables in the database (an empty set for a database still being created)."""
        with self._connect() as db:
            return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _create(self) -> None:
        if _head(self.path) == SQLITE_HEADER and self._tables():  # created meanwhile, or someone else's
            return
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: readers never wait for the writer
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            if self._uri is not None:
                db = sqlite3.connect(self._uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            else:
                db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise BackendError(f"cannot open the outbox {self.path}: {exc}") from None
        try:
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the code moves on
            yield db
        except sqlite3.DatabaseError as exc:
            corrupt = any(t in str(exc) for t in ("malformed", "not a database", "file is encrypted"))
            raise (OutboxUnusable if corrupt else BackendError)(f"cannot use the outbox {self.path}: {exc}") from None
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A connection inside a ``BEGIN IMMEDIATE`` transaction (committed on success)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _check_schema(self) -> None:
        with self._connect() as db:
            found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'").fetchone()
            if not found:
                raise OutboxUnusable(f"{self.path} is an SQLite database but not an astsep outbox (no table 'outbox')")
            have = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
        missing = {c: t for c, t in ADDED_COLUMNS.items() if c not in have}
        if missing:
            with self._write() as db:
                have = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}  # another process may have
                for column, decl in missing.items():
                    if column not in have:
                        db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {decl}")

    def check(self) -> None:
        """Read every page (``PRAGMA quick_check``); :class:`OutboxUnusable` if the file is corrupt."""
        with self._connect() as db:
            result = [r[0] for r in db.execute("PRAGMA quick_check")]
        if result != ["ok"]:
            first = " ".join(str(result[0]).split())[:200]
            raise OutboxUnusable(f"outbox {self.path} is corrupt (PRAGMA quick_check: {first}…)")

    # -- locking -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def sending(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the send lock for a send loop, so no other process sends from this outbox meanwhile.

        Waits at most ``timeout`` seconds (None: forever), then raises :class:`OutboxBusy`. The lock
        is the kernel's (``flock`` through ``filelock``): it goes with the process that dies holding it.
        """
        try:
            self._send_lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout))
        except Timeout:
            raise OutboxBusy(f"outbox {self.path} is busy: another process is sending from it") from None
        except OSError as exc:
            raise BackendError(f"cannot lock the outbox {self.path}: {exc.strerror or exc}") from None
        try:
            yield
        finally:
            self._send_lock.release()

    # -- queueing ----------------------------------------------------------------------------------

    def add(self, key: str, payload: Mapping[str, Any]) -> bool:
        """Durably queue ``payload`` under idempotency ``key``.

        Returns False (and writes nothing) when ``key`` is already in the outbox, whatever its state.
        """
        return self.add_many([(key, payload)])[0]

    def add_many(self, items: Iterable[tuple[str, Mapping[str, Any]]]) -> list[bool]:
        """:meth:`add` for several entries in one transaction. Returns, per item, whether it was added."""
        rows = [(str(k), json.dumps(dict(p), separators=(",", ":"), ensure_ascii=False)) for k, p in items]
        if any(not k for k, _ in rows):
            raise BackendError("outbox key must be a non-empty string")
        at = _now_iso()
        added: list[bool] = []
        with self._write() as db:
            for key, payload in rows:
                cur = db.execute("INSERT OR IGNORE INTO outbox (key, payload, added_at) VALUES (?, ?, ?)",
                                 (key, payload, at))
                added.append(cur.rowcount == 1)
        return added

    # -- outcomes ----------------------------------------------------------------------------------

    def _finish(self, key: str, state: str, status: int | None, reason: str | None, attempts: int) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE outbox SET state = ?, http_status = ?, reason = ?, attempts = attempts + ?, updated_at = ?, "
                "next_at = NULL WHERE key = ? AND state = 'pending'",
                (state, status, reason, int(attempts), _now_iso(), str(key)),
            )
        if cur.rowcount != 1:
            log.debug("outbox: %s is not pending; not recording it as %s", key, state)
        return cur.rowcount == 1

    def mark_delivered(self, key: str, status: int | None = None, attempts: int = 0) -> bool:
        """Record that ``key`` was delivered (call only after a 2xx). False if it was not pending."""
        return self._finish(key, "delivered", status, None, attempts)

    def mark_rejected(self, key: str, status: int | None = None, error: str | None = None, attempts: int = 0) -> bool:
        """Record that the backend refused ``key`` (HTTP ``status``, ``error`` text); it is kept for
        inspection in :meth:`rejected` and never resent. False if it was not pending."""
        return self._finish(key, "rejected", status, error, attempts)

    def note_failure(self, key: str, status: int | None, reason: str | None, attempts: int = 0, *,
                     retry_at: float | None = None, park: bool = False, now: float | None = None) -> bool:
        """Record a send round that did not deliver ``key`` (timeout, 5xx, redirect…): it stays
        pending, with the reason, the requests counted, one more failure, not retried before
        ``retry_at`` (Unix time; None: at once) and, with ``park``, parked (left alone by a normal
        flush, retried by ``flush --all``). False if it was not pending."""
        now = time.time() if now is None else now
        with self._write() as db:
            cur = db.execute(
                "UPDATE outbox SET http_status = ?, reason = ?, attempts = attempts + ?, updated_at = ?, "
                "failures = failures + 1, next_at = ?, failing_since = COALESCE(failing_since, ?), "
                "parked_at = CASE WHEN ? THEN COALESCE(parked_at, ?) ELSE parked_at END "
                "WHERE key = ? AND state = 'pending'",
                (status, reason, int(attempts), _now_iso(), retry_at, now, bool(park), _now_iso(), str(key)),
            )
        return cur.rowcount == 1

    # -- reading -----------------------------------------------------------------------------------

    def _rows(self, where: str, args: tuple[Any, ...] = (), order: str = "rowid") -> list[sqlite3.Row]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return db.execute(f"SELECT * FROM outbox WHERE {where} ORDER BY {order}", args).fetchall()

    @staticmethod
    def _pending_dict(r: sqlite3.Row) -> dict[str, Any]:
        return {"key": r["key"], "payload": json.loads(r["payload"] or "{}"), "added_at": r["added_at"],
                "attempts": r["attempts"], "status": r["http_status"], "reason": r["reason"],
                "failures": r["failures"], "next_at": r["next_at"], "failing_since": r["failing_since"],
                "parked_at": r["parked_at"]}

    def pending(self) -> list[dict[str, Any]]:
        """Entries still to deliver (parked ones included), oldest first: ``{"key", "payload",
        "added_at", "attempts", "status", "reason", "failures", "next_at", "failing_since",
        "parked_at"}`` each (``status`` / ``reason``: the last failed try's, if any)."""
        return [self._pending_dict(r) for r in self._rows("state = 'pending'")]

    def pending_keys(self) -> list[str]:
        """The keys of :meth:`pending`, oldest first, without reading the payloads."""
        with self._connect() as db:
            return [k for (k,) in db.execute("SELECT key FROM outbox WHERE state = 'pending' ORDER BY rowid")]

    def due_keys(self, now: float | None = None, *, include_parked: bool = False,
                 ignore_schedule: bool = False) -> list[str]:
        """Pending keys to try now, in the order to try them: entries that never failed first
        (oldest first), then failed ones whose ``next_at`` has come (earliest due first). Parked
        entries only with ``include_parked``; entries not yet due too with ``ignore_schedule``."""
        now = time.time() if now is None else now
        where = "state = 'pending'"
        args: tuple[Any, ...] = ()
        if not include_parked:
            where += " AND parked_at IS NULL"
        if not ignore_schedule:
            where += " AND (next_at IS NULL OR next_at <= ?)"
            args = (now,)
        with self._connect() as db:
            return [k for (k,) in db.execute(
                f"SELECT key FROM outbox WHERE {where} ORDER BY failures > 0, COALESCE(next_at, 0), rowid", args)]

    def next_due(self) -> float | None:
        """The earliest ``next_at`` of a pending, unparked entry waiting for its retry (Unix time), or None."""
        with self._connect() as db:
            row = db.execute("SELECT MIN(next_at) FROM outbox WHERE state = 'pending' AND parked_at IS NULL "
                             "AND next_at IS NOT NULL").fetchone()
        return row[0] if row else None

    def parked(self) -> list[dict[str, Any]]:
        """Pending entries parked after failing too long, oldest first (as :meth:`pending`)."""
        return [self._pending_dict(r) for r in self._rows("state = 'pending' AND parked_at IS NOT NULL")]

    def counts(self) -> dict[str, int]:
        """``{"pending", "parked", "delivered", "rejected"}``: entries in each state (``pending``
        counts the parked ones too: both are still to deliver)."""
        with self._connect() as db:
            out = {s: 0 for s in STATES}
            for state, n in db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"):
                out[state] = n
            out["parked"] = db.execute(
                "SELECT COUNT(*) FROM outbox WHERE state = 'pending' AND parked_at IS NOT NULL").fetchone()[0]
        return out

    def rejected(self) -> list[dict[str, Any]]:
        """Entries the backend refused: ``{"key", "payload", "status", "error", "attempts", "added_at",
        "rejected_at"}``."""
        return [
            {"key": r["key"], "payload": json.loads(r["payload"]) if r["payload"] is not None else None,
             "status": r["http_status"], "error": r["reason"], "attempts": r["attempts"],
             "added_at": r["added_at"], "rejected_at": r["updated_at"]}
            for r in self._rows("state = 'rejected'")
        ]

    def entry(self, key: str) -> dict[str, Any] | None:
        """One row as a dict (``payload`` decoded), None if ``key`` is not in the outbox."""
        rows = self._rows("key = ?", (str(key),))
        if not rows:
            return None
        row = dict(rows[0])
        row["payload"] = json.loads(row["payload"]) if row["payload"] is not None else None
        return row

    def prune(self) -> int:
        """Delete delivered rows beyond the ``keep_delivered`` most recent, so a device that runs for
        years keeps a bounded file. Returns how many rows went."""
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM outbox WHERE state = 'delivered' AND rowid NOT IN "
                "(SELECT rowid FROM outbox WHERE state = 'delivered' ORDER BY rowid DESC LIMIT ?)",
                (self.keep_delivered,),
            )
        return cur.rowcount

    def state(self, key: str) -> str | None:
        """``pending`` / ``parked`` / ``delivered`` / ``rejected`` for a key in the outbox, None if
        it is not there."""
        with self._connect() as db:
            row = db.execute("SELECT state, parked_at FROM outbox WHERE key = ?", (str(key),)).fetchone()
        if not row:
            return None
        return "parked" if row[0] == "pending" and row[1] is not None else row[0]


# --------------------------------------------------------------------------------------------------
# Opening an outbox that cannot stop a run
# --------------------------------------------------------------------------------------------------


def _quarantine(path: Path) -> Path:
    """Move ``path`` (and its ``-wal`` / ``-shm`` files) aside as ``<path>.unusable-<UTC time>``
    (``-2``, ``-3``… when taken); nothing is deleted. Returns the new name."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = path.with_name(f"{path.name}.unusable-{stamp}")
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    os.rename(path, target)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            with contextlib.suppress(OSError):
                os.rename(side, target.with_name(target.name + suffix))
    return target


def open_outbox(path: str | os.PathLike[str], *, keep_delivered: int = 100_000,
                check: bool = True) -> tuple[Outbox, str | None]:
    """Open the outbox at ``path`` so that nothing about it can stop a run.

    Returns ``(outbox, degraded)``; ``degraded`` is None when ``path`` was opened as it is, else one
    line saying what happened:

    * the file is not an outbox, or is corrupt (``check`` reads every page): it is moved aside as
      ``<path>.unusable-<time>`` (kept, never deleted) and a fresh outbox is opened at ``path``;
    * no outbox file can be created or used there (a full disk, a read-only folder…): an in-memory
      outbox (:data:`MEMORY`) is returned, so events are still sent directly while the process
      runs; what is still pending when it ends is lost with it, which ``degraded`` says.
    """
    path = Path(path)
    problem: str | None = None
    try:
        box = Outbox(path, keep_delivered=keep_delivered)
        if check:
            box.check()
        return box, None
    except OutboxUnusable as exc:
        problem = str(exc)
        try:
            moved = _quarantine(path)
        except OSError as err:
            problem += f"; cannot move it aside: {_reason(err)}"
        else:
            problem += f"; moved aside to {moved.name}"
            try:
                box = Outbox(path, keep_delivered=keep_delivered)
                log.warning("%s; a fresh outbox is in use", problem)
                return box, f"{problem}; a fresh outbox is in use"
            except BackendError as err:
                problem += f"; a fresh one cannot be made either: {err}"
    except BackendError as exc:
        problem = str(exc)
    degraded = f"{problem}; events are sent directly and kept in memory only while this process runs"
    log.warning("%s", degraded)
    return Outbox(MEMORY, keep_delivered=keep_delivered), degraded
