"""The pipeline and the Python API: windows, cross-fade, nothing lost, cache, classification, events."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import astsep
from astsep.config import AstsepConfig, load_config
from astsep.errors import AudioError, ConfigError
from astsep.audio import dbfs, rms_db
from astsep.events import active_span, class_records
from astsep.guide import ASTGuide
from astsep.guidance import top_classes
from astsep.pipeline import Pipeline, crossfade_weights, window_starts
from astsep.testing import force_class, tiny_ast

from conftest import SEED_RECORDING, clip, mixture, written_sum


def snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    err = float(np.sum((ref.astype(np.float64) - est) ** 2))
    return float("inf") if err == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / err)


def test_windows_cover_the_file_and_weights_sum_to_one():
    for n in (1000, 163840, 163841, 170000, 320000, 16000 * 61, 16000 * 300 + 7):
        win, ovl = 163840, 16000
        starts = window_starts(n, win, ovl)
        assert starts[0] == 0 and starts[-1] + min(win, n) == n
        for a, b in zip(starts, starts[1:]):
            assert b - a <= win - ovl  # neighbours overlap by at least the cross-fade
        total = torch.zeros(n, dtype=torch.float64)
        for s, w in zip(starts, crossfade_weights(starts, win, n, ovl)):
            total[s:s + w.numel()] += w.double()
        assert torch.allclose(total, torch.ones(n, dtype=torch.float64), atol=1e-6), n


def test_files_add_back_up_to_the_input_on_a_long_mixture(tmp_path, shared):
    # 25 s: three overlapping windows, written to disk and read back
    parts = [mixture("siren", "dog"), mixture("crying_baby", "rain"), clip("church_bells"), mixture("engine", "crow"),
             clip("door_wood_knock")]
    x = torch.cat(parts)
    guide = ASTGuide(tiny_ast(seed=0))
    res = astsep.separate(x, 16000, guide=guide)
    assert res.stats["windows"] == 3
    res.write(tmp_path)
    manifest = json.loads((tmp_path / "events.json").read_text())
    total = np.zeros(x.numel())
    for name in manifest["files"]:
        data, sr = sf.read(tmp_path / name, dtype="float64")
        assert sr == 16000 and data.shape == (x.numel(),)
        total += data
    assert snr_db(x.numpy(), total) >= 60.0
    # at most one AST forward per pass per window, plus one per classified residual window
    st = manifest["stats"]
    assert st["ast_forwards_separation"] <= 3 * st["windows"]
    assert st["ast_forwards_residual"] <= st["windows"]
    assert st["ast_forwards"] == st["ast_forwards_separation"] + st["ast_forwards_residual"]
    for ev in manifest["events"]:
        assert 0 <= ev["window"] < 3
        if ev["start_sec"] is not None:
            assert 0 <= ev["start_sec"] <= ev["end_sec"] <= x.numel() / 16000 + 1e-3
        assert ev["file"] in manifest["files"]


def test_reference_recording_uses_at_most_three_forwards_plus_a_counted_residual(shared):
    guide = ASTGuide(tiny_ast(seed=0))
    res = astsep.separate(str(SEED_RECORDING), guide=guide)
    st = res.stats
    assert st["windows"] == 1 and st["ast_forwards_separation"] <= 3
    assert st["ast_forwards_residual"] in (0, 1)
    assert st["ast_forwards"] == guide.forwards


def test_residual_is_not_classified_when_it_holds_too_little_energy(shared):
    cfg = AstsepConfig()
    cfg.separator.residual_min_share = 1.01  # nothing can hold more than everything
    guide = ASTGuide(tiny_ast(seed=0))
    res = astsep.separate(str(SEED_RECORDING), config=cfg, guide=guide)
    assert res.stats["ast_forwards_residual"] == 0
    assert res.stats["ast_forwards"] == res.stats["ast_forwards_separation"] <= 3


def test_a_window_behind_runs_its_first_pass_and_names_its_residual(shared):
    """``should_stop`` (live mode: a newer window waits) ends the passes after the first; the rest
    is in the residual, which is still classified. Asked and False, everything runs as without it."""
    cfg = AstsepConfig()
    cfg.separator.residual_min_share = 0.0  # the residual is always classified
    x = mixture("siren", "dog", seconds=4.0)
    full = Pipeline(cfg, ASTGuide(tiny_ast(seed=0))).run(x, "full", should_stop=lambda: False).stats
    assert full["windows_cut"] == 0 and full["passes_run"] > 1 and full["ast_forwards_residual"] == 1
    cut = Pipeline(cfg, ASTGuide(tiny_ast(seed=0))).run(x, "cut", should_stop=lambda: True)
    st = cut.stats
    assert st["windows_cut"] == 1 and st["passes_run"] == 1
    assert (st["ast_forwards_separation"], st["ast_forwards_residual"]) == (1, 1)
    residual = [e for e in cut.events if e["kind"] == "residual"]
    assert residual and residual[0]["class_id"] is not None and residual[0]["class_id"] >= 0, residual


def test_same_audio_again_runs_no_forward_in_process_or_with_a_disk_cache(tmp_path, shared):
    model = tiny_ast(seed=0)
    cfg = AstsepConfig()
    cfg.guide.cache_dir = str(tmp_path / "cache")
    pipe = Pipeline(cfg, ASTGuide(model, cfg.guide))
    x = mixture("siren", "dog")
    first = pipe.run(x)
    again = pipe.run(x)
    assert first.stats["ast_forwards"] >= 1 and again.stats["ast_forwards"] == 0
    assert again.stats["cache_hits"] == first.stats["ast_forwards"]
    fresh = Pipeline(cfg, ASTGuide(model, cfg.guide))  # like a new process with --cache-dir
    third = fresh.run(x)
    assert third.stats["ast_forwards"] == 0
    torch.testing.assert_close(third.residual, first.residual)


def test_a_siren_is_labelled_categorised_and_named(tmp_path, shared):
    model = tiny_ast(seed=1)
    force_class(model, 396)
    # A forced-class tiny AST's attention is nearly flat, so every pass takes nearly everything
    # (3 passes leave -114 dBFS). One pass, and a residual classified however little it holds,
    # keep a residual to name.
    cfg = AstsepConfig()
    cfg.separator.max_passes = 1
    cfg.separator.residual_min_share = 0.0
    res = astsep.separate(mixture("siren", "dog"), 16000, guide=ASTGuide(model), config=cfg)
    src = [e for e in res.events if e["kind"] == "source"]
    assert src and all(e["label"] == "Siren" and e["class_id"] == 396 and e["category"] == "danger" for e in src)
    assert all(e["top5"][0] == {"label": "Siren", "class_id": 396, "prob": e["top5"][0]["prob"]} for e in src)
    assert src[0]["confidence"] > 0.9 and src[0]["file"] == "00_Siren.wav"
    # the whole residual is confidently "Siren" too, so it is saved under that name, as the reference does
    assert res.tracks[-1].filename == "01_Siren.wav"
    res.write(tmp_path)
    assert (tmp_path / "00_Siren.wav").is_file() and (tmp_path / "01_Siren.wav").is_file()


def test_api_accepts_stereo_samples_at_any_rate(tmp_path, shared):
    x = clip("rooster", 2.0)
    stereo44 = torch.stack([x, 0.5 * x], dim=1)
    import torchaudio.functional as AF

    stereo44 = AF.resample(stereo44.T, 16000, 44100).T  # (N, 2) at 44.1 kHz
    res = astsep.separate(stereo44, 44100, guide=ASTGuide(tiny_ast(seed=0)))
    assert abs(res.num_samples - x.numel()) <= 2
    torch.testing.assert_close(written_sum(res, tmp_path), res.audio.double(), atol=1e-5, rtol=0)
    assert (res.stats["input_sample_rate"], res.stats["input_channels"]) == (44100, 2)  # what was given


def test_silent_input_gives_residual_only_and_says_so(shared):
    guide = ASTGuide(tiny_ast(seed=0))
    res = astsep.separate(torch.zeros(16000 * 3), 16000, guide=guide)
    assert res.labels == [] and guide.forwards == 0
    assert [t.filename for t in res.tracks] == ["00_residual.wav"]
    (ev,) = res.events
    assert ev["kind"] == "residual" and ev["silent"] is True and ev["label"] == "silence"
    assert res.stats["silent"] is True


def test_hostile_labels_cannot_escape_the_output_folder(tmp_path, shared):
    model = tiny_ast(seed=2)
    force_class(model, 7)
    model.config.id2label[7] = "../../evil/\x00name" + "x" * 300
    res = astsep.separate(mixture("cat", "rain"), 16000, guide=ASTGuide(model))
    out = tmp_path / "out"
    res.write(out)
    for f in tmp_path.rglob("*"):
        assert f == out or out in f.parents
    names = json.loads((out / "events.json").read_text())["files"]
    assert all("/" not in n and ".." not in n and len(n) < 80 for n in names)


def test_api_fast_option_loads_an_int8_guide_with_merged_padding(tmp_path, tiny_model_dir, shared):
    cfg = load_config(None)
    res = astsep.separate(str(SEED_RECORDING), model=str(tiny_model_dir), device="cpu", config=cfg, fast=True)
    assert (res.stats["dtype"], res.stats["pad_merge"]) == ("int8", 8)
    assert cfg.guide.dtype == "float32" and not cfg.guide.trim_padding  # the caller's config is not changed
    torch.testing.assert_close(written_sum(res, tmp_path), res.audio.double(), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="fast=True"):
        astsep.separate(str(SEED_RECORDING), guide=ASTGuide(tiny_ast(seed=0)), fast=True)


# --- issue 12: arrays, the pipeline cache, event ids, one event per sound, files ---------------
def _one_pass(window_sec: float | None = None) -> AstsepConfig:
    cfg = AstsepConfig()
    cfg.separator.max_passes = 1
    if window_sec:
        cfg.window.window_sec, cfg.window.overlap_sec = window_sec, 0.5
    return cfg


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_channels_first_samples_are_read_as_channels_and_stats_say_so(kind, shared):
    x = clip("rooster", 2.0)
    stereo = torch.stack([x, 0.5 * x])  # (2, N): torchaudio's layout
    arg = stereo if kind == "tensor" else stereo.numpy()
    res = astsep.separate(arg, 16000, guide=ASTGuide(tiny_ast(seed=0)), config=_one_pass())
    assert res.num_samples == x.numel()
    torch.testing.assert_close(res.audio, 0.75 * x, atol=1e-6, rtol=0)
    assert (res.stats["input_sample_rate"], res.stats["input_channels"]) == (16000, 2)
    assert res.stats["duration_sec"] == pytest.approx(2.0)


@pytest.mark.parametrize("shape", [(4, 6), (16, 48000), (1, 2, 16000)])
def test_an_ambiguous_array_shape_is_refused_with_a_clear_error(shape):
    guide = ASTGuide(tiny_ast(seed=0))
    with pytest.raises(AudioError, match="shape"):
        astsep.separate(np.full(shape, 0.1, dtype=np.float32), 16000, guide=guide)
    assert guide.forwards == 0


@pytest.mark.parametrize("dtype, full_scale", [(np.int16, 32768), (np.int32, 2 ** 31)])
def test_integer_pcm_is_scaled_by_its_dtype_range(dtype, full_scale, shared):
    x = clip("dog", 1.0).numpy()
    pcm = np.round(x * (full_scale - 1)).astype(dtype)
    res = astsep.separate(pcm, 16000, guide=ASTGuide(tiny_ast(seed=0)), config=_one_pass())
    np.testing.assert_allclose(res.audio.numpy(), x, atol=2e-4, rtol=0)
    assert res.stats["input_channels"] == 1


def test_changing_any_guide_setting_builds_a_new_guide_instead_of_reusing_the_cache(tiny_model_dir, shared):
    x = clip("siren", 1.0)
    cfg = _one_pass()
    cfg.guide.model = str(tiny_model_dir)
    cfg.guide.cache_size = 77  # a setting no other test uses: this test's own guides
    first = astsep.separate(x, 16000, config=cfg)
    again = astsep.separate(x, 16000, config=cfg)
    assert first.stats["ast_forwards"] >= 1 and again.stats["ast_forwards"] == 0  # same settings: cached
    cfg.guide.fbank_mean = 0.0
    changed = astsep.separate(x, 16000, config=cfg)
    assert changed.stats["ast_forwards"] >= 1  # a new normalisation: new AST results, not the old cache


def test_event_ids_of_long_inputs_depend_on_the_content_not_the_path(shared):
    cfg = _one_pass(window_sec=2.0)  # inputs over 4 windows (8 s) take the long-input path
    pipe = Pipeline(cfg, ASTGuide(tiny_ast(seed=0), cfg.guide))
    x = torch.cat([clip("siren", 5.0), clip("dog", 4.0)])
    here = pipe.run(x, "/data/a.wav")
    there = pipe.run(x.clone(), "/elsewhere/copy_of_a.flac")
    other = pipe.run(0.5 * x, "/data/a.wav")
    ids = [e["event_id"] for e in here.events]
    assert len(ids) == len(set(ids)) > 0
    assert ids == [e["event_id"] for e in there.events]
    assert not set(ids) & {e["event_id"] for e in other.events}


def test_one_sound_seen_by_two_overlapping_windows_is_one_event(shared):
    model = tiny_ast(seed=1)
    force_class(model, 396)
    x = clip("siren").repeat(3)[: int(10.30 * 16000)]  # 10.30 s: two windows overlapping by 10.18 s
    res = astsep.separate(x, 16000, guide=ASTGuide(model), config=_one_pass())
    assert res.stats["windows"] == 2
    src = [e for e in res.events if e["kind"] == "source"]
    assert len(src) == 1 and src[0]["label"] == "Siren" and src[0]["windows"] == [0, 1]
    assert src[0]["end_sec"] > 10.0  # spans both windows' seconds of the file


def test_loading_a_model_through_the_api_prints_no_progress_bars(tmp_path, capfd, shared):
    model_dir = tmp_path / "ast"
    tiny_ast(seed=3).save_pretrained(model_dir)
    capfd.readouterr()
    astsep.separate(clip("dog", 1.0), 16000, model=str(model_dir), config=_one_pass())
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err


def test_output_files_and_an_existing_folder_keep_the_modes_the_umask_gives(tmp_path):
    res = astsep.separate(torch.zeros(16000), 16000, guide=ASTGuide(tiny_ast(seed=0)))
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o755)
    old = os.umask(0o022)
    try:
        res.write(out)
        new = tmp_path / "new"
        res.write(new)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE(new.stat().st_mode) == 0o755
    for f in ("00_residual.wav", "events.json"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o644, f
        assert stat.S_IMODE((new / f).stat().st_mode) == 0o644, f


def test_debug_figures_of_later_windows_label_seconds_of_the_file(tmp_path, monkeypatch, shared):
    import matplotlib.figure

    first_x: dict[str, float] = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, path, *a, **k):
        first_x[Path(path).name] = float(fig.axes[0].lines[0].get_xdata()[0])  # the input waveform
        return save(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    cfg = _one_pass(window_sec=2.0)
    res = astsep.separate(mixture("siren", "dog", seconds=5.0), 16000, guide=ASTGuide(tiny_ast(seed=0)),
                          config=cfg, keep_traces=True)
    res.write(tmp_path / "out", debug=True, config=cfg)
    starts = {f"debug_w{w:03d}_pass_1.png" if w else "debug_pass_1.png": s / 16000 for w, s, _ in res.traces}
    later = [n for n in starts if n in first_x and starts[n] > 0]
    assert later, first_x
    for name in later:
        assert first_x[name] == pytest.approx(starts[name], abs=1e-6)


def test_top_classes_are_best_first_and_padded_when_there_are_fewer_classes_than_five():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    conf, cid, top_p, top_i = top_classes(probs)
    assert cid.tolist() == [1, 0] and conf.tolist() == pytest.approx([0.6, 0.5])
    assert top_i.tolist() == [[1, 2, 0, -1, -1], [0, 2, 1, -1, -1]]
    assert top_p[0].tolist() == pytest.approx([0.6, 0.3, 0.1, 0.0, 0.0])
    # the events' list leaves the padding out
    assert class_records(top_i[0], top_p[0], ["a", "b", "c"]) == [
        {"label": "b", "class_id": 1, "prob": 0.6}, {"label": "c", "class_id": 2, "prob": 0.3},
        {"label": "a", "class_id": 0, "prob": 0.1}]


def test_rms_level_in_db_of_a_full_scale_sine_silence_and_a_batch():
    t = torch.arange(16000, dtype=torch.float64) / 16000
    sine = torch.sin(2 * torch.pi * 440 * t)
    assert dbfs(sine) == pytest.approx(-3.0103, abs=1e-3)  # RMS 1/sqrt(2)
    assert dbfs(torch.zeros(100)) == float("-inf") and dbfs(torch.zeros(0)) == float("-inf")
    levels = rms_db(torch.stack([sine, 0.1 * sine, torch.zeros_like(sine)]))
    assert levels.tolist() == pytest.approx([-3.0103, -23.0103, -300.0], abs=1e-3)  # silence: the -300 dB floor
    # the active span is where 10 ms frames are within the threshold of the loudest
    x = torch.cat([torch.zeros(1600), sine[:3200].float(), torch.zeros(1600)])
    assert active_span(x, -30.0, -80.0) == pytest.approx((0.1, 0.3))
    assert active_span(torch.zeros(3200), -30.0, -80.0) is None


def test_events_json_holds_the_whole_config_by_value_and_rebuilds_the_same_run(tmp_path, shared):
    from astsep.config import apply_overrides, config_from_dict

    x = mixture("dog", "rain", seconds=3.0)
    cfg = apply_overrides(AstsepConfig(), {"separator.rounds": 2, "window.window_sec": 2.0, "window.overlap_sec": 0.5,
                                           "categories.sets": {"danger": [396]}})
    first = astsep.separate(x, 16000, config=cfg, guide=ASTGuide(tiny_ast(seed=0), cfg.guide), max_passes=2)
    first.write(tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "events.json").read_text())["stats"]["config"]
    assert set(recorded) == {"stft", "separator", "guide", "tagger", "window", "categories"}
    assert recorded["separator"]["max_passes"] == 2 and recorded["window"]["overlap_sec"] == 0.5
    rebuilt = config_from_dict(recorded)  # the run, reproduced from its output folder alone
    assert rebuilt == apply_overrides(cfg, {"separator.max_passes": 2})
    again = astsep.separate(x, 16000, config=rebuilt, guide=ASTGuide(tiny_ast(seed=0), rebuilt.guide))
    assert [e["event_id"] for e in again.events] == [e["event_id"] for e in first.events]
    assert torch.equal(again.residual, first.residual)


def test_the_recorded_guide_settings_are_those_the_ast_ran_with():
    cfg = AstsepConfig()
    guide = ASTGuide(tiny_ast(seed=0), dataclasses.replace(cfg.guide, pad_merge=3, trim_padding=True))
    pipe = Pipeline(cfg, guide)
    res = pipe.run(torch.zeros(16000))
    assert res.stats["config"]["guide"]["pad_merge"] == 3 and res.stats["config"]["guide"]["trim_padding"] is True
    assert res.stats["config"]["separator"] == dataclasses.asdict(cfg.separator)


def test_each_source_is_reported_when_its_pass_ends_as_the_result_will_hold_it(shared):
    """``on_source`` (live mode) hands over each source as soon as its pass ends, before the next
    pass's AST forward, with the event ``result.events`` holds (before the windows' merge adds
    ``windows``) and its samples; the result is the
    same with or without it."""
    from astsep.devset import dev_mixtures, label_id
    from astsep.oracle import OracleGuide
    from astsep.testing import audioset_labels

    names = audioset_labels()
    labels = [names[i] for i in range(527)]
    it = dev_mixtures(shared)[0]
    ids = [label_id(labels, it.target_label), label_id(labels, it.interferer_label)]
    cfg = AstsepConfig()
    cfg.separator.max_passes = 3

    def guide():
        return OracleGuide(it.mixture, torch.stack([it.target, it.interferer]), ids, labels, None, cfg.stft)

    plain = Pipeline(cfg, guide()).run(it.mixture, it.name)
    g = guide()
    seen: list[tuple[dict, torch.Tensor, int]] = []
    early = Pipeline(cfg, g).run(it.mixture, it.name, on_source=lambda ev, x: seen.append((ev, x, g.forwards)))
    sources = [e for e in early.events if e["kind"] == "source"]
    assert [e for e in plain.events] == early.events
    assert len(seen) == len(sources) >= 2, [e["label"] for e in sources]
    for k, (ev, x, forwards) in enumerate(seen):
        assert ev == {key: v for key, v in sources[k].items() if key != "windows"}  # "windows": added by the merge
        assert ev["pass"] == k + 1
        assert forwards == k + 1  # reported before the next pass's forward ran
    for name in {ev["file"][:-4] for ev, _, _ in seen}:  # a class's file: the sum of its passes' sources
        torch.testing.assert_close(sum(x for ev, x, _ in seen if ev["file"][:-4] == name), early.sources[name])
