"""``python infer.py --live`` (astsep.frontends.live): real shared clips piped to stdin as a file
would be (as fast as the pipe takes them: nothing here depends on pace or load), a tiny AST forced
to answer *Siren*, delivery to a real HTTP server on 127.0.0.1, and hard stops: SIGTERM, kill -9, a
second SIGINT. Every alert printed is in the outbox, whatever the stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from astsep.config import LiveConfig
from astsep.delivery import Outbox
from conftest import ROOT
from live_streams import Backend, feed_all, read_stderr, siren_stream, start_live, wav_stream_bytes


@pytest.fixture
def backend():
    b = Backend()
    yield b
    b.close()


@pytest.fixture
def slow_backend():
    b = Backend(delay=4.0)  # answers each request after 4 s
    yield b
    b.close()


def _live(*argv: str):
    from astsep.frontends.infer import build_parser
    from astsep.frontends.live import live_config

    return live_config(build_parser().parse_args(["--live", *argv]))


def test_alert_stage_options_reach_the_live_config():
    cfg = _live("-", "--alert-hop", "0.5", "--alert-sec", "0.4", "--alert-threshold", "0.3").live
    assert cfg.alert_stage and (cfg.alert_hop_sec, cfg.alert_sec, cfg.alert_threshold) == (0.5, 0.4, 0.3)
    assert cfg.alert_post_trigger_sec == 0.4  # bounded by the excerpt
    assert not _live("--no-alert-stage").live.alert_stage
    assert LiveConfig().alert_stage  # on by default
    default = _live().live
    assert default.cut_passes_when_behind and default.retract_unconfirmed  # both on by default
    off = _live("--all-passes", "--no-retract").live
    assert not off.cut_passes_when_behind and not off.retract_unconfirmed


def test_every_live_doa_and_delivery_key_is_an_option_and_the_yaml_sets_them(tmp_path):
    """``--live.KEY``, ``--doa.KEY``, ``--delivery.KEY`` and the ``live`` / ``doa`` / ``delivery`` YAML
    sections; the shortcut options (``--live-window``, ``--window``, ``--doa-method``) win."""
    path = tmp_path / "c.yaml"
    path.write_text("live:\n  queue_size: 3\n  hop_sec: 1.5\ndoa:\n  grid: 180\ndelivery:\n  retries: 1\n")
    cfg = _live("--config", str(path), "--live.min_run_sec", "0.1", "--doa.method", "MUSIC",
                "--delivery.backoff", "0.25", "--live.level_frame_sec", "0.02")
    assert (cfg.live.queue_size, cfg.live.hop_sec, cfg.live.min_run_sec, cfg.live.level_frame_sec) == (3, 1.5, 0.1, 0.02)
    assert (cfg.doa.grid, cfg.doa.method, cfg.delivery.retries, cfg.delivery.backoff) == (180, "MUSIC", 1, 0.25)
    cfg = _live("--config", str(path), "--live.window_sec", "3", "--live-window", "2", "--doa-method", "TOPS")
    assert (cfg.live.window_sec, cfg.live.post_trigger_sec, cfg.doa.method) == (2.0, 0.5, "TOPS")
    assert _live("--window", "1.0", "--hop", "0.5").live.window_sec == 1.0  # the earlier names still work
    assert _live("--live.align_sec", "0.5", "--hop", "0.3").live.align_sec == 0.3  # a hop shorter than the grid


def _events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _outbox_keys(path: Path) -> set[str]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return {k for (k,) in db.execute("SELECT key FROM outbox")}


def _key(ev: dict) -> str:
    return f"{ev['event_id']}.r{ev['revision']}" if ev["revision"] else ev["event_id"]


@pytest.mark.slow
def test_stdin_stream_siren_gives_one_event_delivered_once(tmp_path, siren_model_dir, backend, shared):
    head, data = wav_stream_bytes(siren_stream())
    proc = start_live(["-", "-m", str(siren_model_dir), "--backend-url", backend.url,
                       "--outbox", str(tmp_path / "outbox.sqlite3"), "--user-id", "7"])
    ready, err = threading.Event(), []
    threading.Thread(target=read_stderr, args=(proc, ready, err), daemon=True).start()
    threading.Thread(target=feed_all, args=(proc, head, data, ready), daemon=True).start()
    out = proc.stdout.read().decode()
    assert proc.wait(300) == 0, "".join(err)
    events = _events(out)
    # one occurrence: its first event (the alert, or the separation's when the alert excerpt was
    # replaced by a newer one: the file arrives faster than real time) and maybe its update
    assert events and events[0]["revision"] == 0 and len({e["event_id"] for e in events}) == 1, (events, err)
    ev = events[0]
    assert all(e["label"] == "Siren" and abs(e["start_sec"] - 3.0) <= 0.5 for e in events)
    assert len(backend.requests) == 1  # an update changes nothing the backend's body shows
    headers, body = backend.requests[0]
    assert headers["Idempotency-Key"] == ev["event_id"]
    assert body["sound_type"] == "danger" and body["sound_detail"] == "Siren" and body["user_id"] == 7
    assert body["occurred_at"] == ev["occurred_at"][:19] + "Z"
    assert "1 event(s)" in "".join(err) and "outbox pending 0" in "".join(err)


def _live_until(tmp_path, model_dir, url, sirens=(1.0,), events=1):
    """A live run on a stream that stays open (a microphone never ends), up to its first printed
    events of ``events`` occurrences: (process, stderr lines, outbox path, the events printed)."""
    head, data = wav_stream_bytes(siren_stream(3.0 + max(sirens), sirens=sirens, siren_sec=1.0))
    outbox = tmp_path / "outbox.sqlite3"
    proc = start_live(["-", "-m", str(model_dir), "--backend-url", url, "--outbox", str(outbox)])
    ready, err = threading.Event(), []
    threading.Thread(target=read_stderr, args=(proc, ready, err), daemon=True).start()
    threading.Thread(target=feed_all, args=(proc, head, data, ready, False), daemon=True).start()
    printed: list[dict] = []
    while len({e["event_id"] for e in printed}) < events:
        line = proc.stdout.readline().decode()
        assert line, "".join(err)
        printed.append(json.loads(line))
    return proc, err, outbox, printed


def _for_backend(printed: list[dict]) -> set[str]:
    """The outbox keys of the printed events meant for the backend."""
    return {_key(e) for e in printed if e["category"] != "other" and not e.get("retracted") and e["to_backend"]}


@pytest.mark.slow
def test_sigterm_stops_capture_flushes_the_outbox_and_exits_zero(tmp_path, siren_model_dir, backend, shared):
    proc, err, outbox, (first,) = _live_until(tmp_path, siren_model_dir, backend.url)
    assert first["label"] == "Siren"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, "".join(err)
    text = "".join(err)
    assert "(stopped)" in text and "outbox pending 0" in text and "Traceback" not in text
    assert len(backend.requests) == 1


@pytest.mark.slow
def test_kill_9_with_a_slow_backend_loses_no_printed_alert(tmp_path, siren_model_dir, slow_backend, shared):
    """Two sirens 3.5 s apart, a backend that answers after 4 s: the second alert is printed while
    the first is still being sent. Killed then, both are in the outbox."""
    proc, err, outbox, printed = _live_until(tmp_path, siren_model_dir, slow_backend.url, sirens=(1.0, 4.5),
                                             events=2)
    proc.kill()  # SIGKILL: no handler, no flush, no goodbye
    printed += _events(proc.stdout.read().decode())
    assert proc.wait(60) == -signal.SIGKILL
    in_outbox = _outbox_keys(outbox)
    assert len(_for_backend(printed)) >= 2 and _for_backend(printed) <= in_outbox, (printed, in_outbox)


@pytest.mark.slow
def test_a_second_sigint_exits_at_once_and_loses_no_printed_alert(tmp_path, siren_model_dir, slow_backend, shared):
    proc, err, outbox, printed = _live_until(tmp_path, siren_model_dir, slow_backend.url, sirens=(1.0, 4.5),
                                             events=2)
    proc.send_signal(signal.SIGINT)  # the first: stop capture, finish the window, flush (the backend takes 4 s)
    time.sleep(0.3)  # the user presses Ctrl-C again
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(30)  # at once: not after the backend's answers (4 s per request) or its retries
    printed += _events(proc.stdout.read().decode())
    text = "".join(err)
    assert rc == 130, (rc, text)
    assert "terminate called" not in text and "Traceback" not in text, text
    assert _for_backend(printed) <= _outbox_keys(outbox)


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
