"""The real EfficientAT mn04 tagger (``../shared/models/efficientat_mn04_as``) as a first-class guide.

Every test here runs the real, trained weights on real recordings from ``../shared/data``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from astsep.config import AstsepConfig, apply_overrides
from astsep.data.classsplit import HELD_OUT, class_split_dev, split_sounds
from astsep.devset import ESC50_FITTING
from astsep.efficientat import MN04_SHA256, MelFrontEnd, MobileNetTagger, file_sha256, load_tagger
from astsep.errors import ModelLoadError
from astsep.guidance import Guide
from astsep.guide import ASTGuide
from astsep.guide_loader import load_guide, tagger_labels
from astsep.metrics import si_sdri
from astsep.oracle import OracleGuide
from astsep.pipeline import Pipeline
from astsep.testing import tiny_ast

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "efficientat_mn04_as"
ESC = SHARED / "data" / "esc50_one_per_class"

pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason=f"the shared tagger weights are not at {MODEL}")


@pytest.fixture(scope="module")
def guide():
    return load_guide(AstsepConfig(), str(MODEL))


def test_every_one_of_the_312_tensors_loads_exactly():
    model, weights = load_tagger(MODEL)
    state = torch.load(weights, weights_only=True)
    assert len(state) == 312 and file_sha256(weights) == MN04_SHA256
    mine = model.state_dict()
    assert set(mine) == set(state)
    assert all(torch.equal(mine[k], state[k]) for k in state)
    assert sum(t.numel() for t in state.values()) == 993_485


def test_at_least_40_of_the_50_esc50_clips_have_a_fitting_class_in_the_top_3():
    model, _ = load_tagger(MODEL)
    labels = tagger_labels(MODEL)
    files = sorted(ESC.glob("*.flac"))
    x = torch.stack([torch.from_numpy(sf.read(f, dtype="float32")[0][:160000]) for f in files])  # 32 kHz
    with torch.no_grad():
        probs = torch.sigmoid(model(MelFrontEnd()(x)))
    top3 = probs.topk(3, dim=1).indices.tolist()
    hits = sum(any(labels[i] in ESC50_FITTING[f.name.split("__")[0]] for i in top) for f, top in zip(files, top3))
    assert len(files) == 50 and hits >= 40, hits


def test_front_end_is_the_published_log_mel_at_32_khz():
    fe = MelFrontEnd()
    mel = fe(torch.zeros(1, 32000))
    assert mel.shape == (1, 1, 128, 101)  # hop 320: 10 ms frames, centred
    assert torch.allclose(mel, torch.full_like(mel, (torch.log(torch.tensor(1e-5)) + 4.5) / 5))
    tone = torch.sin(2 * torch.pi * 1000 * torch.arange(32000) / 32000).unsqueeze(0)
    band = fe(tone)[0, 0, :, 50].argmax()
    hz = lambda m: 700 * (torch.exp(torch.tensor(m) / 1127) - 1)  # noqa: E731
    edges = torch.linspace(0, 1127 * torch.log1p(torch.tensor(15000 / 700)), 130)
    assert hz(float(edges[band])) < 1000 < hz(float(edges[band + 2]))


def test_a_bad_checkpoint_is_one_error_naming_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no EfficientAT weights"):
        load_tagger(tmp_path)
    bad = tmp_path / "mn04_as_mAP_432.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read EfficientAT weights"):
        load_tagger(tmp_path)
    state = MobileNetTagger().state_dict()
    state.pop("classifier.5.bias")
    torch.save(state, bad)
    with pytest.raises(ModelLoadError, match="does not fit the mn04 layout"):
        load_tagger(tmp_path)
    with pytest.raises(ModelLoadError, match="no class names"):
        tagger_labels(tmp_path)


def test_every_guide_implements_one_protocol(guide):
    ast = ASTGuide(tiny_ast(seed=0))
    x = torch.zeros(1, 16000)
    oracle = OracleGuide(x, torch.stack([x, x], dim=1), [[0, 1]], ["a", "b"])
    for g in (guide, ast, oracle):
        assert isinstance(g, Guide), type(g)
    assert guide.multilabel and not ast.multilabel


def test_tagger_probabilities_are_sigmoids_not_a_softmax(guide):
    clip = torch.from_numpy(sf.read(sorted(ESC.glob("siren__*.flac"))[0], dtype="float32")[0])
    import torchaudio.functional as AF

    x = AF.resample(clip, 32000, 16000).unsqueeze(0)
    out = guide(x)
    assert out.multilabel
    p = out.probs[0]
    assert torch.allclose(p, torch.sigmoid(out.logits[0]))
    assert float(p.sum()) > 1.2  # several classes of one siren are probable at once (Siren, Civil defense siren)
    assert {"Siren", "Civil defense siren"} & {guide.labels[i] for i in guide.classify(x)[0].topk(3).indices.tolist()}


def test_the_loop_grid_is_calibrated_and_the_class_map_is_not(guide):
    mixes = class_split_dev(SHARED / "data", "held_out", 4)
    x = torch.stack([m.mixture for m in mixes])
    out = guide(x)
    g = out.grid[:, :, :out.tp_valid]
    assert out.calibrated and 0 <= float(g.min()) and float(g.max()) <= 1
    assert max(float(row.std()) for row in g) > 0.05  # it splits a mixture (one it hears as one sound is all ones)
    cm = load_guide(apply_overrides(AstsepConfig(), {"tagger.method": "classmap"}), str(MODEL))
    out2 = cm(x[:1])
    assert not out2.calibrated and float(out2.grid[0, :, :out2.tp_valid].std()) > 0


def test_results_are_cached_by_content(guide):
    x = class_split_dev(SHARED / "data", "held_out", 2)[1].mixture.unsqueeze(0)
    first = guide(x)
    hits = guide.cache_hits
    again = guide(x)
    assert guide.cache_hits == hits + 1 and torch.equal(first.grid, again.grid)


def test_the_dev_split_keeps_held_out_classes_out_of_the_tuning_sounds():
    train = split_sounds(SHARED / "data", "train", more=True)
    held = split_sounds(SHARED / "data", "held_out", more=True)
    assert {s.key for s in held if s.group == "esc50"} == set(HELD_OUT["esc50"])
    assert not {s.key for s in train} & {s.key for s in held}
    assert len(train) + len(held) > 50 + 249  # both ESC-50 folders, plus speech and music
    for m in class_split_dev(SHARED / "data", "train", 40):
        a, b = m.name.split("_", 1)[1].rsplit("@", 1)[0].split("+")
        assert a != b and a not in HELD_OUT["esc50"] and b not in HELD_OUT["esc50"]


def test_the_real_guide_separates_held_out_mixtures(guide):
    """Pass 1 against the sound it separated (either of the pair): the mean over 6 held-out mixtures
    gains well over the 0 dB of doing nothing (a random guide gives about -1 dB here)."""
    pipe = Pipeline(AstsepConfig(), guide)
    gains = []
    for m in class_split_dev(SHARED / "data", "held_out", 6):
        res = pipe.run(m.mixture, m.name, keep_traces=True)
        first = res.traces[0][2]["sources"][0]
        gains.append(max(float(si_sdri(first[None], m.mixture[None], ref[None])[0]) for ref in (m.target, m.interferer)))
        assert float((sum(res.sources.values()) - m.mixture).abs().max()) < 1e-4  # the files add up
    assert sum(gains) / len(gains) > 3.0, gains


def test_infer_py_separates_and_labels_with_the_tagger(tmp_path):
    m = class_split_dev(SHARED / "data", "held_out", 3)[2]
    wav = tmp_path / "mix.wav"
    sf.write(wav, m.mixture.numpy(), 16000, subtype="FLOAT")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "infer.py"), "-i", str(wav), "-o", str(out), "--model", str(MODEL),
                        "--outbox", str(tmp_path / "outbox.sqlite3")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    events = json.loads((out / "events.json").read_text())
    assert events["events"] and all(0 <= e["confidence"] <= 1 and e["category"] for e in events["events"])
    labels = tagger_labels(MODEL)
    assert all(e["label"] in labels for e in events["events"])
    total = sum(torch.from_numpy(sf.read(f, dtype="float32")[0]) for f in out.glob("*.wav"))
    assert float((total - m.mixture).abs().max()) < 1e-4


class DoneAfterFirst:
    """An oracle that says, from the second pass on, that nothing is left to separate (``done``)."""

    def __init__(self, inner: OracleGuide):
        self.inner = inner
        self.labels, self.layout, self.hidden_size = inner.labels, inner.layout, inner.hidden_size
        self.time_patches, self.max_frames, self.multilabel = inner.time_patches, inner.max_frames, False
        self.device, self.cfg, self.name = inner.device, inner.cfg, "done-after-first"

    def __call__(self, x, rows=None, pass_index=0):
        out = self.inner(x, rows)
        out.done = torch.full((x.shape[0],), pass_index > 0)
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_guide_that_says_done_ends_the_passes_and_leaves_the_rest_in_the_residual():
    m = class_split_dev(SHARED / "data", "train", 1)[0]
    labels = ["a", "b"]
    oracle = OracleGuide(m.mixture[None], torch.stack([m.target, m.interferer])[None], [[0, 1]], labels)
    cfg = AstsepConfig()
    out = Pipeline(cfg, DoneAfterFirst(oracle)).run(m.mixture, m.name, keep_traces=True)
    kept = [bool(t["kept"]) for t in out.traces[0][2]["traces"]]
    assert kept[0] and not any(kept[1:])
    full = Pipeline(cfg, OracleGuide(m.mixture[None], torch.stack([m.target, m.interferer])[None], [[0, 1]], labels))
    assert sum(bool(t["kept"]) for t in full.run(m.mixture, m.name, keep_traces=True).traces[0][2]["traces"]) > 1
    assert float((sum(out.sources.values()) - m.mixture).abs().max()) < 1e-4


def test_the_alert_stage_judges_a_tagger_on_its_own_sigmoid_threshold(guide):
    from astsep.audio import load_audio
    from astsep.config import LiveConfig
    from astsep.live.alert import AlertStage
    from astsep.live.trigger import Analysis

    clip = load_audio(sorted((SHARED / "data" / "esc50_more").glob("siren__*.flac"))[0])[0]
    excerpt = Analysis(0, clip[16000:32000].numpy()[None], "level", 0.0)  # one second of a siren
    cfg = AstsepConfig()
    probs = guide.classify(clip[16000:32000][None])[0]
    top = float(probs[[i for ids in cfg.categories.sets.values() for i in ids]].max())
    assert cfg.tagger.alert_threshold < top < cfg.live.alert_threshold  # the softmax threshold would miss it
    hit = AlertStage(Pipeline(cfg, guide), LiveConfig()).detect(excerpt)
    assert hit is not None and hit["category"] == "danger" and "siren" in hit["label"].lower()
    strict = apply_overrides(cfg, {"tagger.alert_threshold": min(1.0, top + 0.01)})
    assert AlertStage(Pipeline(strict, guide), LiveConfig()).detect(excerpt) is None


def test_a_missing_model_folder_names_both_kinds_of_model(tmp_path):
    from astsep.guide_loader import build_guide

    with pytest.raises(ModelLoadError, match="model folder not found.*EfficientAT tagger folder"):
        build_guide(str(tmp_path / "no-such-model"), AstsepConfig().guide)
