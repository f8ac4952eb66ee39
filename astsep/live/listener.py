"""The listener: capture, two stages, occurrences, delivery, wired together.

Capture (the caller's thread, :meth:`LiveListener.feed`) never waits: it copies samples into the
ring buffer, meters the level and puts due alert excerpts and windows into two bounded queues
(oldest dropped when full). :meth:`LiveListener.start` starts one thread per stage; a listener
never started is stepped instead (:meth:`LiveListener.process_pending` analyses what is queued, in
the caller's thread), which with a :class:`~astsep.live.clock.ManualClock` makes a test exact.
"""

from __future__ import annotations

import bisect
import logging
import queue
import threading
import uuid
from collections import deque
from datetime import timedelta
from typing import Any, Callable, Iterator

import numpy as np

from ..config import SAMPLE_RATE, LiveConfig
from ..errors import ConfigError
from .alert import AlertStage
from .clock import Clock, SystemClock
from .occurrences import Occurrences, apply_update, retraction
from .recording import Recorder
from .records import direction, live_event
from .separation import SeparationStage
from .sink import OutboxSink
from .stats import LiveStats
from .trigger import Analysis, RingBuffer, Triggers

log = logging.getLogger(__name__)


class LiveListener:
    """Continuous analysis of a stream (:mod:`astsep.live` has the data flow).

    Args:
        pipeline: an :class:`astsep.pipeline.Pipeline` (its guide, model and AST cache are reused by
            every analysis; the alert stage runs the same guide's model on its excerpts, uncached).
        cfg: :class:`LiveConfig` (window, trigger, hop, hold-off, queue, recording, alert stage).
        channels: input channels after capture (the ring buffer keeps them all; separation uses their mean).
        doa: a :class:`astsep.doa.DOAEstimator` for ``channels`` ≥ 2, else None.
        angle: degrees to report when there is no DOA (``angle_source: "option"``); None: no angle.
        on_event: called with each event dict and each update (from the stage's thread, one at a
            time, an alert always before its update), after the event is in the outbox.
        client, outbox: :class:`astsep.delivery.BackendClient` and :class:`astsep.delivery.Outbox`:
            every event (category other than ``other``) is committed to the outbox, then sent.
        user_id: sent with each event.
        stream_id: names the stream in event ids (default: random per listener).
        clock: where every time comes from (default :class:`SystemClock`).
    """

    def __init__(self, pipeline, cfg: LiveConfig | None = None, *, channels: int = 1, doa=None,
                 angle: float | None = None, on_event: Callable[[dict], None] | None = None,
                 client=None, outbox=None, user_id: int = 0, stream_id: str | None = None,
                 clock: Clock | None = None):
        self.pipe = pipeline
        self.cfg = cfg = cfg or LiveConfig()
        self.channels = channels
        if doa is not None and doa.channels != channels:
            raise ConfigError(f"the microphone geometry has {doa.channels} mics but the input has {channels} "
                              "channel(s): pass --channels to match it")
        self.doa, self.angle, self.on_event = doa, angle, on_event
        self.clock = clock or SystemClock()
        self.stream_id = stream_id or uuid.uuid4().hex
        self.win = int(round(cfg.window_sec * SAMPLE_RATE))
        self.alert_len = int(round(cfg.alert_sec * SAMPLE_RATE))
        self.ring = RingBuffer(channels, max(self.win, self.alert_len) + 4 * SAMPLE_RATE)
        self.triggers = Triggers(cfg)
        self.alert_stage = AlertStage(pipeline, cfg) if cfg.alert_stage else None
        self.separation = SeparationStage(pipeline, cfg)
        self.stats = LiveStats()
        self.occurrences = Occurrences(cfg.hold_off_sec)
        self.recorder = Recorder(cfg.record_dir, int(cfg.record_max_mb * 1e6)) if cfg.record_dir else None
        self.sink = OutboxSink(client, outbox, user_id, angle) if client is not None and outbox is not None else None
        self.stream_start = None
        self._q: queue.Queue[Analysis | None] = queue.Queue(maxsize=cfg.queue_size)
        self._alert_q: queue.Queue[Analysis | None] = queue.Queue(maxsize=cfg.alert_queue_size)
        self._times: deque[tuple[int, float]] = deque()  # (end sample of a block, clock time it arrived)
        self._last_end = self._alert_last_end = -1
        self._lock = threading.Lock()  # occurrences and emission: one stage at a time, in order
        self._worker_error: BaseException | None = None
        self._workers: list[threading.Thread] = []
        self._started = self._closed = False

    # --- threads ----------------------------------------------------------------------------------
    def start(self) -> "LiveListener":
        """Start the separation thread, the alert thread (with the alert stage) and the sender."""
        if self._started:
            return self
        self._started = True
        self._workers = [threading.Thread(target=self._work, name="astsep-live-analysis", daemon=True)]
        if self.alert_stage is not None:
            self._workers.insert(0, threading.Thread(target=self._alert_work, name="astsep-live-alert", daemon=True))
        for w in self._workers:
            w.start()
        if self.sink is not None:
            self.sink.start()
        return self

    def _work(self) -> None:
        if self.alert_stage is not None and self.cfg.separation_nice:
            _lower_thread_priority(self.cfg.separation_nice)
        self._loop(self._q, self._analyse, "live analysis")

    def _alert_work(self) -> None:
        self._loop(self._alert_q, self._alert_analyse, "live alert stage")

    def _loop(self, q: queue.Queue, analyse: Callable[[Analysis], None], what: str) -> None:
        while True:
            item = q.get()
            if item is None or not self._run_item(item, analyse, what):
                return

    def _run_item(self, item: Analysis, analyse: Callable[[Analysis], None], what: str) -> bool:
        try:
            analyse(item)
            return True
        except BaseException as exc:  # noqa: BLE001 - reported by close(); capture goes on
            log.error("%s failed: %s", what, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self._worker_error = exc
            return False

    def process_pending(self) -> int:
        """A listener never started: analyse what is queued, alert excerpts first, in this thread.
        Returns how many items were analysed."""
        if self._started:
            raise RuntimeError("process_pending() steps a listener that was not started")
        done = 0
        for q, analyse, what in ((self._alert_q, self._alert_analyse, "live alert stage"),
                                 (self._q, self._analyse, "live analysis")):
            while self._worker_error is None:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    done += self._run_item(item, analyse, what)
        return done

    # --- capture side (never blocks) ---------------------------------------------------------------
    def feed(self, block: np.ndarray) -> None:
        """Take one block ``(frames, channels)`` (or ``(frames,)``) of 16 kHz float32 samples."""
        x = np.asarray(block, dtype=np.float32)
        if x.ndim == 1:
            x = x[:, None]
        if x.shape[1] != self.channels:
            raise ConfigError(f"a block has {x.shape[1]} channel(s), the listener takes {self.channels}")
        now = self.clock.monotonic()
        if self.stream_start is None:
            self.stream_start = self.clock.now() - timedelta(seconds=x.shape[0] / SAMPLE_RATE)
        self.ring.write(x)
        end = self.ring.end
        self._times.append((end, now))
        while self._times and self._times[0][0] < end - 120 * SAMPLE_RATE:
            self._times.popleft()
        self.stats.stream_sec = end / SAMPLE_RATE
        for reason, at in self.triggers.push(x.mean(axis=1), end):
            if reason == "alert":
                self._submit_alert(at)
            else:
                self._submit(at, reason)

    def _submit(self, end: int, reason: str) -> None:
        if end <= self._last_end:
            return  # this moment is already queued or analysed
        self._last_end = end
        start = max(0, end - self.win)
        item = Analysis(start, self.ring.read(start, end), reason, self.clock.monotonic())
        if reason == "end" and self._started:  # capture is over: wait for room rather than drop a window
            while any(w.is_alive() for w in self._workers):
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
        # the alert stage follows the level trigger whatever the separation's trigger
        item = Analysis(start, self.ring.read(start, end), "level", self.clock.monotonic(),
                        self.triggers.onset_in(start, end))
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
                alert = counter.startswith("alert")
                log.warning("%s is behind: dropped the %s at %.2f-%.2f s (%d dropped so far)",
                            "alert stage" if alert else "analysis", "excerpt" if alert else "window",
                            old.start_sec, old.end_sec, dropped)

    def captured_at(self, sample: int) -> float | None:
        """The clock's time when the block holding absolute ``sample`` arrived (None: forgotten)."""
        ends = [e for e, _ in self._times]
        i = bisect.bisect_right(ends, sample)
        return self._times[i][1] if i < len(self._times) else None

    # --- analysis side ------------------------------------------------------------------------------
    def _alert_analyse(self, item: Analysis) -> None:
        t0 = self.clock.monotonic()
        self.stats.alert_max_queue_wait_sec = max(self.stats.alert_max_queue_wait_sec, t0 - item.queued_at)
        found = self.alert_stage.detect(item)
        if found is not None:
            self._record(live_event(found, item, self.stream_id, self.stream_start), "alert", item, found)
        self.stats.alert_windows_analysed += 1
        self.stats.alert_sec += self.clock.monotonic() - t0

    def _analyse(self, item: Analysis) -> None:
        t0 = self.clock.monotonic()
        self.stats.max_queue_wait_sec = max(self.stats.max_queue_wait_sec, t0 - item.queued_at)
        g0 = dict(self.pipe.guide.stats())
        behind = (lambda: not self._q.empty()) if self.cfg.cut_passes_when_behind else None
        emitted = []

        def record(part: dict, samples: np.ndarray | None) -> None:
            ev = self._record(live_event(part, item, self.stream_id, self.stream_start), "separation", item, part,
                              samples)
            if ev is not None:
                emitted.append(ev)

        # a pass's sound is recorded (and sent) as soon as the pass ends, the residual's after the window
        result, detections = self.separation.separate(item, behind, record if self.cfg.report_each_pass else None)
        for part, samples in detections:
            record(part, samples)
        self.stats.windows_cut += result.stats["windows_cut"]
        self.stats.passes_run += result.stats["passes_run"]
        g1 = self.pipe.guide.stats()
        self.stats.ast_forwards += g1["ast_forwards"] - g0["ast_forwards"]
        self.stats.cache_hits += g1["cache_hits"] - g0["cache_hits"]
        if self.alert_stage is not None and self.cfg.retract_unconfirmed and not result.stats["windows_cut"]:
            with self._lock:
                for occ in self.occurrences.unconfirmed(round(item.start_sec, 3), round(item.end_sec, 3)):
                    self._emit(retraction(occ, item), to_backend=False)
        self.stats.windows_analysed += 1
        self.stats.analysis_sec += self.clock.monotonic() - t0
        if self.recorder is not None:
            try:
                self.recorder.save(item, result, emitted)
                self.stats.recordings = self.recorder.count
            except OSError as exc:
                log.warning("could not record the window at %.2f s: %s", item.start_sec, exc)

    def _direction(self, item: Analysis, ev: dict, source: np.ndarray | None = None) -> dict:
        """:func:`astsep.live.records.direction` with this listener's DOA and ``angle``."""
        return direction(item, ev, self.doa, self.angle, source)

    def _record(self, ev: dict, stage: str, item: Analysis, span: dict,
                source: np.ndarray | None = None) -> dict | None:
        """Merge ``ev`` (a live event of ``stage``) into its occurrence; emit it when it is a new
        occurrence or the separation stage's update of an alert. ``span``: the detection in seconds
        of ``item``, ``source``: its separated waveform over ``item`` (both for the direction).
        Returns what was emitted (None: merged)."""
        with self._lock:  # an alert is emitted before any update of it, and never twice
            kind, occ = self.occurrences.observe(ev, stage)
            if kind == "merged":
                self.stats.merged += 1
                return None
            ev.update(self._direction(item, span, source))
            ev.update(stage=stage, provisional=stage == "alert", revision=occ["revision"])
            to_backend = apply_update(ev, occ, self.cfg.resend_angle_deg) if kind == "update" else True
            self._emit(ev, to_backend)
            return ev

    def _count(self, ev: dict, to_backend: bool) -> None:
        stage, update = ev.get("stage", "separation"), ev.get("revision", 0) > 0
        retracted = bool(ev.get("retracted"))
        t_cap = self.captured_at(int(round(ev["start_sec"] * SAMPLE_RATE)))
        if t_cap is not None:
            lat = self.clock.monotonic() - t_cap
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
        log.info("%s: %s (%s) at %.2f s%s", what, ev["label"], ev["category"], ev["start_sec"],
                 f", {ev['angle']:.0f}°" if ev.get("angle") is not None else "")

    def _emit(self, ev: dict, to_backend: bool = True) -> None:
        """Count ``ev``, commit it to the outbox (when it is for the backend), then hand it to
        ``on_event``: nothing is shown that is not already durable."""
        self._count(ev, to_backend)
        # said in the event itself: an update the backend already has (same class, same direction) is
        # shown but not sent, and whoever reads the events (a test, an app) can tell the two apart
        ev["to_backend"] = bool(to_backend) and ev.get("category") != "other"
        if self.sink is not None and to_backend:
            # an update is another delivery (the backend has no update call): its own idempotency key
            update = ev.get("revision", 0) > 0
            try:
                self.sink.commit(dict(ev, event_id=f"{ev['event_id']}.r{ev['revision']}") if update else ev)
            except Exception as exc:  # noqa: BLE001 - the event is still shown; delivery says why
                log.error("could not queue %s for delivery: %s", ev["event_id"], exc)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception as exc:  # noqa: BLE001 - a user's callback must not stop analysis
                log.error("on_event callback failed: %s", exc)

    # --- running and stopping -----------------------------------------------------------------------
    def run(self, source, stop: threading.Event | None = None, drain: bool = True) -> LiveStats:
        """:meth:`start`, feed ``source`` (an iterator of blocks with ``sample_rate`` and ``channels``)
        until it ends or ``stop`` is set, then :meth:`close`. Blocks at another rate than 16 kHz are
        resampled. At the end of the stream, windows still queued are analysed (``drain``) or
        dropped and counted. Ctrl-C (``KeyboardInterrupt``) ends capture too: the window in progress
        is finished, queued ones are dropped (counted), the outbox is flushed, and
        ``stats.interrupted`` is set."""
        self.start()
        resample = _Resampler(source.sample_rate, self.channels) if source.sample_rate != SAMPLE_RATE else None
        interrupted = False
        try:
            interrupted = self._capture(source, resample, stop)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            source.close()
            self.stats.interrupted = interrupted
            self.close(wait=drain and not interrupted)
        return self.stats

    def _capture(self, source, resample, stop: threading.Event | None) -> bool:
        """Feed ``source`` until it ends (False) or ``stop`` is set (True)."""
        for block in source:
            if resample is not None:
                block = resample.push(block)
            if block.size:
                self.feed(block)
            if stop is not None and stop.is_set():
                return True
            if self._worker_error is not None:
                return False
        if resample is not None:
            tail = resample.finish()
            if tail.size:
                self.feed(tail)
        self.finish_stream()
        return False

    def finish_stream(self) -> None:
        """The stream ended: analyse the last window when an analysis was due after its end."""
        if self.triggers.due is not None and self.ring.end - self._last_end >= self.triggers.align:
            self._submit(self.ring.end, "end")
            self.triggers.due = None

    def close(self, wait: bool = True) -> LiveStats:
        """Stop analysis (after the window in progress and any queued one when ``wait``), stop the
        sender and flush the outbox. Raises the analysis's error, if any. A listener never started
        analyses what is queued here (``wait``)."""
        if self._closed:
            return self.stats
        self._closed = True
        if not self._started and wait:
            self.process_pending()
        queues = [(self._alert_q, "alert_windows"), (self._q, "windows")]
        if not wait or not self._started:
            for q, counter in queues:
                _drop_all(q, self.stats, counter)
        for (q, _), worker in zip(queues[-len(self._workers):], self._workers):
            _put_end(q, worker)
        for worker in self._workers:
            worker.join()
        if self.sink is not None:
            self.stats.delivery = self.sink.close()
        if self._worker_error is not None:
            raise self._worker_error
        return self.stats


def _drop_all(q: queue.Queue, stats: LiveStats, counter: str) -> None:
    while True:
        try:
            if q.get_nowait() is not None:
                setattr(stats, f"{counter}_dropped", getattr(stats, f"{counter}_dropped") + 1)
        except queue.Empty:
            return


def _put_end(q: queue.Queue, worker: threading.Thread) -> None:
    """The end marker; never wait on a full queue whose worker has died."""
    while True:
        try:
            q.put(None, timeout=0.2)
            return
        except queue.Full:
            if not worker.is_alive():
                return


def _lower_thread_priority(nice: int) -> None:
    """Make the calling thread (and the threads it starts later, e.g. its OpenMP team) ``nice``
    steps nicer. Linux keeps a nice value per thread; elsewhere, or when refused, nothing changes."""
    import os

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as exc:
        log.debug("could not lower the separation thread's priority: %s", exc)


class _Resampler:
    """Per-channel streaming resampling to 16 kHz (``astsep.audio``'s, exact block by block)."""

    def __init__(self, rate: int, channels: int):
        from ..audio import StreamResampler

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
    ``outbox``, ``user_id``, ``clock``, ...). Leaving the loop early (``break``) stops capture."""
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
