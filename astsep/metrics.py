"""Separation metrics and the training loss, as pure batched functions of waveforms.

Every function takes estimates and references of shape ``(..., N)`` samples and returns one value
per signal, shape ``(...)``, in dB. They are plain tensor code (differentiable, any device), so the
loss and the validation metrics are the same functions.

- ``sdr``: plain signal-to-distortion ratio, ``10 log10(|s|^2 / |s - ŝ|^2)`` (the "SDR" of
  AudioSep / CLAPSep training code; identical to ``torchmetrics``' ``signal_noise_ratio`` with
  ``zero_mean=False``, *not* the BSS-eval ``signal_distortion_ratio``).
- ``si_sdr``: scale-invariant SDR (Le Roux et al. 2019): the reference is rescaled to its
  least-squares projection of the estimate first.
- ``sdri`` / ``si_sdri``: improvement over the unprocessed mixture, ``metric(ŝ, s) - metric(x, s)``.
- ``sdr_sisdr_loss``: CLAPSep's ``-λ·SDR - (1-λ)·SI-SDR``, averaged over the batch;
  :class:`SdrSiSdrLoss` is the same as an ``nn.Module`` (the refiner's default, injectable loss),
  optionally plus ``spectral_weight`` times ``compressed_spectral_loss``.
- ``compressed_spectral_loss``: the L1 distance of power-law compressed STFT magnitudes
  (``|S|^0.3``), relative to the reference's, per signal: a dense, per-bin term that also weighs the
  quiet bins a waveform SDR barely sees.
- ``best_source``: the source of a separation that scores best against the target (oracle
  selection), how the baseline separator is scored.

``eps`` (default: the dtype's machine epsilon, as torchmetrics does) keeps silence and perfect
reconstructions finite.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import STFTConfig
from .features import stft

__all__ = ["sdr", "si_sdr", "sdri", "si_sdri", "sdr_sisdr_loss", "SdrSiSdrLoss", "compressed_spectral_loss", "separation_metrics",
           "METRICS", "best_source"]

METRICS = ("sdr", "sdri", "si_sdr", "si_sdri")  # the keys of separation_metrics, in report order


def _eps(x: torch.Tensor, eps: float | None) -> float:
    return torch.finfo(x.dtype).eps if eps is None else eps


def _check(estimate: torch.Tensor, reference: torch.Tensor) -> None:
    if estimate.shape != reference.shape:
        raise ValueError(f"estimate {tuple(estimate.shape)} and reference {tuple(reference.shape)} differ in shape")


def sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Plain SDR in dB, ``(..., N) -> (...)``."""
    _check(estimate, reference)
    e = _eps(estimate, eps)
    signal = reference.pow(2).sum(dim=-1)
    noise = (reference - estimate).pow(2).sum(dim=-1)
    return 10.0 * torch.log10((signal + e) / (noise + e))


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, zero_mean: bool = False,
           eps: float | None = None) -> torch.Tensor:
    """Scale-invariant SDR in dB, ``(..., N) -> (...)``.

    ``zero_mean`` removes each signal's mean first (torchmetrics' option of the same name).
    """
    _check(estimate, reference)
    e = _eps(estimate, eps)
    if zero_mean:
        estimate = estimate - estimate.mean(dim=-1, keepdim=True)
        reference = reference - reference.mean(dim=-1, keepdim=True)
    alpha = ((estimate * reference).sum(dim=-1, keepdim=True) + e) / (reference.pow(2).sum(dim=-1, keepdim=True) + e)
    projection = alpha * reference
    noise = projection - estimate
    return 10.0 * torch.log10((projection.pow(2).sum(dim=-1) + e) / (noise.pow(2).sum(dim=-1) + e))


def sdri(estimate: torch.Tensor, mixture: torch.Tensor, reference: torch.Tensor,
         eps: float | None = None) -> torch.Tensor:
    """SDR improvement over the mixture in dB, ``(..., N) -> (...)``."""
    return sdr(estimate, reference, eps) - sdr(mixture, reference, eps)


def si_sdri(estimate: torch.Tensor, mixture: torch.Tensor, reference: torch.Tensor,
            zero_mean: bool = False, eps: float | None = None) -> torch.Tensor:
    """SI-SDR improvement over the mixture in dB, ``(..., N) -> (...)``."""
    return si_sdr(estimate, reference, zero_mean, eps) - si_sdr(mixture, reference, zero_mean, eps)


def sdr_sisdr_loss(estimate: torch.Tensor, reference: torch.Tensor, sdr_weight: float = 0.5,
                   eps: float | None = None) -> torch.Tensor:
    """``-λ·SDR - (1-λ)·SI-SDR`` averaged over all signals; a scalar (lower is better).

    ``sdr_weight`` is λ (CLAPSep uses 0.5). Computed in float32 even under mixed precision.
    """
    if not 0.0 <= sdr_weight <= 1.0:
        raise ValueError(f"sdr_weight must be in [0, 1], got {sdr_weight}")
    estimate, reference = estimate.float(), reference.float()
    value = -sdr_weight * sdr(estimate, reference, eps) - (1.0 - sdr_weight) * si_sdr(estimate, reference, eps=eps)
    return value.mean()


