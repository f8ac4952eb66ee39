"""A file or a pipe played at a microphone's pace (issue 19 item 6): `--live FILE`, `--live - --realtime`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from astsep.capture import ArraySource, FileSource, Paced

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self):
        self.t = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def test_paced_blocks_are_given_no_earlier_than_their_time_in_the_stream():
    clock = FakeClock()
    source = ArraySource(np.zeros(16000, dtype=np.float32), 16000, block_sec=0.1, realtime=False)
    given = []
    for block in Paced(source, clock.monotonic, clock.sleep):
        given.append((clock.t, len(block)))
        clock.t += 0.01  # the consumer's own work takes time: the pacer waits only for what is left
    assert len(given) == 10
    for k, (t, n) in enumerate(given):
        assert n == 1600
        assert t == pytest.approx(100.0 + 0.1 * (k + 1))  # block k's last sample is "recorded" at (k+1)·0.1 s
    assert sum(clock.sleeps) == pytest.approx(1.0 - 0.01 * 9)


def test_a_slow_consumer_is_never_made_to_wait():
    clock = FakeClock()
    source = ArraySource(np.zeros(8000, dtype=np.float32), 16000, block_sec=0.1, realtime=False)
    for _ in Paced(source, clock.monotonic, clock.sleep):
        clock.t += 0.5  # slower than real time
    assert clock.sleeps == [pytest.approx(0.1)]  # only the first block waits for its own duration


def test_a_file_source_keeps_the_channels_and_the_rate(tmp_path):
    x = np.stack([np.linspace(-1, 1, 4410), np.zeros(4410)], axis=1).astype(np.float32)
    sf.write(tmp_path / "st.flac", x, 44100, subtype="PCM_24")
    src = FileSource(str(tmp_path / "st.flac"), block_sec=0.032)
    blocks = list(src)
    assert src.sample_rate == 44100 and src.channels == 2
    assert np.allclose(np.concatenate(blocks), x, atol=1e-6)


def test_live_plays_a_file_to_its_end_and_says_so(tmp_path, shared, tiny_model_dir):
    rec = shared / "examples" / "seed_recording_16k.wav"
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--live", str(rec), "-m", str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"listening to {rec}" in proc.stderr
    assert "5.1 s listened" in proc.stderr, proc.stderr


def test_live_refuses_a_missing_file_and_realtime_without_stdin_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--live", str(tmp_path / "nope.wav")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "is not a file" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--live", "--realtime"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--realtime paces stdin" in proc.stderr
