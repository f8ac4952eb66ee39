"""The compact AST forward (astsep/ast_model.py) gives what transformers' ASTForAudioClassification
gives: logits, the last layer's CLS→patch attention grid and the pooled embedding, to 1e-5 in float32,
on a tiny and on a full-size random model, loaded from the files ``save_pretrained`` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ASTForAudioClassification

from astsep.ast_model import CompactAST, load_compact_ast, modern_key
from astsep.config import GuideConfig
from astsep.guide import ASTGuide, load_ast_model
from astsep.testing import full_ast, tiny_ast

from conftest import ROOT, clip
from infer_runner import infer_imports

TOL = dict(atol=1e-5, rtol=1e-5)


def _sharpened_tiny(seed: int = 3):
    """A tiny random AST whose attention is peaked, so that a constant grid could not pass."""
    model = tiny_ast(seed=seed)
    with torch.no_grad():
        for layer in model.audio_spectrogram_transformer.layers:
            layer.attention.q_proj.weight.mul_(8.0)
        model.audio_spectrogram_transformer.embeddings.position_embeddings.normal_(0, 0.5)
    return model


def _same_outputs(ref: ASTGuide, ours: ASTGuide, x: torch.Tensor) -> None:
    a, b = ref(x), ours(x)
    torch.testing.assert_close(b.logits, a.logits, **TOL)
    torch.testing.assert_close(b.grid, a.grid, **TOL)
    torch.testing.assert_close(b.embedding, a.embedding, **TOL)
    assert b.tp_valid == a.tp_valid
    spread = (a.grid.amax(dim=(1, 2)) - a.grid.amin(dim=(1, 2))) / a.grid.mean(dim=(1, 2))
    assert bool((spread > 0.05).all()), "the attention grid is (nearly) constant: the comparison proves little"


@pytest.mark.parametrize("trim", [False, True], ids=["full_window", "trimmed_padding"])
def test_compact_forward_equals_transformers_on_a_tiny_model(tmp_path, shared, trim):
    model = _sharpened_tiny()
    model.save_pretrained(tmp_path)
    loaded = load_ast_model(str(tmp_path))
    assert isinstance(loaded, CompactAST)
    cfg = GuideConfig(device="cpu", trim_padding=trim)
    ref = ASTGuide(model, cfg)
    ours = ASTGuide.from_pretrained(GuideConfig(model=str(tmp_path), device="cpu", trim_padding=trim))
    assert isinstance(ours.model, CompactAST)
    assert ours.labels == ref.labels and (ours.freq_patches, ours.time_patches) == (ref.freq_patches, ref.time_patches)
    _same_outputs(ref, ours, torch.stack([clip("siren", 3.0), clip("crying_baby", 3.0)]))


def test_compact_forward_equals_transformers_on_the_full_size_architecture(tmp_path, shared):
    model = full_ast(seed=1)
    model.save_pretrained(tmp_path)
    ours = ASTGuide.from_pretrained(GuideConfig(model=str(tmp_path), device="cpu", cache_size=0))
    assert isinstance(ours.model, CompactAST) and ours.model.config.num_hidden_layers == 12
    ref = ASTGuide(model, GuideConfig(device="cpu", cache_size=0))
    x = clip("church_bells", 5.0).unsqueeze(0)
    a, b = ref(x), ours(x)
    torch.testing.assert_close(b.logits, a.logits, **TOL)
    torch.testing.assert_close(b.grid, a.grid, **TOL)
    torch.testing.assert_close(b.embedding, a.embedding, **TOL)


def test_compact_int8_guide_equals_the_transformers_int8_guide(tmp_path, shared):
    model = _sharpened_tiny(seed=4)
    model.save_pretrained(tmp_path)
    cfg = GuideConfig(device="cpu", dtype="int8", trim_padding=True)
    ref = ASTGuide(model, cfg)
    ours = ASTGuide.from_pretrained(GuideConfig(model=str(tmp_path), device="cpu", dtype="int8", trim_padding=True))
    assert isinstance(ours.model, CompactAST)
    assert not any(type(m) is torch.nn.Linear for m in ours.model.modules())  # every Linear is int8 now
    _same_outputs(ref, ours, torch.stack([clip("dog", 2.0), clip("rooster", 2.0)]))


def test_hidden_states_match_for_the_layer_probe(tmp_path, shared):
    model = _sharpened_tiny(seed=5)
    model.save_pretrained(tmp_path)
    ours = load_compact_ast(tmp_path)
    feats = torch.randn(2, 1024, 128)
    with torch.no_grad():
        a = model.audio_spectrogram_transformer(feats, output_hidden_states=True)
        b = ours.audio_spectrogram_transformer(feats, output_hidden_states=True)
    assert len(b.hidden_states) == len(a.hidden_states) == model.config.num_hidden_layers + 1
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(hb, ha, **TOL)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_values=feats).logits, model(input_values=feats).logits, **TOL)


@pytest.mark.parametrize("naming", ["as_saved", "transformers_5_names"])
def test_checkpoints_with_either_weight_naming_load_like_transformers_loads_them(tmp_path, shared, naming):
    model = _sharpened_tiny(seed=6)
    model.save_pretrained(tmp_path)  # transformers 5 still writes the ViT-style names of the Hub checkpoints
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    assert "audio_spectrogram_transformer.encoder.layer.0.attention.attention.query.weight" in state
    assert "audio_spectrogram_transformer.encoder.layer.1.output.dense.weight" in state
    renamed = {modern_key(k): v for k, v in state.items()}
    assert set(renamed) == set(model.state_dict())  # the names the modules carry
    if naming == "transformers_5_names":
        save_file(renamed, str(weights), metadata={"format": "pt"})
    theirs = ASTForAudioClassification.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ours = load_compact_ast(tmp_path)
    feats = torch.randn(1, 1024, 128)
    with torch.no_grad():
        ref = model(input_values=feats).logits
        torch.testing.assert_close(theirs(input_values=feats).logits, ref, **TOL)
        torch.testing.assert_close(ours(input_values=feats).logits, ref, **TOL)


def test_a_config_the_compact_forward_does_not_run_falls_back_to_transformers(tmp_path, shared):
    model = tiny_ast(seed=0)
    model.config.hidden_act = "quick_gelu"  # a transformers activation the compact forward does not have
    model.save_pretrained(tmp_path)
    loaded = load_ast_model(str(tmp_path))
    assert isinstance(loaded, ASTForAudioClassification)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "vit"
    with pytest.raises(ValueError, match="model_type"):
        from astsep.ast_model import CompactASTConfig

        CompactASTConfig.from_dict(cfg)


def test_missing_tensors_are_refused_not_left_random(tmp_path):
    model = tiny_ast(seed=0)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["classifier.dense.bias"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        load_compact_ast(tmp_path)


# A guide loaded from safetensors runs without transformers' modeling stack in the process.
NO_MODELING = """
import sys, torch
from astsep.config import GuideConfig
from astsep.guide import ASTGuide
g = ASTGuide.from_pretrained(GuideConfig(model=sys.argv[1], device="cpu", dtype=sys.argv[2], trim_padding=True))
out = g(torch.randn(1, 32000) * 0.1)
assert out.logits.shape == (1, 527) and out.grid.shape == (1, 12, 101), out
print(sorted(m for m in ("transformers.modeling_utils", "transformers.models.audio_spectrogram_transformer"
                         ".modeling_audio_spectrogram_transformer") if m in sys.modules), type(g.model).__name__)