def compressed_spectral_loss(estimate: torch.Tensor, reference: torch.Tensor, power: float = 0.3,
                             stft_cfg: STFTConfig | None = None) -> torch.Tensor:
    """``Σ| |Ŝ|^p − |S|^p | / Σ|S|^p`` per signal over the STFT's bins, ``(..., N) -> (...)`` (0: equal).

    ``p`` compresses the magnitudes as perceptual and speech-enhancement losses do, so quiet bins count
    too; the sum is relative to the reference's, so the level of a signal does not scale it (bins
    below ~1e-5 in magnitude, where the ε that keeps the gradient finite counts, are treated as
    silence). On :func:`astsep.features.stft` (the masks' STFT unless ``stft_cfg`` says otherwise), float32.
    """
    _check(estimate, reference)
    if not 0.0 < power <= 2.0:
        raise ValueError(f"power must be in (0, 2], got {power}")
    shape = estimate.shape[:-1]
    est, ref = estimate.float().reshape(-1, estimate.shape[-1]), reference.float().reshape(-1, reference.shape[-1])
    cfg = stft_cfg or STFTConfig()

    def compressed(x: torch.Tensor) -> torch.Tensor:
        spec = stft(x, cfg)
        # (|S|² + ε)^(p/2) − ε^(p/2): |S|^p, 0 at silence, with a finite gradient there (|S|^p has none)
        return (spec.real.square() + spec.imag.square() + 1e-10) ** (power / 2) - 1e-10 ** (power / 2)

    e, r = compressed(est), compressed(ref)
    value = (e - r).abs().sum(dim=(-2, -1)) / r.sum(dim=(-2, -1)).clamp_min(1e-6)
    return value.reshape(shape)


class SdrSiSdrLoss(nn.Module):
    """:func:`sdr_sisdr_loss` as a module: ``(estimate (B,N), reference (B,N)) -> ()``, plus
    ``spectral_weight`` × the batch mean of :func:`compressed_spectral_loss` when it is not 0.

    The refiner's default training loss (``model.loss`` in the training configs); any module or
    function of ``(estimate, reference)`` returning a scalar can take its place.
    """

    def __init__(self, sdr_weight: float = 0.5, eps: float | None = None, spectral_weight: float = 0.0):
        super().__init__()
        if not 0.0 <= sdr_weight <= 1.0:
            raise ValueError(f"sdr_weight must be in [0, 1], got {sdr_weight}")
        if spectral_weight < 0:
            raise ValueError(f"spectral_weight must be >= 0, got {spectral_weight}")
        self.sdr_weight = sdr_weight
        self.eps = eps
        self.spectral_weight = spectral_weight

    def forward(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        value = sdr_sisdr_loss(estimate, reference, self.sdr_weight, self.eps)
        if self.spectral_weight:
            value = value + self.spectral_weight * compressed_spectral_loss(estimate, reference).mean()
        return value

    def extra_repr(self) -> str:
        return f"sdr_weight={self.sdr_weight}, spectral_weight={self.spectral_weight}"


def separation_metrics(estimate: torch.Tensor, mixture: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """All four metrics of an estimate: ``{"sdr", "sdri", "si_sdr", "si_sdri"}``, each ``(...)`` dB."""
    estimate, mixture, reference = estimate.float(), mixture.float(), reference.float()
    s_est, s_mix = sdr(estimate, reference), sdr(mixture, reference)
    si_est, si_mix = si_sdr(estimate, reference), si_sdr(mixture, reference)
    return {"sdr": s_est, "sdri": s_est - s_mix, "si_sdr": si_est, "si_sdri": si_est - si_mix}


def best_source(sources: torch.Tensor, kept: torch.Tensor, mixture: torch.Tensor,
                target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept source with the highest SI-SDR against the target (oracle selection).

    ``sources (B,K,N)``, ``kept (B,K)`` bool, ``mixture``/``target`` ``(B,N)``. Returns the
    estimate ``(B,N)`` (the mixture where no source was kept) and its index ``(B,)`` (−1 there).
    An upper bound of what any rule could pick from the sources, which is how the refiner's and
    the evaluation's baseline is scored.
    """
    scores = si_sdr(sources.float(), target.float().unsqueeze(1).expand_as(sources))
    scores = scores.masked_fill(~kept, float("-inf"))
    best = scores.argmax(dim=1)
    any_kept = kept.any(dim=1)
    est = sources.gather(1, best.view(-1, 1, 1).expand(-1, 1, sources.shape[-1])).squeeze(1)
    est = torch.where(any_kept.unsqueeze(1), est, mixture)
    return est, torch.where(any_kept, best, torch.full_like(best, -1))
