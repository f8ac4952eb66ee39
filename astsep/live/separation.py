"""The separation stage: a window through the pipeline, its sources cut into detections.

A separated source may hold two sounds of its class (a window spans more than one): each run of
activity apart from the next by more than the hold-off is a detection of its own.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..config import SAMPLE_RATE, LiveConfig
from .trigger import Analysis

ALERT_KINDS = ("source", "residual")


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


class SeparationStage:
    """Separates windows with ``pipeline`` (:meth:`separate`) and cuts its events into detections."""

    def __init__(self, pipeline, cfg: LiveConfig):
        self.pipe = pipeline
        self.cfg = cfg

    def separate(self, item: Analysis, should_stop: Callable[[], bool] | None = None,
                 on_detection: Callable[[dict, np.ndarray | None], None] | None = None):
        """``(result, detections)``: the pipeline's :class:`~astsep.pipeline.SeparationResult` of the
        window's channel mean, and ``[(detection, source samples (N,) or None), ...]`` in seconds of
        the window, for every alertable event. ``should_stop`` is asked before each pass after the
        first (a newer window waits). With ``on_detection``, each source's detections are handed to
        it as soon as its pass ends (the first sound after one pass, not after all of them and the
        residual's classification) and ``detections`` holds only the rest (the residual's, and any
        a pass did not report)."""
        import torch

        mono = torch.from_numpy(item.audio.mean(axis=0))
        reported: set[str] = set()

        def on_source(ev: dict, samples: torch.Tensor) -> None:
            if not self.alertable(ev):
                return
            reported.add(ev["event_id"])
            x = samples.numpy()
            for part in self._parts(ev, x):
                on_detection(part, x)

        result = self.pipe.run(mono, f"live:{item.start_sec:.3f}s", should_stop=should_stop,
                               on_source=on_source if on_detection is not None else None)
        detections: list[tuple[dict, np.ndarray | None]] = []
        sources = None
        for ev in result.events:
            if not self.alertable(ev) or ev["event_id"] in reported:
                continue
            if sources is None:
                sources = result.sources
            samples = sources.get(ev["file"][:-4]) if ev.get("file") else None
            samples = samples.numpy() if samples is not None else None
            detections.extend((part, samples) for part in self._parts(ev, samples))
        return result, detections

    def _parts(self, ev: dict, samples: np.ndarray | None) -> list[dict]:
        """``ev`` cut into one detection per run of activity of its source (:meth:`_runs`)."""
        return [dict(ev, start_sec=max(a, ev["start_sec"]), end_sec=min(b, ev["end_sec"]))
                for a, b in self._runs(ev, samples)]

    def _runs(self, ev: dict, samples: np.ndarray | None) -> list[tuple[float, float]]:
        sc = self.pipe.cfg.separator
        runs = (active_runs(samples, sc.active_threshold_db, sc.silence_dbfs, self.cfg.hold_off_sec)
                if samples is not None else [])
        runs = [(a, b) for a, b in runs if b > ev["start_sec"] and a < ev["end_sec"]] or \
            [(ev["start_sec"], ev["end_sec"])]
        if len(runs) > 1:  # a blip of a few frames beside a longer run is a fragment of it, not a sound
            longest = max(b - a for a, b in runs)
            runs = [(a, b) for a, b in runs if b - a >= self.cfg.min_run_sec or b - a == longest]
        return runs

    def alertable(self, ev: dict) -> bool:
        if ev.get("start_sec") is None or ev.get("kind") not in ALERT_KINDS:
            return False
        if ev["kind"] == "residual" and not ev.get("confident"):
            return False
        return self.cfg.emit_other or ev.get("category") != "other"
