"""One pass's mask, as batched tensor code: the steps :class:`astsep.separator.Separator` runs per pass.

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
from dataclasses import dataclass

import torch

from .config import SeparatorConfig
from .features import patch_energy


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
