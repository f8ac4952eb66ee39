"""Spectral features on batched tensors: STFT/iSTFT for masking, slaney mel bands, the AST fbank,
and the AST's patch layout on the masking STFT.

Shapes: waveforms ``(B, N)`` samples at 16 kHz; STFTs ``(B, F, T)`` with ``F = n_fft // 2 + 1``
bins and ``T = N // hop + 1`` frames (centred); mel powers ``(B, n_mels, T)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF

from .config import SAMPLE_RATE, STFTConfig


def _hann(win_length: int, device: str) -> torch.Tensor:
    # Not cached: a window first made under inference_mode would be an inference tensor and
    # break a later backward pass (training validates before it fits). It costs microseconds.
    return torch.hann_window(win_length, device=device)


def stft(x: torch.Tensor, cfg: STFTConfig) -> torch.Tensor:
    """Complex STFT ``(B, F, T)`` of ``(B, N)`` samples (Hann window, centred, reflect-free zero pad)."""
    window = _hann(cfg.win_length, str(x.device)).to(x.dtype)
    return torch.stft(
        x, n_fft=cfg.n_fft, hop_length=cfg.hop, win_length=cfg.win_length, window=window,
        center=True, pad_mode="constant", return_complex=True,
    )


def istft(spec: torch.Tensor, cfg: STFTConfig, length: int) -> torch.Tensor:
    """Inverse of :func:`stft`: ``(B, F, T)`` complex to ``(B, length)`` samples."""
    window = _hann(cfg.win_length, str(spec.device)).to(spec.real.dtype)
    return torch.istft(
        spec, n_fft=cfg.n_fft, hop_length=cfg.hop, win_length=cfg.win_length, window=window,
        center=True, length=length,
    )


def apply_mask(spec: torch.Tensor, mask: torch.Tensor, cfg: STFTConfig, length: int) -> torch.Tensor:
    """Masked STFT back to samples, with the STFT's own (the mixture's) phase.

    ``spec (B, F, T)`` complex, ``mask (B, F, T)`` → ``(B, length)``; or ``K`` masks per item,
    ``mask (B, K, F, T)`` → ``(B, K, length)``. In float32: iSTFT has no half-precision kernel.
    """
    if mask.dim() == spec.dim() + 1:
        spec = spec.unsqueeze(1)
    masked = spec * mask.float()
    lead = masked.shape[:-2]
    return istft(masked.reshape(-1, *masked.shape[-2:]), cfg, length).view(*lead, length)


@functools.lru_cache(maxsize=8)
def _mel_fb(n_freqs: int, n_mels: int, device: str) -> torch.Tensor:
    # (F, M) triangular filters on the slaney mel scale with slaney area normalisation (librosa's
    # default; the reference separator used librosa's htk=True scale). Used for debug views only.
    return AF.melscale_fbanks(n_freqs=n_freqs, f_min=0.0, f_max=SAMPLE_RATE / 2, n_mels=n_mels,
                              sample_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney").to(device)


def mel_filterbank(n_freqs: int, n_mels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Slaney mel filter bank ``(F, M)``: ``mel_power = P^T @ fb``."""
    return _mel_fb(n_freqs, n_mels, str(device))


@functools.lru_cache(maxsize=8)
def _mel_to_linear(n_freqs: int, n_mels: int, device: str) -> torch.Tensor:
    fb = _mel_fb(n_freqs, n_mels, device)  # (F, M)
    # Row-normalised so that a per-band value becomes a per-bin weighted average (0-1 stays 0-1).
    # Bins no filter covers (DC) take the nearest band.
    w = fb / fb.sum(dim=1, keepdim=True).clamp_min(1e-12)
    empty = fb.sum(dim=1) <= 1e-12
    if bool(empty.any()):
        nearest = fb.argmax(dim=1)
        nearest[empty] = 0
        w[empty] = F.one_hot(nearest[empty], n_mels).to(w.dtype)
    return w


