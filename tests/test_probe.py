"""`python -m astsep.probe`: features from the AST guide and the refiner, linear and 3-layer probes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf

from astsep import probe
from astsep.guide_loader import build_guide
from astsep.config import GuideConfig
from conftest import ESC, SHARED_DATA

FSDD = SHARED_DATA / "fsdd"
LIBROSA = SHARED_DATA / "librosa"
FSDD_PATTERN = r"^(?P<label>\d)_(?P<group>[a-z]+)_"


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = probe.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _tones_and_noise(root, n: int = 50, seconds: float = 1.0, sr: int = 16000):
    """A class-per-folder set that any working feature separates: steady tones vs white noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    for cls in ("tone", "noise"):
        (root / cls).mkdir(parents=True)
    for i in range(n):
        level = 10 ** rng.uniform(-1.5, -0.5)
        tone = level * np.sin(2 * np.pi * rng.uniform(200, 3000) * t)
        noise = level * rng.standard_normal(t.size) / 2
        sf.write(root / "tone" / f"{i:02d}.wav", tone.astype(np.float32), sr)
        sf.write(root / "noise" / f"{i:02d}.wav", noise.astype(np.float32), sr)
    return root


def test_probes_learn_tones_vs_noise_and_score_chance_on_shuffled_labels(tmp_path, capsys):
    data = _tones_and_noise(tmp_path / "set")
    code, out, err = _run(capsys, "--data", str(data), "--model", "tiny", "--features", "layer:0",
                          "--shuffled-control", "--out", str(tmp_path / "rep"))
    assert code == 0, out
    # stderr is not a terminal here: a line per stage instead of a progress bar
    lines = [ln for ln in err.splitlines() if ln.startswith("astsep.probe: ")]
    assert sum("features layer:0 of 100 examples" in ln for ln in lines) == 1
    assert sum(ln.startswith("astsep.probe: probe ") for ln in lines) == 4  # 2 probes x (true, shuffled)
    rep = json.loads((tmp_path / "rep" / "probe.json").read_text())
    assert rep["split"] == {"description": "stratified 80%/20% by label, seed 0", "train": 80, "test": 20}
    acc = {(r["probe"], r["labels"]): r["accuracy"] for r in rep["results"]}
    assert acc[("linear", "true")] >= 0.9 and acc[("mlp", "true")] >= 0.9
    shuffled = "shuffled (mean of 5)"  # 5 permutations x 20 test examples: chance 0.5, s.d. about 0.05
    assert 0.3 <= acc[("linear", shuffled)] <= 0.7 and 0.3 <= acc[("mlp", shuffled)] <= 0.7
    assert "| layer:0 | 32 | linear | true |" in out
    assert (tmp_path / "rep" / "probe.md").read_text() == out


def test_spoken_digits_are_split_by_speaker(shared, capsys, tmp_path):
    entries = probe.list_dataset(FSDD, FSDD_PATTERN)
    examples = probe.load_examples(entries)
    split = probe.make_split(examples, probe.ProbeConfig(), ["lucas"])
    assert {examples[i].group for i in split.test} == {"lucas"}
    assert {examples[i].group for i in split.train} == {"george", "jackson"}
    code, out, _ = _run(capsys, "--data", str(FSDD), "--pattern", FSDD_PATTERN, "--test-groups", "lucas",
                        "--model", "tiny", "--out", str(tmp_path))
    assert code == 0
    rep = json.loads((tmp_path / "probe.json").read_text())
    assert rep["split"]["train"] == 20 and rep["split"]["test"] == 10 and "test groups lucas" in out
    assert rep["classes"] == [str(d) for d in range(10)] and rep["chance"] == pytest.approx(0.1)
    assert [(r["features"], r["probe"]) for r in rep["results"]] == [("pooled", "linear"), ("pooled", "mlp")]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rep["results"])


