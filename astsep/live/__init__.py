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
        ──events──▶ the outbox (committed first), then the callback / iterator; the delivery thread
        sends what the outbox holds (retries, idempotency keys; an update goes to the backend only when it changes what the backend's
        body shows, the label, the category or the angle by more than ``resend_angle_deg``, under
        the key ``<event_id>.r<revision>``)

Capture never waits for analysis: :meth:`LiveListener.feed` only copies samples, measures levels and
puts excerpts / windows in queues without blocking. Every event meant for the backend is committed
to the SQLite outbox before it is printed, handed to a callback or sent; sending is a separate step
that reads the outbox (:mod:`astsep.live.sink`). Times: sample ``s`` of the stream is ``s / 16000``
seconds after the stream's first sample, whose wall-clock time is taken when the first block
arrives (minus the block's length). Each event's ``start_sec`` / ``end_sec`` are stream seconds and
``occurred_at`` is that start on the wall clock (``occurred_at_source: "capture_clock"``).

The package, by role: :mod:`~astsep.live.clock` (the injectable clock), :mod:`~astsep.live.trigger`
(ring buffer, level meter, triggers), :mod:`~astsep.live.alert` and :mod:`~astsep.live.separation`
(the two stages), :mod:`~astsep.live.occurrences` (occurrences, the update / retraction rule),
:mod:`~astsep.live.records` (event records, direction), :mod:`~astsep.live.sink` (outbox first, then
send), :mod:`~astsep.live.recording` (``--record``), :mod:`~astsep.live.listener` (the wiring; its
threads start in :meth:`LiveListener.start`, called by :meth:`LiveListener.run`).

Python API::

    from astsep.live import LiveListener, listen
    for event in listen(source, pipeline):               # an iterator over events, until the source ends
        print(event["label"], event["start_sec"], event.get("angle"), event["stage"], event["revision"])
    LiveListener(pipeline, on_event=print).run(source)   # or a callback
"""

from .alert import AlertStage, excerpt_probs
from .clock import Clock, ManualClock, SystemClock
from .listener import LiveListener, listen
from .occurrences import Occurrences, angle_apart, apply_update, retraction
from .recording import Recorder
from .records import direction, live_event
from .separation import ALERT_KINDS, SeparationStage, active_runs
from .sink import OutboxSink
from .stats import LiveStats
from .trigger import Analysis, RingBuffer, Triggers

__all__ = ["ALERT_KINDS", "AlertStage", "Analysis", "Clock", "LiveListener", "LiveStats",
           "ManualClock", "Occurrences", "OutboxSink", "Recorder", "RingBuffer", "SeparationStage", "SystemClock",
           "Triggers", "active_runs", "angle_apart", "apply_update", "direction", "excerpt_probs", "listen",
           "live_event", "retraction"]
