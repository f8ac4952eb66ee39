"""Config files: every value is checked when it is read; a bad one is one clear line naming the
file, the key and what was expected, and ``infer.py`` exits non-zero without a traceback."""

from __future__ import annotations

import dataclasses

import pytest

from astsep.frontends import infer as cli
from astsep.runtime import RunOptions, build_config
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


# --- one override path: apply_overrides, the --section.key options, separate() ------------------------
def test_apply_overrides_returns_a_new_checked_config_and_leaves_the_given_one_alone():
    from astsep.config import apply_overrides

    cfg = AstsepConfig()
    new = apply_overrides(cfg, {"separator.max_passes": 2, "guide.dtype": "int8"})
    assert (new.separator.max_passes, new.guide.dtype) == (2, "int8")
    assert (cfg.separator.max_passes, cfg.guide.dtype) == (3, "float32")
    assert new.categories.sets is not cfg.categories.sets  # no section shared with the given config
    with pytest.raises(ConfigError, match="separator.max_passes must be an integer >= 1, got 0"):
        apply_overrides(cfg, {"separator.max_passes": 0})
    with pytest.raises(ConfigError, match="guide.dtype must be one of float32, bfloat16, int8"):
        apply_overrides(cfg, {"guide.dtype": "fp8"})
    # the keys of a section change together: alone, window_sec 0.5 is shorter than the 1 s overlap
    both = apply_overrides(cfg, {"window.window_sec": 0.5, "window.overlap_sec": 0.25})
    assert (both.window.window_sec, both.window.overlap_sec) == (0.5, 0.25)
    with pytest.raises(ConfigError, match="window.overlap_sec"):
        apply_overrides(cfg, {"window.window_sec": 0.5})


@pytest.mark.parametrize("key, hint", [("separator.max_pases", "did you mean separator.max_passes"),
                                       ("max_passes", "did you mean separator.max_passes"), ("zzz", "section.key"),
                                       ("guide.nope", "unknown config key guide.nope"),
                                       ("live.windows_sec", "did you mean live.window_sec"),
                                       ("delivery.token", "unknown config key delivery.token")])
def test_an_unknown_override_key_is_one_line_naming_it(key, hint):
    from astsep.config import apply_overrides

    with pytest.raises(ConfigError) as info:
        apply_overrides(AstsepConfig(), {key: 1})
    assert hint in str(info.value) and "\n" not in str(info.value)


def test_config_keys_are_every_field_of_every_section():
    from astsep.config import config_keys

    expected = {f"{s.name}.{f.name}" for s in dataclasses.fields(AstsepConfig)
                for f in dataclasses.fields(getattr(AstsepConfig(), s.name))}
    assert set(config_keys()) == expected and len(expected) > 40


