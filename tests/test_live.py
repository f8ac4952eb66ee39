"""Live mode (issue 11): real shared clips streamed at real-time pace, through stdin into
``python infer.py --live -`` and through the Python API, with a tiny AST forced to answer *Siren*
so the inserted siren is an alert; delivery to a real HTTP server on 127.0.0.1.

Two stages: the fast alert stage announces a sound first (``stage: alert``, provisional), the
separation stage then updates that event (same ``event_id``, ``update_of``, ``revision: 1``): one
occurrence is an alert plus its update, never two unrelated events."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from astsep.capture import ArraySource, StreamSource, parse_raw_format, read_wav_header
from astsep.config import AstsepConfig, LiveConfig
from astsep.errors import AudioError, ConfigError
from astsep.guide import ASTGuide
from astsep.live import Analysis, LiveListener, Occurrences, RingBuffer, active_runs, listen
from astsep.pipeline import Pipeline
from astsep.testing import force_class, tiny_ast
from conftest import ROOT, clip

SR = 16000
SIREN_AT = 3.0  # seconds into the stream


def _level(x: np.ndarray, dbfs: float) -> np.ndarray:
    return (x * 10 ** (dbfs / 20) / np.sqrt(np.mean(x.astype(np.float64) ** 2))).astype(np.float32)


def siren_stream(seconds: float = 8.0, sirens: tuple[float, ...] = (SIREN_AT,), siren_sec: float = 2.0,
                 rain_dbfs: float = -55.0) -> np.ndarray:
    """Quiet rain (-55 dBFS, under the -40 dBFS trigger) with the shared siren clip at -20 dBFS
    inserted at each time in ``sirens``. Onsets: the siren clip starts loud (checked below)."""
    n = int(seconds * SR)
    rain = clip("rain").numpy()
    x = _level(np.tile(rain, n // rain.size + 1)[:n], rain_dbfs)
    siren = clip("siren").numpy()
    seg = _level(siren[: int(siren_sec * SR)], -20.0)
    assert 10 * np.log10(np.mean(seg[:800] ** 2)) > -40, "the siren clip must start at once"
    for t in sirens:
        x[int(t * SR):int(t * SR) + seg.size] += seg
    return x


@pytest.fixture(scope="module")
def siren_pipe() -> Pipeline:
    m = tiny_ast(seed=1)
    force_class(m, 396)  # every source is "Siren" (danger): the level trigger decides what is analysed
    cfg = AstsepConfig()
    return Pipeline(cfg, ASTGuide.from_model(m, cfg.guide, name="siren tiny AST"))


class Backend:
    """A real HTTP server on 127.0.0.1 that records every POST and answers 201."""

    def __init__(self):
        self.requests: list[tuple[dict, dict]] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                state.requests.append((dict(self.headers), body))
                data = b'{"ok": true}'
                self.send_response(201)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/sound-events/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backend():
    b = Backend()
    yield b
    b.close()


def wav_stream_bytes(x: np.ndarray, channels: int = 1) -> tuple[bytes, bytes]:
    """(header, data) of a 16-bit WAV stream whose header says 0xFFFFFFFF bytes, as arecord writes to a pipe."""
    buf = io.BytesIO()
    sf.write(buf, (np.clip(x, -1, 1) * 32767).astype("<i2"), SR, format="WAV", subtype="PCM_16")
    wav = buf.getvalue()
    head, data = bytearray(wav[:44]), wav[44:]
    head[4:8] = head[40:44] = b"\xff\xff\xff\xff"
    return bytes(head), data


def start_live(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, str(ROOT / "infer.py"), "--live", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)


def feed_realtime(proc: subprocess.Popen, head: bytes, data: bytes, ready: threading.Event,
                  close: bool = True, bytes_per_sec: int = 2 * SR) -> None:
    """Write the header, wait until infer.py listens, then the samples at real-time pace."""
    try:
        proc.stdin.write(head)
        proc.stdin.flush()
        ready.wait(120)
        t0, block = time.monotonic(), 1024
        for i in range(0, len(data), block):
            wait = t0 + (i + block) / bytes_per_sec - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            proc.stdin.write(data[i:i + block])
            proc.stdin.flush()
        if close:
            proc.stdin.close()
    except (BrokenPipeError, ValueError):
        pass


def read_stderr(proc: subprocess.Popen, ready: threading.Event, lines: list[str]) -> None:
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        lines.append(line)
        if "listening to" in line:
            ready.set()
    ready.set()


# --- the buffer, the trigger, merging -----------------------------------------------------------
def test_ring_buffer_holds_the_latest_samples_by_absolute_position():
    rb = RingBuffer(2, 10)
    x = np.arange(25, dtype=np.float32)
    for i in range(0, 25, 7):
        blk = x[i:i + 7]
        rb.write(np.stack([blk, -blk], axis=1))
    assert rb.end == 25
    np.testing.assert_array_equal(rb.read(15, 25), np.stack([x[15:25], -x[15:25]]))
    np.testing.assert_array_equal(rb.read(0, 20)[0], x[15:20])  # older samples are gone: clipped


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


def test_live_config_checks_its_ranges():
    with pytest.raises(ConfigError, match="live.hop_sec"):
        LiveConfig(hop_sec=0)
    with pytest.raises(ConfigError, match="live.trigger must be one of level, hop"):
        LiveConfig(trigger="clap")
    with pytest.raises(ConfigError, match="live.window_sec"):
        LiveConfig(window_sec=20.0)
    with pytest.raises(ConfigError, match="live.alert_post_trigger_sec"):
        LiveConfig(alert_sec=0.5, alert_post_trigger_sec=1.0)
    with pytest.raises(ConfigError, match="live.alert_threshold"):
        LiveConfig(alert_threshold=1.5)


def test_alert_stage_options_reach_the_live_config():
    from astsep.frontends.infer import build_parser
    from astsep.frontends.live import live_config

    cfg = live_config(build_parser().parse_args(["--live", "-", "--alert-hop", "0.5", "--alert-sec", "0.4",
                                                 "--alert-threshold", "0.3"]))
    assert cfg.alert_stage and (cfg.alert_hop_sec, cfg.alert_sec, cfg.alert_threshold) == (0.5, 0.4, 0.3)
    assert cfg.alert_post_trigger_sec == 0.4  # bounded by the excerpt
    assert not live_config(build_parser().parse_args(["--live", "--no-alert-stage"])).alert_stage
    assert LiveConfig().alert_stage  # on by default
    default = live_config(build_parser().parse_args(["--live"]))
    assert default.cut_passes_when_behind and default.retract_unconfirmed  # both on by default
    off = live_config(build_parser().parse_args(["--live", "--all-passes", "--no-retract"]))
    assert not off.cut_passes_when_behind and not off.retract_unconfirmed


# --- sources ----------------------------------------------------------------------------------
def test_wav_stream_with_unknown_length_and_raw_formats_are_read():
    x = np.sin(np.linspace(0, 100, 3000)).astype(np.float32) * 0.5
    head, data = wav_stream_bytes(x)
    src = StreamSource(io.BytesIO(head + data), block_sec=0.01)
    got = np.concatenate(list(src))[:, 0]
    assert (src.sample_rate, src.channels, src.format) == (16000, 1, "s16le")
    np.testing.assert_allclose(got, x, atol=2e-4)  # 16-bit: written ×32767, read ÷32768
    stereo = np.stack([x, -x], axis=1)
    raw = StreamSource(io.BytesIO(stereo.astype("<f4").tobytes()), raw_format="f32le:48000:2")
    assert raw.sample_rate == 48000 and np.allclose(np.concatenate(list(raw)), stereo)
    assert parse_raw_format("s16le:16000:1") == ("s16le", 16000, 1)
    with pytest.raises(ConfigError, match="TYPE:RATE:CHANNELS"):
        parse_raw_format("s24:16000")
    with pytest.raises(AudioError, match="not a WAV stream"):
        read_wav_header(io.BytesIO(b"hello, this is not audio"))


# --- the API -------------------------------------------------------------------------------------
def test_api_siren_at_known_time_gives_one_occurrence_alert_first_then_its_update(siren_pipe, shared):
    x = siren_stream()
    events = list(listen(ArraySource(x, realtime=True), siren_pipe, LiveConfig()))
    # one occurrence: the alert stage's event, then the separation stage's update of it (in that order)
    assert [(e["stage"], e["revision"]) for e in events] == [("alert", 0), ("separation", 1)], events
    alert, update = events
    assert alert["provisional"] is True and "update_of" not in alert and alert["kind"] == "mixture"
    assert update["provisional"] is False and update["kind"] == "source"
    assert update["event_id"] == update["update_of"] == alert["event_id"]  # the original id
    for ev in events:
        assert abs(ev["start_sec"] - SIREN_AT) <= 0.5, ev
        assert ev["label"] == "Siren" and ev["category"] == "danger" and ev["trigger"] == "level"
        assert ev["occurred_at_source"] == "capture_clock" and ev["occurred_at"].endswith("Z")
        assert ev["angle_source"] == "none" and "angle" not in ev  # one channel, no --angle
    # the alert comes 0.5 s after the onset plus one forward of a short excerpt; the update later
    assert 0 < alert["latency_sec"] < 2.0, alert
    assert alert["latency_sec"] < update["latency_sec"] + (update["start_sec"] - alert["start_sec"])


def test_without_the_alert_stage_the_separation_stage_gives_the_one_event(siren_pipe, shared):
    x = siren_stream()
    lst = LiveListener(siren_pipe, LiveConfig(alert_stage=False))
    got: list[dict] = []
    lst.on_event = got.append
    stats = lst.run(ArraySource(x, realtime=True))
    assert len(got) == 1 and got[0]["stage"] == "separation" and got[0]["revision"] == 0, got
    assert got[0]["provisional"] is False and abs(got[0]["start_sec"] - SIREN_AT) <= 0.5
    assert stats.alert_windows_queued == 0 and stats.events == 1 and stats.updates == 0


class Puts:
    """A stand-in for the delivery thread: what the listener hands to the outbox."""

    def __init__(self):
        self.events: list[dict] = []

    def put(self, ev: dict) -> None:
        self.events.append(ev)


class ClosingPuts(Puts):
    def close(self) -> dict:
        return {}


@pytest.fixture(scope="module")
def speech_pipe() -> Pipeline:
    """Separation that names every source *Speech* (category other: never an alert)."""
    m = tiny_ast(seed=1)
    force_class(m, 0)
    cfg = AstsepConfig()
    return Pipeline(cfg, ASTGuide.from_model(m, cfg.guide, name="speech tiny AST"))


@pytest.mark.parametrize("retract", [True, False])
def test_an_alert_the_separation_does_not_confirm_is_retracted_on_the_device_not_resent(
        siren_pipe, speech_pipe, shared, retract):
    """The alert stage hears *Siren*; the separation of the window holding that excerpt finds only
    *Speech* (category other). The alert is retracted: same ``event_id``, ``update_of``, revision 1,
    ``retracted: true``, to the callback only (the backend got the alert, and its body cannot
    withdraw one). With ``retract_unconfirmed=False`` (``--no-retract``) the alert stands alone."""
    pipe = SlowPipe(speech_pipe, 0.0)
    pipe.guide = siren_pipe.guide  # the alert stage's forward says Siren
    got: list[dict] = []
    lst = LiveListener(pipe, LiveConfig(retract_unconfirmed=retract), on_event=got.append)
    lst.delivery = puts = ClosingPuts()
    stats = lst.run(ArraySource(siren_stream(), realtime=True))
    alert = got[0]
    assert alert["stage"] == "alert" and alert["label"] == "Siren" and abs(alert["start_sec"] - SIREN_AT) <= 0.5
    assert [e["event_id"] for e in puts.events] == [alert["event_id"]]  # the backend got the alert only
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


def test_an_update_goes_to_the_backend_only_when_it_changes_what_the_backend_shows(siren_pipe):
    """Label, category, or direction by more than ``resend_angle_deg``."""
    lst = LiveListener(siren_pipe, LiveConfig())
    lst.close()  # no threads needed: the occurrence bookkeeping only
    lst.delivery = puts = Puts()
    item = Analysis(0, np.zeros((1, SR), np.float32), "level", time.monotonic())
    top = [{"label": "Siren", "class_id": 396, "prob": 0.9}, {"label": "Fire alarm", "class_id": 400, "prob": 0.05}]

    def ev(label, cid, start, eid, kind="source"):
        return {"label": label, "class_id": cid, "category": "danger", "start_sec": start, "end_sec": start + 1,
                "event_id": eid, "top5": top, "kind": kind}

    a = lst._record(ev("Siren", 396, 1.0, "a1", "mixture"), "alert", item, {"start_sec": 0, "end_sec": 1})
    u = lst._record(ev("Siren", 396, 0.98, "s1"), "separation", item, {"start_sec": 0, "end_sec": 1})
    assert (a["revision"], u["revision"], u["event_id"], u["update_of"]) == (0, 1, "a1", "a1")
    assert [e["event_id"] for e in puts.events] == ["a1"]  # same label and category: the backend has it
    b = lst._record(ev("Siren", 396, 9.0, "a2", "mixture"), "alert", item, {"start_sec": 0, "end_sec": 1})
    v = lst._record(ev("Fire alarm", 400, 9.1, "s2"), "separation", item, {"start_sec": 0, "end_sec": 1})
    assert v["event_id"] == v["update_of"] == b["event_id"] == "a2" and v["label"] == "Fire alarm"
    # the label changed: the update is delivered under its own idempotency key, <event_id>.r<revision>
    assert [e["event_id"] for e in puts.events] == ["a1", "a2", "a2.r1"]
    assert puts.events[-1]["label"] == "Fire alarm" and puts.events[-1]["update_of"] == "a2"
    assert (lst.stats.events, lst.stats.alert_events, lst.stats.updates, lst.stats.updates_sent) == (2, 2, 2, 1)
    # the direction: the alert's is the excerpt's, the update's its separated source's; a move of more
    # than resend_angle_deg (30) is resent, a smaller one is not (angles from the listener's option here)
    for start, eid, alert_angle, update_angle, sent in ((20.0, "a3", 350, 10, False), (30.0, "a4", 350, 90, True)):
        lst.angle = alert_angle
        lst._record(ev("Siren", 396, start, eid, "mixture"), "alert", item, {"start_sec": 0, "end_sec": 1})
        lst.angle = update_angle
        w = lst._record(ev("Siren", 396, start, "s"), "separation", item, {"start_sec": 0, "end_sec": 1})
        assert w["update_of"] == eid and w["angle"] == update_angle
        assert (puts.events[-1]["event_id"] == f"{eid}.r1") is sent, puts.events[-1]
    assert puts.events[-1]["angle"] == 90 and lst.stats.updates_sent == 2


def test_two_sirens_further_apart_than_the_hold_off_are_two_events(siren_pipe, shared):
    x = siren_stream(12.0, sirens=(2.0, 8.0), siren_sec=1.5)
    lst = LiveListener(siren_pipe, LiveConfig(hold_off_sec=2.0, queue_size=8), angle=30)
    got: list[dict] = []
    lst.on_event = got.append
    stats = lst.run(ArraySource(x, realtime=False))
    # fed faster than real time, either stage may announce a siren first; each is one occurrence
    assert sorted(round(e["start_sec"]) for e in got if e["revision"] == 0) == [2, 8], got
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
    x = siren_stream(9.0, sirens=(2.0, 4.5), siren_sec=1.0, rain_dbfs=-65.0)
    got: list[dict] = []
    stats = LiveListener(siren_pipe, LiveConfig(hold_off_sec=1.0, queue_size=8, alert_queue_size=8),
                         on_event=got.append).run(ArraySource(x, realtime=False))
    assert sorted(round(e["start_sec"], 1) for e in got if e["revision"] == 0) == [2.0, 4.5], got
    assert len({e["event_id"] for e in got}) == 2
    assert stats.windows_dropped == 0


class SlowPipe:
    """A pipeline stand-in whose analysis takes ``delay`` seconds (a busy device)."""

    def __init__(self, pipe: Pipeline, delay: float):
        self.pipe, self.delay, self.guide, self.cfg = pipe, delay, pipe.guide, pipe.cfg

    def run(self, x, name, **kwargs):
        time.sleep(self.delay)
        return self.pipe.run(x, name, **kwargs)


def test_slow_analysis_never_blocks_capture_and_dropped_windows_are_counted(siren_pipe, shared, caplog):
    x = siren_stream(6.0)
    lst = LiveListener(SlowPipe(siren_pipe, 1.0), LiveConfig(trigger="hop", hop_sec=0.2, align_sec=0.1))
    feed_times = []
    for i in range(0, x.size, 512):
        t0 = time.perf_counter()
        lst.feed(x[i:i + 512])
        feed_times.append(time.perf_counter() - t0)
    stats = lst.close()
    assert max(feed_times) < 0.2, max(feed_times)  # a window is queued, never waited for
    assert stats.windows_dropped > 5
    assert stats.windows_queued == stats.windows_analysed + stats.windows_dropped
    assert "analysis is behind: dropped" in caplog.text


class SlowGuide:
    """A guide whose AST forwards take longer, cached or not (a slow device, the same for every run):
    ``delay`` seconds more per call (the separation's: one per pass, one per residual),
    ``alert_delay`` per ``forward_features`` (the alert stage's excerpts)."""

    def __init__(self, guide, delay: float = 0.0, alert_delay: float = 0.0):
        self.guide, self.delay, self.alert_delay = guide, delay, alert_delay

    def __getattr__(self, name):
        return getattr(self.guide, name)

    def __call__(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.guide(*args, **kwargs)

    def forward_features(self, *args, **kwargs):
        time.sleep(self.alert_delay)
        return self.guide.forward_features(*args, **kwargs)


def test_a_window_behind_runs_fewer_passes_instead_of_a_window_being_dropped(siren_pipe, shared):
    """Real-time stream, hop trigger every 1 s, every forward 0.45 s slower: a window of 3 passes
    (≥ 1.35 s) cannot keep up. With the pass cut (default) a window stops after the pass
    in progress once the next one waits: none is dropped, the siren is still reported. With
    ``cut_passes_when_behind=False`` (``--all-passes``) every window runs all its passes and windows
    are dropped."""
    from astsep.capture import ArraySource

    slow = Pipeline(siren_pipe.cfg, SlowGuide(siren_pipe.guide, 0.45))
    x = siren_stream(7.0, sirens=(1.0,), siren_sec=5.0)
    runs = {}
    for cut in (True, False):
        got = []
        lcfg = LiveConfig(trigger="hop", hop_sec=1.0, align_sec=0.1, alert_stage=False, cut_passes_when_behind=cut)
        lst = LiveListener(slow, lcfg, on_event=got.append)
        runs[cut] = (lst.run(ArraySource(x, block_sec=0.032, realtime=True)), got)
    cut_stats, cut_events = runs[True]
    full_stats, _ = runs[False]
    assert cut_stats.windows_dropped == 0 and cut_stats.windows_cut >= 2, cut_stats
    assert cut_stats.passes_run < 3 * cut_stats.windows_analysed
    assert any(e["label"] == "Siren" for e in cut_events)
    assert full_stats.windows_dropped >= 1 and full_stats.windows_cut == 0, full_stats
    assert full_stats.passes_run > cut_stats.passes_run / cut_stats.windows_analysed * full_stats.windows_analysed


def test_a_slow_alert_stage_never_blocks_capture_or_separation_and_its_drops_are_counted(siren_pipe, shared):
    pipe = SlowPipe(siren_pipe, 0.0)
    pipe.guide = SlowGuide(siren_pipe.guide, alert_delay=0.5)  # the separation keeps the real guide (pipe.pipe)
    lst = LiveListener(pipe, LiveConfig(trigger="hop", hop_sec=1.0, alert_hop_sec=0.1, queue_size=16))
    feed_times = []
    x = siren_stream(4.0, sirens=(1.0,))
    for i in range(0, x.size, 512):
        t0 = time.perf_counter()
        lst.feed(x[i:i + 512])
        feed_times.append(time.perf_counter() - t0)
    stats = lst.close()
    assert max(feed_times) < 0.2, max(feed_times)
    assert stats.alert_windows_dropped > 10 and stats.windows_dropped == 0
    # the alert stage follows the level with the hop trigger too: excerpts only while the siren
    # (1-3 s) is loud, at most one per 0.1 s then (the separation stage took every 1 s window)
    assert stats.alert_windows_queued <= 2.5 / 0.1, stats.alert_windows_queued
    assert stats.alert_windows_queued == stats.alert_windows_analysed + stats.alert_windows_dropped
    assert stats.windows_analysed == stats.windows_queued >= 3


class BrokenPipe(SlowPipe):
    def run(self, x, name, **kwargs):
        raise RuntimeError("analysis exploded")


def test_a_failing_analysis_is_reported_and_never_hangs_capture_or_close(siren_pipe, shared):
    lst = LiveListener(BrokenPipe(siren_pipe, 0.0), LiveConfig(trigger="hop", hop_sec=0.2, align_sec=0.1))
    with pytest.raises(RuntimeError, match="analysis exploded"):
        lst.run(ArraySource(siren_stream(3.0, sirens=(1.0,), siren_sec=1.0), realtime=False))


def test_recordings_stay_under_the_size_cap(siren_pipe, shared, tmp_path):
    x = siren_stream(10.0)
    cfg = LiveConfig(trigger="hop", hop_sec=1.0, queue_size=16, record_dir=str(tmp_path / "rec"),
                     record_max_mb=2.0)  # a window + its sources (4 s float32 each) ≈ 0.8 MB: about 2 kept
    stats = LiveListener(siren_pipe, cfg).run(ArraySource(x, realtime=False))
    folders = sorted((tmp_path / "rec").iterdir())
    assert stats.recordings >= 5 and 1 <= len(folders) < stats.recordings
    size = sum(p.stat().st_size for d in folders for p in d.iterdir())
    assert size <= 2.0e6
    assert all((d / "window.wav").is_file() and (d / "events.json").is_file() for d in folders)
    assert any(p.name.endswith("_Siren.wav") for d in folders for p in d.iterdir())


# --- the command line: stdin at real-time pace, a real backend -----------------------------------
@pytest.mark.slow
def test_stdin_stream_siren_gives_one_event_delivered_once(tmp_path, siren_model_dir, backend, shared):
    head, data = wav_stream_bytes(siren_stream())
    proc = start_live(["-", "-m", str(siren_model_dir), "--backend-url", backend.url,
                       "--outbox", str(tmp_path / "outbox.sqlite3"), "--user-id", "7"])
    ready, err = threading.Event(), []
    threading.Thread(target=read_stderr, args=(proc, ready, err), daemon=True).start()
    feeder = threading.Thread(target=feed_realtime, args=(proc, head, data, ready), daemon=True)
    t0 = time.monotonic()
    feeder.start()
    out = proc.stdout.read().decode()
    assert proc.wait(60) == 0, "".join(err)
    assert time.monotonic() - t0 >= 7.5  # it was fed at real-time pace
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    # one occurrence: the alert, then the separation stage's update carrying its id
    assert [(e["stage"], e["revision"]) for e in events] == [("alert", 0), ("separation", 1)], (events, "".join(err))
    ev = events[0]
    assert events[1]["event_id"] == events[1]["update_of"] == ev["event_id"]
    assert all(abs(e["start_sec"] - SIREN_AT) <= 0.5 and e["label"] == "Siren" for e in events)
    assert ev["latency_sec"] < 2.0, ev
    assert len(backend.requests) == 1  # the update changes nothing the backend's body shows
    headers, body = backend.requests[0]
    assert headers["Idempotency-Key"] == ev["event_id"]
    assert body["sound_type"] == "danger" and body["sound_detail"] == "Siren" and body["user_id"] == 7
    assert body["occurred_at"] == ev["occurred_at"][:19] + "Z"
    assert "1 event(s)" in "".join(err) and "outbox pending 0" in "".join(err)


@pytest.mark.slow
def test_sigterm_stops_capture_flushes_the_outbox_and_exits_zero(tmp_path, siren_model_dir, backend, shared):
    head, data = wav_stream_bytes(siren_stream(6.0, sirens=(1.0,)))
    proc = start_live(["-", "-m", str(siren_model_dir), "--backend-url", backend.url,
                       "--outbox", str(tmp_path / "outbox.sqlite3")])
    ready, err = threading.Event(), []
    threading.Thread(target=read_stderr, args=(proc, ready, err), daemon=True).start()
    # the stream stays open (a microphone never ends): only SIGTERM stops it
    threading.Thread(target=feed_realtime, args=(proc, head, data, ready, False), daemon=True).start()
    line = proc.stdout.readline().decode()  # the siren's event
    assert json.loads(line)["label"] == "Siren"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, "".join(err)
    text = "".join(err)
    assert "(stopped)" in text and "outbox pending 0" in text and "Traceback" not in text
    assert len(backend.requests) == 1


def test_live_refuses_files_and_a_value_other_than_stdin():
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--live", "-i", "a.wav"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "leave out -i/--input" in proc.stderr


def test_sound_card_without_the_live_extra_says_so_in_one_line(tmp_path):
    code = ("import sys, runpy\nsys.modules['sounddevice'] = None\n"
            "sys.argv = ['infer.py', '--live', '-m', 'nowhere']\nrunpy.run_path('infer.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "astsep: error: live capture from a sound card needs the optional dependencies of astsep[live] "
        "(sounddevice is not installed): pip install 'astsep[live]' (and the system library libportaudio2)"]


# --- a real sound card: a PulseAudio null sink's monitor, through PortAudio ------------------------
def _pulse_null_sink(tmp_path: Path) -> tuple[subprocess.Popen | None, str]:
    """Start a private PulseAudio with a null sink; (daemon, reason when impossible)."""
    if not shutil.which("pulseaudio") or not shutil.which("pacat"):
        return None, "pulseaudio is not installed (apt-get install pulseaudio libasound2-plugins)"
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError) as exc:
        return None, f"sounddevice / PortAudio unavailable: {exc}"
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path), PULSE_RUNTIME_PATH=str(tmp_path / "pulse"),
               HOME=str(tmp_path))
    daemon = subprocess.Popen(["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--system=no",
                               "--disallow-exit", "-L", "module-native-protocol-unix",
                               "-L", "module-null-sink sink_name=astsep_test rate=16000 channels=1",
                               "--load=module-always-sink"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    for _ in range(50):
        if subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode == 0:
            return daemon, ""
        if daemon.poll() is not None:
            return None, f"pulseaudio would not start here: {daemon.stderr.read().decode()[-300:]}"
        time.sleep(0.1)
    daemon.kill()
    return None, "pulseaudio did not answer within 5 s"


@pytest.mark.slow
def test_sound_card_path_through_a_pulseaudio_null_sink(tmp_path, siren_model_dir, shared):
    daemon, reason = _pulse_null_sink(tmp_path)
    if daemon is None:
        pytest.skip(f"no audio device can be made on this machine: {reason}")
    env = {"XDG_RUNTIME_DIR": str(tmp_path), "PULSE_RUNTIME_PATH": str(tmp_path / "pulse"),
           "PULSE_SOURCE": "astsep_test.monitor", "HOME": str(tmp_path)}
    proc = None
    try:
        proc = start_live(["--device-in", "pulse", "-m", str(siren_model_dir)], env_extra=env)
        ready, err = threading.Event(), []
        threading.Thread(target=read_stderr, args=(proc, ready, err), daemon=True).start()
        assert ready.wait(120) and proc.poll() is None, "".join(err)
        pcm = (np.clip(siren_stream(6.0, sirens=(2.0,)), -1, 1) * 32767).astype("<i2").tobytes()
        play = subprocess.run(["pacat", "--playback", "--device=astsep_test", "--format=s16le", "--rate=16000",
                               "--channels=1", "--raw"], input=pcm, env=dict(os.environ, **env), timeout=60)
        assert play.returncode == 0
        line = proc.stdout.readline().decode()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "".join(err)
        ev = json.loads(line)
        assert ev["label"] == "Siren" and ev["trigger"] == "level"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        daemon.terminate()
        daemon.wait(10)
