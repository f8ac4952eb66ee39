"""What a live run did: :class:`LiveStats` (``LiveListener.stats``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