"""


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_guide_from_safetensors_does_not_import_transformers_modeling(tmp_path, dtype):
    tiny_ast(seed=0).save_pretrained(tmp_path)
    proc = subprocess.run([sys.executable, "-c", NO_MODELING, str(tmp_path), dtype], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.split() == ["[]", "CompactAST"], proc.stdout


HUB_ID = """
import sys
from astsep.guide import load_ast_model
print(type(load_ast_model("someone/tiny-ast")).__name__)
"""


def test_a_hub_id_in_the_local_cache_loads_the_compact_forward(tmp_path):
    repo = tmp_path / "hub" / "models--someone--tiny-ast"
    commit = "0123456789abcdef0123456789abcdef01234567"
    tiny_ast(seed=0).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", HUB_ID], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.strip() == "CompactAST"


def test_a_corrupt_weight_file_is_a_model_error_not_a_traceback(tmp_path):
    from astsep.errors import ModelError

    tiny_ast(seed=0).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot load AST model"):
        load_ast_model(str(tmp_path))


@pytest.mark.parametrize("fast", [False, True], ids=["default", "fast"])
def test_an_infer_run_on_a_safetensors_model_imports_no_transformers_at_all(tmp_path, tiny_model_dir, shared, fast):
    args = ["-i", str(clip_path("dog")), "-o", str(tmp_path / "out"), "-m", str(tiny_model_dir), "-q"]
    res, proc = infer_imports(args + (["--fast"] if fast else []))
    assert res["code"] == 0, proc.stderr[-1500:]
    assert res["transformers"] == [], res["transformers"][:10]
    assert json.loads((tmp_path / "out" / "events.json").read_text())["stats"]["model"] == str(tiny_model_dir)


def clip_path(name: str):
    from conftest import ESC

    return next(ESC.glob(f"{name}__*.flac"))
