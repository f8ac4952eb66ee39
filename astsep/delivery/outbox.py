"""The durable queue of deliveries: :class:`Outbox`, one SQLite table keyed by the idempotency key.

An event is committed here *before* its first POST and marked delivered only *after* a 2xx, so a
process killed at any instant loses nothing; at worst the one request in flight is sent again with
the same ``Idempotency-Key``, which the backend can deduplicate. Inspect it with any SQLite tool::

    sqlite3 ~/.cache/astsep/outbox.sqlite3 "SELECT key, state, http_status, attempts, reason FROM outbox"

A JSON-lines journal written by earlier versions is migrated on first open (:func:`_migrate`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from filelock import FileLock, Timeout

from ..durable import fsync_path
from ..errors import BackendError

log = logging.getLogger(__name__)

SQLITE_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 30.0  # how long a write waits for another process's transaction (each lasts milliseconds)
MIGRATE_LOCK_TIMEOUT_S = 60.0
STATES = ("pending", "delivered", "rejected")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    key         TEXT PRIMARY KEY,           -- the Idempotency-Key: the event's event_id
    payload     TEXT,                       -- the JSON body; NULL only for a delivered key migrated without one
    state       TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'rejected')),
    http_status INTEGER,                    -- the last HTTP status seen; NULL: no answer (yet)
    reason      TEXT,                       -- why it is not delivered: the last error, or the rejection
    attempts    INTEGER NOT NULL DEFAULT 0, -- HTTP requests made for it, retries included
    added_at    TEXT,                       -- UTC, when it was queued
    updated_at  TEXT                        -- UTC, when its last outcome was recorded
);
CREATE INDEX IF NOT EXISTS outbox_by_state ON outbox (state);
"""


