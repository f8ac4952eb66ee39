"""``infer.py --refiner``: refined sources still add up; queried extraction; clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from astsep.lit import RefinerModule
from astsep.query import EmbeddingTable, label_prompt
from astsep.refiner import Refiner
from astsep.testing import audioset_labels

from conftest import clip, fit_and_save, mixture
from infer_runner import infer, one_error_line

SMALL = {"n_masks": 3, "channels": 8, "max_channels": 16, "depth": 2, "cond_dim": 16, "groups": 4}


def _train_and_save(path, query_source: str, query_dim: int, **refiner) -> None:
    """Two real optimisation steps on shared-clip mixtures, saved by Lightning.

    ``query_source``: ``"table"`` (text queries) or ``"target_audio"`` / ``"pass"``: AST-embedding
    queries, trained (as only is allowed now) on the guide's embedding of each pass; callers in other
    test files still name those ``"target_audio"``, the name inference gives them."""
    query_source = "pass" if query_source == "target_audio" else query_source
    module = RefinerModule(refiner=dict(SMALL, query_dim=query_dim, **refiner), guide_model="tiny", guide_seed=0,
                           query_source=query_source, example_every_n_val=0)
    tgt = [clip("dog", 2.0), clip("siren", 2.0)]
    itf = [clip("rain", 2.0), clip("crow", 2.0)]
    batch = [{"mixture": t + i, "target": t, "query": torch.randn(query_dim), "has_query": torch.tensor(1.0)}
             for t, i in zip(tgt, itf)]
    fit_and_save(module, batch, path, steps=2)


@pytest.fixture(scope="module")
def audio_ckpt(tmp_path_factory):
    p = tmp_path_factory.mktemp("refiner") / "audio_query.ckpt"
    _train_and_save(p, "target_audio", 32)  # tiny AST: 32-dim pooled embeddings
    return p


@pytest.fixture(scope="module")
def text_ckpt_and_table(tmp_path_factory):
    d = tmp_path_factory.mktemp("refiner_text")
    _train_and_save(d / "text_query.ckpt", "table", 16)
    texts = [label_prompt(lab) for lab in audioset_labels().values()] + ["a dog barking", "rain falling"]
    texts = list(dict.fromkeys(texts))
    g = torch.Generator().manual_seed(0)
    EmbeddingTable(texts, torch.randn(len(texts), 16, generator=g), "random-test").save(d / "table.pt")
    return d / "text_query.ckpt", d / "table.pt"


def _sum_of_files(out, files):
    return sum(sf.read(out / f, dtype="float64")[0] for f in files if f.endswith(".wav"))


def test_refiner_checkpoint_loads_with_weights_only(audio_ckpt):
    ref = Refiner.load(audio_ckpt)
    assert ref.query_source == "target_audio" and ref.query_dim == 32 and ref.n_masks == 3


def test_refined_sources_still_add_up_and_say_which_model_made_them(tmp_path, tiny_model_dir, audio_ckpt, shared):
    path = tmp_path / "mix.wav"
    x = mixture("dog", "rain", seconds=4.0).numpy()
    sf.write(path, x, 16000, subtype="FLOAT")
    out = tmp_path / "out"
    proc = infer("-i", str(path), "-o", str(out), "-m", str(tiny_model_dir), "--refiner", str(audio_ckpt), "-q")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "events.json").read_text())
    src = [e for e in m["events"] if e["kind"] == "source"]
    assert src and all(e["model"] == f"refiner:{audio_ckpt.name}" for e in src)
    assert m["stats"]["refiner"] == audio_ckpt.name
    total = _sum_of_files(out, m["files"])
    assert 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - total) ** 2)) >= 60


def test_audio_query_extracts_one_source_plus_the_rest(tmp_path, tiny_model_dir, audio_ckpt, shared):
    path, query = tmp_path / "mix.wav", tmp_path / "dog_example.wav"
    x = mixture("dog", "rain", seconds=4.0).numpy()
    sf.write(path, x, 16000, subtype="FLOAT")
    sf.write(query, clip("dog", 2.0).numpy(), 16000)
    out = tmp_path / "out"
    proc = infer("-i", str(path), "-o", str(out), "-m", str(tiny_model_dir), "--refiner", str(audio_ckpt),
                 "--query-audio", str(query), "-q")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "events.json").read_text())
    wavs = [f for f in m["files"] if f.endswith(".wav")]
    assert wavs[0] == "00_dog_example.wav" and wavs[-1].startswith("01_")
    (ev,) = [e for e in m["events"] if e["kind"] == "source"]
    assert ev["query"] == "dog_example" and ev["category"] in {"danger", "help", "warning", "other"}
    assert m["stats"]["ast_forwards_query"] == 1
    total = _sum_of_files(out, wavs)
    assert 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - total) ** 2)) >= 60


def test_text_query_through_an_embedding_table(tmp_path, tiny_model_dir, text_ckpt_and_table, shared):
    ckpt, table = text_ckpt_and_table
    path = tmp_path / "mix.wav"
    sf.write(path, mixture("dog", "rain", seconds=3.0).numpy(), 16000)
    out = tmp_path / "out"
    proc = infer("-i", str(path), "-o", str(out), "-m", str(tiny_model_dir), "--refiner", str(ckpt),
                 "--query-table", str(table), "--query", "a dog barking", "--negative", "rain falling", "-q")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "events.json").read_text())
    (ev,) = [e for e in m["events"] if e["kind"] == "source"]
    assert ev["query"] == "a dog barking" and ev["negative_query"] == "rain falling"
    assert m["files"][0] == "00_a_dog_barking.wav"
    # every baseline source refined by label prompts from the same table
    proc = infer("-i", str(path), "-o", str(tmp_path / "all"), "-m", str(tiny_model_dir), "--refiner", str(ckpt),
                 "--query-table", str(table), "-q")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", ["missing_ckpt", "text_for_audio_refiner", "query_without_refiner", "text_not_in_table"])
def test_refiner_misuse_gives_one_line(tmp_path, tiny_model_dir, audio_ckpt, text_ckpt_and_table, case):
    path = tmp_path / "mix.wav"
    sf.write(path, np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32), 16000)
    args = ["-i", str(path), "-o", str(tmp_path / "out"), "-m", str(tiny_model_dir)]
    if case == "missing_ckpt":
        args += ["--refiner", str(tmp_path / "nope.ckpt")]
    elif case == "text_for_audio_refiner":
        args += ["--refiner", str(audio_ckpt), "--query", "a dog barking"]
    elif case == "query_without_refiner":
        args += ["--query", "a dog barking"]
    else:
        ckpt, table = text_ckpt_and_table
        args += ["--refiner", str(ckpt), "--query-table", str(table), "--query", "a sound nobody embedded"]
    proc = infer(*args)
    assert proc.returncode != 0
    assert one_error_line(proc).startswith("astsep: error:")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.fixture(scope="module")
def no_negative_ckpt(tmp_path_factory):
    p = tmp_path_factory.mktemp("refiner_noneg") / "no_negatives.ckpt"
    _train_and_save(p, "target_audio", 32, use_negative=False)
    return p


def _in_process(capsys, *args: str) -> tuple[int, str]:
    from astsep.frontends.infer import main

    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_a_negative_query_for_a_refiner_trained_without_negatives_is_refused(tmp_path, tiny_model_dir,
                                                                            no_negative_ckpt, capsys, shared):
    path, query, neg = tmp_path / "mix.wav", tmp_path / "dog.wav", tmp_path / "rain.wav"
    sf.write(path, mixture("dog", "rain", seconds=2.0).numpy(), 16000)
    sf.write(query, clip("dog", 1.0).numpy(), 16000)
    sf.write(neg, clip("rain", 1.0).numpy(), 16000)
    out = tmp_path / "out"
    rc, err = _in_process(capsys, "-i", str(path), "-o", str(out), "-m", str(tiny_model_dir),
                          "--refiner", str(no_negative_ckpt), "--query-audio", str(query), "--negative-audio", str(neg))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "without negative queries" in lines[0], err
    assert not (out / "events.json").exists()


def test_a_text_query_missing_from_the_table_names_the_nearest_entries(tmp_path, tiny_model_dir,
                                                                       text_ckpt_and_table, capsys, shared):
    ckpt, table = text_ckpt_and_table
    path = tmp_path / "mix.wav"
    sf.write(path, mixture("dog", "rain", seconds=2.0).numpy(), 16000)
    rc, err = _in_process(capsys, "-i", str(path), "-o", str(tmp_path / "out"), "-m", str(tiny_model_dir),
                          "--refiner", str(ckpt), "--query-table", str(table), "--query", "a dog barkin")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "'a dog barking'" in lines[0] and "nearest" in lines[0] and "--clap-ckpt" in lines[0]


def test_training_and_inference_default_to_the_same_baseline_settings():
    from astsep.config import baseline_settings, load_config
    from conftest import ROOT

    module = RefinerModule(refiner=dict(SMALL, query_dim=32), guide_model="tiny")
    infer_cfg = load_config(ROOT / "configs" / "separator.yaml")  # what infer.py reads by default
    assert module.hparams["baseline"] == baseline_settings(infer_cfg)
    assert module.cfg.guide.trim_padding is False


def test_a_checkpoint_records_the_baseline_by_value_and_inference_warns_naming_what_differs(tmp_path, caplog, shared):
    from astsep.config import load_config
    from astsep.pipeline import Pipeline

    sep_yaml = tmp_path / "sep.yaml"
    sep_yaml.write_text("separator:\n  rounds: 2\nguide:\n  trim_padding: true\n  pad_merge: 0\n")
    module = RefinerModule(refiner=dict(SMALL, query_dim=32), guide_model="tiny", separator_config=str(sep_yaml),
                           query_source="pass")
    s = clip("dog", 1.0)
    fit_and_save(module, [{"mixture": s + clip("rain", 1.0), "target": s}], tmp_path / "r.ckpt")
    sep_yaml.unlink()  # the checkpoint holds the values, not the path

    hp = torch.load(tmp_path / "r.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["baseline"]["separator"]["rounds"] == 2 and hp["baseline"]["guide"]["trim_padding"] is True
    reloaded = RefinerModule.load_from_checkpoint(tmp_path / "r.ckpt", map_location="cpu", weights_only=True)
    assert reloaded.cfg.separator.rounds == 2 and reloaded.cfg.guide.pad_merge == 0

    ref = Refiner.load(tmp_path / "r.ckpt")
    from astsep.guide import ASTGuide
    from astsep.testing import tiny_ast

    guide = ASTGuide.from_model(tiny_ast(seed=0), load_config(None).guide)
    with caplog.at_level("WARNING", logger="astsep.refiner.inference"):
        Pipeline(load_config(None), guide, refiner=ref)
    assert "separator.rounds" in caplog.text and "guide.trim_padding" in caplog.text and "guide.pad_merge" in caplog.text
    assert "stft." not in caplog.text and "max_passes" not in caplog.text
    caplog.clear()
    same = load_config(None, {"separator.rounds": 2, "guide.trim_padding": True, "guide.pad_merge": 0})
    with caplog.at_level("WARNING", logger="astsep.refiner.inference"):
        Pipeline(same, guide, refiner=ref)
    assert "other settings" not in caplog.text


def test_the_readme_flow_train_tiny_then_infer_with_its_checkpoint_runs_as_written(tmp_path, shared):
    """README: `train.py fit --config configs/refiner_tiny.yaml`, then `infer.py --refiner <its best-step
    checkpoint>` with no --model: the refiner brings the (tiny, random) AST it was trained on."""
    import train
    from conftest import ESC, ROOT

    code = train.main(["fit", "--config", str(ROOT / "configs" / "refiner_tiny.yaml"),
                       f"--data.train_csv={ESC / 'manifest.csv'}", "--trainer.max_steps=2", "--data.epoch_size=8",
                       "--data.val_mixtures=2", "--model.example_every_n_val=0", "--trainer.enable_progress_bar=false",
                       f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])
    assert code == 0
    ckpt = next(tmp_path.glob("astsep-refiner/*/checkpoints/best-step*.ckpt"))  # where the README looks
    path = tmp_path / "mix.wav"
    sf.write(path, mixture("dog", "rain", seconds=3.0).numpy(), 16000, subtype="FLOAT")
    proc = infer("-i", str(path), "-o", str(tmp_path / "out"), "--refiner", str(ckpt), "-q")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "out" / "events.json").read_text())
    assert m["stats"]["model"] == "tiny-ast-0"  # the config's guide_model: tiny, guide_seed: 0
    assert m["stats"]["refiner"] == ckpt.name


def test_a_refiner_given_an_ast_of_another_size_is_refused_in_one_line_saying_what_fits(tmp_path, audio_ckpt, shared):
    from astsep.testing import tiny_ast

    other = tmp_path / "ast16"
    tiny_ast(seed=0, hidden=16).save_pretrained(other)
    path = tmp_path / "mix.wav"
    sf.write(path, mixture("dog", "rain", seconds=2.0).numpy(), 16000, subtype="FLOAT")
    proc = infer("-i", str(path), "-o", str(tmp_path / "out"), "-m", str(other), "--refiner", str(audio_ckpt))
    line = one_error_line(proc)
    assert proc.returncode == 2
    assert "takes 32-dim AST embeddings" in line and "'tiny'" in line and "hidden size 16" in line
    assert line.startswith("astsep: error: --model: refiner")  # the front end names its option, the library the model
    assert "name no AST model to use the refiner's own guide" in line
    assert not (tmp_path / "out" / "events.json").exists()
