"""astsep.live.trigger: the ring buffer and the level / hop triggers, on exact sample positions."""

from __future__ import annotations

import numpy as np
import pytest

from astsep.config import LiveConfig
from astsep.errors import ConfigError
from astsep.live import RingBuffer, Triggers

SR = 16000


def test_ring_buffer_holds_the_latest_samples_by_absolute_position():
    rb = RingBuffer(2, 10)
    x = np.arange(25, dtype=np.float32)
    for i in range(0, 25, 7):
        blk = x[i:i + 7]
        rb.write(np.stack([blk, -blk], axis=1))
    assert rb.end == 25
    np.testing.assert_array_equal(rb.read(15, 25), np.stack([x[15:25], -x[15:25]]))
    np.testing.assert_array_equal(rb.read(0, 20)[0], x[15:20])  # older samples are gone: clipped


def _push_all(trig: Triggers, x: np.ndarray, block: int = 400) -> list[tuple[str, int]]:
    due = []
    for i in range(0, x.size, block):
        due += trig.push(x[i:i + block], i + min(block, x.size - i))
    return due


def test_an_onset_schedules_an_alert_then_a_window_and_more_of_both_while_loud():
    # quiet 1 s, loud 1.2 s from 1.0 s, quiet again: the level trigger's schedule, sample by sample
    x = np.full(4 * SR, 1e-4, np.float32)
    x[SR:int(2.2 * SR)] = 0.1
    cfg = LiveConfig(alert_hop_sec=0.4, hop_sec=0.6, post_trigger_sec=0.5, alert_post_trigger_sec=0.3)
    trig = Triggers(cfg)
    due = _push_all(trig, x)
    alerts = [at for r, at in due if r == "alert"]
    windows = [at for r, at in due if r == "level"]
    assert list(trig.onsets) == [SR]
    # 0.3 s after the onset, then every 0.4 s while loud; the level falls at 2.2 s and the sound is
    # over after release_sec (0.3 s) of quiet, by 2.5 s: the excerpt due then is not taken
    assert alerts == [int(1.3 * SR), int(1.7 * SR), int(2.1 * SR)]
    assert not trig.loud
    # 0.5 s after the onset (on the 0.1 s grid), then every 0.6 s while loud
    assert windows == [int(1.5 * SR), int(2.1 * SR)]
    assert trig.onset_in(SR, int(1.3 * SR)) == SR and trig.onset_in(0, SR) is None


def test_the_hop_trigger_analyses_every_hop_quiet_or_not():
    trig = Triggers(LiveConfig(trigger="hop", hop_sec=0.5, alert_stage=False))
    due = _push_all(trig, np.zeros(2 * SR, np.float32))
    assert due == [("hop", int(k * 0.5 * SR)) for k in (1, 2, 3, 4)]


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
