"""Config files: every value is checked when it is read; a bad one is one clear line naming the
file, the key and what was expected, and ``infer.py`` exits non-zero without a traceback."""

from __future__ import annotations

import dataclasses

import pytest

from astsep import cli
from astsep.config import (AstsepConfig, CategoryConfig, GuideConfig, SeparatorConfig, STFTConfig, WindowConfig,
                           load_config)
from astsep.errors import ConfigError
from conftest import ROOT, SEED_RECORDING


def _yaml(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_the_shipped_separator_config_and_the_defaults_pass_the_checks():
    assert load_config(ROOT / "configs" / "separator.yaml").to_dict() == AstsepConfig().to_dict()


@pytest.mark.parametrize("text, key, expected", [
    ("separator:\n  max_passes: '3'\n", "separator.max_passes", "integer"),
    ("separator:\n  max_passes: 0\n", "separator.max_passes", ">= 1"),
    ("separator:\n  max_passes: 2.5\n", "separator.max_passes", "integer"),
    ("separator:\n  min_eratio: 1.5\n", "separator.min_eratio", "< 1"),
    ("separator:\n  min_eratio: '0.1'\n", "separator.min_eratio", "number"),
    ("separator:\n  eps: 0\n", "separator.eps", "> 0"),
    ("separator:\n  residual_confidence: .nan\n", "separator.residual_confidence", "finite"),
    ("separator:\n  suppression_db: 10\n", "separator.suppression_db", "<= 0"),
    ("stft:\n  hop: 0\n", "stft.hop", ">= 1"),
    ("stft:\n  win_length: 2048\n", "stft.win_length", "in [1, 1024]"),
    ("guide:\n  trim_padding: 'yes'\n", "guide.trim_padding", "true or false"),
    ("guide:\n  dtype: fp8\n", "guide.dtype", "float32, bfloat16, int8"),
    ("guide:\n  fbank_std: 0\n", "guide.fbank_std", "> 0"),
    ("guide:\n  device: tpu\n", "guide.device", "auto, cpu or cuda"),
    ("window:\n  window_sec: 0\n", "window.window_sec", "> 0"),
    ("window:\n  window_sec: 20\n", "window.window_sec", "<= 10.24"),
    ("window:\n  overlap_sec: 10.24\n", "window.overlap_sec", "< 10.24"),
    ("window:\n  window_sec: 2\n  overlap_sec: 3\n", "window.overlap_sec", "< 2"),
    ("separator: null\n", "separator", "mapping"),
    ("guide: 3\n", "guide", "mapping"),
    ("window: [1, 2]\n", "window", "mapping"),
])
def test_a_bad_value_names_the_file_the_key_and_what_was_expected(tmp_path, text, key, expected):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and key in msg and expected in msg and "\n" not in msg, msg


@pytest.mark.parametrize("sets, expected", [
    ({"danger": ["396"]}, "not an integer"),           # a string never matches an int class id
    ({"danger": [9999]}, r"not an AudioSet class \(0\.\.526\)"),
    ({"danger": [-1]}, "not an AudioSet class"),
    ({"danger": [True]}, "not an integer"),
    ({"danger": [396], "warning": [390, 396]}, "in both 'danger' and 'warning'"),
    ({"danger": 396}, "must be a list"),
    ({"other": [1]}, "not a usable category name"),
])
def test_category_sets_refuse_ids_that_could_never_match_or_match_twice(sets, expected):
    with pytest.raises(ConfigError, match=expected):
        CategoryConfig(sets=sets)


def test_category_errors_from_a_file_name_the_file(tmp_path):
    path = _yaml(tmp_path, "categories:\n  sets:\n    danger: [396, '390']\n")
    with pytest.raises(ConfigError, match=f"{path}.*categories.sets.danger.*'390'"):
        load_config(path)


def test_overrides_are_checked_like_file_values():
    with pytest.raises(ConfigError, match="separator.max_passes must be an integer"):
        load_config(None, {"separator.max_passes": "3"})
    assert load_config(None, {"separator.max_passes": 2}).separator.max_passes == 2


def test_every_component_config_checks_its_fields_when_built_in_python():
    for bad in (lambda: SeparatorConfig(max_passes="3"), lambda: STFTConfig(n_mels=0),
                lambda: GuideConfig(pad_merge=-1), lambda: WindowConfig(batch_windows=-1),
                lambda: dataclasses.replace(WindowConfig(), overlap_sec=11.0)):
        with pytest.raises(ConfigError):
            bad()


@pytest.mark.parametrize("text", ["separator:\n  max_passes: '3'\n", "separator: null\n", "guide: 7\n",
                                  "window:\n  overlap_sec: 11\n"])
def test_infer_reports_a_bad_config_in_one_line_and_exits_non_zero(tmp_path, capsys, text, shared):
    path = _yaml(tmp_path, text)
    code = cli.main(["-i", str(SEED_RECORDING), "-o", str(tmp_path / "out"), "--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and str(path) in err and "internal error" not in err, err
    assert not (tmp_path / "out").exists()
