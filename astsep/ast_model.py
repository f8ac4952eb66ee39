"""A compact Audio Spectrogram Transformer for inference, in plain torch.

``transformers.ASTForAudioClassification`` is the reference (and what tests and training build),
but importing transformers' modeling stack costs ~2-3 s of a command-line run before any audio is
touched. This module is the same network — patch convolution, CLS and distillation tokens, position
embeddings, pre-norm ViT layers with SDPA attention, final layer norm, mean of the two tokens, MLP
head — written in ~150 lines of torch, loading the same ``config.json`` and ``*.safetensors`` files.

Its modules carry transformers' attribute names (``audio_spectrogram_transformer.embeddings``,
``.layers[i].attention.q_proj``, ``classifier.dense``…), so the state dict keys are the ones
transformers 5 uses and :class:`astsep.guide.ASTGuide` drives either model the same way. The files
hold the ViT-style names of the Hub checkpoints (``encoder.layer.N.attention.attention.query``…,
which transformers 5's ``save_pretrained`` still writes); they are renamed on load as transformers
renames them, and files with the new names load too. ``tests/test_ast_model.py`` holds logits, the last layer's
CLS→patch attention and the pooled embedding to transformers' within 1e-5 (float32).

Shapes: fbank input ``(B, max_length, num_mel_bins)`` (frames × mel bands, normalised as the AST
feature extractor does); tokens ``(B, 2 + Fp·Tp, hidden)``, patches frequency-major.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPE = "audio-spectrogram-transformer"

_ACTIVATIONS = {
    "gelu": F.gelu,  # erf GELU, transformers' "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

# the files' ViT-style names; transformers 5 renames them on load ("ViTModel" rules of
# its conversion mapping, which ASTModel uses). Applied in this order.
_LEGACY_RENAMES = [
    (r"encoder\.layer\.", "layers."),
    (r"attention\.attention\.query", "attention.q_proj"),
    (r"attention\.attention\.key", "attention.k_proj"),
    (r"attention\.attention\.value", "attention.v_proj"),
    (r"attention\.output\.dense", "attention.o_proj"),
    (r"intermediate\.dense", "mlp.fc1"),
    (r"output\.dense", "mlp.fc2"),
]


@dataclass
class CompactASTConfig:
    """The fields of transformers' ``ASTConfig`` that the forward uses (its defaults are the
    published AudioSet checkpoint's), plus the label names. ``raw`` is the ``config.json`` as read."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    patch_size: int = 16
    qkv_bias: bool = True
    frequency_stride: int = 10
    time_stride: int = 10
    max_length: int = 1024
    num_mel_bins: int = 128
    head_dim: int | None = None
    id2label: dict[int, str] = field(default_factory=dict)
    num_labels: int = 2
    _name_or_path: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], name_or_path: str = "") -> "CompactASTConfig":
        """From a ``config.json`` mapping. Raises ``ValueError`` for what this forward does not run
        (another model type, an unknown activation, a non-square patch)."""
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"model_type {d.get('model_type')!r} is not {MODEL_TYPE!r}")
        if d.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {d.get('hidden_act')!r} is not one of {sorted(_ACTIVATIONS)}")
        if not isinstance(d.get("patch_size", 16), int):
            raise ValueError(f"patch_size {d.get('patch_size')!r} is not one integer")
        names = {f.name for f in dataclasses.fields(cls)} - {"id2label", "num_labels", "_name_or_path", "raw"}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        id2label = {int(k): str(v) for k, v in (d.get("id2label") or {}).items()}
        num_labels = int(d.get("num_labels", len(id2label) or 2))
        return cls(**kwargs, id2label=id2label, num_labels=num_labels, _name_or_path=name_or_path, raw=dict(d))

    @property
    def attention_head_dim(self) -> int:
        return int(self.head_dim or self.hidden_size // self.num_attention_heads)

    def to_diff_dict(self) -> dict[str, Any]:
        """The ``config.json`` content (what the guide's fingerprint hashes)."""
        return dict(self.raw)


@dataclass
class EncoderOutput:
    """``last_hidden_state`` ``(B, S, H)`` after the final layer norm; ``pooler_output`` ``(B, H)``
    the mean of the CLS and distillation tokens; ``hidden_states``: the embeddings and every layer's
    output (before the final norm), when asked for."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # (B, num_labels)
    hidden_states: tuple[torch.Tensor, ...] | None = None


class PatchEmbeddings(nn.Module):
    def __init__(self, c: CompactASTConfig):
        super().__init__()
        self.projection = nn.Conv2d(1, c.hidden_size, kernel_size=(c.patch_size, c.patch_size),
                                    stride=(c.frequency_stride, c.time_stride))

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """``(B, frames, mels)`` → ``(B, Fp·Tp, H)`` patch tokens, frequency-major."""
        return self.projection(fbank.unsqueeze(1).transpose(2, 3)).flatten(2).transpose(1, 2)


class Embeddings(nn.Module):
    def __init__(self, c: CompactASTConfig):
        super().__init__()
        fp = (c.num_mel_bins - c.patch_size) // c.frequency_stride + 1
        tp = (c.max_length - c.patch_size) // c.time_stride + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, fp * tp + 2, c.hidden_size))
        self.patch_embeddings = PatchEmbeddings(c)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        B = fbank.shape[0]
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), self.distillation_token.expand(B, -1, -1),
                            self.patch_embeddings(fbank)], dim=1)
        return tokens + self.position_embeddings


class Attention(nn.Module):
    def __init__(self, c: CompactASTConfig):
        super().__init__()
        self.num_attention_heads = c.num_attention_heads
        self.head_dim = c.attention_head_dim
        self.scaling = self.head_dim ** -0.5
        inner = c.num_attention_heads * self.head_dim
        self.q_proj = nn.Linear(c.hidden_size, inner, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, inner, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, inner, bias=c.qkv_bias)
        self.o_proj = nn.Linear(inner, c.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, S, H)``; ``bias`` an additive mask broadcastable to ``(B, heads, S, S)``."""
        B, S, _ = x.shape
        shape = (B, S, self.num_attention_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, c: CompactASTConfig):
        super().__init__()
        self.act = _ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    """Pre-norm transformer layer: ``h + attn(ln(h))``, then ``h + mlp(ln(h))``."""

    def __init__(self, c: CompactASTConfig):
        super().__init__()
        self.attention = Attention(c)
        self.layernorm_before = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.attention(self.layernorm_before(h), bias)
        return h + self.mlp(self.layernorm_after(h))


class Encoder(nn.Module):
    """The AST body (transformers' ``ASTModel``)."""

    def __init__(self, c: CompactASTConfig):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_values: torch.Tensor, output_hidden_states: bool = False) -> EncoderOutput:
        h = self.embeddings(input_values)
        states = [h]
        for layer in self.layers:
            h = layer(h)
            states.append(h)
        seq = self.layernorm(h)
        return EncoderOutput(seq, (seq[:, 0] + seq[:, 1]) / 2, tuple(states) if output_hidden_states else None)


