"""Real, randomly initialised AST models for tests and benchmarks (no weights to download).

``tiny_ast`` builds a small ``ASTForAudioClassification`` with transformers' own classes and the
527 real AudioSet labels; ``full_ast`` builds the published checkpoint's architecture (same
compute) with random weights.

Their label names come from AudioSet's ``class_labels_indices.csv``: the file given, else the one
named by ``$ASTSEP_AUDIOSET_LABELS`` (``tests/conftest.py`` and the benchmarks point it at the
shared data), else generic names ``class_<i>``. This module knows no path of a checkout.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

LABELS_ENV = "ASTSEP_AUDIOSET_LABELS"


def audioset_labels(csv_path: str | Path | None = None) -> dict[int, str]:
    """``{index: display_name}`` from AudioSet's ``class_labels_indices.csv`` (``csv_path``, else
    ``$ASTSEP_AUDIOSET_LABELS``); without one, the 527 generic names ``class_<i>``."""
    path = csv_path or os.environ.get(LABELS_ENV)
    path = Path(path) if path else None
    if path is None or not path.is_file():
        return {i: f"class_{i}" for i in range(527)}
    with open(path, newline="") as fh:
        return {int(row["index"]): row["display_name"] for row in csv.DictReader(fh)}


def _build(seed: int, **sizes):
    from transformers import ASTConfig, ASTForAudioClassification

    labels = audioset_labels()
    cfg = ASTConfig(num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()},
                    attn_implementation="sdpa", **sizes)
    torch.manual_seed(seed)
    model = ASTForAudioClassification(cfg).eval()
    return model


def tiny_ast(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2):
    """A tiny random AST (≈0.1 M parameters) with the real 12×101 patch grid and 527 labels."""
    return _build(seed, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=hidden * 2)


def full_ast(seed: int = 0):
    """The published AST-AudioSet architecture (default ``ASTConfig``, 527 labels), random weights."""
    return _build(seed)


def force_class(model, class_id: int, margin: float = 20.0) -> None:
    """Make ``model`` predict ``class_id`` for any input: zero the classifier, bias that class."""
    with torch.no_grad():
        dense = model.classifier.dense
        dense.weight.zero_()
        dense.bias.zero_()
        dense.bias[class_id] = margin
