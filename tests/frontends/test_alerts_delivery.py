"""``infer.py`` with a backend (issue 21, items 3, 4, 5 and 10 as a user meets them): an unusable
outbox does not stop a batch, a full output disk does not lose the input's events, odd input names
stay inside ``-o``, an input inside its own output folder is refused. Real backend on 127.0.0.1
(``test_delivery.FakeBackend``), real tiny AST whose every window is a Siren (category danger)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from infer_runner import infer
from test_delivery import FakeBackend, rows, server, start_server  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[2]


def _noise(path: Path, seconds: float, seed: int = 0) -> Path:
    x = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000)).astype(np.float32)
    sf.write(path, x, 16000, format="WAV")
    return path


def _lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


def test_an_unusable_outbox_does_not_stop_the_batch(server: FakeBackend, tmp_path: Path, siren_model_dir: Path) -> None:
    box = tmp_path / "outbox.sqlite3"
    box.write_text("these are not the bytes of an outbox\n")
    ins = [_noise(tmp_path / "a.wav", 1.0, 1), _noise(tmp_path / "b.wav", 1.0, 2)]
    proc = infer("-i", str(ins[0]), str(ins[1]), "-o", str(tmp_path / "out"), "-m", str(siren_model_dir),
                 "--backend-url", server.url, "--outbox", str(box), "-q")
    assert proc.returncode == 5, proc.stderr  # every input written; delivery degraded
    for name in ("a", "b"):
        assert (tmp_path / "out" / name / "events.json").is_file()
    warnings = [ln for ln in _lines(proc) if ln.startswith("astsep: warning: delivery degraded:")]
    assert len(warnings) == 1 and "not an SQLite database" in warnings[0] and "moved aside" in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("outbox.sqlite3.unusable-")]
    assert len(kept) == 1 and kept[0].read_text() == "these are not the bytes of an outbox\n"
    events = [e for n in ("a", "b") for e in json.loads((tmp_path / "out" / n / "events.json").read_text())["events"]
              if e["category"] != "other"]
    assert events and set(server.processed) == {e["event_id"] for e in events}  # delivered, each once
    assert {k for k, state, *_ in rows(box)} == set(server.processed)  # the fresh outbox has them as delivered


_FULL_DISK_INFER = r"""
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # no file past 300 kB: a WAV of 10 s is 640 kB
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_output_disk_still_sends_the_inputs_events_and_says_so_in_one_line(
    server: FakeBackend, tmp_path: Path, siren_model_dir: Path
) -> None:
    wav = _noise(tmp_path / "long.wav", 10.0)
    box, out = tmp_path / "ob.sqlite3", tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_INFER, str(ROOT / "infer.py"), "-i", str(wav), "-o",
                           str(out), "-m", str(siren_model_dir), "--backend-url", server.url, "--outbox", str(box), "-q"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT))
    lines = _lines(proc)
    assert proc.returncode == 4, proc.stderr
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("astsep: error: cannot write") and "File too large" in lines[0], lines
    assert server.processed and all(v == 1 for v in server.processed.values())  # the events went out all the same
    assert {k for k, state, *_ in rows(box) if state == "delivered"} == set(server.processed)
    assert not (out / "events.json").exists()


def test_inputs_named_dot_dot_wav_stay_inside_the_output_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "in").mkdir()
    for i, n in enumerate(("...wav", "..wav")):
        _noise(tmp_path / "in" / n, 0.5, i)
    results = tmp_path / "results"
    (results / "earlier").mkdir(parents=True)
    (results / "earlier" / "keep.txt").write_text("an earlier run's files")
    proc = infer("-i", str(tmp_path / "in"), "-o", str(results / "batch2"), "-m", str(tiny_model_dir), "-q")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in results.iterdir()) == ["batch2", "earlier"]
    assert (results / "earlier" / "keep.txt").read_text() == "an earlier run's files"
    subs = sorted(p.name for p in (results / "batch2").iterdir())
    assert len(subs) == 2 and all((results / "batch2" / s / "events.json").is_file() for s in subs), subs


def test_an_input_inside_its_own_output_folder_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    assert infer("-i", str(_noise(tmp_path / "in.wav", 0.5)), "-o", str(out), "-m", str(tiny_model_dir),
                 "-q").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = infer("-i", str(out / "01_residual.wav" if (out / "01_residual.wav").exists() else next(out.glob("*.wav"))),
                 "-o", str(out), "-m", str(tiny_model_dir), "-q")
    lines = _lines(proc)
    assert proc.returncode == 4 and len(lines) == 1 and "inside the output folder" in lines[0], proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_live_mode_with_an_unusable_outbox_still_delivers_and_exits_5(
    server: FakeBackend, tmp_path: Path, siren_model_dir: Path
) -> None:
    import io

    box = tmp_path / "outbox.sqlite3"
    box.write_text("not an outbox\n")
    buf = io.BytesIO()
    x = 0.3 * np.random.default_rng(3).standard_normal(16000 * 4).astype(np.float32)
    sf.write(buf, x, 16000, format="WAV", subtype="PCM_16")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--live", "-", "-m", str(siren_model_dir),
                           "--backend-url", server.url, "--outbox", str(box), "-q"], input=buf.getvalue(),
                          capture_output=True, timeout=300, env=env, cwd=str(ROOT))
    err = proc.stderr.decode()
    assert proc.returncode == 5, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("astsep: warning: delivery degraded:")]
    assert len(warnings) == 1 and "moved aside" in warnings[0] and "Traceback" not in err, err
    printed = [json.loads(ln) for ln in proc.stdout.decode().splitlines() if ln.strip()]
    sent = {e["event_id"] for e in printed if e.get("category") != "other" and not e.get("update_of")}
    assert sent and sent <= set(server.processed), (printed, server.processed)
