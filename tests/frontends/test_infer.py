"""``python infer.py`` end to end, as a user runs it: files, events, debug figures, errors, backend."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT, SEED_RECORDING, clip, mixture
from infer_run import infer, one_error_line

EVENT_KEYS = {"event_id", "kind", "file", "pass", "window", "start_sec", "end_sec", "label", "class_id", "confidence",
              "top5", "category", "level_dbfs", "energy_share", "model"}
STAT_KEYS = {"input", "duration_sec", "input_sample_rate", "input_channels", "model", "device", "ast_forwards",
             "cache_hits", "seconds"}


def test_separates_the_reference_recording_with_debug_figures(tmp_path, tiny_model_dir, shared):
    out = tmp_path / "out"
    proc = infer("-i", str(SEED_RECORDING), "-o", str(out), "-m", str(tiny_model_dir), "--debug", "-q")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "events.json").read_text())
    files = manifest["files"]
    wavs = [f for f in files if f.endswith(".wav")]
    assert wavs[-1].endswith("_residual.wav") or manifest["events"][-1]["confident"]
    assert all(f[:2].isdigit() and f[2] == "_" for f in wavs)
    for ev in manifest["events"]:
        assert EVENT_KEYS <= set(ev)
        assert ev["category"] in {"danger", "help", "warning", "other"}
    assert STAT_KEYS <= set(manifest["stats"])
    assert manifest["stats"]["ast_forwards_separation"] <= 3
    pngs = sorted(f for f in files if f.endswith(".png"))
    assert pngs and pngs[0] == "debug_pass_1.png"
    for f in files:
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    # the files add back up to the 16 kHz input
    ref, _ = sf.read(SEED_RECORDING, dtype="float64")
    total = sum(sf.read(out / f, dtype="float64")[0] for f in wavs)
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - total) ** 2)) >= 60


def test_fast_option_runs_int8_with_merged_padding_and_the_files_still_add_up(tmp_path, tiny_model_dir, shared):
    out = tmp_path / "out"
    proc = infer("-i", str(SEED_RECORDING), "-o", str(out), "-m", str(tiny_model_dir), "--fast", "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "events.json").read_text())
    assert manifest["stats"]["dtype"] == "int8" and manifest["stats"]["pad_merge"] == 8
    assert manifest["stats"]["ast_forwards_separation"] <= 3
    ref, _ = sf.read(SEED_RECORDING, dtype="float64")
    total = sum(sf.read(out / f, dtype="float64")[0] for f in manifest["files"] if f.endswith(".wav"))
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - total) ** 2)) >= 60


def test_any_format_rate_and_channel_count(tmp_path, tiny_model_dir, shared):
    x = clip("rooster", 3.0).numpy()
    import torch
    import torchaudio.functional as AF

    x48 = AF.resample(torch.from_numpy(x), 16000, 48000).numpy()
    six = np.stack([x48 * (0.2 + 0.1 * c) for c in range(6)], axis=1)
    sf.write(tmp_path / "six.flac", six, 48000, subtype="PCM_24")
    sf.write(tmp_path / "voice.ogg", clip("laughing", 2.0).numpy(), 16000)
    out = tmp_path / "out"
    proc = infer("-i", str(tmp_path / "six.flac"), str(tmp_path / "voice.ogg"),
                 str(SHARED := (ROOT.parent / "shared" / "data" / "fsdd" / "3_jackson_0.wav")),
                 "-o", str(out), "-m", str(tiny_model_dir), "-q")
    assert proc.returncode == 0, proc.stderr
    six_stats = json.loads((out / "six" / "events.json").read_text())["stats"]
    assert six_stats["input_sample_rate"] == 48000 and six_stats["input_channels"] == 6
    n = sf.info(out / "six" / json.loads((out / "six" / "events.json").read_text())["files"][0]).frames
    assert abs(n - 3 * 16000) <= 2
    assert (out / "voice" / "events.json").is_file()
    assert json.loads((out / "3_jackson_0" / "events.json").read_text())["stats"]["input_sample_rate"] == 8000
    assert SHARED.exists()


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "random_bytes", "text", "nan"])
def test_bad_inputs_give_one_line_and_leave_no_output(tmp_path, tiny_model_dir, case):
    path = tmp_path / "in.wav"
    if case == "missing":
        path = tmp_path / "nope.wav"
    elif case == "folder":
        path = tmp_path / "adir"
        path.mkdir()
        (path / "notes.txt").write_text("no audio here")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "text":
        path = tmp_path / "in.txt"
        path.write_text("hello, I am not audio\n" * 20)
    elif case == "nan":
        data = np.zeros(16000, dtype=np.float32)
        data[100] = np.nan
        sf.write(path, data, 16000, subtype="FLOAT")
    out = tmp_path / "out"
    proc = infer("-i", str(path), "-o", str(out), "-m", str(tiny_model_dir))
    assert proc.returncode != 0
    line = one_error_line(proc)
    assert line.startswith("astsep: error:")
    assert not out.exists() or not any(out.iterdir())


def test_unloadable_models_name_the_model_option(tmp_path, shared):
    out = tmp_path / "out"
    for model in ("MIT/ast-finetuned-audioset-10-10-0.4593", str(tmp_path / "no_such_folder")):
        proc = infer("-i", str(SEED_RECORDING), "-o", str(out), "-m", model)
        assert proc.returncode == 3
        assert "--model" in one_error_line(proc)
    assert not out.exists()


def test_silent_input_is_not_an_error(tmp_path, tiny_model_dir):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(32000, dtype=np.int16), 16000, subtype="PCM_16")
    proc = infer("-i", str(path), "-o", str(tmp_path / "out"), "-m", str(tiny_model_dir), "-q")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "out" / "events.json").read_text())
    assert m["files"] == ["00_residual.wav"] and m["events"][0]["silent"] is True
    assert m["stats"]["ast_forwards"] == 0


def test_cache_dir_makes_a_second_process_run_no_forward(tmp_path, tiny_model_dir, shared):
    args = ["-i", str(SEED_RECORDING), "-m", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert infer(*args, "-o", str(tmp_path / "a")).returncode == 0
    assert infer(*args, "-o", str(tmp_path / "b")).returncode == 0
    a = json.loads((tmp_path / "a" / "events.json").read_text())["stats"]
    b = json.loads((tmp_path / "b" / "events.json").read_text())["stats"]
    assert a["ast_forwards"] >= 1 and b["ast_forwards"] == 0 and b["cache_hits"] == a["ast_forwards"]


class _Recorder(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append((self.headers.get("Idempotency-Key"), body))
        self.send_response(201)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *a):
        pass


def test_backend_gets_danger_events_and_an_unreachable_backend_fills_the_outbox(tmp_path, siren_model_dir, shared):
    path = tmp_path / "mix.wav"
    sf.write(path, mixture("siren", "dog").numpy(), 16000)
    outbox = tmp_path / "outbox.sqlite3"
    # 1. backend down: outputs are still written, events wait in the outbox
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    proc = infer("-i", str(path), "-o", str(tmp_path / "o1"), "-m", str(siren_model_dir), "-q",
                 "--backend-url", f"http://127.0.0.1:{dead_port}/sound-events/", "--outbox", str(outbox),
                 "--backend-timeout", "1", "--user-id", "6", "--angle", "90")
    assert proc.returncode == 0, proc.stderr
    events = json.loads((tmp_path / "o1" / "events.json").read_text())["events"]
    danger = [e for e in events if e["category"] == "danger"]
    assert danger and (tmp_path / "o1" / "00_Siren.wav").is_file()
    # 2. backend up: the next run delivers what waited plus its own events, each key once
    _Recorder.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/sound-events/"
        proc = infer("-i", str(path), "-o", str(tmp_path / "o2"), "-m", str(siren_model_dir), "-q",
                     "--backend-url", url, "--outbox", str(outbox), "--user-id", "6", "--angle", "90")
        assert proc.returncode == 0, proc.stderr
    finally:
        server.shutdown()
    keys = [k for k, _ in _Recorder.received]
    assert len(keys) == len(set(keys)) == len(danger)  # same audio → same event ids: delivered once
    assert set(keys) == {e["event_id"] for e in danger}
    body = _Recorder.received[0][1]
    assert set(body) == {"user_id", "sound_type", "sound_detail", "angle", "occurred_at", "sound_icon",
                         "location_image_url", "decibel"}
    assert body["sound_type"] == "danger" and body["sound_detail"] == "Siren" and body["angle"] == 90
    assert body["user_id"] == 6 and isinstance(body["user_id"], int)  # --user-id 6 goes out as a JSON integer


def test_a_second_run_into_a_locked_output_folder_is_refused(tmp_path, tiny_model_dir, shared):
    from astsep.outputs import output_lock

    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out):  # another run, writing
        proc = infer("-i", str(SEED_RECORDING), "-o", str(out), "-m", str(tiny_model_dir))
    assert proc.returncode == 4 and "another astsep run" in one_error_line(proc)
    assert not (out / "events.json").exists()


# --- issue 12: in-process runs of the same command line (no new interpreter per case) ---------
def main_in_process(capsys, *args: str) -> tuple[int, str]:
    from astsep.frontends.infer import main

    rc = main(list(args))
    return rc, capsys.readouterr().err


def _write(path, x) -> None:
    sf.write(path, np.asarray(x, dtype=np.float32), 16000)


def test_inputs_sharing_a_stem_get_their_own_output_folders(tmp_path, tiny_model_dir, capsys, shared):
    ins = tmp_path / "in"
    ins.mkdir()
    paths = [ins / "a.wav", ins / "a.flac", ins / "a_1.wav"]
    for p, name in zip(paths, ["dog", "rain", "cat"]):
        _write(p, clip(name, 1.0).numpy())
    out = tmp_path / "out"
    rc, err = main_in_process(capsys, "-i", *map(str, paths), "-o", str(out), "-m", str(tiny_model_dir),
                              "--max-passes", "1", "-q")
    assert rc == 0, err
    written = {json.loads(m.read_text())["stats"]["input"]: m.parent.name for m in out.glob("*/events.json")}
    assert set(written) == set(map(str, paths))  # every input's results, none overwritten
    assert len(set(written.values())) == 3


@pytest.mark.parametrize("case", ["foreign_files", "regular_file"])
def test_a_bad_output_folder_is_refused_before_any_decoding(tmp_path, tiny_model_dir, capsys, monkeypatch, case):
    import astsep.audio

    decoded = []
    real = astsep.audio.load_audio
    monkeypatch.setattr(astsep.audio, "load_audio", lambda p: decoded.append(p) or real(p))
    path = tmp_path / "in.wav"
    _write(path, np.random.default_rng(0).normal(0, 0.1, 16000))
    out = tmp_path / "out"
    if case == "foreign_files":
        out.mkdir()
        (out / "thesis.tex").write_text("mine")
    else:
        out.write_text("a file, not a folder")
    rc, err = main_in_process(capsys, "-i", str(path), "-o", str(out), "-m", str(tiny_model_dir), "-q")
    assert rc == 4, err  # docs/robustness.md: output folder problems exit 4
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("astsep: error:") and str(out) in lines[0]
    assert decoded == []
    assert (out / "thesis.tex").read_text() == "mine" if case == "foreign_files" else out.is_file()


def test_a_bad_first_input_is_skipped_like_a_later_one(tmp_path, tiny_model_dir, capsys, shared):
    bad, good = tmp_path / "bad.wav", tmp_path / "good.wav"
    bad.write_bytes(b"not audio at all" * 64)
    _write(good, clip("dog", 1.0).numpy())
    out = tmp_path / "out"
    rc, err = main_in_process(capsys, "-i", str(bad), str(good), str(tmp_path / "missing.wav"), "-o", str(out),
                              "-m", str(tiny_model_dir), "--max-passes", "1", "-q")
    assert rc == 1  # some inputs failed: non-zero at the end, after the others were written
    assert (out / "good" / "events.json").is_file()
    errors = [ln for ln in err.splitlines() if ln.startswith("astsep: error:")]
    assert len(errors) == 2
    assert any(str(bad) in e for e in errors) and any("missing.wav" in e for e in errors)


def test_verbose_logs_a_line_as_each_input_starts(tmp_path, tiny_model_dir, capsys, caplog, shared):
    import logging

    path = tmp_path / "short.wav"
    _write(path, clip("dog", 1.0).numpy())
    caplog.set_level(logging.INFO, logger="astsep")
    rc, err = main_in_process(capsys, "-i", str(path), "-o", str(tmp_path / "out"), "-m", str(tiny_model_dir),
                              "--max-passes", "1", "-v")
    assert rc == 0, err
    messages = [r.getMessage() for r in caplog.records]
    starts = [i for i, m in enumerate(messages) if m.startswith(f"{path}: separating")]
    ends = [i for i, m in enumerate(messages) if m.startswith(f"{path}:") and "source(s)" in m]
    assert starts and ends and starts[0] < ends[0]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_short_input_on_a_terminal_gets_a_bar_and_the_summary_after_it(tmp_path, tiny_model_dir, monkeypatch, shared):
    from astsep.frontends.infer import main

    path = tmp_path / "short.wav"
    _write(path, clip("dog", 2.0).numpy())
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    rc = main(["-i", str(path), "-o", str(tmp_path / "out"), "-m", str(tiny_model_dir), "--max-passes", "1"])
    text = term.getvalue()
    assert rc == 0, text
    assert "audio separated" in text  # a progress bar for a 2 s input too
    assert text.rindex("audio separated") < text.index(f"{path} -> ")  # the bar is closed before the summary


def test_user_id_must_be_an_integer(tmp_path, capsys):
    from astsep.frontends.infer import main

    with pytest.raises(SystemExit) as exc:
        main(["-i", "x.wav", "-o", str(tmp_path / "out"), "--user-id", "bob"])
    assert exc.value.code == 2 and "--user-id" in capsys.readouterr().err


def test_events_say_when_their_sound_happened(tmp_path, siren_model_dir, capsys, shared):
    from datetime import datetime, timedelta, timezone

    path = tmp_path / "mix.wav"
    _write(path, mixture("siren", "dog", seconds=3.0).numpy())
    ended = datetime(2026, 1, 31, 8, 0, 3, tzinfo=timezone.utc)
    os.utime(path, (ended.timestamp(), ended.timestamp()))
    common = ["-i", str(path), "-m", str(siren_model_dir), "--max-passes", "1", "-q"]
    rc, err = main_in_process(capsys, *common, "-o", str(tmp_path / "o1"))
    assert rc == 0, err
    rc, err = main_in_process(capsys, *common, "-o", str(tmp_path / "o2"), "--recorded-at", "2026-02-01T10:00:00Z")
    assert rc == 0, err

    def when(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    for out, source, start in (("o1", "file_mtime", ended - timedelta(seconds=3.0)),
                               ("o2", "recorded_at", datetime(2026, 2, 1, 10, tzinfo=timezone.utc))):
        events = json.loads((tmp_path / out / "events.json").read_text())["events"]
        for ev in events:
            assert ev["occurred_at_source"] == source
            offset = ev["start_sec"] if ev["start_sec"] is not None else ev["window_start_sec"]
            assert abs((when(ev["occurred_at"]) - start).total_seconds() - offset) < 0.002
