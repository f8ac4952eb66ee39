"""The deterministic guidance-driven multi-pass separator, as batched tensor code.

:class:`Separator` runs up to ``max_passes`` passes over ``B`` windows at once. Each pass asks the
guide about what is left (the mixture, then what earlier passes left), names the loudest sound
(class, confidence, the ``top_k`` classes, embedding) and estimates its mask
(:func:`astsep.masking.guided_mask`: the guide's grid as a prior, the mixture's own NMF structure,
the patch-share fit; the steps are described in :mod:`astsep.masking`). Source = mask · current STFT
(its phase); the rest goes on to the next pass. Confidence never removes frames; the class and
confidence only name the source. An item stops when its pass removes less than ``min_eratio`` of
the energy, or nothing audible is left.

Energies are compared as ratios within a window, so a quiet recording gives the same masks as a
loud one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .audio import rms_db
from .config import AstsepConfig
from .features import apply_mask, istft, patch_operators, stft
from .guidance import Guide, GuideOutput, top_classes
from .masking import (  # noqa: F401 - dominant_group, sharpen: re-exported, the pass's steps were here before
    dominant_group,
    guidance_prior,
    guided_mask,
    nmf,
    nmf_init,
    own_map_weight,
    sharpen,
    structure_shares,
)


# --- results ----------------------------------------------------------------------------------
@dataclass
class PassTrace:
    """What one pass saw and decided, for every window of the batch (for debug figures)."""

    index: int
    ran: torch.Tensor  # (B,) bool: the pass ran for this window
    kept: torch.Tensor  # (B,) bool: its source was kept (removed ≥ min_eratio of the energy)
    class_id: torch.Tensor  # (B,)
    confidence: torch.Tensor  # (B,)
    top5_ids: torch.Tensor  # (B, top_k)
    top5_probs: torch.Tensor  # (B, top_k)
    embedding: torch.Tensor  # (B, H)
    mask: torch.Tensor  # (B, F, T) applied to the pass's input
    prior: torch.Tensor  # (B, F, T) the guide's grid spread over bins and frames
    power: torch.Tensor  # (B, F, T) power of the pass's input
    presence: torch.Tensor  # (B, T) share of each frame's energy the source took
    grid: torch.Tensor  # (B, Fp, Tp) the guide's raw grid (padding columns zero)
    shares: torch.Tensor  # (B, Fp, Tp) the grid as target shares in [0, 1]
    component_share: torch.Tensor  # (B, K) each NMF component's target share
    trust: torch.Tensor  # (B,) how far the grid was trusted, in [0, 1]
    contrast: torch.Tensor  # (B,) the attention map's coefficient of variation (1 for a calibrated grid)
    eratio: torch.Tensor  # (B,) share of the pass input's energy the source took
    input_energy: torch.Tensor  # (B,)
    residual_energy: torch.Tensor  # (B,) energy left after the pass


@dataclass
class BatchSeparation:
    """Sources of ``B`` windows. ``sources[:, k]`` is zero where pass ``k`` kept nothing."""

    sources: torch.Tensor  # (B, K, N)
    residual: torch.Tensor  # (B, N) = input − Σ sources (exact, time domain)
    masks: torch.Tensor  # (B, K, F, T) masks relative to the mixture STFT
    kept: torch.Tensor  # (B, K) bool
    class_ids: torch.Tensor  # (B, K) (−1 where not kept)
    confidences: torch.Tensor  # (B, K)
    top5_ids: torch.Tensor  # (B, K, top_k)
    top5_probs: torch.Tensor  # (B, K, top_k)
    embeddings: torch.Tensor  # (B, K, H)
    silent: torch.Tensor  # (B,) bool: window below the silence level, no AST forward
    traces: list[PassTrace] = field(default_factory=list)
    labels: list[list[str]] = field(default_factory=list)
    passes_run: int = 0  # passes that ran (for any window of the batch)
    cut: bool = False  # ``should_stop`` ended the passes early (see :meth:`Separator.separate_batch`)


@dataclass
class PassSources:
    """What pass ``index`` kept, handed to ``on_pass`` as soon as the pass ends (before the next)."""

    index: int  # the pass, from 0
    rows: torch.Tensor  # (b,) the batch rows whose source this pass kept
    sources: torch.Tensor  # (b, N) their sources
    class_ids: torch.Tensor  # (b,)
    confidences: torch.Tensor  # (b,)
    top5_ids: torch.Tensor  # (b, top_k)
    top5_probs: torch.Tensor  # (b, top_k)


@dataclass
class PassResult:
    """One pass for ``b`` windows (the running ones)."""

    mask: torch.Tensor  # (b, F, T)
    power: torch.Tensor  # (b, F, T) power of the pass's input
    prior: torch.Tensor  # (b, F, T)
    shares: torch.Tensor  # (b, Fp, tp)
    component_share: torch.Tensor  # (b, K)
    trust: torch.Tensor  # (b,) how far the grid was trusted (grid_trust)
    contrast: torch.Tensor  # (b,) the attention map's coefficient of variation (1 for a calibrated grid)
    guide: GuideOutput
    class_id: torch.Tensor  # (b,)
    confidence: torch.Tensor  # (b,)
    top5_ids: torch.Tensor  # (b, top_k)
    top5_probs: torch.Tensor  # (b, top_k)
    W: torch.Tensor  # (b, F, K) NMF state, the warm start of the next pass
    H: torch.Tensor  # (b, K, T)


class Separator:
    """Deterministic multi-pass separator over any :class:`~astsep.guidance.Guide` (AST, tagger, oracle).

    ``separate_batch(x)`` takes ``(B, N)`` float32 windows at 16 kHz, ``N`` ≤ 10.24 s of samples.
    """

    def __init__(self, cfg: AstsepConfig, guide: Guide):
        self.cfg = cfg
        self.guide = guide

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def separate_batch(self, x: torch.Tensor, keep_traces: bool = False,
                       should_stop: Callable[[], bool] | None = None,
                       on_pass: Callable[[PassSources], None] | None = None) -> BatchSeparation:
        """Separate ``x`` ``(B, N)``. (Stays whole: the pass loop, whose every step updates the same running
        state: what is left, the share of the mixture left, the regions, the NMF warm start, the outputs.)
        ``should_stop``, when given, is asked before every pass after
        the first: True ends the passes there (``cut``), with the sources found so far and the rest
        in the residual, as if ``max_passes`` had been reached. Live mode uses it so that a window
        gives way to a newer one waiting instead of that one being dropped; without it (files, the
        default) the result depends on the audio and the config only. ``on_pass``, when given, is
        called after each pass that kept a source, with what it kept (:class:`PassSources`; live
        mode reports a pass's sound at once instead of after the last pass); it changes nothing."""
        sc, st = self.cfg.separator, self.cfg.stft
        if x.dim() == 1:
            x = x.unsqueeze(0)
        x = x.float()
        B, N = x.shape
        dev = x.device
        X = stft(x, st)  # (B, F, T)
        Fb, T = X.shape[-2:]
        K = max(1, int(sc.max_passes))
        Hd = self.guide.hidden_size

        silent = rms_db(x) < sc.silence_dbfs
        running = ~silent

        cur = X.clone()  # current (residual) spectrum
        keep_share = torch.ones(B, Fb, T, device=dev)  # Π (1 − M_j): share of the mixture still left
        region = torch.zeros(B, T, device=dev)  # frames an earlier source dominated (0/1)
        top_input_energy = X.abs().pow(2).sum(dim=(1, 2))
        nmf_state: tuple[torch.Tensor, torch.Tensor] | None = None

        sources = torch.zeros(B, K, N, device=dev)
        masks = torch.zeros(B, K, Fb, T, device=dev)
        kept = torch.zeros(B, K, dtype=torch.bool, device=dev)
        class_ids = torch.full((B, K), -1, dtype=torch.long, device=dev)
        confs = torch.zeros(B, K, device=dev)
        t5i = torch.full((B, K, sc.top_k), -1, dtype=torch.long, device=dev)
        t5p = torch.zeros(B, K, sc.top_k, device=dev)
        embs = torch.zeros(B, K, Hd, device=dev)
        traces: list[PassTrace] = []
        passes_run, cut = 0, False

        for k in range(K):
            idx = running.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            if k > 0 and should_stop is not None and should_stop():
                cut = True
                break
            passes_run += 1
            warm = None if nmf_state is None else (nmf_state[0][idx], nmf_state[1][idx])
            res = self._pass(k, N, cur[idx], region[idx], idx, warm)
            M = res.mask
            src_spec = M * cur[idx]
            src = istft(src_spec, st, N)
            P_in = res.power
            e_in = P_in.sum(dim=(1, 2)).clamp_min(1e-20)
            src_pow = src_spec.abs().pow(2)
            eratio = src_pow.sum(dim=(1, 2)) / e_in
            keep_now = eratio >= sc.min_eratio
            presence = src_pow.sum(dim=1) / P_in.sum(dim=1).clamp_min(sc.eps)  # (b, T)

            sel, km = idx[keep_now], keep_now  # batch rows kept, and the same rows within this pass
            sources[sel, k] = src[km]
            masks[sel, k] = (M * keep_share[idx])[km]
            kept[sel, k] = True
            class_ids[sel, k] = res.class_id[km]
            confs[sel, k] = res.confidence[km]
            t5i[sel, k] = res.top5_ids[km]
            t5p[sel, k] = res.top5_probs[km]
            embs[sel, k] = res.guide.embedding.to(dev)[km].to(embs.dtype)
            if on_pass is not None and bool(km.any()):
                on_pass(PassSources(k, sel, src[km], res.class_id[km], res.confidence[km], res.top5_ids[km],
                                    res.top5_probs[km]))
            keep_share[sel] = keep_share[sel] * (1 - M[km])
            cur[sel] = cur[sel] - src_spec[km]
            region[sel] = torch.maximum(region[sel], (presence[km] >= sc.region_share).float())
            if nmf_state is None:
                nmf_state = (torch.zeros(B, *res.W.shape[1:], device=dev), torch.zeros(B, *res.H.shape[1:], device=dev))
            nmf_state[0][idx], nmf_state[1][idx] = res.W, res.H

            left = cur.abs().pow(2).sum(dim=(1, 2))
            # stop items whose pass took too little, or with nothing audible left
            stop = torch.zeros(B, dtype=torch.bool, device=dev)
            stop[idx[~keep_now]] = True
            stop |= left <= top_input_energy * 10 ** (sc.residual_floor_db / 10)
            running = running & ~stop

            if keep_traces:
                traces.append(self._trace(k, B, idx, keep_now, res, P_in, presence, eratio, e_in, left))

        residual = x - sources.sum(dim=1)
        labels = [[self.guide.labels[int(c)] if c >= 0 else "" for c in row] for row in class_ids.tolist()]
        return BatchSeparation(sources, residual, masks, kept, class_ids, confs, t5i, t5p, embs, silent, traces,
                               labels, passes_run, cut)

    # ------------------------------------------------------------------------------------------
    def _pass(self, k: int, n_samples: int, cur: torch.Tensor, region: torch.Tensor, rows: torch.Tensor,
              warm: tuple[torch.Tensor, torch.Tensor] | None) -> PassResult:
        """One pass for ``b`` windows: ``cur (b, F, T)`` complex, ``region (b, T)``, ``rows`` their batch rows."""
        sc, st = self.cfg.separator, self.cfg.stft
        b, Fb, T = cur.shape
        dev = cur.device
        P = cur.abs().pow(2)

        # The guide sees the current signal with the frames earlier sources dominated turned down
        # by suppression_db (in power), so it names what is left rather than what was taken.
        if k > 0 and sc.suppression_db < 0:
            gain = 1 - (1 - 10 ** (sc.suppression_db / 20)) * region  # amplitude
            ast_sig = apply_mask(cur, gain.unsqueeze(1).expand_as(P), st, n_samples)
        else:
            ast_sig = istft(cur, st, n_samples)
        g_out = self.guide(ast_sig, rows=rows, pass_index=k)
        conf, cid, top5p, top5i = top_classes(g_out.probs.to(dev), self.cfg.separator.top_k)  # padded with −1 below k classes

        tp = int(g_out.tp_valid)
        pool_f, pool_t, up_f, up_t = patch_operators(Fb, T, tp, st, self.guide.layout, dev)

        V = P.pow(sc.nmf_power / 2)  # |X|^p
        if warm is None:
            W, H = nmf_init(b, Fb, T, V.mean(dim=(1, 2)), sc, dev)
            iters = sc.nmf_iterations
        else:
            W, H = warm
            iters = sc.nmf_warm_iterations
        W, H = nmf(V, W, H, iters, sc.eps)
        fallback = None if g_out.calibrated else structure_shares(W, H, pool_f, pool_t, sc)
        g, prior, contrast = guidance_prior(g_out.grid[:, :, :tp].to(dev), g_out.calibrated, fallback, up_f, up_t, sc)
        own = None if g_out.calibrated else own_map_weight(contrast, sc)
        est = guided_mask(P, g, prior, W, H, pool_f, pool_t, sc, own)
        if g_out.done is not None:  # the guide says nothing is left to separate: the pass takes nothing
            est.mask = est.mask * (~g_out.done.to(dev)).float().view(-1, 1, 1)
        return PassResult(est.mask, P, prior, g, est.component_share, est.trust, contrast, g_out, cid, conf, top5i,
                          top5p, W, H)

    def _trace(self, k, B, idx, keep_now, res: PassResult, P_in, presence, eratio, e_in, left) -> PassTrace:
        dev = res.mask.device

        def full(t, fill=0):
            out = torch.full((B, *t.shape[1:]), fill, dtype=t.dtype, device=dev)
            out[idx] = t.to(dev)
            return out

        ran = torch.zeros(B, dtype=torch.bool, device=dev)
        ran[idx] = True
        grid = res.guide.grid.to(dev).float()
        Tp = grid.shape[-1]
        shares = torch.nn.functional.pad(res.shares, (0, Tp - res.shares.shape[-1]))
        return PassTrace(
            index=k, ran=ran, kept=full(keep_now, False), class_id=full(res.class_id, -1),
            confidence=full(res.confidence), top5_ids=full(res.top5_ids, -1), top5_probs=full(res.top5_probs),
            embedding=full(res.guide.embedding.float()), mask=full(res.mask), prior=full(res.prior),
            power=full(P_in), presence=full(presence), grid=full(grid), shares=full(shares),
            component_share=full(res.component_share), trust=full(res.trust), contrast=full(res.contrast), eratio=full(eratio), input_energy=full(e_in),
            residual_energy=left.clone(),
        )
