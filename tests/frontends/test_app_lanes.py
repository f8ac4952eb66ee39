"""The web demo's bounds (issue 21, item 8), without a browser: a file longer than ``--max-minutes``
is refused at once in one line, and a short file never waits behind another visitor's long one."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("gradio", reason='the web demo needs Gradio: pip install -e ".[app]"')

from astsep.errors import AudioError  # noqa: E402
from astsep.runtime import RunOptions  # noqa: E402


def _noise(path: Path, seconds: float) -> Path:
    sf.write(path, 0.1 * np.random.default_rng(0).standard_normal(int(seconds * 16000)).astype(np.float32), 16000)
    return path


@pytest.fixture(scope="module")
def demo(tiny_model_dir):
    from astsep.frontends.app import Demo

    return Demo(RunOptions(model=str(tiny_model_dir), max_passes=1), max_seconds=60, short_seconds=30)


def test_a_file_over_the_maximum_is_refused_at_once_in_one_line(demo, tmp_path: Path) -> None:
    path = _noise(tmp_path / "upload.wav", 61)
    long_lane = demo.lanes["long"][1]
    with long_lane:  # another visitor's long job holds the long lane: the refusal must not wait for it
        with pytest.raises(AudioError) as exc:
            demo.run(path, tmp_path / "out" / "x", name="party.wav")
    msg = str(exc.value)
    assert "party.wav is 1.0 min long" in msg and "at most 1 min (--max-minutes)" in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def test_a_short_file_does_not_wait_behind_a_long_one(demo, tmp_path: Path) -> None:
    """The long job cannot finish before the short one has (its progress waits for it): with one
    queue for both, the short job would wait for the long one and neither would finish."""
    short_done = threading.Event()
    long_started = threading.Event()
    outcome: dict[str, object] = {}

    def long_progress(done: int, total: int) -> None:
        long_started.set()
        if not short_done.wait(timeout=120):
            raise TimeoutError("the short job never finished while the long one ran")

    def run_long() -> None:
        try:
            outcome["long"] = demo.run(_noise(tmp_path / "long.wav", 40), tmp_path / "l" / "long", progress=long_progress)
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["long"] = exc

    t = threading.Thread(target=run_long)
    t.start()
    assert long_started.wait(timeout=120), "the long job did not start"
    short = demo.run(_noise(tmp_path / "short.wav", 1), tmp_path / "s" / "short")  # while the long one runs
    short_done.set()
    t.join(timeout=300)
    assert not t.is_alive()
    assert short.events and (short.out_dir / "events.json").is_file()
    assert not isinstance(outcome["long"], Exception), outcome["long"]
    assert (outcome["long"].out_dir / "events.json").is_file()


def test_the_lanes_go_by_duration(demo) -> None:
    assert [demo.lane(s) for s in (0.5, 30, 30.01, 600)] == ["short", "short", "long", "long"]
    assert demo.lanes["short"][0].guide is demo.lanes["long"][0].guide  # one model in memory
