"""The AST guide: features match the reference extractor, attention matches eager, caching works."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchaudio.compliance.kaldi as kaldi
from transformers import ASTFeatureExtractor, ASTForAudioClassification

from astsep.config import GuideConfig
from astsep.errors import ConfigError, ModelError
from astsep.features import ast_fbank, ast_input, istft, mel_to_linear, stft
from astsep.config import STFTConfig
from astsep.guide import ASTGuide, Int8Linear, check_precision, fast_precision, load_ast_model, quantize_int8
from astsep.testing import tiny_ast

from conftest import SEED_RECORDING, clip


def test_batched_fbank_equals_kaldi_fbank_per_item(shared):
    x = torch.stack([clip("siren", 2.0), clip("dog", 2.0)])
    ours = ast_fbank(x)
    for i in range(2):
        ref = kaldi.fbank(x[i:i + 1], htk_compat=True, sample_frequency=16000, window_type="hanning",
                          num_mel_bins=128, use_energy=False, dither=0.0, frame_shift=10)
        torch.testing.assert_close(ours[i], ref, atol=1e-4, rtol=1e-5)


def test_ast_input_equals_transformers_feature_extractor(shared):
    x = clip("rooster")
    fe = ASTFeatureExtractor()  # default settings are the AudioSet checkpoint's
    ref = fe(x.numpy(), sampling_rate=16000, return_tensors="pt")["input_values"]
    ours, real = ast_input(x.unsqueeze(0), 1024, fe.mean, fe.std)
    assert real == 498
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


def test_stft_roundtrip_and_mel_to_linear_keeps_constants():
    cfg = STFTConfig()
    x = torch.randn(2, 12345)
    torch.testing.assert_close(istft(stft(x, cfg), cfg, 12345), x, atol=1e-5, rtol=1e-4)
    ones = mel_to_linear(torch.ones(3, 128), 201)
    torch.testing.assert_close(ones, torch.ones(3, 201))


def _eager_copy(model):
    eager = ASTForAudioClassification(model.config)
    eager.load_state_dict(model.state_dict())
    eager.config._attn_implementation = "eager"
    return eager.eval()


def test_sdpa_guide_attention_equals_eager_attention_and_is_not_constant(shared):
    model = tiny_ast(seed=3)
    with torch.no_grad():  # sharpen attention so a constant map could not pass by tolerance
        for layer in model.audio_spectrogram_transformer.layers:
            layer.attention.q_proj.weight.mul_(8.0)
    guide = ASTGuide(model)
    x = torch.stack([clip("siren"), clip("crying_baby")])
    out = guide(x)
    feats, _ = ast_input(x, 1024, guide.cfg.fbank_mean, guide.cfg.fbank_std)
    with torch.no_grad():
        ref = _eager_copy(model)(input_values=feats, output_attentions=True)
    assert ref.attentions and len(ref.attentions) == model.config.num_hidden_layers
    ref_grid = ref.attentions[-1][:, :, 0, 2:].mean(dim=1).reshape(2, 12, 101)
    torch.testing.assert_close(out.grid, ref_grid, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    spread = (out.grid.amax(dim=(1, 2)) - out.grid.amin(dim=(1, 2))) / out.grid.mean(dim=(1, 2))
    assert bool((spread > 0.05).all()), f"attention map is (nearly) constant: relative spread {spread.tolist()}"
    assert out.tp_valid == 50  # 5 s of audio cover 50 of the 101 time patches


def test_trimmed_forward_uses_fewer_patches_and_keeps_the_grid_shape(shared):
    model = tiny_ast(seed=0)
    full = ASTGuide(model, GuideConfig(trim_padding=False))
    trim = ASTGuide(model, GuideConfig(trim_padding=True))
    x = clip("dog", 3.0).unsqueeze(0)
    a, b = full(x), trim(x)
    assert a.grid.shape == b.grid.shape == (1, 12, 101)
    assert float(b.grid[0, :, 30:].abs().sum()) == 0.0  # 3 s = 298 frames: patches 0..29 hold audio
    assert float(b.grid[0, :, :30].abs().min()) > 0


def _forward(guide, x, trimmed):
    feats, real = ast_input(x, 1024, guide.cfg.fbank_mean, guide.cfg.fbank_std)
    with torch.no_grad():
        return guide.forward_features(feats, real if trimmed else None)


def test_merged_padding_is_exact_when_padded_patches_are_identical(shared):
    """Padded patches have the same content; with equal position embeddings they are identical
    tokens, and merging them with proportional attention must give the full forward's outputs."""
    model = tiny_ast(seed=0)
    with torch.no_grad():
        model.audio_spectrogram_transformer.embeddings.position_embeddings[:, 2:] = 0.0
    x = clip("siren", 3.0).unsqueeze(0)
    full = _forward(ASTGuide(model, GuideConfig()), x, trimmed=False)
    for group in (1, 7, 200):
        merged = _forward(ASTGuide(model, GuideConfig(trim_padding=True, pad_merge=group)), x, trimmed=True)
        torch.testing.assert_close(merged["logits"], full["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged["grid"][..., :30], full["grid"][..., :30], atol=1e-6, rtol=1e-4)
    dropped = _forward(ASTGuide(model, GuideConfig(trim_padding=True, pad_merge=0)), x, trimmed=True)
    assert float((dropped["logits"] - full["logits"]).abs().max()) > 1e-2  # dropping the padding is not exact


def test_merged_padding_stays_closer_to_the_full_forward_than_dropping_it(shared):
    model = tiny_ast(seed=1)  # random position embeddings: merging is approximate
    full_g, merge_g = ASTGuide(model, GuideConfig()), ASTGuide(model, GuideConfig(trim_padding=True))
    drop_g = ASTGuide(model, GuideConfig(trim_padding=True, pad_merge=0))
    for name in ("dog", "siren", "crying_baby"):
        x = clip(name, 2.5).unsqueeze(0)
        full = _forward(full_g, x, False)["logits"]
        merged, dropped = _forward(merge_g, x, True)["logits"], _forward(drop_g, x, True)["logits"]
        assert float((merged - full).abs().max()) < 0.25 * float((dropped - full).abs().max()), name


def test_int8_guide_is_close_to_float32_and_leaves_the_callers_model_alone(shared):
    model = tiny_ast(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref, q = ASTGuide(model, GuideConfig()), ASTGuide(model, GuideConfig(dtype="int8"))
    assert any(isinstance(m, Int8Linear) for m in q.model.modules())
    assert not any(type(m) is torch.nn.Linear for m in q.model.modules())
    assert q.fingerprint == ref.fingerprint  # same weights; the precision is part of the cache key
    assert q._settings() != ref._settings()
    x = torch.stack([clip("siren", 2.0), clip("dog", 2.0)])
    a, b = ref(x), q(x)
    assert a.logits.argmax(-1).tolist() == b.logits.argmax(-1).tolist()
    rel = float((a.logits - b.logits).abs().max() / a.logits.std())
    assert 0 < rel < 0.2, rel  # quantised (not bit-equal), yet close
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_int8_linear_layers_compute_what_torch_quantize_dynamic_computes(shared):
    import copy
    import warnings

    model = tiny_ast(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    ours = quantize_int8(copy.deepcopy(model))
    feats, _ = ast_input(torch.stack([clip("siren", 3.0), clip("dog", 3.0)]), 1024, -4.27, 4.57)
    with torch.no_grad():
        a, b = ref(input_values=feats).logits, ours(input_values=feats).logits
        assert torch.equal(a, b)  # the same quantised weights and the same op: bit for bit
        assert not torch.equal(b, model(input_values=feats).logits)  # and quantised indeed
        x = torch.randn(3, 7, 32)
        lin = model.audio_spectrogram_transformer.layers[0].mlp.fc1
        torch.testing.assert_close(Int8Linear(lin)(x), ref.audio_spectrogram_transformer.layers[0].mlp.fc1(x),
                                   atol=0, rtol=0)


def test_int8_guide_refuses_a_gpu_and_unknown_precisions_are_named():
    with pytest.raises(ConfigError, match="float32, bfloat16, int8"):
        GuideConfig(dtype="fp8")  # refused when the config is built, before any model is loaded
    with pytest.raises(ModelError, match="float32, bfloat16, int8"):
        check_precision("fp8", torch.device("cpu"))
    with pytest.raises(ModelError, match="CPU only"):
        check_precision("int8", torch.device("cuda"))
    check_precision("bfloat16", torch.device("cuda"))
    assert fast_precision(torch.device("cpu")) == "int8" and fast_precision(torch.device("cuda")) == "bfloat16"


def test_cache_in_memory_and_on_disk_skips_forwards(tmp_path, shared):
    model = tiny_ast(seed=0)
    x = clip("cat", 2.0).unsqueeze(0)
    g1 = ASTGuide(model, GuideConfig(cache_dir=str(tmp_path)))
    first = g1(x)
    g1(x)
    assert (g1.forwards, g1.cache_hits) == (1, 1)
    g2 = ASTGuide(model, GuideConfig(cache_dir=str(tmp_path)))  # a new process, same disk cache
    again = g2(x)
    assert (g2.forwards, g2.cache_hits) == (0, 1)
    torch.testing.assert_close(again.logits, first.logits)
    g3 = ASTGuide(tiny_ast(seed=5), GuideConfig(cache_dir=str(tmp_path)))  # another model: a miss
    g3(x)
    assert g3.forwards == 1
    g4 = ASTGuide(model, GuideConfig(cache_dir=str(tmp_path), trim_padding=True))  # other settings: a miss
    g4(x)
    assert g4.forwards == 1
    for other in (GuideConfig(cache_dir=str(tmp_path), trim_padding=True, pad_merge=0),
                  GuideConfig(cache_dir=str(tmp_path), dtype="int8")):
        g5 = ASTGuide(model, other)
        g5(x)
        assert g5.forwards == 1, other


def test_model_folder_with_only_pickle_weights_is_refused(tmp_path):
    model = tiny_ast(seed=0)
    model.save_pretrained(tmp_path, safe_serialization=False) if _can_save_pickle() else None
    if not any(tmp_path.glob("pytorch_model*.bin")):
        model.config.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="pickle"):
        load_ast_model(str(tmp_path))


def _can_save_pickle() -> bool:
    import inspect

    return "safe_serialization" in inspect.signature(ASTForAudioClassification.save_pretrained).parameters


def test_missing_folder_and_offline_hub_id_give_actionable_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_ast_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="cannot load AST model 'someone/not-a-real-ast-model'") as exc:
        load_ast_model("someone/not-a-real-ast-model")
    assert "--model" not in str(exc.value)  # the library names no command-line option; infer.py adds it
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_ast_model(str(empty))


def test_seed_recording_is_what_the_benchmarks_expect(shared):
    import soundfile as sf

    info = sf.info(str(SEED_RECORDING))
    assert info.samplerate == 16000 and np.isclose(info.duration, 5.056, atol=0.01)


def test_bfloat16_is_not_used_on_a_cpu_without_native_bf16_and_the_user_is_told(monkeypatch, caplog):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with caplog.at_level("WARNING", logger="astsep.guide"):
        g = ASTGuide(tiny_ast(seed=0), GuideConfig(device="cpu", dtype="bfloat16"))
    assert g.cfg.dtype == "float32" and next(g.model.parameters()).dtype == torch.float32
    assert "no native bfloat16" in caplog.text and "AVX2" in caplog.text
    caplog.clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with caplog.at_level("WARNING", logger="astsep.guide"):
        g = ASTGuide(tiny_ast(seed=0), GuideConfig(device="cpu", dtype="bfloat16"))
    assert g.cfg.dtype == "bfloat16" and next(g.model.parameters()).dtype == torch.bfloat16 and not caplog.text


def _forbid_fingerprints(monkeypatch):
    import astsep.guide as guide_mod

    def boom(*a, **k):
        raise AssertionError("fingerprint computed")

    monkeypatch.setattr(guide_mod, "fingerprint_params", boom)
    monkeypatch.setattr(guide_mod, "fingerprint_files", boom)


def test_the_fingerprint_is_not_computed_when_no_disk_cache_needs_it(tmp_path, monkeypatch, shared):
    d = tmp_path / "m"
    tiny_ast(seed=0).save_pretrained(d)
    x = clip("cat", 1.0).unsqueeze(0)
    _forbid_fingerprints(monkeypatch)
    for cfg in (GuideConfig(model=str(d), device="cpu"), GuideConfig(model=str(d), device="cpu", cache_size=0)):
        g = ASTGuide.from_pretrained(cfg)  # start-up hashes nothing
        g(x)
        g(x)  # the memory cache answers without any fingerprint
        assert g.forwards == (1 if cfg.cache_size else 2)
    g = ASTGuide(tiny_ast(seed=0), GuideConfig(device="cpu"))  # an in-memory model: no parameter sums either
    g(x)


def test_the_fingerprint_comes_from_the_weight_files_and_changes_with_them(tmp_path, monkeypatch, shared):
    import astsep.guide as guide_mod

    d = tmp_path / "m"
    model = tiny_ast(seed=0)
    model.save_pretrained(d)
    monkeypatch.setattr(guide_mod, "fingerprint_params", lambda m: pytest.fail("parameters summed for a model from files"))
    cfg = GuideConfig(model=str(d), device="cpu", cache_dir=str(tmp_path / "cache"))
    first = ASTGuide.from_pretrained(cfg).fingerprint
    x = clip("cat", 1.0).unsqueeze(0)
    g = ASTGuide.from_pretrained(cfg)
    g(x)
    assert g.fingerprint == first  # stable: same files
    copy_dir = tmp_path / "elsewhere"
    model.save_pretrained(copy_dir)  # the same weights in another folder share the disk cache
    g2 = ASTGuide.from_pretrained(dataclasses.replace(cfg, model=str(copy_dir)))
    g2(x)
    assert g2.fingerprint == first and (g2.forwards, g2.cache_hits) == (0, 1)
    with torch.no_grad():
        model.classifier.dense.bias[0] += 1e-3  # one value of one tensor
    model.save_pretrained(d)
    changed = ASTGuide.from_pretrained(cfg)
    assert changed.fingerprint != first
    changed(x)
    assert changed.forwards == 1  # a disk-cache miss: the old weights' results are not reused
