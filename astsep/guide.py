"""The AST guide: one forward gives class probabilities, where the model looks, and an embedding.

``ASTGuide`` wraps an AudioSet-trained ``ASTForAudioClassification``. Per input window it returns

- ``logits`` ``(B, C)``: the 527 AudioSet classes;
- ``grid`` ``(B, Fp, Tp)``: the last layer's attention from the CLS token to the patch grid
  (12 frequency × 101 time patches for a 10.24 s window), averaged over heads;
- ``embedding`` ``(B, H)``: the pooled (CLS + distillation) representation.

The model runs with SDPA attention (no attention maps are materialised in any layer); the last
layer's CLS row is recomputed from that layer's input hidden states, which costs one
``(1 × seq)`` attention row per head instead of the 2.3× slower eager path.

Precision: float32 (default), bfloat16, or int8 (dynamic int8 ``nn.Linear`` layers, CPU only;
what ``--fast`` uses there). With ``trim_padding`` the zero-padded tail of a short window is not
run patch by patch: its patches are merged into a few tokens that keep their share of attention
(see :meth:`ASTGuide.forward_features`).

Results are cached by content: a SHA-256 over the samples, the model's fingerprint and every
setting that changes the output. The cache lives in memory (LRU) and optionally on disk. The
fingerprint is needed only by the disk cache (the memory cache belongs to one guide, one model),
and computed on first use: a SHA-256 of the weight files' bytes when the model came from files,
else of the parameters.

Loading the model (device, precision, folders and Hub ids) is :mod:`astsep.ast_load`; the cache and
the fingerprint are :mod:`astsep.guide_cache`. Their public names are importable from here too.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from .ast_load import (  # noqa: F401 - re-exported: `from astsep.guide import load_ast_model` keeps working
    Int8Linear,
    check_precision,
    cpu_has_native_bf16,
    describe_load_error,
    fast_precision,
    load_ast_model,
    quantize_int8,
    quiet_model_loading,
    resolve_device,
    use_fast_settings,
)
from .config import GuideConfig
from .errors import ConfigError
from .features import PatchLayout, ast_input
from .guidance import GuideOutput
from .guide_cache import GuideCache, file_stats, fingerprint_files, fingerprint_params, weight_files

log = logging.getLogger(__name__)


class ASTGuide:
    """Runs the AST on batches of 16 kHz windows, with a content-addressed cache: a
    :class:`astsep.guidance.Guide` whose grid is the CLS→patch attention.

    Counters: ``forwards`` (windows run through the AST), ``batches`` (AST calls),
    ``cache_hits`` (windows answered from the cache).
    """

    def __init__(self, model, cfg: GuideConfig | None = None, name: str | None = None,
                 weight_files: list[Path] | None = None, owns_model: bool = False):
        """``owns_model``: ``model`` was loaded for this guide alone, so it may be cast and quantised
        in place (a caller's model is copied first)."""
        self.cfg = cfg or GuideConfig()
        self.device = resolve_device(self.cfg.device)
        check_precision(self.cfg.dtype, self.device)
        if self.cfg.dtype == "bfloat16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("guide dtype bfloat16 was asked for, but this CPU has no native bfloat16 (torch reports %s): "
                        "it would run about 5x slower than float32; running the AST in float32 (--fast uses int8 "
                        "on the CPU)", torch.backends.cpu.get_cpu_capability())
            self.cfg = dataclasses.replace(self.cfg, dtype="float32")
        if int(self.cfg.pad_merge) < 0:
            raise ConfigError(f"guide.pad_merge must be >= 0 (0 drops the padding), not {self.cfg.pad_merge}")
        self.dtype = torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32
        if not owns_model and (next(model.parameters()).dtype != self.dtype or self.cfg.dtype == "int8"):
            model = copy.deepcopy(model)  # never change the caller's model in place
        model = model.to(self.device, self.dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        # the fingerprint (of the float weights; the precision is in the cache key) waits for a cache
        # that needs it, except for an in-memory model about to be quantised: its float weights go
        self._fingerprint: str | None = None
        self._weight_files = list(weight_files or [])
        self._weight_stat = file_stats(self._weight_files)
        if self.cfg.dtype == "int8" and not self._weight_files:
            self._fingerprint = fingerprint_params(model)
        self.model = quantize_int8(model) if self.cfg.dtype == "int8" else model
        self.name = name or str(getattr(model.config, "_name_or_path", "") or "ast")
        conf = model.config
        self.max_frames = min(self.cfg.max_frames, conf.max_length)
        self.layout = PatchLayout.of_model(conf)
        self.freq_patches = self.layout.freq_patches
        self.time_patches = self.layout.time_patches(conf.max_length)
        id2label = conf.id2label or {}
        self.labels = [str(id2label.get(i, id2label.get(str(i), f"class_{i}"))) for i in range(conf.num_labels)]
        self.cache = GuideCache(self.cfg.cache_size, self.cfg.cache_dir)
        self.forwards = 0
        self.batches = 0
        self.cache_hits = 0
        self.forward_seconds = 0.0

    multilabel = False  # softmax probabilities: the reference's thresholds are calibrated on those

    @classmethod
    def from_pretrained(cls, cfg: GuideConfig) -> "ASTGuide":
        """The guide of ``cfg.model`` (a Hub id or a local folder, :func:`astsep.ast_load.load_ast_model`)."""
        model = load_ast_model(cfg.model, allow_pickle=cfg.allow_pickle)
        return cls(model, cfg, name=cfg.model, weight_files=weight_files(cfg.model), owns_model=True)

    @property
    def fingerprint(self) -> str:
        """Identity of the weights (computed once, on first use): a hash of the weight files the model
        was loaded from, or of its parameters when it came from memory or its files changed since."""
        if self._fingerprint is None:
            files = self._weight_files
            if files and all(f.is_file() for f in files) and file_stats(files) == self._weight_stat:
                self._fingerprint = fingerprint_files(files, self.model)
            else:
                self._fingerprint = fingerprint_params(self.model)
        return self._fingerprint

    @classmethod
    def from_model(cls, model, cfg: GuideConfig | None = None, name: str | None = None) -> "ASTGuide":
        return cls(model, cfg, name)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def stats(self) -> dict:
        return {"ast_forwards": self.forwards, "ast_batches": self.batches, "cache_hits": self.cache_hits,
                "ast_seconds": round(self.forward_seconds, 4)}

    # --- cache keys ---------------------------------------------------------------------------
    def _settings(self) -> bytes:
        # the memory cache belongs to this guide and its one model: only files on disk, which other
        # guides and processes read, need the model's fingerprint in their key
        fp = self.fingerprint if self.cache.dir is not None else None
        return json.dumps({"fp": fp, "dtype": self.cfg.dtype, "trim": self.cfg.trim_padding,
                           "pad_merge": self.cfg.pad_merge if self.cfg.trim_padding else None,
                           "max_frames": self.max_frames, "mean": self.cfg.fbank_mean, "std": self.cfg.fbank_std,
                           "v": 1}, sort_keys=True).encode()

    def key(self, x: torch.Tensor) -> str:
        h = hashlib.sha256(self._settings())
        h.update(str(x.numel()).encode())
        h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    # --- forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None, pass_index: int = 0) -> GuideOutput:
        """Guide a batch ``(B, N)`` of 16 kHz windows of equal length (at most 10.24 s are seen).

        ``rows``: which windows of the batch being separated these are; ``pass_index``: which pass asks.
        The AST judges by content alone and ignores both; guides built for known items
        (:class:`astsep.oracle.OracleGuide`) use ``rows``.
        """
        if x.dim() == 1:
            x = x.unsqueeze(0)
        found, hits = self.cache.fetch(x, self.key, lambda rows: self._forward(rows.to(self.device)))
        self.cache_hits += hits
        tp_valid = self.layout.valid_time_patches(x.shape[-1], self.max_frames, self.time_patches)
        grid = torch.stack([f["grid"] for f in found])
        return GuideOutput(
            logits=torch.stack([f["logits"] for f in found]),
            grid=grid,
            embedding=torch.stack([f["embedding"] for f in found]),
            tp_valid=min(tp_valid, grid.shape[-1]),
        )

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        feats, real = ast_input(x.float(), self.max_frames, cfg.fbank_mean, cfg.fbank_std)
        feats = feats.to(self.dtype)
        self.forwards += x.shape[0]
        self.batches += 1
        t0 = time.perf_counter()
        out = self.forward_features(feats, real if cfg.trim_padding else None)
        if out["logits"].is_cuda:
            torch.cuda.synchronize()
        self.forward_seconds += time.perf_counter() - t0
        return out

    def forward_features(self, feats: torch.Tensor, real_frames: int | None = None) -> dict[str, torch.Tensor]:
        """AST forward on normalised fbank ``(B, max_length, mel)``.

        With ``real_frames`` (the frames that hold audio, the same for the whole batch), the time
        patches that lie wholly in the zero padding are not run one by one: in each frequency row
        they are averaged in groups of ``cfg.pad_merge`` and every group token is attended as
        often as the patches it stands for (an additive ``log(count)`` bias on its keys, as in
        token merging). Padded patches differ only by their position embeddings, so this keeps the
        padding's share of the attention that simply dropping them (``pad_merge = 0``) loses; it is
        exact when the position embeddings of a group are equal (tested).
        """
        ast = self.model.audio_spectrogram_transformer
        emb = ast.embeddings
        conf = self.model.config
        B = feats.shape[0]
        patches = emb.patch_embeddings(feats)  # (B, Fp*Tp, H), frequency-major
        H = patches.shape[-1]
        Fp, Tp = self.freq_patches, self.time_patches
        pos = emb.position_embeddings
        tokens = patches + pos[:, 2:]
        tp = Tp if real_frames is None else min(Tp, max(1, math.ceil(real_frames / conf.time_stride)))
        counts = None
        if tp < Tp:  # time patch t covers frames [t*stride, t*stride + patch): audio iff t*stride < real
            grid4 = tokens.reshape(B, Fp, Tp, H)
            kept = grid4[:, :, :tp].reshape(B, Fp * tp, H)
            group = int(self.cfg.pad_merge)
            if group > 0:
                member = torch.arange(Tp - tp, device=feats.device) // group
                n_groups = int(member[-1]) + 1
                sums = grid4.new_zeros(B, Fp, n_groups, H).index_add_(2, member, grid4[:, :, tp:])
                size = torch.bincount(member, minlength=n_groups).to(sums.dtype)
                merged = (sums / size[:, None]).reshape(B, Fp * n_groups, H)
                tokens = torch.cat([kept, merged], dim=1)
                counts = torch.cat([torch.ones(2 + Fp * tp, device=feats.device, dtype=sums.dtype),
                                    size.repeat(Fp)])
            else:
                tokens = kept
        h = torch.cat([
            emb.cls_token.expand(B, -1, -1) + pos[:, :1],
            emb.distillation_token.expand(B, -1, -1) + pos[:, 1:2],
            tokens,
        ], dim=1)
        bias = None if counts is None else counts.log().view(1, 1, 1, -1)
        for layer in ast.layers[:-1]:
            h = layer(h, bias)
        last = ast.layers[-1]
        grid = self._cls_attention(last, h, bias)[:, 2:2 + Fp * tp].reshape(B, Fp, tp)
        h = last(h, bias)
        seq = ast.layernorm(h)
        pooled = (seq[:, 0] + seq[:, 1]) / 2
        logits = self.model.classifier(pooled)
        if tp != Tp:  # keep a fixed grid shape for callers; the padding is not part of the map
            grid = torch.nn.functional.pad(grid, (0, Tp - tp))
        return {"logits": logits.float(), "grid": grid.float(), "embedding": pooled.float()}

    @staticmethod
    def _cls_attention(layer, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Head-averaged attention row of the CLS token ``(B, seq)`` in ``layer``, from its input."""
        attn = layer.attention
        x = layer.layernorm_before(h)
        B, S, _ = x.shape
        nh, hd = attn.num_attention_heads, attn.head_dim
        q = attn.q_proj(x[:, :1]).view(B, 1, nh, hd).transpose(1, 2).float()  # (B, nh, 1, hd)
        k = attn.k_proj(x).view(B, S, nh, hd).transpose(1, 2).float()  # (B, nh, S, hd)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        if bias is not None:
            scores = scores + bias.float()
        return scores.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, S)

    @torch.no_grad()
    def classify(self, x: torch.Tensor, rows: torch.Tensor | None = None, excerpt: bool = False) -> torch.Tensor:
        """Softmax probabilities ``(B, C)`` of ``(B, N)`` signals: the guide's own (cached) answer, or for an
        ``excerpt`` (live alerts: seen once) uncached, with the zero padding trimmed (merged as
        ``cfg.pad_merge`` says) whatever the guide's own setting."""
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if not excerpt:
            return self(x, rows).probs
        feats, real = ast_input(x.float().to(self.device), self.max_frames, self.cfg.fbank_mean, self.cfg.fbank_std)
        return torch.softmax(self.forward_features(feats.to(self.dtype), real)["logits"].float(), dim=-1)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled AST embedding ``(B, H)`` of ``(B, N)`` windows (cached like every forward)."""
        return self(x, rows).embedding
