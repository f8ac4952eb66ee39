"""The separator's output on a fixed input stays what ``tests/data/separator_regression.json`` says.

A change to the algorithm or to the default config changes these vectors on purpose: regenerate
them with ``python tests/make_regression.py`` and commit the JSON with the change, so the diff shows
what moved. Numbers are compared with a relative tolerance (plus small absolute floors), so float
noise across machines does not fail the test; labels, class ids, file names and flags exactly.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from make_regression import VECTORS, regression_vectors

RTOL = 1e-3
ATOL = 1e-5  # energy shares are stored to 6 decimals
ATOL_BY_KEY = {"start_sec": 0.011, "end_sec": 0.011, "level_dbfs": 0.011,  # stored to 10 ms, 0.01 dB
               "si_sdr_target": 0.05, "si_sdr_interferer": 0.05}  # a change in quality, not float noise
REGENERATE = "if the change is deliberate, run `python tests/make_regression.py` and commit the new vectors"


def differences(expected: Any, got: Any, path: str = "") -> list[str]:
    """Every place where ``got`` differs from ``expected`` beyond the tolerances, as ``path: a != b``."""
    key = path.rsplit(".", 1)[-1].split("[", 1)[0]
    if isinstance(expected, dict) and isinstance(got, dict):
        if set(expected) != set(got):
            return [f"{path or '<top>'}: keys {sorted(expected)} != {sorted(got)}"]
        return [d for k in expected for d in differences(expected[k], got[k], f"{path}.{k}" if path else k)]
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{path}: {len(expected)} items expected, {len(got)} got"]
        return [d for i, (a, b) in enumerate(zip(expected, got)) for d in differences(a, b, f"{path}[{i}]")]
    numbers = (int, float)
    if (isinstance(expected, numbers) and isinstance(got, numbers) and not isinstance(expected, bool)
            and not isinstance(got, bool) and (isinstance(expected, float) or isinstance(got, float))):
        ok = math.isclose(expected, got, rel_tol=RTOL, abs_tol=ATOL_BY_KEY.get(key, ATOL))
        return [] if ok else [f"{path}: {expected} expected, {got} got"]
    return [] if expected == got else [f"{path}: {expected!r} expected, {got!r} got"]


def test_the_tolerant_comparison_catches_a_moved_anchor_and_a_new_class_but_not_float_noise():
    base = {"anchors": [{"end_sec": 2.37, "energy_share": 0.952218}], "classes": [{"class_id": 134}]}
    noisy = {"anchors": [{"end_sec": 2.37, "energy_share": 0.952218 * (1 + 1e-5)}], "classes": [{"class_id": 134}]}
    assert differences(base, noisy) == []
    moved = {"anchors": [{"end_sec": 2.40, "energy_share": 0.952218}], "classes": [{"class_id": 511}]}
    assert differences(base, moved) == ["anchors[0].end_sec: 2.37 expected, 2.4 got",
                                        "classes[0].class_id: 134 expected, 511 got"]


def test_a_quality_change_of_a_tenth_of_a_db_fails_but_float_noise_does_not():
    base = {"passes": [{"si_sdr_target": 12.3456}]}
    assert differences(base, {"passes": [{"si_sdr_target": 12.37}]}) == []
    assert differences(base, {"passes": [{"si_sdr_target": 12.45}]}) == [
        "passes[0].si_sdr_target: 12.3456 expected, 12.45 got"]


def test_the_oracle_vectors_record_real_separation(shared):
    """The pinned quality is a separation worth pinning: pass 1 finds the target under the exact oracle."""
    vectors = json.loads(VECTORS.read_text())["oracle"]
    assert len(vectors) == 4
    for name, guides in vectors.items():
        first = guides["exact"]["passes"][0]
        assert first["kept"] and first["si_sdr_target"] > 5.0, (name, first)
        assert first["si_sdr_target"] > (first["si_sdr_interferer"] or -99.0) + 10.0, (name, first)


def test_the_separator_gives_the_recorded_classes_anchors_and_mask_checksums_on_the_seed_recording(shared):
    if not VECTORS.is_file():
        pytest.fail(f"{VECTORS} is missing: run `python tests/make_regression.py`")
    expected = json.loads(VECTORS.read_text())
    diffs = differences(expected, regression_vectors())
    assert not diffs, (f"the separator's output on the seed recording changed ({len(diffs)} differences; "
                       f"{REGENERATE}):\n" + "\n".join(diffs[:20]))
