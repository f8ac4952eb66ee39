"""What the separator needs from a guide, whatever its backbone: the :class:`Guide` protocol.

A guide is asked about a batch of 16 kHz windows and answers, per window, with a
:class:`GuideOutput`: class logits (and whether they are multi-label), a grid over the AST's patch
layout (12 frequency × 101 time patches for 10.24 s, :class:`astsep.features.PatchLayout`) saying
where the named sound is, and an embedding (queries, probes). Every guide speaks the AST's patch
layout, so the separator has one geometry whatever model answered:

- :class:`astsep.guide.ASTGuide`: an AudioSet AST; its grid is the CLS→patch attention (uncalibrated);
- :class:`astsep.tagger.TaggerGuide`: a real CNN tagger (EfficientAT mn04); its grid is either a class
  map of its feature map (uncalibrated) or, tagger in the loop, the named class's share of the energy
  of every patch estimated from tagged NMF components (calibrated);
- :class:`astsep.oracle.OracleGuide`: built from known sources (calibrated, exact or spoiled).

:func:`astsep.guide_loader.load_guide` builds the right one from a model name or folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .config import SeparatorConfig
from .features import PatchLayout


@dataclass
class GuideOutput:
    """Batched guide results. ``tp_valid`` time patches of ``grid`` cover real audio."""

    logits: torch.Tensor  # (B, C) float32
    # (B, Fp, Tp) float32: attention (scale free: the separator normalises it) or, when ``calibrated``,
    # the named sound's share of the energy in every patch, in [0, 1]
    grid: torch.Tensor
    embedding: torch.Tensor  # (B, H) float32
    tp_valid: int
    calibrated: bool = False
    # True for a multi-label tagger's logits (independent sigmoid per class); False: softmax over classes
    multilabel: bool = False
    # (B,) bool or None: windows in which nothing more should be separated (what is left is one sound,
    # which stays in the residual and is classified there); the separator ends those items' passes
    done: torch.Tensor | None = None

    @property
    def probs(self) -> torch.Tensor:
        """``(B, C)`` class probabilities: sigmoid of multi-label logits, else a softmax. (AST
        checkpoints are trained with BCE too, but the reference reports softmax probabilities and its
        thresholds, 0.7 and 0.8, are calibrated on those; the AST keeps them.)"""
        return torch.sigmoid(self.logits) if self.multilabel else torch.softmax(self.logits, dim=-1)


@runtime_checkable
class Guide(Protocol):
    """The interface every guide implements (AST attention, AST class maps, CNN taggers, oracles).

    Attributes: ``name`` (recorded in events and reports), ``labels`` (class names, index = class id),
    ``layout`` (the patch layout its grids use), ``time_patches`` (grid width of a full window),
    ``max_frames`` (fbank frames a full window covers), ``hidden_size`` (embedding length), ``device``,
    ``multilabel`` (how its logits become probabilities), ``cfg`` (its :class:`~astsep.config.GuideConfig`),
    and the counters ``forwards`` / ``batches`` / ``cache_hits`` / ``forward_seconds``.
    """

    name: str
    labels: list[str]
    layout: PatchLayout
    time_patches: int
    max_frames: int
    multilabel: bool

    @property
    def hidden_size(self) -> int: ...

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None, pass_index: int = 0) -> GuideOutput:
        """Guide ``x (B, N)`` 16 kHz windows (≤ 10.24 s); ``rows``: which items of the batch they are;
        ``pass_index``: which separation pass asks (0: the mixture itself, then what earlier passes left)."""
        ...

    def classify(self, x: torch.Tensor, rows: torch.Tensor | None = None, excerpt: bool = False) -> torch.Tensor:
        """``(B, C)`` class probabilities of whole signals ``x (B, N)`` (a residual, a refined source), with
        no separation guidance; ``excerpt``: a short live excerpt, seen once (uncached, padding trimmed)."""
        ...

    def embed(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, H)`` embeddings of ``x (B, N)``."""
        ...

    def key(self, x: torch.Tensor) -> str:
        """A content key of ``x`` under this guide's settings (caches)."""
        ...

    def stats(self) -> dict:
        """Counters for a run's statistics (``ast_forwards``, ``ast_batches``, ``cache_hits``, ``ast_seconds``)."""
        ...


def top_classes(probs: torch.Tensor, k: int = SeparatorConfig.top_k) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The most probable class and the ``k`` most probable ones of class probabilities ``(..., C)``.

    Returns ``(confidence (...), class_id (...), top_probs (..., k), top_ids (..., k))``, best
    first; with fewer than ``k`` classes (an oracle's own label list) the tail is padded with
    probability 0 and id −1.
    """
    confidence, class_id = probs.max(dim=-1)
    top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)
    if top_i.shape[-1] < k:
        top_p = torch.nn.functional.pad(top_p, (0, k - top_p.shape[-1]))
        top_i = torch.nn.functional.pad(top_i, (0, k - top_i.shape[-1]), value=-1)
    return confidence, class_id, top_p, top_i
