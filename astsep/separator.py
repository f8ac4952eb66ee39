"""The deterministic guidance-driven multi-pass separator, as batched tensor code.

One pass takes ``b`` windows' current spectra (the mixture, then what earlier passes left) and
the guide's answer for them, and returns one mask per window (``F`` STFT bins, ``T`` frames,
``Fp × tp`` guide patches):

1. :func:`guidance_prior` — the guide's 2-D grid ``(b, Fp, tp)`` says how much of every AST patch
   belongs to the sound it names. A calibrated grid (an oracle's energy shares) is used as it is;
   an attention map is scaled so its ``grid_quantile`` maps to 1, and a nearly flat one (it says
   nothing about where) gives way to the dominant sound by the mixture's own structure (the NMF
   components that move with the loudest one, :func:`dominant_group`). Linear interpolation between patch
   centres spreads it over bins and frames: the prior ``(b, F, T)``.
2. :func:`nmf` — the current power spectrogram is factorised into ``nmf_components`` spectral
   templates × activations (KL multiplicative updates). This is the mixture's own structure at
   STFT resolution, which the 160 ms × 16-band patches cannot see.
3. :func:`component_split` — every component is given to the target in proportion to how much of
   its energy falls where the target is believed to be; the components' model of the target and of
   the rest, combined with the prior, gives a per-bin posterior (product of experts).
   :func:`grid_trust` compares the grid with the shares this posterior gives: an exact grid agrees
   with the mixture's structure, a blurred or noisy one does not.
4. :func:`fit_patch_shares` — the posterior is corrected, patch by patch, towards the grid's shares
   of the energy (an EM fit to the patch proportions over the overlapping patches). The correction
   is bounded, loosely for a trusted grid and tightly for an untrusted one, so that a blurred or
   noisy grid cannot force a share onto bins that do not look like the target. Steps 3-4 repeat
   ``rounds`` times, each with the sharper posterior.
5. For trusted windows, each side of the mask gets its own NMF (the target's templates and the
   rest's); their Wiener ratio, fitted to the grid again, is the mask (``source_nmf_*``).

The posterior is the mask. Source = mask · current STFT (its phase); the rest goes on to the next
pass. Confidence never removes frames; the class and confidence only name the source. An item
stops when its pass removes less than ``min_eratio`` of the energy, or nothing audible is left.

Energies are compared as ratios within a window, so a quiet recording gives the same masks as a
loud one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import AstsepConfig, SeparatorConfig
from .audio import rms_db
from .features import apply_mask, istft, patch_energy, patch_operators, stft
from .guide import TOP_K, ASTGuide, GuideOutput, top_classes


# --- pure steps ---------------------------------------------------------------------------------
def guidance_prior(grid: torch.Tensor, calibrated: bool, fallback: torch.Tensor | None, up_f: torch.Tensor,
                   up_t: torch.Tensor, sc: SeparatorConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patch shares ``g (b, Fp, tp)`` in [0, 1], the prior ``(b, F, T)`` spread over bins and frames,
    and each window's map contrast ``(b,)``.

    ``grid``: the guide's map over the ``tp`` patches that hold audio. A ``calibrated`` grid already
    is a share of the energy and is kept as it is. An attention map is divided by its
    ``grid_quantile``. An attention map that is nearly flat (coefficient of variation below
    ``grid_contrast_low``) says nothing about where the sound is; it is replaced by the ``fallback``
    shares ``(b, Fp, tp)`` (:func:`structure_shares`: the dominant sound by the mixture's own
    structure), fading between the two up to ``grid_contrast_high``.
    """
    g = grid.float().clamp_min(0)
    contrast = torch.ones(g.shape[0], device=g.device)
    if not calibrated:
        flat = g.flatten(1)
        contrast = flat.std(dim=1) / flat.mean(dim=1).clamp_min(1e-12)
        ref = torch.quantile(flat, sc.grid_quantile, dim=1).clamp_min(1e-12)
        g = (g / ref.view(-1, 1, 1)).clamp(0, 1)
        if fallback is not None:
            w = own_map_weight(contrast, sc).view(-1, 1, 1)
            g = w * g + (1 - w) * fallback
    g = g.clamp(0, 1)
    return g, (up_f @ g @ up_t.T).clamp(0, 1), contrast


