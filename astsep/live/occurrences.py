"""Occurrences of a sound, and the rule that turns detections into events, updates and retractions.

Both stages report detections; :class:`Occurrences` decides whether one is a new sound (an event),
the separation stage's update of an alert (the same ``event_id``, the next ``revision``), or more
of a sound already announced (merged: nothing is emitted). :func:`resend_update` says whether an
update goes to the backend again, :func:`retraction` builds the event that withdraws an alert a
complete separation did not confirm.
"""

from __future__ import annotations

from .trigger import Analysis


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

    A retracted occurrence (:func:`retraction`) takes the alert stage's later excerpts
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


def angle_apart(a: float | None, b: float | None) -> float:
    """Degrees between two azimuths (0..180); 0 when either is unknown."""
    if a is None or b is None:
        return 0.0
    return abs((float(a) - float(b) + 180.0) % 360.0 - 180.0)


def apply_update(ev: dict, occ: dict, resend_angle_deg: float) -> bool:
    """Make ``ev`` (the separation stage's detection of an occurrence an alert announced) the update
    of that alert: its ``event_id``, ``update_of``. Returns whether it goes to the backend: the
    backend's body has no id or revision, so only when it changes what the body shows, the label,
    the category, or the direction by more than ``resend_angle_deg`` (the alert's came from the
    unseparated excerpt: a louder sound beside it can pull it away). The occurrence then remembers
    what the backend was last sent."""
    first = occ["event"]
    ev.update(event_id=first["event_id"], update_of=first["event_id"])
    moved = angle_apart(ev.get("angle"), first.get("angle")) > resend_angle_deg
    resend = (ev["label"], ev["category"]) != (first["label"], first["category"]) or moved
    occ["event"] = dict(first, label=ev["label"], category=ev["category"])
    if resend and ev.get("angle") is not None:
        occ["event"]["angle"] = ev["angle"]
    return resend


def retraction(occ: dict, item: Analysis) -> dict:
    """The separation of ``item`` (every pass run) held the whole excerpt the occurrence's alert was
    made from and did not confirm it: the event that withdraws the alert (its fields, same
    ``event_id``, ``update_of``, next ``revision``, ``retracted: true``, ``retracted_by_window``).
    Marks the occurrence retracted. Not for the backend: its body (the reference backend's) cannot
    withdraw an alert, and another POST would be a second alert."""
    first = occ["event"]
    occ["stage"] = "retracted"
    occ["revision"] += 1
    ev = {k: v for k, v in first.items() if k != "latency_sec"}
    ev.update(stage="separation", provisional=False, retracted=True, revision=occ["revision"],
              update_of=first["event_id"], retracted_by_window=[round(item.start_sec, 3), round(item.end_sec, 3)])
    return ev