class Head(nn.Module):
    def __init__(self, c: CompactASTConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dense = nn.Linear(c.hidden_size, c.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.dense(self.layernorm(pooled))


class CompactAST(nn.Module):
    """``ASTForAudioClassification``'s network for inference: ``model(input_values=fbank).logits``."""

    def __init__(self, config: CompactASTConfig):
        super().__init__()
        self.config = config
        self.audio_spectrogram_transformer = Encoder(config)
        self.classifier = Head(config)

    def forward(self, input_values: torch.Tensor, output_hidden_states: bool = False) -> ClassifierOutput:
        out = self.audio_spectrogram_transformer(input_values, output_hidden_states=output_hidden_states)
        return ClassifierOutput(self.classifier(out.pooler_output), out.hidden_states)


def modern_key(name: str) -> str:
    """A state-dict key as transformers 5 names it (old ViT-style names renamed)."""
    for pattern, new in _LEGACY_RENAMES:
        name = re.sub(pattern, new, name)
    return name


def has_safetensors(folder: str | Path) -> bool:
    return any(Path(folder).glob("*.safetensors"))


def load_compact_ast(folder: str | Path, name_or_path: str | None = None) -> CompactAST:
    """The model saved in ``folder`` (``config.json`` and one or more ``*.safetensors``), float32
    weights as stored (the caller moves and casts), in eval mode.

    Raises ``ValueError`` when the folder holds something this forward does not run (another model
    type, missing or unexpected tensors): the caller then falls back to transformers."""
    from safetensors.torch import load_file

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    cfg = CompactASTConfig.from_dict(raw, name_or_path if name_or_path is not None else str(folder))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update({modern_key(k): v for k, v in load_file(str(f)).items()})
    with torch.device("meta"):  # no random initialisation of 86 M parameters that are overwritten next
        model = CompactAST(cfg)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"weights do not match the AST layout (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.shape != shapes[k]]
    if bad:
        raise ValueError(f"weight {bad[0]} has shape {tuple(state[bad[0]].shape)}, the config says "
                         f"{tuple(shapes[bad[0]])}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                          strict=True, assign=True)
    return model.eval()


__all__ = ["CompactAST", "CompactASTConfig", "load_compact_ast", "modern_key", "has_safetensors"]