@pytest.mark.parametrize("key, text, value", [
    ("separator.max_passes", "2", 2), ("separator.eps", "1e-10", 1e-10), ("separator.min_eratio", "0", 0.0),
    ("guide.trim_padding", "true", True), ("guide.trim_padding", "False", False), ("guide.dtype", "int8", "int8"),
    ("guide.model", "123", "123"), ("guide.cache_dir", "null", None), ("guide.cache_dir", "/tmp/c", "/tmp/c"),
    ("categories.sets", "{danger: [396]}", {"danger": [396]}),
])
def test_option_text_is_typed_by_the_dataclass_field(key, text, value):
    from astsep.config import parse_value

    got = parse_value(key, text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("key, text, expected", [("separator.max_passes", "2.5", "an integer"),
                                                 ("separator.eps", "tiny", "a number"),
                                                 ("guide.trim_padding", "maybe", "true or false")])
def test_option_text_of_the_wrong_type_is_refused_naming_the_key(key, text, expected):
    from astsep.config import parse_value

    with pytest.raises(ConfigError, match=f"{key} must be {expected}, got '{text}'"):
        parse_value(key, text)


def test_config_round_trips_through_a_plain_dict():
    from pathlib import Path

    from astsep.config import apply_overrides, config_from_dict

    cfg = apply_overrides(AstsepConfig(), {"separator.rounds": 2, "guide.cache_dir": Path("/tmp/c"),
                                           "categories.sets": {"danger": [396]}})
    data = cfg.to_dict()
    assert data["guide"]["cache_dir"] == "/tmp/c"  # plain types only (JSON, checkpoints)
    back = config_from_dict(data)
    assert back.to_dict() == data and back.separator.rounds == 2
    assert config_from_dict({"separator": {"rounds": 2}}).to_dict() == apply_overrides(
        AstsepConfig(), {"separator.rounds": 2}).to_dict()  # left-out keys: defaults
    with pytest.raises(ConfigError, match="events.json: separator.rounds must be an integer >= 1"):
        config_from_dict({"separator": {"rounds": 0}}, where="events.json")


def _config(args):
    return build_config(RunOptions.from_values(args))


def _args(*argv: str):
    return cli.build_parser().parse_args(["-i", "x.wav", "-o", "out", *argv])


def test_every_config_key_is_an_infer_option_typed_and_checked_by_its_dataclass():
    parser = cli.build_parser()
    options = {s for a in parser._actions for s in a.option_strings}
    keys = {f"--{s.name}.{f.name}" for s in dataclasses.fields(AstsepConfig)
            for f in dataclasses.fields(getattr(AstsepConfig(), s.name))}
    assert keys <= options
    cfg = _config(_args("--separator.max_passes", "2", "--guide.dtype", "int8", "--window.overlap_sec", "0.5",
                            "--guide.trim_padding", "true", "--categories.sets", "{danger: [396]}"))
    assert (cfg.separator.max_passes, cfg.guide.dtype, cfg.window.overlap_sec, cfg.guide.trim_padding) == \
        (2, "int8", 0.5, True)
    assert cfg.categories.sets == {"danger": [396]}
    assert _config(_args()).to_dict() == AstsepConfig().to_dict()


def test_precedence_is_defaults_then_yaml_then_dotted_options_then_shortcuts(tmp_path):
    path = _yaml(tmp_path, "separator:\n  max_passes: 2\n  rounds: 2\nguide:\n  dtype: bfloat16\n")
    cfg = _config(_args("--config", str(path)))
    assert (cfg.separator.max_passes, cfg.separator.rounds, cfg.separator.nmf_components) == (2, 2, 32)
    cfg = _config(_args("--config", str(path), "--separator.max_passes", "4", "--guide.dtype", "int8"))
    assert (cfg.separator.max_passes, cfg.separator.rounds, cfg.guide.dtype) == (4, 2, "int8")
    cfg = _config(_args("--config", str(path), "--separator.max_passes", "4", "--max-passes", "1",
                            "--guide.device", "cuda", "--device", "cpu", "--guide.allow_pickle", "false",
                            "--allow-pickle"))
    assert (cfg.separator.max_passes, cfg.guide.device, cfg.guide.allow_pickle) == (1, "cpu", True)


@pytest.mark.parametrize("argv, expected", [
    (["--separator.max_passes", "0"], "separator.max_passes must be an integer >= 1, got 0"),
    (["--separator.max_passes", "two"], "separator.max_passes must be an integer, got 'two'"),
    (["--guide.dtype", "fp8"], "guide.dtype must be one of float32, bfloat16, int8, got 'fp8'"),
    (["--max-passes", "0"], "separator.max_passes must be an integer >= 1, got 0"),
    (["--min-eratio", "1.5"], "separator.min_eratio must be >= 0 and < 1, got 1.5"),
])
def test_a_bad_option_value_is_one_line_and_exit_2_before_any_audio_is_read(tmp_path, capsys, argv, expected):
    code = cli.main(["-i", str(tmp_path / "missing.wav"), "-o", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"astsep: error: {expected}", err
    assert not (tmp_path / "out").exists()


def test_separate_overrides_are_checked_and_leave_the_callers_config_alone(monkeypatch):
    import numpy as np

    import astsep
    from astsep import api

    cfg = AstsepConfig()
    with pytest.raises(ConfigError, match="separator.max_passes must be an integer >= 1"):
        astsep.separate(np.zeros(1600, dtype=np.float32), 16000, config=cfg, max_passes=0)
    with pytest.raises(ConfigError, match="separator.min_eratio must be a finite number"):
        astsep.separate(np.zeros(1600, dtype=np.float32), 16000, config=cfg, min_eratio="0.1")
    seen = []
    monkeypatch.setattr(api, "get_pipeline", lambda c: seen.append(c) or (_ for _ in ()).throw(RuntimeError))
    with pytest.raises(RuntimeError):
        astsep.separate(np.zeros(1600, dtype=np.float32), 16000, config=cfg, max_passes=2, device="cpu")
    assert (seen[0].separator.max_passes, seen[0].guide.device) == (2, "cpu")
    assert (cfg.separator.max_passes, cfg.guide.device) == (3, "auto")
