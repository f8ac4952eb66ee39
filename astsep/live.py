"""Live mode: listen continuously, alert within about a second, then refine with the separated source.

Two stages, each with its own thread and bounded queue, so that neither ever waits for the other
or blocks capture::

    source (sound card / stdin / array) ──blocks──▶ capture (caller's thread): ring buffer + level
        meter + triggers
          ├─ alert excerpt (the last alert_sec s, after an onset and every alert_hop_sec while loud,
          │  whatever the trigger; queue, oldest dropped) ──▶ alert thread: ONE AST forward,
          │  padding trimmed, no separation → an alertable class at or above alert_threshold →
          │  event at once ("stage": "alert", "provisional": true), direction from the excerpt
          └─ window (the last window_sec s, every hop_sec while loud; queue, oldest dropped) ──▶
             separation thread (niced): Pipeline.run (separator + classifier, the AST guide shared)
             → direction (the DOA of the bins the event's separated source dominates, so that
             overlapping sounds get one each) → occurrence merging: a sound the alert stage already
             announced gets an UPDATE (the same event_id, "update_of", "revision": 1, "stage":
             "separation") instead of a second event; one it missed is a new event. An alert whose
             whole excerpt the first complete separated window held without confirming it is
             retracted (an event with "retracted": true, same event_id; not sent to the backend).
             When a newer window waits, the window in progress stops after its current pass
             (``windows_cut``) rather than that newer one being dropped
        ──events──▶ callback / iterator, and the outbox + backend client (delivery thread: retries,
        idempotency keys; an update goes to the backend only when it changes what the backend's
        body shows, the label, the category or the angle by more than ``resend_angle_deg``, under
        the key ``<event_id>.r<revision>``)

Capture never waits for analysis: :meth:`LiveListener.feed` only copies samples, measures levels and
puts excerpts / windows in queues without blocking. Times: sample ``s`` of the stream is ``s / 16000``
seconds after the stream's first sample, whose wall-clock time is taken when the first block
arrives (minus the block's length). Each event's ``start_sec`` / ``end_sec`` are stream seconds and
``occurred_at`` is that start on the wall clock (``occurred_at_source: "capture_clock"``).

Python API::

    from astsep.live import LiveListener, listen
    for event in listen(source, pipeline):               # an iterator over events, until the source ends
        print(event["label"], event["start_sec"], event.get("angle"), event["stage"], event["revision"])
    LiveListener(pipeline, on_event=print).run(source)   # or a callback
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import queue
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .config import SAMPLE_RATE, LiveConfig
from .errors import ConfigError

log = logging.getLogger(__name__)

ALERT_KINDS = ("source", "residual")
MIN_RUN_SEC = 0.05  # a run of activity shorter than this beside a longer one of its source is not a sound


class RingBuffer:
    """The last ``capacity`` samples of a ``channels``-channel stream, addressed by absolute sample
    position (``0`` = the stream's first sample)."""

    def __init__(self, channels: int, capacity: int):
        self.buf = np.zeros((channels, capacity), dtype=np.float32)
        self.capacity = capacity
        self.end = 0  # absolute position one past the newest sample

    def write(self, x: np.ndarray) -> None:
        """Append ``x`` ``(frames, channels)``."""
        n = x.shape[0]
        if n >= self.capacity:
            x, self.end = x[-self.capacity:], self.end + n - self.capacity
            n = self.capacity
        i = self.end % self.capacity
        first = min(n, self.capacity - i)
        self.buf[:, i:i + first] = x[:first].T
        if first < n:
            self.buf[:, :n - first] = x[first:].T
        self.end += n

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` ``(channels, stop - start)``; ``start`` is clipped to what is held."""
        start = max(start, self.end - self.capacity, 0)
        stop = min(stop, self.end)
        idx = np.arange(start, stop) % self.capacity
        return self.buf[:, idx].copy()


@dataclass
class Analysis:
    """One window (or alert excerpt) handed from capture to an analysis thread."""

    start: int  # absolute sample of the window's first sample
    audio: np.ndarray  # (channels, samples) float32, 16 kHz
    reason: str  # "level" | "hop" | "end"
    queued_at: float  # time.monotonic()
    onset: int | None = None  # alert excerpts: absolute sample of the latest level-trigger onset in it


@dataclass
class LiveStats:
    """What a live run did (``LiveListener.stats``); JSON-serialisable with :meth:`to_dict`.

    ``windows_*``, ``analysis_sec``, ``max_queue_wait_sec`` are the separation stage's; ``alert_*``
    the alert stage's. ``events`` counts occurrences (first deliveries, whichever stage made them),
    ``updates`` the separation stage's updates of an alert (``updates_sent``: those that went to the
    backend, their label or category having changed)."""

    stream_sec: float = 0.0
    windows_queued: int = 0
    windows_analysed: int = 0
    windows_dropped: int = 0
    windows_cut: int = 0  # windows whose passes ended early because a newer one was waiting
    passes_run: int = 0  # separation passes, over all windows
    events: int = 0
    merged: int = 0  # detections merged into an earlier event of the same occurrence
    analysis_sec: float = 0.0  # seconds spent separating, in all
    ast_forwards: int = 0
    cache_hits: int = 0
    max_queue_wait_sec: float = 0.0
    latencies_sec: list[float] = field(default_factory=list)  # per occurrence: first delivery - captured(start_sec)
    alert_windows_queued: int = 0
    alert_windows_analysed: int = 0
    alert_windows_dropped: int = 0
    alert_sec: float = 0.0  # seconds spent in the alert stage, in all
    alert_max_queue_wait_sec: float = 0.0
    alert_events: int = 0  # occurrences first announced by the alert stage
    alert_latencies_sec: list[float] = field(default_factory=list)  # per alert-stage event
    separation_latencies_sec: list[float] = field(default_factory=list)  # per separation event or update
    updates: int = 0
    updates_sent: int = 0
    retractions: int = 0  # alerts a complete separation of their excerpt did not confirm
    recordings: int = 0
    interrupted: bool = False  # ended by Ctrl-C / SIGTERM / stop, not by the end of the stream
    delivery: dict[str, Any] = field(default_factory=dict)

    @property
    def real_time_factor(self) -> float:
        """Separation seconds per second of stream (the separation thread's busy share; > 1: behind)."""
        return self.analysis_sec / self.stream_sec if self.stream_sec else 0.0

    @property
    def alert_real_time_factor(self) -> float:
        """Alert-stage seconds per second of stream."""
        return self.alert_sec / self.stream_sec if self.stream_sec else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["real_time_factor"] = round(self.real_time_factor, 4)
        d["alert_real_time_factor"] = round(self.alert_real_time_factor, 4)
        for k in ("latencies_sec", "alert_latencies_sec", "separation_latencies_sec"):
            d[k] = [round(v, 3) for v in getattr(self, k)]
        return d


def active_runs(x: np.ndarray, threshold_db: float, floor_dbfs: float, join_gap_sec: float,
                hop: int = 160) -> list[tuple[float, float]]:
    """Runs of activity of ``x`` ``(N,)`` in seconds ``[(start, end), ...]``: 10 ms frames within
    ``threshold_db`` of the loudest and above ``floor_dbfs`` (as :func:`astsep.events.active_span`),
    runs closer than ``join_gap_sec`` joined."""
    n = x.size // hop
    if n == 0:
        return []
    power = np.mean(x[: n * hop].astype(np.float64).reshape(n, hop) ** 2, axis=1)
    db = 10 * np.log10(np.maximum(power, 1e-30))
    on = (db >= db.max() + threshold_db) & (db >= floor_dbfs)
    idx = np.flatnonzero(on)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) * hop / SAMPLE_RATE > join_gap_sec)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]]) + 1
    return [(float(a) * hop / SAMPLE_RATE, float(b) * hop / SAMPLE_RATE) for a, b in zip(starts, ends)]


class Occurrences:
    """One event per occurrence of a class: a detection of a class whose span comes within
    ``hold_off`` seconds of an occurrence of that class extends it instead of making a new event.

    Each occurrence remembers which stage announced it. The first separation-stage detection of an
    occurrence the alert stage announced is an ``"update"``; so is a separated source of another
    class overlapping a provisional alert (within the hold-off) when either class is in the
    other's top 5 (the unseparated mixture and the separated source may name one sound by
    neighbouring AudioSet classes, e.g. *Siren* / *Civil defense siren*): the update then corrects
    the label. Several occurrences of a class stay open (the latest ``keep``): the alert stage
    announces a new sound while a window that still holds the previous one waits for separation,
    and that window's detection of the previous sound belongs to the previous occurrence.

    A retracted occurrence (:meth:`LiveListener._retract`) takes the alert stage's later excerpts
    of it in silence; the separation stage's later detection of its class is a new occurrence."""

    def __init__(self, hold_off: float, keep: int = 32):
        self.hold_off = hold_off
        self.keep = keep
        self.open: dict[tuple[str, int], list[dict]] = {}

    def add(self, ev: dict) -> bool:
        """Record ``ev`` (stream seconds ``start_sec``/``end_sec``); True when it is a new occurrence."""
        return self.observe(ev)[0] == "new"

    def _gap(self, cur: dict, ev: dict) -> float:
        """Seconds between ``ev``'s span and the occurrence's (0 when they overlap)."""
        return max(0.0, ev["start_sec"] - cur["end_sec"], cur["start_sec"] - ev["end_sec"])

    def _remember(self, key: tuple[str, int], cur: dict) -> None:
        held = self.open.setdefault(key, [])
        if not any(c is cur for c in held):
            held.append(cur)
            del held[:-self.keep]

    def observe(self, ev: dict, stage: str = "separation") -> tuple[str, dict]:
        """Record ``ev`` seen by ``stage`` (``alert`` / ``separation``): ``("new" | "update" |
        "merged", the occurrence)``. An occurrence holds ``start_sec``, ``end_sec``, ``windows``,
        ``stage`` (the last stage that reported it), ``revision`` and ``event`` (its first event)."""
        key = (ev["label"], ev["class_id"])
        # a retracted occurrence silences the alert stage's later excerpts of it (the separation
        # had more to go on); a separation detection of its class is a new occurrence
        near = [c for c in self.open.get(key, []) if self._gap(c, ev) <= self.hold_off
                and (c["stage"] != "retracted" or stage == "alert")]
        cur = min(near, key=lambda c: (self._gap(c, ev), -c["start_sec"])) if near else None
        if cur is None and stage == "separation":
            cur = self._provisional_match(ev)
        if cur is None:
            cur = {"start_sec": ev["start_sec"], "end_sec": ev["end_sec"], "windows": 1, "stage": stage,
                   "revision": 0, "event": ev}
            self._remember(key, cur)
            return "new", cur
        cur["start_sec"] = min(cur["start_sec"], ev["start_sec"])
        cur["end_sec"] = max(cur["end_sec"], ev["end_sec"])
        cur["windows"] += 1
        self._remember(key, cur)  # a related class now names this occurrence too
        if stage == "separation" and cur["stage"] == "alert":
            cur["stage"] = "separation"
            cur["revision"] += 1
            return "update", cur
        return "merged", cur

    def unconfirmed(self, window_start: float, window_end: float) -> list[dict]:
        """Alert-stage occurrences no separation has confirmed whose alert excerpt (its
        ``window_start_sec`` .. ``window_end_sec``) lies within ``[window_start, window_end]`` seconds."""
        out, seen = [], set()
        for held in self.open.values():
            for cur in held:
                first = cur.get("event") or {}
                if cur["stage"] != "alert" or id(cur) in seen:
                    continue
                seen.add(id(cur))
                a, b = first.get("window_start_sec"), first.get("window_end_sec")
                if a is not None and b is not None and window_start - 1e-6 <= a and b <= window_end + 1e-6:
                    out.append(cur)
        return out

    def _provisional_match(self, ev: dict) -> dict | None:
        ids = {t.get("class_id") for t in ev.get("top5") or []} | {ev["class_id"]}
        best = None
        for held in self.open.values():
            for cur in held:
                first = cur.get("event") or {}
                if cur["stage"] != "alert" or self._gap(cur, ev) > self.hold_off:
                    continue
                theirs = {t.get("class_id") for t in first.get("top5") or []} | {first.get("class_id")}
                if (first.get("class_id") in ids or ev["class_id"] in theirs) and \
                        (best is None or self._gap(cur, ev) < self._gap(best, ev)):
                    best = cur
        return best


class Recorder:
    """Each analysed window and its sources as WAV files under ``root/NNNNNN_<stream sec>/``; the
    oldest folders are deleted to keep the total under ``max_bytes``."""

    def __init__(self, root: str | Path, max_bytes: int):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.kept: deque[tuple[Path, int]] = deque()
        self.total = 0
        self.count = 0

    def save(self, window: Analysis, result, events: list[dict]) -> None:
        from .audio import write_wav_atomic

        folder = self.root / f"{self.count:06d}_{window.start / SAMPLE_RATE:010.3f}s"
        folder.mkdir(parents=True, exist_ok=True)
        write_wav_atomic(folder / "window.wav", window.audio.T)
        for stem, samples in result.sources.items():
            write_wav_atomic(folder / f"{stem}.wav", samples)
        (folder / "events.json").write_text(json.dumps(events, indent=2, default=str))
        size = sum(p.stat().st_size for p in folder.iterdir())
        self.kept.append((folder, size))
        self.total += size
        self.count += 1
        while self.total > self.max_bytes and self.kept:
            old, old_size = self.kept.popleft()
            shutil.rmtree(old, ignore_errors=True)
            self.total -= old_size


class _Delivery:
    """Hands events to the outbox and sends them from its own thread, so a slow or absent backend
    never holds up analysis. ``close()`` sends what is queued, then flushes the outbox."""

    def __init__(self, client, outbox, user_id: int, angle: float | None):
        self.client, self.outbox, self.user_id, self.angle = client, outbox, user_id, angle
        self.q: queue.Queue[dict | None] = queue.Queue()
        self.reports: list[dict] = []
        self.thread = threading.Thread(target=self._loop, name="astsep-live-delivery", daemon=True)
        self.thread.start()

    def put(self, ev: dict) -> None:
        self.q.put(ev)

    def _loop(self) -> None:
        from .delivery import deliver

        while True:
            ev = self.q.get()
            if ev is None:
                return
            batch = [ev]
            while True:  # whatever else is waiting goes in the same call
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.q.put(None)
                    break
                batch.append(nxt)
            try:
                report = deliver(batch, self.client, self.outbox, user_id=self.user_id,
                                 angle=self.angle if self.angle is not None else 0)
                self.reports.append(report.to_dict())
                log.info("live delivery: %s", report.summary())
            except Exception as exc:  # noqa: BLE001 - delivery must never end the live run
                log.error("live delivery failed (events stay in the outbox when queued): %s", exc)

    def close(self, timeout: float | None = None) -> dict:
        from .delivery import flush

        self.q.put(None)
        self.thread.join(timeout)
        report = flush(self.outbox, self.client)
        keys = ("sent", "delivered", "pending", "rejected", "requests")
        total = {k: sum(r.get(k, 0) for r in self.reports) for k in keys}
        return {"this_run": total, "final_flush": report.to_dict()}


class LiveListener:
    """Continuous analysis of a stream. See the module docstring for the data flow.

    Args:
        pipeline: an :class:`astsep.pipeline.Pipeline` (its guide, model and AST cache are reused by
            every analysis; the alert stage runs the same guide's model on its excerpts, uncached).
        cfg: :class:`LiveConfig` (window, trigger, hop, hold-off, queue, recording, alert stage).
        channels: input channels after capture (the ring buffer keeps them all; separation uses their mean).
        doa: a :class:`astsep.doa.DOAEstimator` for ``channels`` ≥ 2, else None.
        angle: degrees to report when there is no DOA (``angle_source: "option"``); None: no angle.
        on_event: called with each event dict and each update (from the alert or separation thread,
            one at a time, an alert always before its update).
        client, outbox: :class:`astsep.delivery.BackendClient` and :class:`astsep.delivery.Outbox`:
            every event (category other than ``other``) goes to the backend through the outbox.
        user_id: sent with each event.
        stream_id: names the stream in event ids (default: random per listener).
    """

    def __init__(self, pipeline, cfg: LiveConfig | None = None, *, channels: int = 1, doa=None,
                 angle: float | None = None, on_event: Callable[[dict], None] | None = None,
                 client=None, outbox=None, user_id: int = 0, stream_id: str | None = None):
        self.pipe = pipeline
        self.cfg = cfg or LiveConfig()
        self.channels = channels
        if doa is not None and doa.channels != channels:
            raise ConfigError(f"the microphone geometry has {doa.channels} mics but the input has {channels} "
                              "channel(s): pass --channels to match it")
        self.doa = doa
        self.angle = angle
        self.on_event = on_event
        self.stream_id = stream_id or uuid.uuid4().hex
        self.win = int(round(self.cfg.window_sec * SAMPLE_RATE))
        self.hop = int(round(self.cfg.hop_sec * SAMPLE_RATE))
        self.align = max(1, int(round(self.cfg.align_sec * SAMPLE_RATE)))
        self.frame = max(1, int(round(self.cfg.level_frame_sec * SAMPLE_RATE)))
        self.alert_on = self.cfg.alert_stage
        self.alert_len = int(round(self.cfg.alert_sec * SAMPLE_RATE))
        self.alert_hop = int(round(self.cfg.alert_hop_sec * SAMPLE_RATE))
        self.ring = RingBuffer(channels, max(self.win, self.alert_len) + 4 * SAMPLE_RATE)
        self.stats = LiveStats()
        self.occurrences = Occurrences(self.cfg.hold_off_sec)
        self.recorder = (Recorder(self.cfg.record_dir, int(self.cfg.record_max_mb * 1e6))
                         if self.cfg.record_dir else None)
        self.delivery = _Delivery(client, outbox, user_id, angle) if client is not None and outbox is not None \
            else None
        self.stream_start: datetime | None = None
        self._q: queue.Queue[Analysis | None] = queue.Queue(maxsize=self.cfg.queue_size)
        self._times: deque[tuple[int, float]] = deque()  # (end sample of a block, monotonic time it arrived)
        self._level_acc = np.zeros(0, dtype=np.float32)
        self._level_pos = 0  # absolute sample of _level_acc[0]
        self._loud = False
        self._quiet_since: int | None = None
        self._due: int | None = None  # end sample of the next analysis
        self._onset_pending = False  # _due is the first analysis after an onset (always runs)
        self._last_end = -1
        self._alert_due: int | None = None  # end sample of the next alert excerpt
        self._alert_onset_pending = False
        self._alert_last_end = -1
        self._onsets: deque[int] = deque(maxlen=64)  # absolute samples where the level trigger fired
        self._alert_q: queue.Queue[Analysis | None] = queue.Queue(maxsize=self.cfg.alert_queue_size)
        self._lock = threading.Lock()  # occurrences and emission: one stage at a time, in order
        self._worker_error: BaseException | None = None
        self._worker = threading.Thread(target=self._work, name="astsep-live-analysis", daemon=True)
        self._worker.start()
        self._alert_worker = None
        if self.alert_on:
            self._alert_worker = threading.Thread(target=self._alert_work, name="astsep-live-alert", daemon=True)
            self._alert_worker.start()
        self._closed = False

    # --- capture side (never blocks) --------------------------------------------------------------
    def feed(self, block: np.ndarray) -> None:
        """Take one block ``(frames, channels)`` (or ``(frames,)``) of 16 kHz float32 samples."""
        x = np.asarray(block, dtype=np.float32)
        if x.ndim == 1:
            x = x[:, None]
        if x.shape[1] != self.channels:
            raise ConfigError(f"a block has {x.shape[1]} channel(s), the listener takes {self.channels}")
        now = time.monotonic()
        if self.stream_start is None:
            self.stream_start = datetime.now(timezone.utc) - timedelta(seconds=x.shape[0] / SAMPLE_RATE)
        self.ring.write(x)
        end = self.ring.end
        self._times.append((end, now))
        while self._times and self._times[0][0] < end - 120 * SAMPLE_RATE:
            self._times.popleft()
        self.stats.stream_sec = end / SAMPLE_RATE
        self._meter(x.mean(axis=1))
        if self.alert_on:  # first: an excerpt and a window of one moment are queued alert first
            self._schedule_alerts(end)
        if self.cfg.trigger == "hop" and self._due is None:
            self._due = self.hop
        while self._due is not None and end >= self._due:
            due = self._due
            if self.cfg.trigger == "hop" or self._onset_pending or self._loud:
                self._submit(due, "hop" if self.cfg.trigger == "hop" else "level")
            self._onset_pending = False
            # the next one: every hop (hop trigger) or every hop while the sound lasts (level trigger;
            # skipped when the level has fallen by then)
            self._due = due + self.hop if (self.cfg.trigger == "hop" or self._loud) else None

    def _schedule_alerts(self, end: int) -> None:
        """Alert excerpts due by ``end``: after an onset, then every alert hop while the sound lasts,
        with either trigger. The alert stage is the fast path for what is loud enough to trigger; an
        excerpt of quiet is not classified (with ``trigger: hop`` the separation stage still
        analyses every window, quiet or not)."""
        while self._alert_due is not None and end >= self._alert_due:
            due = self._alert_due
            if self._alert_onset_pending or self._loud:
                self._submit_alert(due)
            self._alert_onset_pending = False
            self._alert_due = due + self.alert_hop if self._loud else None

    def _meter(self, mono: np.ndarray) -> None:
        """Level trigger on 50 ms frames: a rise above ``trigger_dbfs`` schedules an analysis whose
        window ends ``post_trigger_sec`` later (rounded up to the ``align_sec`` grid)."""
        acc = np.concatenate([self._level_acc, mono]) if self._level_acc.size else mono
        n = acc.size // self.frame
        cfg = self.cfg
        for i in range(n):
            seg = acc[i * self.frame:(i + 1) * self.frame]
            ms = float(np.mean(seg.astype(np.float64) ** 2))
            db = 10 * math.log10(ms) if ms > 0 else -200.0
            pos = self._level_pos + i * self.frame
            if db >= cfg.trigger_dbfs:
                self._quiet_since = None
                if not self._loud:
                    self._loud = True
                    self._onsets.append(pos)
                    if cfg.trigger == "level":
                        due = pos + int(round(cfg.post_trigger_sec * SAMPLE_RATE))
                        due = -(-due // self.align) * self.align
                        if self._due is None or due < self._due:
                            self._due = due
                        self._onset_pending = True
                        log.debug("level %.1f dBFS at %.2f s: analysis at %.2f s", db, pos / SAMPLE_RATE,
                                  due / SAMPLE_RATE)
                    if self.alert_on:  # the alert stage follows the level whatever the trigger
                        due = pos + int(round(cfg.alert_post_trigger_sec * SAMPLE_RATE))
                        due = -(-due // self.align) * self.align
                        if self._alert_due is None or due < self._alert_due:
                            self._alert_due = due
                        self._alert_onset_pending = True
            elif db < cfg.trigger_dbfs - cfg.release_db and self._loud:
                if self._quiet_since is None:
                    self._quiet_since = pos
                if pos + self.frame - self._quiet_since >= cfg.release_sec * SAMPLE_RATE:
                    self._loud = False
        self._level_acc = acc[n * self.frame:].copy()
        self._level_pos += n * self.frame

    def _submit(self, end: int, reason: str) -> None:
        if end <= self._last_end:
            return  # this moment is already queued or analysed
        self._last_end = end
        start = max(0, end - self.win)
        item = Analysis(start, self.ring.read(start, end), reason, time.monotonic())
        if reason == "end":  # capture is over: wait for room rather than drop a window still waiting
            while self._worker.is_alive():
                try:
                    self._q.put(item, timeout=0.2)
                    self.stats.windows_queued += 1
                    return
                except queue.Full:
                    continue
            return
        if self._put_newest(self._q, item, "windows"):
            self.stats.windows_queued += 1

    def _submit_alert(self, end: int) -> None:
        if end <= self._alert_last_end:
            return
        self._alert_last_end = end
        start = max(0, end - self.alert_len)
        onset = next((o for o in reversed(self._onsets) if start <= o < end), None)
        # the alert stage follows the level trigger whatever the separation's trigger
        item = Analysis(start, self.ring.read(start, end), "level", time.monotonic(), onset)
        if self._put_newest(self._alert_q, item, "alert_windows"):
            self.stats.alert_windows_queued += 1

    def _put_newest(self, q: queue.Queue, item: Analysis, counter: str) -> bool:
        """Queue ``item`` without waiting; when ``q`` is full the oldest waiting item is dropped and
        counted in ``stats.<counter>_dropped``. False when closing (``item`` is dropped)."""
        while True:
            try:
                q.put_nowait(item)
                return True
            except queue.Full:
                try:  # keep the newest window: drop the oldest one waiting
                    old = q.get_nowait()
                except queue.Empty:
                    continue
                if old is None:  # closing: put the sentinel back, this window is dropped
                    q.put_nowait(None)
                    return False
                dropped = getattr(self.stats, f"{counter}_dropped") + 1
                setattr(self.stats, f"{counter}_dropped", dropped)
                stage = "alert stage" if counter.startswith("alert") else "analysis"
                log.warning("%s is behind: dropped the %s at %.2f-%.2f s (%d dropped so far)", stage,
                            "excerpt" if counter.startswith("alert") else "window", old.start / SAMPLE_RATE,
                            (old.start + old.audio.shape[1]) / SAMPLE_RATE, dropped)

    def captured_at(self, sample: int) -> float | None:
        """``time.monotonic()`` when the block holding absolute ``sample`` arrived (None: forgotten)."""
        ends = [e for e, _ in self._times]
        i = bisect.bisect_right(ends, sample)
        return self._times[i][1] if i < len(self._times) else None

    # --- analysis side -------------------------------------------------------------------------
    def _work(self) -> None:
        if self.alert_on and self.cfg.separation_nice:
            _lower_thread_priority(self.cfg.separation_nice)
        self._loop(self._q, self._analyse, "live analysis")

    def _alert_work(self) -> None:
        self._loop(self._alert_q, self._alert_analyse, "live alert stage")

    def _loop(self, q: queue.Queue, analyse: Callable[[Analysis], None], what: str) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            try:
                analyse(item)
            except BaseException as exc:  # noqa: BLE001 - reported by close(); capture goes on
                log.error("%s failed: %s", what, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                self._worker_error = exc
                return

    def _alert_analyse(self, item: Analysis) -> None:
        """The fast stage: one AST forward on the excerpt (padding trimmed, uncached, no separation);
        the most probable alertable class of its top 5 at or above ``alert_threshold`` is an event."""
        import torch

        from .audio import dbfs
        from .events import class_records
        from .guide import top_classes
        from .pipeline import round_db  # the separation events' level_dbfs, the same way

        t0 = time.perf_counter()
        self.stats.alert_max_queue_wait_sec = max(self.stats.alert_max_queue_wait_sec,
                                                  time.monotonic() - item.queued_at)
        mono = item.audio.mean(axis=0)
        probs = torch.softmax(excerpt_logits(self.pipe.guide, torch.from_numpy(mono)).float(), dim=-1)
        _, _, top_p, top_i = top_classes(probs[None].cpu())
        cats = self.pipe.cfg.categories
        labels = self.pipe.guide.labels
        found = None
        for p, cid in zip(top_p[0].tolist(), top_i[0].tolist()):
            if p < self.cfg.alert_threshold:
                break
            if cid >= 0 and (self.cfg.emit_other or cats.category(cid) != "other"):
                found = (p, cid)
                break
        if found is not None:
            a, b = self._alert_span(item, mono)
            level = dbfs(torch.from_numpy(mono[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)]))
            ev = {"label": labels[found[1]], "class_id": found[1], "confidence": round(found[0], 6),
                  "top5": class_records(top_i[0], top_p[0], labels), "category": cats.category(found[1]),
                  "level_dbfs": round_db(level), "kind": "mixture",
                  "start_sec": a, "end_sec": b}
            self._record(self._live_event(ev, item, item.start / SAMPLE_RATE), "alert", item, ev)
        self.stats.alert_windows_analysed += 1
        self.stats.alert_sec += time.perf_counter() - t0

    def _analyse(self, item: Analysis) -> None:
        import torch

        t0 = time.perf_counter()
        self.stats.max_queue_wait_sec = max(self.stats.max_queue_wait_sec, time.monotonic() - item.queued_at)
        mono = torch.from_numpy(item.audio.mean(axis=0))
        g0 = dict(self.pipe.guide.stats())
        behind = (lambda: not self._q.empty()) if self.cfg.cut_passes_when_behind else None
        result = self.pipe.run(mono, f"live:{item.start / SAMPLE_RATE:.3f}s", should_stop=behind)
        self.stats.windows_cut += result.stats["windows_cut"]
        self.stats.passes_run += result.stats["passes_run"]
        g1 = self.pipe.guide.stats()
        self.stats.ast_forwards += g1["ast_forwards"] - g0["ast_forwards"]
        self.stats.cache_hits += g1["cache_hits"] - g0["cache_hits"]
        offset = item.start / SAMPLE_RATE
        emitted: list[dict] = []
        sources = None
        sc = self.pipe.cfg.separator
        for ev in result.events:
            if not self._alertable(ev):
                continue
            if sources is None:
                sources = result.sources
            # one source may hold two sounds of its class (a window spans more than one); each run
            # of activity apart from the next by more than the hold-off is a detection of its own
            samples = sources.get(ev["file"][:-4]) if ev.get("file") else None
            samples = samples.numpy() if samples is not None else None
            runs = (active_runs(samples, sc.active_threshold_db, sc.silence_dbfs, self.cfg.hold_off_sec)
                    if samples is not None else [])
            runs = [(a, b) for a, b in runs if b > ev["start_sec"] and a < ev["end_sec"]] or \
                [(ev["start_sec"], ev["end_sec"])]
            if len(runs) > 1:  # a blip of a few frames beside a longer run is a fragment of it, not a sound
                longest = max(b - a for a, b in runs)
                runs = [(a, b) for a, b in runs if b - a >= MIN_RUN_SEC or b - a == longest]
            for a, b in runs:
                part = dict(ev, start_sec=max(a, ev["start_sec"]), end_sec=min(b, ev["end_sec"]))
                live_ev = self._record(self._live_event(part, item, offset), "separation", item, part, samples)
                if live_ev is not None:
                    emitted.append(live_ev)
        if self.alert_on and self.cfg.retract_unconfirmed and not result.stats["windows_cut"]:
            w0, w1 = offset, offset + item.audio.shape[1] / SAMPLE_RATE
            with self._lock:
                for occ in self.occurrences.unconfirmed(round(w0, 3), round(w1, 3)):
                    self._retract(occ, item)
        self.stats.windows_analysed += 1
        self.stats.analysis_sec += time.perf_counter() - t0
        if self.recorder is not None:
            try:
                self.recorder.save(item, result, emitted)
                self.stats.recordings = self.recorder.count
            except OSError as exc:
                log.warning("could not record the window at %.2f s: %s", offset, exc)

    def _alert_span(self, item: Analysis, mono: np.ndarray) -> tuple[float, float]:
        """Seconds of the excerpt ``(start, end)`` of the sound the alert is about: from the level
        trigger's latest onset in the excerpt (else the start of the run of activity holding the
        loudest 10 ms frame; runs closer than 0.25 s joined: the mixture's background must not
        bridge a longer gap) to the end of the last run."""
        sc = self.pipe.cfg.separator
        dur = mono.size / SAMPLE_RATE
        runs = active_runs(mono, sc.active_threshold_db, sc.silence_dbfs, min(0.25, self.cfg.hold_off_sec))
        end = runs[-1][1] if runs else dur
        if item.onset is not None:
            return (item.onset - item.start) / SAMPLE_RATE, max(end, (item.onset - item.start) / SAMPLE_RATE)
        if not runs:
            return 0.0, dur
        n = mono.size // 160
        loudest = (int(np.argmax(np.mean(mono[: n * 160].reshape(n, 160).astype(np.float64) ** 2, axis=1))) * 160
                   / SAMPLE_RATE) if n else 0.0
        start = next((a for a, b in runs if a <= loudest < b + 0.01), runs[-1][0])
        return start, end

    def _alertable(self, ev: dict) -> bool:
        if ev.get("start_sec") is None or ev.get("kind") not in ALERT_KINDS:
            return False
        if ev["kind"] == "residual" and not ev.get("confident"):
            return False
        return self.cfg.emit_other or ev.get("category") != "other"

    def _live_event(self, ev: dict, item: Analysis, offset: float) -> dict:
        start = offset + ev["start_sec"]
        end = offset + ev["end_sec"]
        start_sample = int(round(start * SAMPLE_RATE))
        # stable per stream and occurrence: a resend of this event is recognised by the backend
        eid = hashlib.sha256(f"live:{self.stream_id}:{start_sample}:{ev['class_id']}".encode()).hexdigest()[:32]
        when = self.stream_start + timedelta(seconds=start) if self.stream_start else None
        out = {k: ev[k] for k in ("label", "class_id", "confidence", "top5", "category", "level_dbfs", "kind")}
        out.update({
            "event_id": eid,
            "stream": self.stream_id,
            "start_sec": round(start, 3),
            "end_sec": round(end, 3),
            "window_start_sec": round(offset, 3),
            "window_end_sec": round(offset + item.audio.shape[1] / SAMPLE_RATE, 3),
            "trigger": item.reason,
            "occurred_at": when.isoformat(timespec="milliseconds").replace("+00:00", "Z") if when else None,
            "occurred_at_source": "capture_clock",
        })
        return out

    def _direction(self, item: Analysis, ev: dict, source: np.ndarray | None = None) -> dict:
        """``angle`` and ``angle_source``: the array's DOA over the event's span in the window, else the option.

        ``source``: the separated source's waveform over the whole window (separation events):
        the DOA then keeps only the span's time-frequency bins where that source dominates the
        channel mean (``angle_source`` ``doa:<method>:source``), so that a sound overlapping a
        louder one gets its own direction; when the source dominates too few bins for that, the
        DOA of the whole span (``doa:<method>``), as for an alert (no separation)."""
        if self.doa is not None:
            # ev: the pipeline's event, in seconds of this window
            s0, s1 = int(round(ev["start_sec"] * SAMPLE_RATE)), int(round(ev["end_sec"] * SAMPLE_RATE))
            cut = slice(max(0, s0), max(s1, s0 + 1))
            if item.audio[:, cut].shape[1] < 4 * self.doa.cfg.nfft:
                cut = slice(None)
            if source is not None and source.shape[-1] != item.audio.shape[1]:
                log.warning("a separated source of %d samples for a window of %d: whole-span direction",
                            source.shape[-1], item.audio.shape[1])
                source = None
            try:
                angle = self.doa.estimate(item.audio[:, cut], None if source is None else source[cut])
                own = self.doa.used_source
            except Exception as exc:  # noqa: BLE001 - a failed DOA must not lose the alert
                log.warning("direction of arrival failed: %s", exc)
                angle = None
            if angle is not None:
                return {"angle": round(angle, 1), "angle_source": f"doa:{self.doa.name}" + (":source" if own else "")}
        if self.angle is not None:
            return {"angle": self.angle, "angle_source": "option"}
        return {"angle_source": "none"}

    def _record(self, ev: dict, stage: str, item: Analysis, span: dict,
                source: np.ndarray | None = None) -> dict | None:
        """Merge ``ev`` (a live event of ``stage``) into its occurrence; emit it when it is a new
        occurrence or the separation stage's update of an alert. ``span``: the detection in seconds
        of ``item`` (for the direction); ``source``: its separated waveform over ``item`` (separation
        events; for the direction). Returns what was emitted (None: merged)."""
        with self._lock:  # an alert is emitted before any update of it, and never twice
            kind, occ = self.occurrences.observe(ev, stage)
            if kind == "merged":
                self.stats.merged += 1
                return None
            ev.update(self._direction(item, span, source))
            ev.update(stage=stage, provisional=stage == "alert", revision=occ["revision"])
            to_backend = True
            if kind == "update":
                first = occ["event"]
                ev.update(event_id=first["event_id"], update_of=first["event_id"])
                # the backend's body has no id or revision: resend only what changes what it shows,
                # the label, the category, or the direction by more than resend_angle_deg (the alert's
                # came from the unseparated excerpt: a louder sound beside it can pull it away)
                moved = _angle_apart(ev.get("angle"), first.get("angle")) > self.cfg.resend_angle_deg
                to_backend = (ev["label"], ev["category"]) != (first["label"], first["category"]) or moved
                occ["event"] = dict(first, label=ev["label"], category=ev["category"])
                if to_backend and ev.get("angle") is not None:
                    occ["event"]["angle"] = ev["angle"]
            self._emit(ev, to_backend)
            return ev

    def _retract(self, occ: dict, item: Analysis) -> None:
        """The separation of ``item`` (every pass run) held the whole excerpt an alert was made from and
        did not confirm it: emit a retraction (the alert's fields, same ``event_id``, ``update_of``,
        next ``revision``, ``retracted: true``). Called under ``self._lock``. Not sent to the backend:
        its body (the reference backend's) cannot withdraw an alert, and another POST would be a
        second alert."""
        first = occ["event"]
        occ["stage"] = "retracted"
        occ["revision"] += 1
        ev = {k: v for k, v in first.items() if k != "latency_sec"}
        ev.update(stage="separation", provisional=False, retracted=True, revision=occ["revision"],
                  update_of=first["event_id"], retracted_by_window=[round(item.start / SAMPLE_RATE, 3), round(
                      (item.start + item.audio.shape[1]) / SAMPLE_RATE, 3)])
        self._emit(ev, to_backend=False)

    def _emit(self, ev: dict, to_backend: bool = True) -> None:
        stage, update = ev.get("stage", "separation"), ev.get("revision", 0) > 0
        retracted = bool(ev.get("retracted"))
        t_cap = self.captured_at(int(round(ev["start_sec"] * SAMPLE_RATE)))
        if t_cap is not None:
            lat = time.monotonic() - t_cap
            ev["latency_sec"] = round(lat, 3)
            if not update:
                self.stats.latencies_sec.append(lat)
            if not retracted:
                (self.stats.alert_latencies_sec if stage == "alert" else self.stats.separation_latencies_sec).append(lat)
        if retracted:
            self.stats.retractions += 1
        elif update:
            self.stats.updates += 1
            self.stats.updates_sent += int(to_backend)
        else:
            self.stats.events += 1
            self.stats.alert_events += int(stage == "alert")
        what = "retraction" if retracted else f"update r{ev['revision']}" if update else f"{stage} event"
        log.info("%s: %s (%s) at %.2f s%s", what, ev["label"],
                 ev["category"], ev["start_sec"], f", {ev['angle']:.0f}°" if ev.get("angle") is not None else "")
        if self.delivery is not None and to_backend:
            # an update is another delivery (the backend has no update call): its own idempotency key
            self.delivery.put(dict(ev, event_id=f"{ev['event_id']}.r{ev['revision']}") if update else ev)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception as exc:  # noqa: BLE001 - a user's callback must not stop analysis
                log.error("on_event callback failed: %s", exc)

    # --- running and stopping ------------------------------------------------------------------
    def run(self, source, stop: threading.Event | None = None, drain: bool = True) -> LiveStats:
        """Feed ``source`` (an iterator of blocks with ``sample_rate`` and ``channels``) until it ends
        or ``stop`` is set, then :meth:`close`. Blocks at another rate than 16 kHz are resampled.
        At the end of the stream, windows still queued are analysed (``drain``) or dropped and counted.
        Ctrl-C (``KeyboardInterrupt``) ends capture too: the window in progress is finished, queued
        ones are dropped (counted), the outbox is flushed, and ``stats.interrupted`` is set."""
        resample = _Resampler(source.sample_rate, self.channels) if source.sample_rate != SAMPLE_RATE else None
        interrupted = False
        try:
            for block in source:
                if resample is not None:
                    block = resample.push(block)
                if block.size:
                    self.feed(block)
                if stop is not None and stop.is_set():
                    interrupted = True
                    break
                if self._worker_error is not None:
                    break
            else:
                if resample is not None:
                    tail = resample.finish()
                    if tail.size:
                        self.feed(tail)
                self.finish_stream()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            source.close()
            self.stats.interrupted = interrupted
            self.close(wait=drain and not interrupted)
        return self.stats

    def finish_stream(self) -> None:
        """The stream ended: analyse the last window when an analysis was due after its end."""
        if self._due is not None and self.ring.end - self._last_end >= self.align:
            self._submit(self.ring.end, "end")
            self._due = None

    def close(self, wait: bool = True) -> LiveStats:
        """Stop analysis (after the window in progress and any queued one when ``wait``), send what
        is queued for delivery, flush the outbox. Raises the analysis thread's error, if any."""
        if self._closed:
            return self.stats
        self._closed = True
        stages = [(self._q, self._worker, "windows")]
        if self._alert_worker is not None:
            stages.insert(0, (self._alert_q, self._alert_worker, "alert_windows"))
        for q, worker, counter in stages:
            if not wait:
                while True:
                    try:
                        if q.get_nowait() is not None:
                            setattr(self.stats, f"{counter}_dropped", getattr(self.stats, f"{counter}_dropped") + 1)
                    except queue.Empty:
                        break
            while True:  # the end marker; never wait on a full queue whose worker has died
                try:
                    q.put(None, timeout=0.2)
                    break
                except queue.Full:
                    if not worker.is_alive():
                        break
        for _, worker, _ in stages:
            worker.join()
        if self.delivery is not None:
            self.stats.delivery = self.delivery.close()
        if self._worker_error is not None:
            raise self._worker_error
        return self.stats


def _angle_apart(a: float | None, b: float | None) -> float:
    """Degrees between two azimuths (0..180); 0 when either is unknown."""
    if a is None or b is None:
        return 0.0
    return abs((float(a) - float(b) + 180.0) % 360.0 - 180.0)


def _lower_thread_priority(nice: int) -> None:
    """Make the calling thread (and the threads it starts later, e.g. its OpenMP team) ``nice``
    steps nicer. Linux keeps a nice value per thread; elsewhere, or when refused, nothing changes."""
    import os

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as exc:
        log.debug("could not lower the separation thread's priority: %s", exc)


def excerpt_logits(guide, x) -> "torch.Tensor":
    """The AST's logits ``(C,)`` for one excerpt ``x`` ``(N,)``: the guide's model with the zero
    padding trimmed (merged as ``guide.cfg.pad_merge`` says) whatever the guide's own setting,
    uncached (an excerpt is seen once). A guide without a model of its own (an oracle) is called."""
    import torch

    from .features import ast_input

    with torch.no_grad():
        if not hasattr(guide, "forward_features"):
            return guide(x[None].to(guide.device)).logits[0]
        cfg = guide.cfg
        feats, real = ast_input(x[None].float(), guide.max_frames, cfg.fbank_mean, cfg.fbank_std)
        return guide.forward_features(feats.to(guide.device, guide.dtype), real)["logits"][0]


class _Resampler:
    """Per-channel streaming resampling to 16 kHz (``astsep.audio``'s, exact block by block)."""

    def __init__(self, rate: int, channels: int):
        from .audio import StreamResampler

        self.rs = [StreamResampler(rate) for _ in range(channels)]

    def _stack(self, parts) -> np.ndarray:
        n = min(p.numel() for p in parts)
        return np.stack([p[:n].numpy() for p in parts], axis=1).astype(np.float32)

    def push(self, block: np.ndarray) -> np.ndarray:
        import torch

        return self._stack([r.push(torch.from_numpy(np.ascontiguousarray(block[:, c])))
                            for c, r in enumerate(self.rs)])

    def finish(self) -> np.ndarray:
        return self._stack([r.finish() for r in self.rs])


def listen(source, pipeline, cfg: LiveConfig | None = None, **kwargs: Any) -> Iterator[dict]:
    """Events of ``source`` as they are detected: ``for ev in listen(source, pipeline): ...``; an
    alert (``ev["stage"] == "alert"``) may be followed by its update (same ``event_id``, ``revision`` 1).

    Capture and analysis run in background threads; the iterator ends when the source ends and its
    last window is analysed. ``kwargs`` go to :class:`LiveListener` (``doa``, ``angle``, ``client``,
    ``outbox``, ``user_id``, ...). Leaving the loop early (``break``) stops capture."""
    out: queue.Queue[dict | None] = queue.Queue()
    stop = threading.Event()
    listener = LiveListener(pipeline, cfg, channels=source.channels, on_event=out.put, **kwargs)
    error: list[BaseException] = []

    def capture() -> None:
        try:
            listener.run(source, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)
        finally:
            out.put(None)

    t = threading.Thread(target=capture, name="astsep-live-capture", daemon=True)
    t.start()
    try:
        while True:
            ev = out.get()
            if ev is None:
                break
            yield ev
    finally:
        stop.set()
        t.join()
    if error:
        raise error[0]
