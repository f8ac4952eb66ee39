"""``--record DIR`` across two live runs (issue 21, item 10): the second run never overwrites the
first one's folders (before, both numbered theirs from ``000000_``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from astsep.live import Analysis, Recorder


class _Result:
    def __init__(self, level: float) -> None:
        self.sources = {"00_Siren": np.full(1600, level, np.float32)}


def _run(root: Path, level: float, windows: int) -> None:
    recorder = Recorder(root, max_bytes=10**9)
    for i in range(windows):
        window = Analysis(start=16000 * i, audio=np.full((1, 1600), level, np.float32), reason="level", queued_at=0.0)
        recorder.save(window, _Result(level), [{"event_id": f"run{level}-{i}"}])


def test_a_second_run_into_the_same_record_folder_keeps_the_first_runs_windows(tmp_path: Path) -> None:
    _run(tmp_path, 0.25, 3)
    first = {p.name: json.loads((p / "events.json").read_text()) for p in tmp_path.iterdir()}
    _run(tmp_path, 0.5, 3)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 6, folders
    for name, events in first.items():  # untouched by the second run
        assert json.loads((tmp_path / name / "events.json").read_text()) == events
    assert [f[:6] for f in folders] == [f"{i:06d}" for i in range(6)]
