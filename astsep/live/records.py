"""Live events as records: stream times, stable ids, wall-clock time, direction of arrival."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta

import numpy as np

from ..config import SAMPLE_RATE
from .trigger import Analysis

log = logging.getLogger(__name__)

EVENT_KEYS = ("label", "class_id", "confidence", "top5", "category", "level_dbfs", "kind")


def live_event(ev: dict, item: Analysis, stream_id: str, stream_start: datetime | None) -> dict:
    """The live event of detection ``ev`` (seconds of ``item``): stream seconds, an ``event_id``
    stable per stream and occurrence start (a resend is recognised by the backend), and
    ``occurred_at`` = ``stream_start`` + its start (``occurred_at_source: "capture_clock"``)."""
    offset = item.start_sec
    start = offset + ev["start_sec"]
    end = offset + ev["end_sec"]
    start_sample = int(round(start * SAMPLE_RATE))
    eid = hashlib.sha256(f"live:{stream_id}:{start_sample}:{ev['class_id']}".encode()).hexdigest()[:32]
    when = stream_start + timedelta(seconds=start) if stream_start else None
    out = {k: ev[k] for k in EVENT_KEYS}
    out.update({
        "event_id": eid,
        "stream": stream_id,
        "start_sec": round(start, 3),
        "end_sec": round(end, 3),
        "window_start_sec": round(offset, 3),
        "window_end_sec": round(item.end_sec, 3),
        "trigger": item.reason,
        "occurred_at": when.isoformat(timespec="milliseconds").replace("+00:00", "Z") if when else None,
        "occurred_at_source": "capture_clock",
    })
    return out


def direction(item: Analysis, ev: dict, doa=None, angle: float | None = None,
              source: np.ndarray | None = None) -> dict:
    """``angle`` and ``angle_source``: the array's DOA (``doa``, a :class:`astsep.doa.DOAEstimator`)
    over the event's span in the window, else ``angle`` (``angle_source: "option"``), else none.

    ``ev``: the detection in seconds of ``item``. ``source``: the separated source's waveform over
    the whole window (separation events): the DOA then keeps only the span's time-frequency bins
    where that source dominates the channel mean (``angle_source`` ``doa:<method>:source``), so that
    a sound overlapping a louder one gets its own direction; when the source dominates too few bins
    for that, the DOA of the whole span (``doa:<method>``), as for an alert (no separation)."""
    if doa is not None:
        s0, s1 = int(round(ev["start_sec"] * SAMPLE_RATE)), int(round(ev["end_sec"] * SAMPLE_RATE))
        cut = slice(max(0, s0), max(s1, s0 + 1))
        if item.audio[:, cut].shape[1] < 4 * doa.cfg.nfft:
            cut = slice(None)
        if source is not None and source.shape[-1] != item.audio.shape[1]:
            log.warning("a separated source of %d samples for a window of %d: whole-span direction",
                        source.shape[-1], item.audio.shape[1])
            source = None
        try:
            found = doa.estimate(item.audio[:, cut], None if source is None else source[cut])
            own = doa.used_source
        except Exception as exc:  # noqa: BLE001 - a failed DOA must not lose the alert
            log.warning("direction of arrival failed: %s", exc)
            found = None
        if found is not None:
            return {"angle": round(found, 1), "angle_source": f"doa:{doa.name}" + (":source" if own else "")}
    if angle is not None:
        return {"angle": angle, "angle_source": "option"}
    return {"angle_source": "none"}