class OutboxBusy(BackendError):
    """Another process holds the outbox's send lock (it is flushing or delivering right now)."""


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _head(path: Path) -> bytes | None:
    """The first 16 bytes of ``path``; None if it does not exist."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return None


class Outbox:
    """A durable on-disk queue of deliveries in an SQLite database (WAL mode, ``BEGIN IMMEDIATE``).

    Every method opens its own short connection, so an ``Outbox`` holds no open handle between calls
    and several processes can share one database; SQLite serialises their writes. Rows are kept in
    the order they were queued (``rowid``). Rejected rows are kept, and so are the ``keep_delivered``
    most recent delivered ones (:meth:`prune`), so an event delivered earlier is not queued again
    when it is passed to ``deliver`` a second time.

    Args:
        path: the database file; created (with its folder) on first use. A JSON-lines journal of an
            earlier version found at ``path`` is migrated in place (the journal is kept as
            ``<path>.migrated``). The send lock ``<path>.send.lock`` lives next to it.
        migrate_from: a JSON-lines journal to import when ``path`` does not exist yet (it is then
            renamed to ``<journal>.migrated``); e.g. the previous default location.
        keep_delivered: how many delivered rows :meth:`prune` keeps (the most recent; older keys are
            forgotten, and the backend can still deduplicate them by ``Idempotency-Key``).
    """

    def __init__(self, path: str | os.PathLike[str], *, migrate_from: str | os.PathLike[str] | None = None,
                 keep_delivered: int = 100_000) -> None:
        self.path = Path(path)
        self.keep_delivered = max(0, int(keep_delivered))
        if self.path.is_dir():
            raise BackendError(f"outbox path is a folder, not a file: {self.path}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create the outbox folder {self.path.parent}: {exc.strerror or exc}") from None
        self._send_lock = FileLock(str(self.path) + ".send.lock")
        if _head(self.path) != SQLITE_HEADER:  # absent, empty, or a journal: create or migrate, one process at a time
            # the same lock file the JSON-lines version held while it appended, so no old writer is cut off
            try:
                with FileLock(str(self.path) + ".lock", timeout=MIGRATE_LOCK_TIMEOUT_S):
                    self._create(Path(migrate_from) if migrate_from else None)
            except Timeout:
                raise BackendError(f"outbox {self.path} is locked by another process (its .lock file)") from None
            except (OSError, sqlite3.Error) as exc:
                raise BackendError(f"cannot use the outbox {self.path}: {getattr(exc, 'strerror', None) or exc}") from None
        self._check_schema()

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r})"

    # -- database ----------------------------------------------------------------------------------

    def _create(self, migrate_from: Path | None) -> None:
        head = _head(self.path)
        if head == SQLITE_HEADER:  # another process created it meanwhile
            return
        if head:  # something that is not SQLite: a journal of an earlier version
            _migrate(self.path, self.path)
        elif head is None and migrate_from is not None and migrate_from.is_file() and migrate_from.stat().st_size:
            _migrate(migrate_from, self.path)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: readers never wait for the writer
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise BackendError(f"cannot open the outbox {self.path}: {exc}") from None
        try:
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the code moves on
            yield db
        except sqlite3.DatabaseError as exc:
            raise BackendError(f"cannot use the outbox {self.path}: {exc}") from None
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
            raise BackendError(f"{self.path} is an SQLite database but not an astsep outbox (no table 'outbox')")

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
                "UPDATE outbox SET state = ?, http_status = ?, reason = ?, attempts = attempts + ?, updated_at = ? "
                "WHERE key = ? AND state = 'pending'",
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

    def note_failure(self, key: str, status: int | None, reason: str | None, attempts: int = 0) -> bool:
        """Record a try that did not deliver ``key`` (timeout, 5xx, redirect…): it stays pending, with
        the reason and the requests counted. False if it was not pending."""
        return self._finish(key, "pending", status, reason, attempts)

    # -- reading -----------------------------------------------------------------------------------

    def _rows(self, where: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return db.execute(f"SELECT * FROM outbox WHERE {where} ORDER BY rowid", args).fetchall()

    def pending(self) -> list[dict[str, Any]]:
        """Entries still to deliver, oldest first: ``{"key", "payload", "added_at", "attempts", "status",
        "reason"}`` each (``status`` / ``reason``: the last failed try's, if any)."""
        return [
            {"key": r["key"], "payload": json.loads(r["payload"] or "{}"), "added_at": r["added_at"],
             "attempts": r["attempts"], "status": r["http_status"], "reason": r["reason"]}
            for r in self._rows("state = 'pending'")
        ]

    def pending_keys(self) -> list[str]:
        """The keys of :meth:`pending`, oldest first, without reading the payloads."""
        with self._connect() as db:
            return [k for (k,) in db.execute("SELECT key FROM outbox WHERE state = 'pending' ORDER BY rowid")]

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
        """``pending`` / ``delivered`` / ``rejected`` for a key in the outbox, None if it is not there."""
        with self._connect() as db:
            row = db.execute("SELECT state FROM outbox WHERE key = ?", (str(key),)).fetchone()
        return row[0] if row else None


# --------------------------------------------------------------------------------------------------
# Migration from the JSON-lines journal of earlier versions
# --------------------------------------------------------------------------------------------------


def _read_journal(path: Path) -> list[tuple[Any, ...]]:
    """The rows a JSON-lines journal stands for, in journal order.

    Its records, one JSON object per line::

        {"op": "add", "key": K, "payload": {...}, "at": "...Z"}
        {"op": "done", "key": K, "status": 201, "at": "...Z"}          (also alone: a compaction tombstone)
        {"op": "rejected", "key": K, "status": 400, "error": "...", "at": "...Z"}

    A line that is not a valid record (the torn last line of a killed writer) is skipped with a warning.
    """
    data = path.read_bytes()
    if not data.lstrip().startswith(b"{"):
        raise BackendError(f"outbox {path} is neither an SQLite database nor a JSON-lines outbox journal")
    rows: dict[str, dict[str, Any]] = {}
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            op, key = rec["op"], str(rec["key"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            torn = lineno == len(lines)
            log.warning("outbox journal %s line %d is not a valid record (%s); skipping it",
                        path, lineno, "torn last line" if torn else "corrupt")
            continue
        if op == "add":
            if key not in rows and isinstance(rec.get("payload"), dict):
                rows[key] = {"payload": json.dumps(rec["payload"], separators=(",", ":"), ensure_ascii=False),
                             "state": "pending", "http_status": None, "reason": None, "added_at": rec.get("at"),
                             "updated_at": None}
        elif op in ("done", "rejected"):
            row = rows.setdefault(key, {"payload": None, "state": "pending", "http_status": None, "reason": None,
                                        "added_at": None, "updated_at": None})
            if row["state"] == "pending":
                row.update(state="delivered" if op == "done" else "rejected", http_status=rec.get("status"),
                           reason=rec.get("error"), updated_at=rec.get("at"))
        else:
            log.warning("outbox journal %s line %d has unknown op %r; skipping it", path, lineno, op)
    return [(k, r["payload"], r["state"], r["http_status"], r["reason"], r["added_at"], r["updated_at"])
            for k, r in rows.items()]


def _free_name(path: Path) -> Path:
    n = 1
    candidate = path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _migrate(source: Path, target: Path) -> None:
    """Turn the journal ``source`` into the database ``target`` (the same path, or a new one).

    Crash-safe: the database is built and fsync'ed beside ``target``, then renamed over it in one
    step; until then the journal is untouched, and a later open simply migrates again. The journal
    is kept as ``<source>.migrated``.
    """
    rows = _read_journal(source)
    tmp = target.with_name(f".{target.name}.migrating-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        db = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            db.executescript(SCHEMA)
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR IGNORE INTO outbox (key, payload, state, http_status, reason, added_at, updated_at) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        finally:
            db.close()
        fsync_path(tmp)
        backup = _free_name(source.with_name(source.name + ".migrated"))
        if source == target:
            shutil.copy2(source, backup)
            fsync_path(backup)
            os.replace(tmp, target)
        else:
            os.replace(tmp, target)
            os.replace(source, backup)
        fsync_path(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    states = [r[2] for r in rows]
    log.info("outbox: migrated the JSON-lines journal %s to the SQLite database %s (%d pending, %d delivered, "
                "%d rejected); the journal is kept as %s", source, target, states.count("pending"),
                states.count("delivered"), states.count("rejected"), backup)
