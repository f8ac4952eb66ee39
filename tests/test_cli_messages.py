"""What infer.py says when a user slips: a mistyped option or config key, Ctrl-C mid-run (issue 19)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
INFER = str(ROOT / "infer.py")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, INFER, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_a_mistyped_option_is_one_line_with_the_nearest_option(tmp_path):
    proc = _run("-i", "x.wav", "-o", "out", "--separator.max_pases", "2", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "astsep: error: unknown option --separator.max_pases (did you mean --separator.max_passes?); "
        "infer.py -h lists them"]
    far = _run("-i", "x.wav", "-o", "out", "--zzzzzz", cwd=tmp_path)
    assert far.returncode == 2 and far.stderr.strip() == "astsep: error: unknown option --zzzzzz; infer.py -h lists them"


def test_a_mistyped_config_key_in_yaml_names_the_nearest_key(tmp_path):
    (tmp_path / "my.yaml").write_text("separator:\n  max_pases: 2\n")
    proc = _run("-i", "x.wav", "-o", "out", "--config", "my.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_pases (did you mean separator.max_passes?)" in lines[0], proc.stderr


def test_ctrl_c_leaves_the_progress_bar_where_the_work_stopped(tmp_path, shared, tiny_model_dir):
    """On a terminal, SIGINT mid-run ends with 'astsep: interrupted' and a bar short of 100 %."""
    x, sr = sf.read(shared / "examples" / "seed_recording_16k.wav", dtype="float32")
    sf.write(tmp_path / "long.wav", np.tile(x, 120), sr)  # 10 min: many windows, a bar that moves for a while
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    # SIGINT at its default in the child whatever this process has it at (ignored, Python would not
    # install its KeyboardInterrupt handler at all: an earlier test in the same pytest run can leave it so)
    proc = subprocess.Popen([sys.executable, INFER, "-i", "long.wav", "-o", "out", "-m", str(tiny_model_dir)],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:  # wait for the bar to show progress past 0 %
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
            if re.search(rb"\b([1-9]\d?)%", seen):
                break
        assert re.search(rb"\b([1-9]\d?)%", seen), seen.decode(errors="replace")[-500:]
        proc.send_signal(signal.SIGINT)
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert "astsep: interrupted" in text
    before = text[: text.index("astsep: interrupted")]
    percents = [int(p) for p in re.findall(r"(\d+)%", before)]
    assert percents and percents[-1] < 100, before[-400:]