def mel_to_linear(values: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """Map per-mel-band values ``(..., M)`` to per-STFT-bin values ``(..., F)`` (weighted average)."""
    w = _mel_to_linear(n_freqs, values.shape[-1], str(values.device)).to(values.dtype)
    return values @ w.T


def mel_power(P: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Mel band power ``(B, M, T)`` from STFT power ``(B, F, T)``."""
    fb = mel_filterbank(P.shape[-2], n_mels, P.device).to(P.dtype)
    return torch.einsum("bft,fm->bmt", P, fb)


# --- AST fbank (Kaldi-compatible, batched) -------------------------------------------------------
_FB_WIN = 400  # 25 ms at 16 kHz
_FB_SHIFT = 160  # 10 ms
_FB_PAD = 512  # next power of two of the window
_PREEMPH = 0.97


@functools.lru_cache(maxsize=4)
def _kaldi_mel(n_mels: int, device: str) -> torch.Tensor:
    banks, _ = kaldi.get_mel_banks(n_mels, _FB_PAD, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0)
    banks = F.pad(banks, (0, 1))  # (M, 257): Nyquist column is zero, as in kaldi.fbank
    return banks.to(device)


def ast_fbank(x: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Log-mel fbank ``(B, frames, n_mels)`` of ``(B, N)`` 16 kHz samples.

    Matches ``torchaudio.compliance.kaldi.fbank(wave, htk_compat=True, window_type="hanning",
    num_mel_bins=n_mels, use_energy=False, dither=0.0, frame_shift=10)`` as used by the AST feature
    extractor, but batched and on any device. Inputs shorter than one 25 ms frame give 0 frames.
    """
    if x.dim() == 1:
        x = x.unsqueeze(0)
    B, N = x.shape
    n_frames = 0 if N < _FB_WIN else 1 + (N - _FB_WIN) // _FB_SHIFT
    if n_frames == 0:
        return x.new_zeros(B, 0, n_mels)
    frames = x.unfold(1, _FB_WIN, _FB_SHIFT)[:, :n_frames]  # (B, T, W)
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove DC offset
    prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = frames - _PREEMPH * prev
    window = torch.hann_window(_FB_WIN, periodic=False, device=x.device, dtype=x.dtype)
    frames = frames * window
    spec = torch.fft.rfft(frames, n=_FB_PAD).abs().pow(2)  # (B, T, 257)
    mel = spec @ _kaldi_mel(n_mels, str(x.device)).to(spec.dtype).T
    return torch.log(mel.clamp_min(torch.finfo(mel.dtype).eps))


def n_frames(num_samples: int, hop: int) -> int:
    """Number of centred STFT frames for a signal of ``num_samples``."""
    return num_samples // hop + 1


def ast_input(x: torch.Tensor, max_frames: int, mean: float, std: float) -> tuple[torch.Tensor, int]:
    """Normalised AST input ``(B, max_frames, 128)`` and the number of frames that hold audio.

    The log fbank is zero-padded to ``max_frames``, then normalised, as ``ASTFeatureExtractor`` does.
    """
    fb = ast_fbank(x)
    real = fb.shape[1]
    if real > max_frames:
        fb, real = fb[:, :max_frames], max_frames
    if fb.shape[1] < max_frames:
        fb = F.pad(fb, (0, 0, 0, max_frames - fb.shape[1]))
    return (fb - mean) / (std * 2), real


# --- the AST's patch layout on the masking STFT ------------------------------------------------
@dataclass(frozen=True)
class PatchLayout:
    """Where the AST's patches lie: ``patch`` × ``patch`` squares of its ``n_mels``-band Kaldi fbank
    (25 ms frames every 10 ms, htk mel scale from 20 Hz to Nyquist), taken every ``freq_stride``
    bands and ``time_stride`` frames. Defaults: the published AudioSet AST (12 × 101 patches)."""

    n_mels: int = 128
    patch: int = 16
    freq_stride: int = 10
    time_stride: int = 10

    @property
    def freq_patches(self) -> int:
        return (self.n_mels - self.patch) // self.freq_stride + 1

    def time_patches(self, frames: int) -> int:
        """Time patches of an fbank of ``frames`` frames (101 for the AST's 1024)."""
        return (frames - self.patch) // self.time_stride + 1

    def valid_time_patches(self, num_samples: int, max_frames: int, total: int) -> int:
        """Of ``total`` time patches, those that hold audio for ``num_samples`` samples (the rest
        cover only the zero padding up to ``max_frames`` frames); at least one."""
        frames = 0 if num_samples < _FB_WIN else 1 + (num_samples - _FB_WIN) // _FB_SHIFT
        frames = min(max(frames, 1), max_frames)
        return max(1, min(total, -(-max(frames - self.patch, 0) // self.time_stride) + 1))

    @staticmethod
    def of_model(config) -> "PatchLayout":
        return PatchLayout(int(config.num_mel_bins), int(config.patch_size), int(config.frequency_stride),
                           int(config.time_stride))


def htk_mel(f: torch.Tensor) -> torch.Tensor:
    """Kaldi's HTK mel scale, ``1127 ln(1 + f / 700)``, of frequencies ``f`` in Hz."""
    return 1127.0 * torch.log1p(f / 700.0)


def interp_matrix(coord: torch.Tensor, n: int) -> torch.Tensor:
    """``(L, n)`` linear-interpolation weights at fractional positions ``coord`` (clamped to the ends)."""
    c = coord.clamp(0, n - 1)
    lo = c.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = (c - lo.to(c.dtype)).float()
    out = torch.zeros(len(c), n)
    rows = torch.arange(len(c))
    out.index_put_((rows, lo), 1 - w, accumulate=True)
    out.index_put_((rows, hi), w, accumulate=True)
    return out


@functools.lru_cache(maxsize=32)
def _patch_ops(n_freqs: int, n_fft: int, n_frames: int, hop: int, tp: int, layout: PatchLayout,
               device: str) -> tuple[torch.Tensor, ...]:
    banks, _ = kaldi.get_mel_banks(layout.n_mels, n_fft, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0)
    banks = F.pad(banks, (0, n_freqs - banks.shape[1]))  # (M, F): the Nyquist bin is in no band
    Fp = layout.freq_patches
    member = torch.zeros(Fp, layout.n_mels)
    for i in range(Fp):
        member[i, i * layout.freq_stride: i * layout.freq_stride + layout.patch] = 1
    pool_f = member @ banks  # (Fp, F): weight of every STFT bin in every frequency patch
    # STFT frame t (centred at t*hop) is Kaldi frame (t*hop - 200) / 160 (25 ms window, 10 ms shift)
    kf = (torch.arange(n_frames, dtype=torch.float64) * hop - _FB_WIN / 2) / _FB_SHIFT
    starts = torch.arange(tp, dtype=torch.float64).unsqueeze(1) * layout.time_stride
    pool_t = ((kf >= starts - 0.5) & (kf < starts + layout.patch - 0.5)).float()  # (tp, T)
    # bilinear upsampling from patch centres to bins and frames
    lo, hi = htk_mel(torch.tensor(20.0, dtype=torch.float64)), htk_mel(torch.tensor(SAMPLE_RATE / 2, dtype=torch.float64))
    delta = (hi - lo) / (layout.n_mels + 1)
    freqs = torch.arange(n_freqs, dtype=torch.float64) * SAMPLE_RATE / n_fft
    band = (htk_mel(freqs.clamp_min(20.0)) - lo) / delta - 1  # fractional mel band of every bin
    up_f = interp_matrix((band - (layout.patch - 1) / 2) / layout.freq_stride, Fp)  # (F, Fp)
    up_t = interp_matrix((kf - (layout.patch - 1) / 2) / layout.time_stride, tp)  # (T, tp)
    return tuple(t.to(device) for t in (pool_f, pool_t, up_f, up_t))


def patch_operators(n_freqs: int, n_frames: int, tp: int, cfg: STFTConfig, layout: PatchLayout = PatchLayout(),
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The AST's patch grid on a masking STFT of ``n_freqs`` bins × ``n_frames`` frames.

    Returns ``pool_f (Fp, F)``, ``pool_t (tp, T)``, ``up_f (F, Fp)``, ``up_t (T, tp)``:

    - ``pool_f @ P @ pool_t.T`` is the energy of a power spectrogram ``P (…, F, T)`` inside every
      one of the ``Fp × tp`` patches (a bin counts with its Kaldi mel-filter weight, a frame when its
      centre lies in the patch's 16 fbank frames; patches overlap, as the AST's do);
    - ``up_f @ G @ up_t.T`` spreads a patch grid ``G (…, Fp, tp)`` back over bins and frames by
      linear interpolation between patch centres.
    """
    return _patch_ops(n_freqs, cfg.n_fft, n_frames, cfg.hop, int(tp), layout, str(device))


def patch_energy(P: torch.Tensor, pool_f: torch.Tensor, pool_t: torch.Tensor) -> torch.Tensor:
    """Energy per patch ``(B, Fp, tp)`` of power spectrograms ``P (B, F, T)``."""
    return pool_f @ P @ pool_t.T
