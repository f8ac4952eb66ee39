"""astsep.live.listener: real shared clips through a listener with a tiny AST forced to answer
*Siren* (so the inserted siren is an alert). Most tests step a listener that was never started on a
:class:`ManualClock` (:class:`live_streams.Stepper`): time moves with the audio fed, analyses take the
time the test gives them, and the results are exact on any machine, however loaded. The threaded
tests assert nothing about time."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from astsep.capture import ArraySource
from astsep.config import LiveConfig
from astsep.live import LiveListener, ManualClock, active_runs, listen
from astsep.pipeline import Pipeline
from live_streams import SIREN_AT, SR, Stepper, forced_pipe, siren_pipe, siren_stream  # noqa: F401 - siren_pipe: a fixture


@pytest.fixture(scope="module")
def speech_pipe() -> Pipeline:
    """Separation that names every source *Speech* (category other: never an alert)."""
    return forced_pipe(0, "speech tiny AST")


def stepped(pipe, cfg: LiveConfig | None = None, **kwargs) -> tuple[LiveListener, list[dict]]:
    got: list[dict] = []
    lst = LiveListener(pipe, cfg, on_event=got.append, clock=ManualClock(), **kwargs)
    return lst, got


class Spending:
    """A pipeline (or guide) stand-in whose every call spends ``seconds`` of the stepped stream
    before the real one runs: capture goes on meanwhile, as on a busy device."""

    def __init__(self, real, seconds: float, stepper_box: list):
        self.real, self.seconds, self.box = real, seconds, stepper_box

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, *args, **kwargs):
        self.box[0].spend(self.seconds)
        return self.real(*args, **kwargs)

    def run(self, *args, **kwargs):
        self.box[0].spend(self.seconds)
        return self.real.run(*args, **kwargs)

    def classify(self, *args, **kwargs):  # the alert stage's one call per excerpt
        self.box[0].spend(self.seconds)
        return self.real.classify(*args, **kwargs)


def test_a_siren_gives_one_occurrence_its_alert_at_a_known_latency_then_the_update(siren_pipe, shared):
    lst, events = stepped(siren_pipe, LiveConfig())
    Stepper(lst, siren_stream()).run()
    # one occurrence: the alert stage's event, then the separation stage's update of it (in that order)
    assert [(e["stage"], e["revision"]) for e in events] == [("alert", 0), ("separation", 1)], events
    alert, update = events
    assert alert["provisional"] is True and "update_of" not in alert and alert["kind"] == "mixture"
    assert update["provisional"] is False and update["kind"] == "source"
    assert update["event_id"] == update["update_of"] == alert["event_id"]  # the original id
    for ev in events:
        assert abs(ev["start_sec"] - SIREN_AT) <= 0.5, ev
        assert ev["label"] == "Siren" and ev["category"] == "danger" and ev["trigger"] == "level"
        assert ev["occurred_at_source"] == "capture_clock"
        assert ev["angle_source"] == "none" and "angle" not in ev  # one channel, no --angle
    # the onset at 3.0 s arrives in the block ending at 48128; the excerpt is due 0.5 s later, on the
    # 0.1 s grid (56000), i.e. with the block ending at 56320: analyses take no time here
    assert alert["start_sec"] == 3.0 and alert["latency_sec"] == round((56320 - 48128) / SR, 3)
    assert alert["occurred_at"] == "2026-01-01T00:00:03.000Z"  # the clock's start + the stream's 3.0 s
    # the update comes from the first window after the onset (post_trigger_sec 0.5 s), due with the
    # same block: emitted at the same moment, after the alert, for a span that starts no later
    assert update["start_sec"] <= alert["start_sec"] and update["latency_sec"] >= alert["latency_sec"]
    assert lst.stats.events == 1 and lst.stats.updates == 1 and lst.stats.windows_dropped == 0


def test_without_the_alert_stage_the_separation_stage_gives_the_one_event(siren_pipe, shared):
    lst, got = stepped(siren_pipe, LiveConfig(alert_stage=False))
    stats = Stepper(lst, siren_stream()).run()
    assert len(got) == 1 and got[0]["stage"] == "separation" and got[0]["revision"] == 0, got
    assert got[0]["provisional"] is False and abs(got[0]["start_sec"] - SIREN_AT) <= 0.5
    assert stats.alert_windows_queued == 0 and stats.events == 1 and stats.updates == 0


class Commits:
    """A stand-in for the outbox sink: what the listener commits for the backend."""

    def __init__(self):
        self.events: list[dict] = []

    def commit(self, ev: dict) -> None:
        self.events.append(ev)

    def start(self):
        return self

    def close(self) -> dict:
        return {}


@pytest.mark.parametrize("retract", [True, False])
def test_an_alert_the_separation_does_not_confirm_is_retracted_on_the_device_not_resent(
        siren_pipe, speech_pipe, shared, retract):
    """The alert stage hears *Siren*; the separation of the window holding that excerpt finds only
    *Speech* (category other). The alert is retracted: same ``event_id``, ``update_of``, revision 1,
    ``retracted: true``, to the callback only (the backend got the alert, and its body cannot
    withdraw one). With ``retract_unconfirmed=False`` (``--no-retract``) the alert stands alone."""
    lst, got = stepped(speech_pipe, LiveConfig(retract_unconfirmed=retract))
    lst.alert_stage.pipe = siren_pipe  # the alert stage's forward says Siren
    lst.sink = commits = Commits()
    stats = Stepper(lst, siren_stream()).run()
    alert = got[0]
    assert alert["stage"] == "alert" and alert["label"] == "Siren" and abs(alert["start_sec"] - SIREN_AT) <= 0.5
    assert [e["event_id"] for e in commits.events] == [alert["event_id"]]  # the backend got the alert only
    if not retract:
        assert len(got) == 1 and stats.retractions == 0, got
        return
    assert len(got) == 2 and stats.retractions == 1 and stats.updates == 0, got
    r = got[1]
    assert r["retracted"] is True and r["provisional"] is False and r["stage"] == "separation"
    assert r["event_id"] == r["update_of"] == alert["event_id"] and r["revision"] == 1
    assert (r["label"], r["start_sec"]) == (alert["label"], alert["start_sec"])
    w0, w1 = r["retracted_by_window"]
    assert w0 <= alert["window_start_sec"] and alert["window_end_sec"] <= w1  # it held the whole excerpt


def test_an_update_that_changes_the_label_is_committed_under_its_own_key(siren_pipe, shared):
    lst, got = stepped(siren_pipe, LiveConfig())
    # the excerpt says Fire alarm (danger), Siren second: the separation's Siren is its update
    lst.alert_stage.pipe = forced_pipe(400, "fire alarm tiny AST", runner_up=396)
    lst.sink = commits = Commits()
    Stepper(lst, siren_stream()).run()
    alert, update = got[0], got[1]
    assert (alert["label"], update["label"], update["update_of"]) == ("Fire alarm", "Siren", alert["event_id"])
    assert [e["event_id"] for e in commits.events] == [alert["event_id"], f"{alert['event_id']}.r1"]
    assert lst.stats.updates_sent == 1


def test_two_sirens_further_apart_than_the_hold_off_are_two_events(siren_pipe, shared):
    lst, got = stepped(siren_pipe, LiveConfig(hold_off_sec=2.0), angle=30)
    stats = Stepper(lst, siren_stream(12.0, sirens=(2.0, 8.0), siren_sec=1.5)).run()
    assert [(round(e["start_sec"]), e["revision"]) for e in got] == [(2, 0), (2, 1), (8, 0), (8, 1)], got
    assert len({e["event_id"] for e in got}) == 2
    assert all(e["angle"] == 30 and e["angle_source"] == "option" for e in got)
    assert stats.events == 2 and stats.windows_dropped == 0


def test_activity_runs_split_at_gaps_longer_than_the_hold_off():
    x = np.zeros(5 * SR, np.float32)
    x[SR:2 * SR] = 0.5
    x[int(2.5 * SR):3 * SR] = 0.5  # 0.5 s gap: joined
    x[4 * SR:int(4.5 * SR)] = 0.5  # 1 s gap: a run of its own
    assert active_runs(x, -30.0, -80.0, join_gap_sec=0.75) == [(1.0, 3.0), (4.0, 4.5)]


def test_two_sirens_in_one_window_further_apart_than_the_hold_off_are_two_events(siren_pipe, shared):
    # the window of the second holds the first; the rain is 45 dB under the sirens, so that no rain
    # frame is within the separator's 30 dB activity threshold of them and bridges the gap
    lst, got = stepped(siren_pipe, LiveConfig(hold_off_sec=1.0))
    stats = Stepper(lst, siren_stream(9.0, sirens=(2.0, 4.5), siren_sec=1.0, rain_dbfs=-65.0)).run()
    assert sorted(round(e["start_sec"], 1) for e in got if e["revision"] == 0) == [2.0, 4.5], got
    assert len({e["event_id"] for e in got}) == 2
    assert stats.windows_dropped == 0


def test_a_slow_separation_drops_the_oldest_waiting_window_and_counts_it(siren_pipe, shared, caplog):
    box: list = []
    lst, _ = stepped(Spending(siren_pipe, 1.0, box), LiveConfig(trigger="hop", hop_sec=0.2, align_sec=0.1,
                                                                alert_stage=False))
    box.append(Stepper(lst, siren_stream(6.0)))
    stats = box[0].run()
    # a window every 0.2 s (30 in 6 s), each analysis 1 s: analyses start at 0.2, 1.2, ... 5.2 s, and the
    # window due at 6.0 s is analysed when the stream ends; of the others, the newer replaced the older
    assert stats.windows_queued == 30 and stats.windows_analysed == 7, stats
    assert stats.windows_queued == stats.windows_analysed + stats.windows_dropped
    assert "analysis is behind: dropped" in caplog.text


def test_a_window_behind_runs_fewer_passes_instead_of_a_window_being_dropped(siren_pipe, shared):
    """Hop trigger every 1 s, every AST forward 0.45 s: a window of 3 passes (≥ 1.35 s) cannot keep
    up. With the pass cut (default) a window stops after the pass in progress once the next one
    waits: none is dropped, the siren is still reported. With ``cut_passes_when_behind=False``
    (``--all-passes``) every window runs all its passes and windows are dropped."""
    x = siren_stream(7.0, sirens=(1.0,), siren_sec=5.0)
    runs = {}
    for cut in (True, False):
        box: list = []
        slow = Pipeline(siren_pipe.cfg, Spending(siren_pipe.guide, 0.45, box))
        lcfg = LiveConfig(trigger="hop", hop_sec=1.0, align_sec=0.1, alert_stage=False, cut_passes_when_behind=cut)
        lst, got = stepped(slow, lcfg)
        box.append(Stepper(lst, x))
        runs[cut] = (box[0].run(), got)
    cut_stats, cut_events = runs[True]
    full_stats, _ = runs[False]
    assert cut_stats.windows_dropped == 0 and cut_stats.windows_cut >= 2, cut_stats
    assert cut_stats.passes_run < 3 * cut_stats.windows_analysed
    assert any(e["label"] == "Siren" for e in cut_events)
    assert full_stats.windows_dropped >= 1 and full_stats.windows_cut == 0, full_stats
    assert full_stats.passes_run > cut_stats.passes_run / cut_stats.windows_analysed * full_stats.windows_analysed


def test_a_windows_first_sound_is_reported_when_its_first_pass_ends(siren_pipe, shared):
    """Every AST forward takes 0.45 s of the stream. With ``report_each_pass`` (default) the siren's
    separation event is recorded as soon as pass 1 ends: one forward after its window was taken.
    Without it, after the window's last pass and its residual's forward too."""
    latency, forwards = {}, {}
    for each in (True, False):
        box: list = []
        slow = Pipeline(siren_pipe.cfg, Spending(siren_pipe.guide, 0.45, box))
        lst, got = stepped(slow, LiveConfig(alert_stage=False, report_each_pass=each))
        box.append(Stepper(lst, siren_stream()))
        stats = box[0].run()
        first = [e for e in got if e["stage"] == "separation" and e["revision"] == 0]
        assert len(first) == 1 and first[0]["label"] == "Siren", got
        latency[each], forwards[each] = first[0]["latency_sec"], stats.passes_run / stats.windows_analysed
    assert forwards[True] == forwards[False] >= 2  # the same work (passes; then the residual's forward)
    # the first window is due 0.5 s after the onset's block (56320 - 48128 samples, as above); its
    # pass 1 takes one forward, 0.45 s of stream
    assert latency[True] == round((56320 - 48128) / SR + 0.45, 3), latency
    assert latency[False] >= latency[True] + 0.45 * (forwards[False] - 1) - 0.04, latency


def test_a_slow_alert_stage_never_holds_up_separation_and_its_drops_are_counted(siren_pipe, shared):
    box: list = []
    lst, _ = stepped(siren_pipe, LiveConfig(trigger="hop", hop_sec=1.0, alert_hop_sec=0.1, queue_size=16))
    alert_pipe = forced_pipe(396, "siren tiny AST")
    alert_pipe.guide = Spending(alert_pipe.guide, 0.5, box)  # each excerpt's forward: 0.5 s
    lst.alert_stage.pipe = alert_pipe
    box.append(Stepper(lst, siren_stream(4.0, sirens=(1.0,))))
    stats = box[0].run()
    assert stats.alert_windows_dropped > 10 and stats.windows_dropped == 0, stats
    # the alert stage follows the level with the hop trigger too: excerpts only while the siren
    # (1-3 s) is loud, at most one per 0.1 s then (the separation stage took every 1 s window)
    assert stats.alert_windows_queued <= 2.5 / 0.1, stats.alert_windows_queued
    assert stats.alert_windows_queued == stats.alert_windows_analysed + stats.alert_windows_dropped
    assert stats.windows_analysed == stats.windows_queued >= 3


def test_recordings_stay_under_the_size_cap(siren_pipe, shared, tmp_path):
    cfg = LiveConfig(trigger="hop", hop_sec=1.0, record_dir=str(tmp_path / "rec"),
                     record_max_mb=2.0)  # a window + its sources (4 s float32 each) ≈ 0.8 MB: about 2 kept
    lst, _ = stepped(siren_pipe, cfg)
    stats = Stepper(lst, siren_stream(10.0)).run()
    folders = sorted((tmp_path / "rec").iterdir())
    assert stats.recordings >= 5 and 1 <= len(folders) < stats.recordings
    size = sum(p.stat().st_size for d in folders for p in d.iterdir())
    assert size <= 2.0e6
    assert all((d / "window.wav").is_file() and (d / "events.json").is_file() for d in folders)
    assert any(p.name.endswith("_Siren.wav") for d in folders for p in d.iterdir())


# --- threads: what start() wires, nothing about time ----------------------------------------------
def test_the_constructor_starts_no_thread_run_does(siren_pipe, shared):
    before = {t.name for t in threading.enumerate()}
    lst = LiveListener(siren_pipe, LiveConfig())
    assert {t.name for t in threading.enumerate()} == before and not lst._workers
    stats = lst.run(ArraySource(siren_stream(5.0, sirens=(1.0,)), realtime=False))
    assert stats.alert_windows_analysed >= 1 and stats.windows_analysed >= 1
    assert not any(w.is_alive() for w in lst._workers)


def test_the_threaded_api_gives_one_occurrence_alert_first(siren_pipe, shared):
    cfg = LiveConfig(queue_size=8, alert_queue_size=8)
    events = list(listen(ArraySource(siren_stream(), realtime=False), siren_pipe, cfg))
    assert events and events[0]["revision"] == 0 and len({e["event_id"] for e in events}) == 1, events
    assert all(e["label"] == "Siren" and abs(e["start_sec"] - SIREN_AT) <= 0.5 for e in events)


class Blocking:
    """A pipeline whose analyses wait until ``release`` is set."""

    def __init__(self, pipe: Pipeline):
        self.pipe, self.guide, self.cfg = pipe, pipe.guide, pipe.cfg
        self.release = threading.Event()

    def run(self, x, name, **kwargs):
        self.release.wait()
        return self.pipe.run(x, name, **kwargs)


def test_capture_never_waits_for_a_stuck_analysis(siren_pipe, shared, caplog):
    caplog.set_level(logging.WARNING)
    pipe = Blocking(siren_pipe)
    lst = LiveListener(pipe, LiveConfig(trigger="hop", hop_sec=0.2, align_sec=0.1, alert_stage=False)).start()
    x = siren_stream(6.0)
    fed = threading.Thread(target=lambda: [lst.feed(x[i:i + 512]) for i in range(0, x.size, 512)])
    fed.start()
    fed.join(120)  # the analysis is stuck until released: feeding must still finish
    finished = not fed.is_alive()
    pipe.release.set()
    stats = lst.close()
    assert finished
    assert stats.windows_dropped > 5 and stats.windows_queued == stats.windows_analysed + stats.windows_dropped
    assert "analysis is behind: dropped" in caplog.text


class Broken(Blocking):
    def run(self, x, name, **kwargs):
        raise RuntimeError("analysis exploded")


def test_a_failing_analysis_is_reported_and_never_hangs_capture_or_close(siren_pipe, shared):
    lst = LiveListener(Broken(siren_pipe), LiveConfig(trigger="hop", hop_sec=0.2, align_sec=0.1))
    with pytest.raises(RuntimeError, match="analysis exploded"):
        lst.run(ArraySource(siren_stream(3.0, sirens=(1.0,), siren_sec=1.0), realtime=False))
