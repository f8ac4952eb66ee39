"""astsep.live.occurrences: one event per occurrence, the update of an alert, its retraction."""

from __future__ import annotations

import numpy as np

from astsep.live import Analysis, Occurrences, apply_update, retraction

SR = 16000


def test_separation_updates_the_alert_of_its_occurrence_once_even_under_a_neighbouring_class():
    occ = Occurrences(hold_off=2.0)
    top = [{"label": "Siren", "class_id": 396, "prob": 0.6}, {"label": "Civil defense siren", "class_id": 397,
                                                               "prob": 0.2}]
    alert = {"label": "Siren", "class_id": 396, "start_sec": 3.0, "end_sec": 3.5, "top5": top}
    kind, rec = occ.observe(alert, "alert")
    assert kind == "new" and rec["stage"] == "alert" and rec["event"] is alert
    assert occ.observe(dict(alert, start_sec=3.2, end_sec=4.5), "alert")[0] == "merged"  # the next excerpt
    # the separated source names it "Civil defense siren": in the alert's top 5, overlapping: its update
    sep = {"label": "Civil defense siren", "class_id": 397, "start_sec": 2.98, "end_sec": 5.0, "top5": []}
    kind, rec2 = occ.observe(sep, "separation")
    assert kind == "update" and rec2 is rec and rec["revision"] == 1 and rec["end_sec"] == 5.0
    assert occ.observe(dict(sep, start_sec=4.0, end_sec=6.0), "separation")[0] == "merged"  # later windows
    assert occ.observe(dict(alert, start_sec=5.5, end_sec=6.0), "alert")[0] == "merged"
    # a class unrelated to the alert's top 5 is a sound of its own
    assert occ.observe({"label": "Dog", "class_id": 74, "start_sec": 3.0, "end_sec": 4.0}, "separation")[0] == "new"


def test_a_window_holding_the_previous_sound_does_not_update_the_next_sounds_alert():
    # sirens at 2 s and 5.5 s: the alert stage announces the second while the window that ends
    # 0.5 s into it (1.9-6.0 s) still holds the first, already updated, sound
    occ = Occurrences(hold_off=2.0)
    siren = {"label": "Siren", "class_id": 396}
    assert occ.observe(dict(siren, start_sec=2.0, end_sec=2.5), "alert")[0] == "new"
    first = occ.observe(dict(siren, start_sec=2.0, end_sec=2.5), "separation")
    assert first[0] == "update"
    assert occ.observe(dict(siren, start_sec=5.5, end_sec=6.0), "alert")[0] == "new"
    kind, rec = occ.observe(dict(siren, start_sec=1.994, end_sec=3.004), "separation")  # the first siren again
    assert kind == "merged" and rec is first[1]
    kind, rec = occ.observe(dict(siren, start_sec=5.49, end_sec=6.0), "separation")  # the second's own update
    assert kind == "update" and rec["start_sec"] == 5.49


def test_same_class_within_the_hold_off_is_one_occurrence():
    occ = Occurrences(hold_off=2.0)
    ev = {"label": "Siren", "class_id": 396}
    assert occ.add(dict(ev, start_sec=3.0, end_sec=4.0))
    assert not occ.add(dict(ev, start_sec=3.5, end_sec=6.0))  # overlapping window
    assert not occ.add(dict(ev, start_sec=7.5, end_sec=8.0))  # gap 1.5 s < hold-off
    assert occ.add(dict(ev, start_sec=10.5, end_sec=11.0))  # gap 2.5 s: a new sound
    assert occ.add({"label": "Dog", "class_id": 74, "start_sec": 10.6, "end_sec": 11.0})  # another class


def _alert(label, cid, start, eid, angle=None):
    ev = {"label": label, "class_id": cid, "category": "danger", "start_sec": start, "end_sec": start + 1,
          "event_id": eid, "top5": [{"label": "Fire alarm", "class_id": 400, "prob": 0.05}]}
    return ev if angle is None else dict(ev, angle=angle)


def test_an_update_is_resent_only_when_it_changes_what_the_backend_shows():
    """Label, category, or direction by more than ``resend_angle_deg``."""
    occ = Occurrences(hold_off=2.0)
    cases = [  # (alert, the separation's detection, resent?)
        (_alert("Siren", 396, 1.0, "a1"), _alert("Siren", 396, 0.98, "s1"), False),
        (_alert("Siren", 396, 9.0, "a2"), _alert("Fire alarm", 400, 9.1, "s2"), True),
        (_alert("Siren", 396, 20.0, "a3", 350), _alert("Siren", 396, 20.0, "s3", 10), False),  # 20° apart
        (_alert("Siren", 396, 30.0, "a4", 350), _alert("Siren", 396, 30.0, "s4", 90), True),  # 100° apart
    ]
    for alert, sep, resent in cases:
        assert occ.observe(alert, "alert")[0] == "new"
        kind, rec = occ.observe(sep, "separation")
        assert kind == "update" and rec["revision"] == 1
        assert apply_update(sep, rec, resend_angle_deg=30.0) is resent, (alert, sep)
        assert sep["event_id"] == sep["update_of"] == alert["event_id"]
        # what the backend was last sent: the update's label, and its angle when it was resent
        assert rec["event"]["label"] == sep["label"]
        assert rec["event"].get("angle") == (sep.get("angle") if resent else alert.get("angle"))


def test_an_unconfirmed_alert_is_retracted_by_the_window_that_held_its_excerpt():
    occ = Occurrences(hold_off=2.0)
    alert = dict(_alert("Siren", 396, 3.0, "a1"), window_start_sec=2.5, window_end_sec=3.5, latency_sec=0.5)
    occ.observe(alert, "alert")
    assert occ.unconfirmed(3.0, 7.0) == []  # the excerpt began before this window
    (held,) = occ.unconfirmed(2.0, 6.096)
    window = Analysis(start=2 * SR, audio=np.zeros((1, int(4.096 * SR)), np.float32), reason="level", queued_at=0.0)
    ev = retraction(held, window)
    assert ev["retracted"] is True and ev["event_id"] == ev["update_of"] == "a1" and ev["revision"] == 1
    assert ev["retracted_by_window"] == [2.0, 6.096] and "latency_sec" not in ev
    assert occ.unconfirmed(2.0, 6.096) == []  # retracted once
    # the alert stage's later excerpts of it are taken in silence; a separation detection is new
    assert occ.observe(dict(alert, start_sec=3.5, end_sec=4.0), "alert")[0] == "merged"
    assert occ.observe(dict(alert, start_sec=3.5, end_sec=4.0), "separation")[0] == "new"