def own_map_weight(contrast: torch.Tensor, sc: SeparatorConfig) -> torch.Tensor:
    """How much of an attention map's shares are its own ``(b,)`` in [0, 1], from its ``contrast (b,)``:
    0 at or below ``grid_contrast_low`` (replaced by the structure fallback), 1 from ``grid_contrast_high``."""
    span = max(sc.grid_contrast_high - sc.grid_contrast_low, 1e-6)
    return ((contrast - sc.grid_contrast_low) / span).clamp(0, 1)


def dominant_group(W: torch.Tensor, H: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """The NMF components ``(b, K)`` (0/1) that move with the most energetic one: a blind split.

    Components of one sound start, stop and swell together. Their similarity is the correlation of
    their log activations over time, ``R``, turned into an affinity ``exp((R − 1) / tau)``; the graph's
    Fiedler vector (second eigenvector of its Laplacian) cuts the components in two, and the side of
    the most energetic component is returned.
    """
    energy = W.sum(dim=1) * H.sum(dim=-1)  # (b, K)
    L = torch.log(H + 1e-6 * H.mean(dim=(1, 2), keepdim=True) + eps)
    L = L - L.mean(dim=-1, keepdim=True)
    L = L / L.norm(dim=-1, keepdim=True).clamp_min(eps)
    A = torch.exp((L @ L.transpose(1, 2) - 1) / max(tau, 1e-6))  # (b, K, K)
    lap = torch.diag_embed(A.sum(dim=-1)) - A
    fiedler = torch.linalg.eigh(lap.double())[1][..., 1].float()  # (b, K)
    top = energy.argmax(dim=1, keepdim=True)
    return ((fiedler * fiedler.gather(1, top).sign()) > 0).float().scatter(1, top, 1.0)


def structure_shares(W: torch.Tensor, H: torch.Tensor, pool_f: torch.Tensor, pool_t: torch.Tensor,
                     sc: SeparatorConfig) -> torch.Tensor:
    """Patch shares ``(b, Fp, tp)`` of the dominant component group (:func:`dominant_group`): what a
    flat attention map is replaced by."""
    a = dominant_group(W, H, sc.flat_affinity_tau, sc.eps)
    part = patch_energy((W * a.unsqueeze(1)) @ H, pool_f, pool_t)
    return (part / patch_energy(W @ H, pool_f, pool_t).clamp_min(1e-30)).clamp(0, 1)


def nmf(V: torch.Tensor, W: torch.Tensor, H: torch.Tensor, iterations: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-divergence NMF of ``V (b, F, T) ≈ W (b, F, K) @ H (b, K, T)`` by multiplicative updates.

    Columns of ``W`` are kept at unit sum (the scale lives in ``H``). Deterministic for a given
    start; batched over ``b``. Returns the updated ``W, H``.
    """
    for _ in range(iterations):
        H = H * (W.transpose(1, 2) @ (V / (W @ H + eps))) / W.sum(dim=1).unsqueeze(-1).clamp_min(eps)
        W = W * ((V / (W @ H + eps)) @ H.transpose(1, 2)) / H.sum(dim=2).unsqueeze(1).clamp_min(eps)
        scale = W.sum(dim=1, keepdim=True).clamp_min(eps)  # (b, 1, K)
        W, H = W / scale, H * scale.transpose(1, 2)
    return W, H


def component_split(W: torch.Tensor, H: torch.Tensor, belief: torch.Tensor, prior: torch.Tensor, clamp: float,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``(b, F, T)`` that a bin is the target, and each component's target share ``(b, K)``.

    Component ``k`` (``W[:, :, k] ⊗ H[:, k]``) goes to the target in proportion to the target
    ``belief (b, F, T)`` over its energy. The target model ``S = Σ a_k C_k`` and the rest
    ``N = Σ (1 − a_k) C_k`` are combined with the ``prior``: ``prior·S / (prior·S + (1 − prior)·N)``,
    clamped to ``[clamp, 1 − clamp]``.
    """
    weighted = ((W.transpose(1, 2) @ belief) * H).sum(dim=-1)  # (b, K): Σ_ft C_k · belief
    total = W.sum(dim=1) * H.sum(dim=-1)  # (b, K): Σ_ft C_k
    a = weighted / total.clamp_min(eps)
    S = (W * a.unsqueeze(1)) @ H
    N = (W @ H - S).clamp_min(0)
    post = prior * S / (prior * S + (1 - prior) * N + eps)
    return post.clamp(clamp, 1 - clamp), a


def patch_shares(m: torch.Tensor, P: torch.Tensor, E: torch.Tensor, pool_f: torch.Tensor,
                 pool_t: torch.Tensor) -> torch.Tensor:
    """The target share ``(b, Fp, tp)`` of every patch's energy ``E`` under the mask ``m (b, F, T)``."""
    return patch_energy(m * P, pool_f, pool_t) / E.clamp_min(1e-30)


def grid_trust(P: torch.Tensor, g: torch.Tensor, post: torch.Tensor, E: torch.Tensor, pool_f: torch.Tensor,
               pool_t: torch.Tensor, sc: SeparatorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """How far the grid can be trusted, per window: ``(trust (b,) in [0, 1], residual (b,))``.

    The residual is the energy-weighted RMS difference between the grid's shares ``g`` and the shares
    the mixture's own structure gives (the component posterior ``post``, before any fit). An exact
    grid agrees with it closely; a blurred, noisy or distorted one does not. Trust falls linearly from
    1 at ``trust_residual_low`` to 0 at ``trust_residual_high``.
    """
    w = E / E.sum(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    r = ((g - patch_shares(post, P, E, pool_f, pool_t)).pow(2) * w).sum(dim=(1, 2)).sqrt()
    span = max(sc.trust_residual_high - sc.trust_residual_low, 1e-6)
    return ((sc.trust_residual_high - r) / span).clamp(0, 1), r


def fit_patch_shares(P: torch.Tensor, g: torch.Tensor, prior: torch.Tensor, pool_f: torch.Tensor,
                     pool_t: torch.Tensor, iterations: int, max_log_ratio: torch.Tensor | float,
                     eps: float) -> torch.Tensor:
    """Correct the per-bin ``prior (b, F, T)`` so each patch's target share of ``P`` approaches ``g``.

    EM for learning from label proportions: per patch, the log ratios between the share the grid
    asks for and the share the current posterior gives (for the target and for the rest) are
    accumulated, bounded to ``± max_log_ratio`` (a number, or ``(b, 1, 1)`` per window), averaged
    over the patches that cover a bin, and added to the bin's prior log-odds.
    """
    if iterations <= 0:
        return prior
    bound = torch.as_tensor(max_log_ratio, dtype=prior.dtype, device=prior.device)
    E = patch_energy(P, pool_f, pool_t)  # (b, Fp, tp)
    cover = pool_f.sum(dim=0).clamp_min(eps).unsqueeze(1) * pool_t.sum(dim=0).clamp_min(eps).unsqueeze(0)  # (F, T)
    logit = torch.log(prior / (1 - prior))
    la = torch.zeros_like(g)
    lb = torch.zeros_like(g)
    m = prior
    for _ in range(iterations):
        es = patch_energy(m * P, pool_f, pool_t)
        en = (E - es).clamp_min(0)
        la = torch.minimum(torch.maximum(la + torch.log((g * E + eps) / (es + eps)), -bound), bound)
        lb = torch.minimum(torch.maximum(lb + torch.log(((1 - g) * E + eps) / (en + eps)), -bound), bound)
        m = torch.sigmoid(logit + (pool_f.T @ (la - lb) @ pool_t) / cover)
    return m


def sharpen(m: torch.Tensor, sharpness: torch.Tensor | float) -> torch.Tensor:
    """``m (b, F, T)`` with its log-odds multiplied by ``sharpness`` (a number or ``(b, 1, 1)``; 1:
    unchanged, > 1: towards 0 / 1)."""
    if bool((torch.as_tensor(sharpness) == 1).all()):
        return m
    m = m.clamp(1e-6, 1 - 1e-6)  # float32: 1 - 1e-10 rounds to 1
    return torch.sigmoid(sharpness * torch.log(m / (1 - m)))


@dataclass
class MaskEstimate:
    """What :func:`guided_mask` found for ``b`` windows."""

    mask: torch.Tensor  # (b, F, T)
    component_share: torch.Tensor  # (b, K) each shared NMF component's target share
    trust: torch.Tensor  # (b,) how far the grid was trusted, in [0, 1]
    residual: torch.Tensor  # (b,) grid vs the mixture's own structure (energy-weighted RMS of shares)
    bound: torch.Tensor  # (b,) the patch fit's log-ratio bound used


def guided_mask(P: torch.Tensor, g: torch.Tensor, prior: torch.Tensor, W: torch.Tensor,
                H: torch.Tensor, pool_f: torch.Tensor, pool_t: torch.Tensor,
                sc: SeparatorConfig, own: torch.Tensor | None = None) -> MaskEstimate:
    """Steps 3-5 for ``P (b, F, T)`` with grid ``g (b, Fp, tp)`` and the shared NMF ``W, H``.

    3-4. Component split + patch-share fit, ``rounds`` times. The fit's bound goes from
         ``fit_min_log_ratio`` (grid not trusted) to ``fit_max_log_ratio`` (trusted), on a log scale.
    5.   For windows trusted at least ``source_nmf_min_trust``: each side of the mask gets its own
         NMF (``source_nmf_components`` each, fitted to ``m·P`` and ``(1 − m)·P``); their Wiener
         ratio, fitted again to the grid, is the new mask; ``source_nmf_rounds`` times.
    6.   :func:`sharpen` by ``mask_sharpness``.

    ``own (b,)`` is how much of ``g`` is the guide's own map rather than the structure fallback of a
    flat attention map (:func:`own_map_weight`; None: all of it). Steps 5 and 6 act on what the guide
    said: the per-side NMF runs only on windows whose grid is all the guide's own, and the sharpening
    fades out with ``own`` (a guess from the mixture's structure is not made more confident).
    """
    E = patch_energy(P, pool_f, pool_t)
    post, a = component_split(W, H, prior, prior, sc.prior_clamp, sc.eps)
    trust, resid = grid_trust(P, g, post, E, pool_f, pool_t, sc)
    lo, hi = max(sc.fit_min_log_ratio, 1e-6), max(sc.fit_max_log_ratio, 1e-6)
    bound = lo * (hi / lo) ** trust  # (b,)
    kb = bound.view(-1, 1, 1)
    m = prior
    for r in range(max(1, sc.rounds)):
        if r > 0:  # round 0's split (belief = prior) is the one the trust was measured on
            post, a = component_split(W, H, m, prior, sc.prior_clamp, sc.eps)
        m = fit_patch_shares(P, g, post, pool_f, pool_t, sc.fit_iterations, kb, sc.eps)

    if own is None:
        own = torch.ones_like(trust)
    use = (trust >= sc.source_nmf_min_trust) & (own >= 1)
    if sc.source_nmf_rounds > 0 and bool(use.any()):
        idx = use.nonzero().squeeze(1)
        Pi, gi, mi = P[idx], g[idx], m[idx]
        b, Fb, T = Pi.shape
        start = dataclasses.replace(sc, nmf_components=sc.source_nmf_components)
        state = None
        for r in range(sc.source_nmf_rounds):
            Vs, Vn = mi * Pi, (1 - mi) * Pi
            if state is None:
                Ws, Hs = nmf_init(b, Fb, T, Vs.mean(dim=(1, 2)), start, P.device)
                Wn, Hn = nmf_init(b, Fb, T, Vn.mean(dim=(1, 2)), start, P.device)
                iters = sc.nmf_iterations
            else:
                Ws, Hs, Wn, Hn = state
                iters = sc.source_nmf_iterations
            Ws, Hs = nmf(Vs, Ws, Hs, iters, sc.eps)
            Wn, Hn = nmf(Vn, Wn, Hn, iters, sc.eps)
            state = (Ws, Hs, Wn, Hn)
            S, N = Ws @ Hs, Wn @ Hn
            post = (S / (S + N + sc.eps)).clamp(sc.prior_clamp, 1 - sc.prior_clamp)
            mi = fit_patch_shares(Pi, gi, post, pool_f, pool_t, sc.fit_iterations, kb[idx], sc.eps)
        m = m.clone()
        m[idx] = mi
    m = sharpen(m, (1 + (sc.mask_sharpness - 1) * own).view(-1, 1, 1))
    return MaskEstimate(m, a, trust, resid, bound)


def nmf_init(b: int, n_freqs: int, n_frames: int, scale: torch.Tensor, sc: SeparatorConfig,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same seeded start for every window (so a window's result does not depend on its batch):
    ``W (b, F, K)`` with unit-sum columns, ``H (b, K, T)`` scaled to the window's mean level ``scale (b,)``."""
    gen = torch.Generator().manual_seed(int(sc.nmf_seed))
    K = int(sc.nmf_components)
    W = torch.rand(n_freqs, K, generator=gen) + 0.1
    H = torch.rand(K, n_frames, generator=gen) + 0.1
    W = (W / W.sum(dim=0, keepdim=True)).to(device)
    H = H.to(device)
    return W.expand(b, -1, -1).clone(), H.unsqueeze(0) * scale.view(-1, 1, 1) * n_freqs / K


# --- results ----------------------------------------------------------------------------------
@dataclass
class PassTrace:
    """What one pass saw and decided, for every window of the batch (for debug figures)."""

    index: int
    ran: torch.Tensor  # (B,) bool: the pass ran for this window
    kept: torch.Tensor  # (B,) bool: its source was kept (removed ≥ min_eratio of the energy)
    class_id: torch.Tensor  # (B,)
    confidence: torch.Tensor  # (B,)
    top5_ids: torch.Tensor  # (B, 5)
    top5_probs: torch.Tensor  # (B, 5)
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
    top5_ids: torch.Tensor  # (B, K, 5)
    top5_probs: torch.Tensor  # (B, K, 5)
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
    top5_ids: torch.Tensor  # (b, 5)
    top5_probs: torch.Tensor  # (b, 5)


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
    top5_ids: torch.Tensor  # (b, 5)
    top5_probs: torch.Tensor  # (b, 5)
    W: torch.Tensor  # (b, F, K) NMF state, the warm start of the next pass
    H: torch.Tensor  # (b, K, T)


class Separator:
    """Deterministic multi-pass separator over a guide (:class:`ASTGuide` or an oracle).

    ``separate_batch(x)`` takes ``(B, N)`` float32 windows at 16 kHz, ``N`` ≤ 10.24 s of samples.
    """

    def __init__(self, cfg: AstsepConfig, guide: ASTGuide):
        self.cfg = cfg
        self.guide = guide

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def separate_batch(self, x: torch.Tensor, keep_traces: bool = False,
                       should_stop: Callable[[], bool] | None = None,
                       on_pass: Callable[[PassSources], None] | None = None) -> BatchSeparation:
        """Separate ``x`` ``(B, N)``. ``should_stop``, when given, is asked before every pass after
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
        t5i = torch.full((B, K, TOP_K), -1, dtype=torch.long, device=dev)
        t5p = torch.zeros(B, K, TOP_K, device=dev)
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
        g_out = self.guide(ast_sig, rows=rows)
        conf, cid, top5p, top5i = top_classes(g_out.probs.to(dev))  # padded with −1 below five classes

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
