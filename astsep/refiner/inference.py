"""Refined inference: a trained :class:`~astsep.refiner.network.MaskRefiner` on top of the baseline.

Two uses, both behind ``infer.py --refiner CKPT``:

- **refine every baseline source**: each kept pass's source is re-estimated by the refiner,
  queried with that source's AST label ("The sound of <label>", needs a text encoder: a CLAP
  checkpoint or an embedding table) or with the AST embedding of the pass (refiners trained with
  audio queries); a pass-aware refiner (``own_mask``) is also told which pass it refines, and one
  with ``refine_passes`` re-estimates only the first passes (the others keep their baseline masks,
  rescaled to what the refined ones leave); the refined masks of a window are scaled so they never
  claim more than the whole mixture, and the residual takes the difference, so the files still add
  up to the input;
- **extract one queried source** (``--query TEXT`` / ``--query-audio FILE``, optional
  ``--negative``): the refiner's mask for the query, plus the rest.

Checkpoints are Lightning checkpoints written by ``train.py`` (``hyper_parameters`` hold plain
types); they are read with ``torch.load(weights_only=True)``: no pickled code runs. They record the
baseline's STFT, separator and guide settings by value (``hyper_parameters["baseline"]``); the
refiner is fed baseline masks, so :meth:`Refiner.check_baseline` warns, naming the keys, when the
inference config would make different ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import AstsepConfig, STFTConfig, settings_differences
from ..errors import ConfigError, ModelError, ModelMismatchError
from ..features import apply_mask
from .network import MaskRefiner, RefinerConfig, refine

log = logging.getLogger(__name__)


@dataclass
class Query:
    """A positive query embedding ``(D,)`` with its text, and an optional negative one."""

    embedding: torch.Tensor
    text: str
    negative: torch.Tensor | None = None
    negative_text: str | None = None


class Refiner:
    """A trained refiner ready for inference, plus what it needs to embed queries."""

    def __init__(self, net: MaskRefiner, query_source: str, name: str, table=None, text_encoder=None,
                 baseline: dict | None = None, guide_model: str | None = None, guide_seed: int = 0):
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        # what the checkpoint says it was trained with: "table" (caption embeddings), "pass" (the
        # guide's embedding of the pass it refines) or "target_audio" (older: the clean target's embedding)
        self.trained_query = query_source
        # how inference queries it: "target_audio" (the AST embedding of each pass) or "table" (text)
        self.query_source = "table" if query_source == "table" else "target_audio"
        self.name = name
        self.table = table
        self.text_encoder = text_encoder
        self.baseline = baseline  # the settings it was trained with (astsep.config.baseline_settings), or None
        # the AST it was trained on (Hub id, folder, or "tiny": a random test AST built from guide_seed)
        self.guide_model = guide_model
        self.guide_seed = guide_seed

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, table: str | None = None, clap_ckpt: str | None = None) -> "Refiner":
        """A refiner from a ``train.py`` checkpoint (``weights_only``: no pickled code runs); the one
        loader of ``infer.py --refiner`` and ``python -m astsep.evaluate --refiner``."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise ModelError(f"refiner checkpoint not found: {p} (a .ckpt written by train.py)")
        try:
            ck = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a crafted, torn or foreign file: one line, never a traceback
            from ..ast_load import describe_load_error

            raise ModelError(f"cannot read refiner checkpoint {p}: {describe_load_error(exc)}") from None
        if not isinstance(ck, dict) or "state_dict" not in ck or "hyper_parameters" not in ck:
            raise ModelError(f"{p} is not a refiner checkpoint written by train.py (no state_dict/hyper_parameters)")
        hp = ck["hyper_parameters"]
        rcfg = hp.get("refiner") or {}
        try:
            net = MaskRefiner(RefinerConfig(**rcfg))
        except TypeError as exc:
            raise ModelError(f"refiner checkpoint {p} has an unknown refiner config: {exc}") from exc
        state = {k[len("refiner."):]: v for k, v in ck["state_dict"].items() if k.startswith("refiner.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(f"refiner checkpoint {p} does not match its config (missing {len(missing)}, "
                             f"unexpected {len(unexpected)} tensors)")
        tbl = enc = None
        if table:
            from ..query import EmbeddingTable

            tbl = EmbeddingTable.load(table)
        if clap_ckpt:
            from ..query import ClapQueryEncoder

            enc = ClapQueryEncoder(clap_ckpt)
        baseline = hp.get("baseline")
        guide_model = hp.get("guide_model")
        return cls(net, str(hp.get("query_source", "table")), p.name, tbl, enc,
                   baseline if isinstance(baseline, dict) else None,
                   guide_model if isinstance(guide_model, str) else None, int(hp.get("guide_seed") or 0))

    def check_guide(self, guide) -> None:
        """Refuse, before any audio is separated, an AST whose embeddings this refiner cannot take:
        a refiner trained on audio (AST embedding) queries takes embeddings of its guide's hidden size."""
        if self.query_source != "target_audio" or guide.hidden_size == self.query_dim:
            return
        trained = f"the guide {self.guide_model!r}" if self.guide_model else "its guide"
        raise ModelMismatchError(f"refiner {self.name} takes {self.query_dim}-dim AST embeddings (trained with {trained}, "
                                 f"hidden size {self.query_dim}) but the AST model {guide.name} has hidden size "
                                 f"{guide.hidden_size}: name no AST model to use the refiner's own guide, or train a "
                                 "refiner on this AST (model.guide_model in the training config)")

    def check_baseline(self, cfg: AstsepConfig) -> list[str]:
        """Warn when ``cfg`` makes other baseline masks than the refiner was trained on; returns the
        differing keys with both values (empty when they match or the checkpoint records none)."""
        if self.baseline is None:
            log.info("refiner %s records no baseline settings (written before they were recorded); "
                     "cannot check that the baseline matches its training", self.name)
            return []
        diff = settings_differences(self.baseline, cfg)
        if diff:
            log.warning("refiner %s was trained on a baseline with other settings: %s; its masks may be worse "
                        "than its validation scores (set these in the separator config to match)", self.name, "; ".join(diff))
        return diff

    @property
    def query_dim(self) -> int:
        return self.net.cfg.query_dim

    @property
    def n_masks(self) -> int:
        return self.net.cfg.n_masks

    def to(self, device: torch.device) -> "Refiner":
        self.net.to(device)
        return self

    # --- queries ------------------------------------------------------------------------------
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """``(N, D)`` text embeddings from the table (exact text) or the text encoder."""
        if self.table is not None and all(t in self.table for t in texts):
            emb = self.table.lookup_many(texts)
        elif self.text_encoder is not None:
            emb = self.text_encoder.encode_text(texts)
        else:
            missing = [t for t in texts if self.table is None or t not in self.table]
            raise ConfigError(f"no text embedding for {missing[:3]}: the refiner needs a query table holding these "
                              "texts or a CLAP text encoder (laion-clap) to embed them")
        return self._check_dim(emb, "text")

    def _check_dim(self, emb: torch.Tensor, what: str) -> torch.Tensor:
        if emb.shape[-1] != self.query_dim:
            raise ConfigError(f"{what} queries have {emb.shape[-1]} dims but the refiner was trained with "
                              f"{self.query_dim}-dim queries ({self.query_source}); use the matching encoder/model")
        return emb.float()

    def source_queries(self, labels: list[str], ast_embeddings: torch.Tensor) -> torch.Tensor:
        """Queries ``(M, D)`` for baseline sources: their AST embeddings for refiners trained on
        audio queries, else the text "The sound of <label>"."""
        if self.query_source == "target_audio":
            return self._check_dim(ast_embeddings, "AST embedding")
        from ..query import label_prompt

        return self.embed_text([label_prompt(lab) for lab in labels])

    # --- masks --------------------------------------------------------------------------------
    @torch.no_grad()
    def masks(self, x: torch.Tensor, baseline_masks: torch.Tensor, queries: torch.Tensor,
              negative: torch.Tensor | None, stft_cfg: STFTConfig,
              pass_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Refined masks for ``M`` queries per window, through :func:`~astsep.refiner.network.refine`
        (the path training takes).

        ``x (b,N)``, ``baseline_masks (b,K,F,T)``, ``queries (b,M,D)``, ``negative (b,M,D)`` or None,
        ``pass_index (M,)``: the pass query ``m`` refines (pass-aware refiners; default pass 1).
        Returns ``(masks (b,M,F,T), spec (b,F,T))``.
        """
        b, M = queries.shape[:2]
        dev = next(self.net.parameters()).device
        xm = x.float().to(dev).repeat_interleave(M, dim=0)
        base = baseline_masks.float().to(dev).repeat_interleave(M, dim=0)
        q = queries.reshape(b * M, -1).to(dev)
        neg = negative.reshape(b * M, -1).to(dev) if negative is not None else None
        idx = None if pass_index is None else torch.as_tensor(pass_index, device=dev).long().view(1, M).expand(b, M).reshape(-1)
        _, m, spec = refine(self.net, xm, base, q, stft_cfg, neg, pass_index=idx)
        return m.view(b, M, *m.shape[1:]).float(), spec.view(b, M, *spec.shape[1:])[:, 0]

    def refine_sources(self, x: torch.Tensor, baseline_masks: torch.Tensor, kept: torch.Tensor,
                       queries: torch.Tensor, stft_cfg: STFTConfig) -> torch.Tensor:
        """Refined sources ``(b,K,N)`` (zero where ``kept`` is False), pass ``k`` refined as pass ``k``.

        Masks of one window are scaled down wherever together they would take more than the
        mixture (Σ ≤ 1 per time-frequency bin), so the residual never has to be negative energy.
        """
        K = baseline_masks.shape[1]
        n_ref = self.net.cfg.refine_passes if 0 < self.net.cfg.refine_passes < K else K
        masks, spec = self.masks(x, baseline_masks, queries[:, :n_ref], None, stft_cfg, torch.arange(n_ref))
        masks = masks * kept[:, :n_ref, None, None].to(masks.device, masks.dtype)
        if n_ref < K:
            # later passes (not trained on) keep their baseline masks relative to what the refined
            # passes leave: m_k · (1 − Σ refined) / (1 − Σ baseline), so the refined ones are not scaled
            base = baseline_masks.float().to(masks.device)
            left_base = (1 - base[:, :n_ref].sum(dim=1, keepdim=True)).clamp_min(1e-6)
            left_ref = (1 - masks.sum(dim=1, keepdim=True)).clamp_min(0)
            rest = (base[:, n_ref:] / left_base).clamp(0, 1) * left_ref
            rest = rest * kept[:, n_ref:, None, None].to(rest.device, rest.dtype)
            masks = torch.cat([masks, rest], dim=1)
        total = masks.sum(dim=1, keepdim=True)
        masks = masks / total.clamp_min(1.0)
        return apply_mask(spec, masks, stft_cfg, x.shape[-1]).cpu()

    def extract(self, x: torch.Tensor, baseline_masks: torch.Tensor, query: Query,
                stft_cfg: STFTConfig) -> torch.Tensor:
        """The queried source ``(b,N)`` of each window."""
        b = x.shape[0]
        q = query.embedding.view(1, 1, -1).expand(b, 1, -1)
        neg = query.negative.view(1, 1, -1).expand(b, 1, -1) if query.negative is not None else None
        masks, spec = self.masks(x, baseline_masks, q, neg, stft_cfg)
        return apply_mask(spec, masks[:, 0], stft_cfg, x.shape[-1]).cpu()
