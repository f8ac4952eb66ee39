"""The capture side of live mode: the ring buffer, the level meter and the two triggers.

Nothing here waits or starts a thread: :class:`Triggers` turns each block's samples into the
analyses now due (alert excerpts, separation windows), which the listener cuts from the
:class:`RingBuffer` and queues.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..config import SAMPLE_RATE, LiveConfig

log = logging.getLogger(__name__)


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
    """One window (or alert excerpt) handed from capture to an analysis stage."""

    start: int  # absolute sample of the window's first sample
    audio: np.ndarray  # (channels, samples) float32, 16 kHz
    reason: str  # "level" | "hop" | "end"
    queued_at: float  # the listener's clock (monotonic seconds)
    onset: int | None = None  # alert excerpts: absolute sample of the latest level-trigger onset in it

    @property
    def start_sec(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_sec(self) -> float:
        return (self.start + self.audio.shape[1]) / SAMPLE_RATE


def _ceil_to(x: int, grid: int) -> int:
    return -(-x // grid) * grid


class Triggers:
    """The level meter (50 ms frames of the channel mean) and what it schedules.

    Separation windows: with ``trigger: level``, the first ends ``post_trigger_sec`` after an onset
    (rounded up to the ``align_sec`` grid), then one every ``hop_sec`` while the sound lasts; with
    ``trigger: hop``, one every ``hop_sec``. Alert excerpts (``alert_stage``): the first ends
    ``alert_post_trigger_sec`` after an onset, then one every ``alert_hop_sec`` while loud, with
    either trigger. Positions are absolute samples."""

    def __init__(self, cfg: LiveConfig):
        self.cfg = cfg
        self.hop = int(round(cfg.hop_sec * SAMPLE_RATE))
        self.align = max(1, int(round(cfg.align_sec * SAMPLE_RATE)))
        self.frame = max(1, int(round(cfg.level_frame_sec * SAMPLE_RATE)))
        self.alert_hop = int(round(cfg.alert_hop_sec * SAMPLE_RATE))
        self.loud = False
        self.onsets: deque[int] = deque(maxlen=64)  # absolute samples where the level trigger fired
        self._level_acc = np.zeros(0, dtype=np.float32)
        self._level_pos = 0  # absolute sample of _level_acc[0]
        self._quiet_since: int | None = None
        self.due: int | None = None  # end sample of the next separation window
        self._onset_pending = False  # due is the first window after an onset (always analysed)
        self._alert_due: int | None = None  # end sample of the next alert excerpt
        self._alert_onset_pending = False

    def push(self, mono: np.ndarray, end: int) -> list[tuple[str, int]]:
        """Meter ``mono`` (the block's channel mean, ending at absolute sample ``end``); the analyses
        due by ``end`` as ``(reason, end sample)``, alert excerpts (reason ``"alert"``) first, then
        windows (``"level"`` / ``"hop"``)."""
        self._meter(mono)
        due = self._alerts_due(end) if self.cfg.alert_stage else []
        hop_trigger = self.cfg.trigger == "hop"
        if hop_trigger and self.due is None:
            self.due = self.hop
        while self.due is not None and end >= self.due:
            at = self.due
            if hop_trigger or self._onset_pending or self.loud:
                due.append(("hop" if hop_trigger else "level", at))
            self._onset_pending = False
            # the next one: every hop (hop trigger) or every hop while the sound lasts (level trigger;
            # skipped when the level has fallen by then)
            self.due = at + self.hop if (hop_trigger or self.loud) else None
        return due

    def _alerts_due(self, end: int) -> list[tuple[str, int]]:
        """After an onset, then every alert hop while the sound lasts. An excerpt of quiet is not
        classified (with ``trigger: hop`` the separation stage still analyses every window)."""
        out = []
        while self._alert_due is not None and end >= self._alert_due:
            at = self._alert_due
            if self._alert_onset_pending or self.loud:
                out.append(("alert", at))
            self._alert_onset_pending = False
            self._alert_due = at + self.alert_hop if self.loud else None
        return out

    def onset_in(self, start: int, end: int) -> int | None:
        """The latest onset in ``[start, end)``, or None."""
        return next((o for o in reversed(self.onsets) if start <= o < end), None)

    def _meter(self, mono: np.ndarray) -> None:
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
                if not self.loud:
                    self._onset(pos, db)
            elif db < cfg.trigger_dbfs - cfg.release_db and self.loud:
                if self._quiet_since is None:
                    self._quiet_since = pos
                if pos + self.frame - self._quiet_since >= cfg.release_sec * SAMPLE_RATE:
                    self.loud = False
        self._level_acc = acc[n * self.frame:].copy()
        self._level_pos += n * self.frame

    def _onset(self, pos: int, db: float) -> None:
        """The level rose above ``trigger_dbfs`` at ``pos``: schedule the first window and excerpt."""
        cfg = self.cfg
        self.loud = True
        self.onsets.append(pos)
        if cfg.trigger == "level":
            due = _ceil_to(pos + int(round(cfg.post_trigger_sec * SAMPLE_RATE)), self.align)
            if self.due is None or due < self.due:
                self.due = due
            self._onset_pending = True
            log.debug("level %.1f dBFS at %.2f s: analysis at %.2f s", db, pos / SAMPLE_RATE, due / SAMPLE_RATE)
        if cfg.alert_stage:  # the alert stage follows the level whatever the trigger
            due = _ceil_to(pos + int(round(cfg.alert_post_trigger_sec * SAMPLE_RATE)), self.align)
            if self._alert_due is None or due < self._alert_due:
                self._alert_due = due
            self._alert_onset_pending = True
