"""A full output disk (issue 21, item 4): simulated with ``RLIMIT_FSIZE`` in a child process (no file
may grow past the limit; ``SIGXFSZ`` ignored, so a write fails with ``EFBIG`` as on a full disk)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_WRITER = r"""
import resource, signal, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from astsep.audio import write_wav_atomic
from astsep.errors import OutputError
try:
    write_wav_atomic(sys.argv[2], np.zeros(16000 * 60, np.float32))  # 3.8 MB: far past the limit
except OutputError as exc:
    print(f"astsep: error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def test_a_wav_write_on_a_full_disk_is_one_error_line_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "00_Siren.wav"
    proc = subprocess.run([sys.executable, "-c", _WRITER, str(ROOT), str(target)], capture_output=True, text=True,
                          timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 4, proc.stderr
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines == [f"astsep: error: cannot write {target}: File too large"], lines
    assert list(tmp_path.iterdir()) == []  # the temporary file went too
