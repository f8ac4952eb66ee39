"""Delivery settings from the config reach every payload and every entry's retry schedule (issue 19 item 10,
issue 21: the retry policy settable from YAML / --delivery.KEY like every other tunable)."""

from __future__ import annotations

import pytest

from astsep.config import AstsepConfig, apply_overrides
from astsep.errors import ConfigError
from astsep.runtime import RunOptions, build_delivery


def test_the_payload_fields_and_the_retry_policy_come_from_the_delivery_section(tmp_path):
    cfg = apply_overrides(AstsepConfig(), {"delivery.sound_icon": "siren.png", "delivery.location_image_url":
                                           "https://example.org/map.png", "delivery.retry_base_sec": 1.5,
                                           "delivery.retry_max_sec": 60, "delivery.park_after_sec": 3600})
    sink = build_delivery(RunOptions(backend_url="http://127.0.0.1:9/x", outbox=str(tmp_path / "o.sqlite3")), cfg)
    policy = sink.policy
    assert (policy.base_delay, policy.max_delay, policy.park_after) == (1.5, 60, 3600)
    keys = sink.queue([{"event_id": "e1", "category": "danger", "label": "Siren", "level_dbfs": -20.0}])
    payload = sink.outbox.entry(keys[0])["payload"]
    assert payload["sound_icon"] == "siren.png"
    assert payload["location_image_url"] == "https://example.org/map.png"


def test_by_default_the_reference_placeholders_are_sent(tmp_path):
    sink = build_delivery(RunOptions(backend_url="http://127.0.0.1:9/x", outbox=str(tmp_path / "o.sqlite3")),
                          AstsepConfig())
    keys = sink.queue([{"event_id": "e1", "category": "help", "label": "Baby cry", "level_dbfs": -30.0}])
    payload = sink.outbox.entry(keys[0])["payload"]
    assert payload["sound_icon"] == payload["location_image_url"] == "string"


def test_a_bad_delivery_value_is_one_config_error():
    with pytest.raises(ConfigError, match="delivery.retry_base_sec"):
        apply_overrides(AstsepConfig(), {"delivery.retry_base_sec": -1})
