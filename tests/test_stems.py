"""MUSDB18-style stem evaluation: class → stem mapping, the MUSDB layout, museval scores."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from astsep import evaluate, stemset
from astsep.stems import STEMS, StemMap, assign_stems, load_stem_map, read_track, score_stems
from astsep.testing import force_class, tiny_ast

try:
    import museval  # noqa: F401 - imports musdb → stempeg, which needs ffmpeg on the PATH
    MUSEVAL_ERROR = None
except (ImportError, RuntimeError) as exc:
    MUSEVAL_ERROR = str(exc).splitlines()[0]

needs_museval = pytest.mark.skipif(MUSEVAL_ERROR is not None, reason=f"museval cannot be imported ({MUSEVAL_ERROR}); "
                                   "install ffmpeg (apt-get install ffmpeg)")
needs_fluidsynth = pytest.mark.skipif(not stemset.fluidsynth_available(),
                                      reason="FluidSynth or a GM SoundFont is missing (apt-get install fluidsynth "
                                             "fluid-soundfont-gm); the stem set renders its bass and drums with it")

SPEECH, BASS_GUITAR, SIREN = 0, 142, 396


@pytest.fixture(scope="module")
def stem_dir(tmp_path_factory, shared):
    """One 3 s track at 44.1 kHz stereo, MUSDB18-HQ layout (FluidSynth bass and drums, shared speech and music)."""
    if not stemset.fluidsynth_available():
        pytest.skip("FluidSynth or a GM SoundFont is missing (apt-get install fluidsynth fluid-soundfont-gm)")
    root = tmp_path_factory.mktemp("musdb")
    stemset.make_stemset(root, n_tracks=1, seconds=3.0, rate=44100, data=shared)
    return root


def test_the_default_map_sends_voices_drums_and_basses_to_their_stems_and_the_rest_to_other():
    m = load_stem_map()
    assert m.stem_of(SPEECH) == "vocals" and m.stem_of(27) == "vocals"  # Speech, Singing
    assert m.stem_of(162) == "drums" and m.stem_of(168) == "drums"  # Drum kit, Bass drum
    assert m.stem_of(BASS_GUITAR) == "bass" and m.stem_of(194) == "bass"  # Bass guitar, Double bass
    assert m.stem_of(SIREN) == "other" and m.stem_of(SPEECH, residual=True) == "other"


def test_sources_of_one_stem_are_summed_and_the_residual_goes_to_its_stem():
    m = StemMap(stems={"vocals": [SPEECH, 27], "bass": [BASS_GUITAR]}, default="other", residual="other")
    a, b, c, r = (torch.full((8,), v) for v in (1.0, 2.0, 4.0, 8.0))
    stems, assignment = assign_stems([("Speech", SPEECH, False, a), ("Singing", 27, False, b),
                                      ("Siren", SIREN, False, c), ("residual", None, True, r)], m, 8)
    assert torch.equal(stems["vocals"], a + b) and torch.equal(stems["other"], c + r)
    assert not stems["drums"].any() and not stems["bass"].any()
    assert [x["stem"] for x in assignment] == ["vocals", "vocals", "other", "other"]


@pytest.mark.parametrize("bad, message", [({"stems": {"voice": [0]}}, "unknown stem 'voice'"),
                                          ({"stems": {"vocals": [0], "drums": [0]}}, "in both"),
                                          ({"stems": {"bass": [527]}}, "not an AudioSet class id")])
def test_a_bad_stem_map_is_refused_with_a_message_naming_the_problem(bad, message):
    from astsep.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        StemMap(**bad)


@needs_museval
@needs_fluidsynth
def test_true_stems_score_high_and_swapped_stems_score_low(tmp_path, shared):
    stemset.make_stemset(tmp_path, n_tracks=1, seconds=3.0, rate=16000, data=shared)
    track = read_track(next((tmp_path / "test").iterdir()))
    refs = track.references
    rng = np.random.default_rng(0)
    near = {s: refs[s] + 1e-3 * np.sqrt(np.mean(refs[s] ** 2)) * rng.standard_normal(refs[s].shape) for s in STEMS}
    good = score_stems(refs, near, track.rate)
    assert all(good[s]["SDR"] > 40 for s in STEMS), {s: good[s]["SDR"] for s in STEMS}
    swapped = dict(near, vocals=near["drums"], drums=near["vocals"], other=np.zeros_like(refs["other"]))
    bad = score_stems(refs, swapped, track.rate)
    assert bad["vocals"]["SDR"] < 0 and bad["drums"]["SDR"] < 0
    assert bad["bass"]["SDR"] == pytest.approx(good["bass"]["SDR"])  # one stem's score ignores the others'
    assert bad["other"]["silent"] and bad["other"]["SDR"] is None  # BSS Eval cannot score silence

def test_the_stem_set_is_a_musdb_layout_whose_mixture_is_the_sum_of_its_stems(stem_dir, shared):
    folder = next((stem_dir / "test").iterdir())
    track = read_track(folder)
    assert track.rate == 44100 and track.mixture.shape == (3 * 44100, 2)
    assert np.array_equal(track.mixture, sum(track.references[s] for s in STEMS))
    for s in STEMS:  # every stem sounds, at its own level
        assert np.sqrt(np.mean(track.references[s] ** 2)) > 10 ** (-35 / 20), s


@needs_museval
@pytest.mark.parametrize("class_id, stem", [(SPEECH, "vocals"), (BASS_GUITAR, "bass")])
def test_musdb_evaluation_maps_a_forced_class_to_its_stem_and_scores_it(stem_dir, tmp_path, capsys, class_id, stem,
                                                                         shared):
    model_dir = tmp_path / "ast"
    m = tiny_ast(seed=2)
    force_class(m, class_id)
    m.save_pretrained(model_dir)
    out = tmp_path / "report"
    code = evaluate.main(["--musdb", str(stem_dir), "--guide-model", str(model_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    rep = json.loads((out / "musdb.json").read_text())
    (row,) = rep["tracks"]
    sources = [a for a in row["sources"] if not a["residual"]]
    assert sources and all(a["class_id"] == class_id and a["stem"] == stem for a in sources)
    assert [a["stem"] for a in row["sources"] if a["residual"]] == ["other"]
    scored = {s for s, v in row["stems"].items() if not v["silent"]}
    assert scored == {stem, "other"}
    assert all(isinstance(row["stems"][s][m], float) for s in scored for m in ("SDR", "SIR", "ISR", "SAR"))
    assert rep["summary"][stem]["scored_tracks"] == 1 and f"| {stem} |" in printed
    museval_json = json.loads(next((out / "museval" / "test").glob("*.json")).read_text())
    assert {t["name"] for t in museval_json["targets"]} == scored


@needs_museval
@pytest.mark.parametrize("case", ["missing_stem", "no_subset"])
def test_a_broken_musdb_folder_gives_one_line_and_exit_2(stem_dir, tmp_path, capsys, case):
    root = tmp_path / "broken"
    shutil.copytree(stem_dir, root)
    if case == "missing_stem":
        next((root / "test").iterdir()).joinpath("bass.wav").unlink()
        expected = "bass.wav is missing"
    else:
        expected = "has no train/ folder"
    args = ["--musdb", str(root), "--guide-model", "tiny", "--out", str(tmp_path / "o")]
    code = evaluate.main(args + (["--subset", "train"] if case == "no_subset" else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0]
