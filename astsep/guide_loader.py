"""One place that turns a model name into a :class:`~astsep.guidance.Guide`.

``--model`` (and ``astsep.separate(model=…)``, training, evaluate, live) may name:

- an EfficientAT tagger: a folder holding its ``mn*_as*.pt`` state_dict (``../shared/models/efficientat_mn04_as``)
  or that file → :class:`astsep.tagger.TaggerGuide`, guided as ``cfg.tagger`` says;
- an AST: a Hugging Face Hub id or a local folder with ``config.json`` → :class:`astsep.guide.ASTGuide`;
- ``"tiny"``: a random tiny AST (smoke tests, seeded by ``seed``).

A tagger's checkpoint carries no label names: they are read from ``tagger.labels`` (a CSV of AudioSet's
``index,mid,display_name``) or found beside the weights, in the folder itself or, as the shared layout has
it, ``../../data/audioset/class_labels_indices.csv`` from the folder.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from .config import AstsepConfig, GuideConfig, STFTConfig, TaggerConfig
from .efficientat import is_tagger_path, tagger_weights
from .errors import ModelLoadError

LABELS_FILE = "class_labels_indices.csv"


def tagger_labels(model_path: str | Path, labels_csv: str | None = None) -> list[str]:
    """The 527 display names for the tagger at ``model_path`` (module docstring)."""
    weights = tagger_weights(model_path)
    folder = weights.parent if weights is not None else Path(model_path)
    candidates = [Path(labels_csv).expanduser()] if labels_csv else [
        folder / LABELS_FILE, folder / "labels.csv", folder.parent.parent / "data" / "audioset" / LABELS_FILE]
    for path in candidates:
        if path.is_file():
            try:
                with open(path, newline="", encoding="utf-8") as fh:
                    rows = {int(r["index"]): r["display_name"] for r in csv.DictReader(fh)}
            except (KeyError, ValueError, OSError) as exc:
                raise ModelLoadError(f"cannot read class labels from {path} (need columns index, display_name): "
                                     f"{exc}") from None
            if sorted(rows) != list(range(len(rows))):
                raise ModelLoadError(f"class labels in {path} are not numbered 0..{len(rows) - 1}")
            return [rows[i] for i in range(len(rows))]
        if labels_csv:
            raise ModelLoadError(f"class labels file not found: {path}")
    raise ModelLoadError(f"the tagger at {model_path} has no class names beside it: put AudioSet's {LABELS_FILE} "
                         f"in its folder, or set tagger.labels to that file")


def build_guide(model: str, guide_cfg: GuideConfig, seed: int = 0, tagger_cfg: TaggerConfig | None = None,
                stft_cfg: STFTConfig | None = None):
    """The guide of ``model`` (module docstring) with the guide section ``guide_cfg``."""
    if model == "tiny":
        from .guide import ASTGuide
        from .testing import tiny_ast

        return ASTGuide.from_model(tiny_ast(seed=seed), guide_cfg, name=f"tiny-ast-{seed}")
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise ModelLoadError(f"model folder not found: {model} (an AST folder saved with save_pretrained, or an "
                             f"EfficientAT tagger folder holding its mn*_as*.pt weights)")
    if is_tagger_path(model):
        from .tagger import TaggerGuide

        tcfg = tagger_cfg or TaggerConfig()
        labels = tagger_labels(model, tcfg.labels)
        return TaggerGuide.from_folder(model, labels, dataclasses.replace(guide_cfg, model=model), tcfg, stft_cfg)
    from .guide import ASTGuide

    return ASTGuide.from_pretrained(dataclasses.replace(guide_cfg, model=model))


def load_guide(cfg: AstsepConfig, model: str | None = None, seed: int = 0):
    """The guide of a whole config: ``model`` (default ``cfg.guide.model``) with its guide, tagger and
    STFT sections."""
    return build_guide(model or cfg.guide.model, cfg.guide, seed, cfg.tagger, cfg.stft)