def test_esc50_clips_cut_into_segments_get_a_stratified_split_that_says_so(shared, tmp_path, capsys):
    code, out, _ = _run(capsys, "--data", str(ESC), "--pattern", r"^(?P<label>.+?)__", "--segment", "1",
                        "--model", "tiny", "--features", "layer:1", "--probes", "linear", "--out", str(tmp_path))
    assert code == 0
    rep = json.loads((tmp_path / "probe.json").read_text())
    assert len(rep["classes"]) == 50 and rep["n_examples"] == 250
    assert rep["split"]["train"] == 200 and rep["split"]["test"] == 50
    assert "segments of one file can be in both train and test" in rep["split"]["description"]


def test_librispeech_speakers_are_picked_out_of_a_mixed_folder(shared):
    entries = probe.list_dataset(LIBROSA, r"^(?P<label>\d+)-\d+-\d+\.ogg$")
    assert sorted({e.label for e in entries}) == ["198", "3436", "5703"] and len(entries) == 3
    examples = probe.load_examples(entries, segment=1.0)
    split = probe.make_split(examples, probe.ProbeConfig(), None)
    guide = build_guide("tiny", GuideConfig(device="cpu"))
    X = {"pooled": probe.extract(examples, "pooled", guide)}
    rep = probe.run_probes(examples, X, split, probe.ProbeConfig(), ("linear",))
    assert X["pooled"].shape == (len(examples), 32)
    assert rep.split["train"] + rep.split["test"] == len(examples) > 20
    assert rep.classes == ["198", "3436", "5703"]


def test_a_csv_split_column_is_used_as_given(shared, tmp_path):
    rows = [{"path": str(p), "label": p.name[0], "split": "test" if "_jackson_" in p.name else "train"}
            for p in sorted(FSDD.glob("*.wav"))]
    csv_path = tmp_path / "digits.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    examples = probe.load_examples(probe.list_dataset(csv_path))
    split = probe.make_split(examples, probe.ProbeConfig(), None)
    assert split.description == "as given by the CSV's split column"
    assert all("_jackson_" in examples[i].source for i in split.test) and len(split.test) == 10


def test_refiner_bottleneck_features_depend_on_the_audio(shared, tmp_path, capsys):
    from test_refined_inference import _train_and_save

    ckpt = tmp_path / "refiner.ckpt"
    _train_and_save(ckpt, "target_audio", 32)
    from astsep.probe import load_refiner_module as load_refiner

    examples = probe.load_examples(probe.list_dataset(FSDD, FSDD_PATTERN))[:4]
    feats = probe.extract(examples, "refiner", refiner=load_refiner(ckpt))
    assert feats.shape == (4, 16)  # SMALL refiner: max_channels 16 at the bottleneck
    assert np.isfinite(feats).all() and np.abs(feats[0] - feats[1]).max() > 1e-4
    code, out, _ = _run(capsys, "--data", str(FSDD), "--pattern", FSDD_PATTERN, "--test-groups", "lucas",
                        "--features", "refiner", "--refiner", str(ckpt), "--probes", "linear")
    assert code == 0 and "| refiner | 16 | linear | true |" in out


@pytest.mark.parametrize("case", ["one_clip_per_class", "flat_folder_without_pattern", "refiner_without_ckpt",
                                  "unknown_group", "layer_out_of_range"])
def test_bad_probe_requests_give_one_line_and_exit_2(shared, capsys, case):
    args = {
        "one_clip_per_class": ["--data", str(ESC), "--pattern", r"^(?P<label>.+?)__"],
        "flat_folder_without_pattern": ["--data", str(FSDD)],
        "refiner_without_ckpt": ["--data", str(FSDD), "--pattern", FSDD_PATTERN, "--features", "refiner"],
        "unknown_group": ["--data", str(FSDD), "--pattern", FSDD_PATTERN, "--test-groups", "nobody"],
        "layer_out_of_range": ["--data", str(FSDD), "--pattern", FSDD_PATTERN, "--test-groups", "lucas",
                               "--features", "layer:3"],
    }[case]
    code, out, err = _run(capsys, *args, "--model", "tiny")
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: ")
    expected = {"one_clip_per_class": "needs at least 2 per class", "flat_folder_without_pattern": "--pattern",
                "refiner_without_ckpt": "--refiner CKPT", "unknown_group": "nobody",
                "layer_out_of_range": "layers 0..2"}[case]
    assert expected in lines[0]
