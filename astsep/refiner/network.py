"""The trainable mask refiner: a small FiLM-conditioned 2-D U-Net.

It looks at the mixture's log-magnitude STFT and the baseline separator's K masks, and is told
*which* source to return by a query embedding (CLAP text or audio, or an AST audio embedding).
Conditioning follows CLAPSep: a positive query (the sound to keep) and an optional negative query
(a sound to remove); the network sees ``[pos·p, p, neg·n, n]`` where ``p``/``n`` are 0/1 flags
saying whether each query is present, so "no negative" is distinguishable from a zero embedding.
Every convolution block is followed by FiLM (per-channel ``γ``, ``β`` from the condition;
``γ`` starts at 1 and ``β`` at 0, so an untrained network ignores the query).

Shapes: ``F`` STFT bins (513 for n_fft 1024), ``T`` frames (any number ≥ 1; the network pads to a
multiple of ``2**depth`` internally and crops back), ``K`` baseline masks, ``D`` query dim.

Plain ``nn.Module``; runs without Lightning. Its mask goes back to samples with
:func:`astsep.features.apply_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..features import apply_mask, stft

__all__ = ["RefinerConfig", "MaskRefiner", "count_parameters", "refine"]


@dataclass
class RefinerConfig:
    """Size and conditioning of :class:`MaskRefiner` (defaults: about 1.65 M parameters)."""

    n_masks: int = 3  # K baseline masks given as extra input channels (= separator.max_passes)
    query_dim: int = 512  # D, the query embedding size (CLAP: 512; AST-base pooled: 768)
    channels: int = 16  # channels of the first level; doubled per level
    max_channels: int = 128  # channel cap of the deeper levels
    depth: int = 4  # number of 2x down-sampling levels (pads F and T to a multiple of 2**depth)
    cond_dim: int = 128  # width of the shared condition MLP that feeds every FiLM layer
    groups: int = 4  # GroupNorm groups (batch-size independent, safe for batch 1 and DDP)
    use_negative: bool = True  # accept a negative query (CLAPSep); off: negatives are ignored
    log_floor: float = 1e-5  # magnitude floor before the log (about -100 dB re full scale)
    dropout: float = 0.0  # dropout on the condition vector (query dropout regularises)
    # pass-aware refinement: the refined pass's own baseline mask is an extra first input channel and
    # its pass number (one-hot) joins the condition, so one network repairs any pass of the baseline
    own_mask: bool = False
    # with own_mask: the output is sigmoid(logit(own mask) + correction), the correction's last layer
    # starting at zero, so an untrained refiner returns the baseline's mask (it starts at the baseline)
    residual: bool = False
    # passes the refiner re-estimates at inference (1: pass 1 only, the others keep their baseline
    # masks; 0: every kept pass); set to what it was trained on
    refine_passes: int = 0
    # with own_mask: four more input channels of context a small receptive field cannot gather, all
    # from the mixture and the pass's own mask (what inference has): the mask-weighted mean power per
    # bin over the whole clip of the pass's estimate and of the rest (their spectral profiles), and
    # the per-frame mean power of each (their activity), as log magnitudes, broadcast over the other
    # axis, so each bin can be weighed against what the source and the rest sound like elsewhere
    context: bool = False
    # "unet": the FiLM U-Net above (all levels down from full F×T resolution); "bandsplit": a light
    # full-resolution stem and head around a wider core that runs on frequency bands
    # (:class:`BandSplitCore`; needs own_mask and residual: it only corrects the pass's own mask)
    arch: str = "unet"
    band_width: tuple = (4, 8, 16)  # bandsplit: bins per band in each frequency region ...
    band_edges: tuple = (64, 256)  # ... regions split at these bins (defaults: 16 + 24 + 17 = 57 bands)
    core_channels: int = 64  # bandsplit: channels of the band core
    core_blocks: int = 8  # bandsplit: residual blocks of the core (time dilation 1, 2, 4, ... per block)
    max_dilation: int = 16  # bandsplit: the time dilation cycles back to 1 past this
    head_channels: int = 8  # bandsplit: channels of the full-resolution stem and head
    time_stride: int = 1  # bandsplit: the core runs on every time_stride-th frame (2: half the cost)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class FiLM(nn.Module):
    """Feature-wise affine modulation: ``x·(1+γ(c)) + β(c)``; ``x (B,C,F,T)``, ``c (B,cond)``."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)  # start as identity: the query's effect is learnt
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(cond).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return x * (1.0 + gamma) + beta


class ConvBlock(nn.Module):
    """Two 3×3 conv → GroupNorm → GELU layers, then FiLM. ``(B,Cin,F,T) -> (B,Cout,F,T)``."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, groups: int):
        super().__init__()
        g = max(1, min(groups, c_out))
        while c_out % g:
            g -= 1
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(g, c_out), nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.GroupNorm(g, c_out), nn.GELU(),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.film = FiLM(cond_dim, c_out)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.film(self.body(x) + self.skip(x), cond)


class MaskRefiner(nn.Module):
    """FiLM U-Net that turns (mixture, baseline masks, query) into the queried source's mask.

    ``forward(mixture_mag (B,F,T), baseline_masks (B,K,F,T), query (B,D), negative (B,D) | None,
    has_query (B,) | None, has_negative (B,) | None) -> mask (B,F,T)`` in ``[0, 1]``.
    """

    def __init__(self, cfg: RefinerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or RefinerConfig()
        if cfg.depth < 0 or cfg.channels < 1:
            raise ValueError(f"depth must be >= 0 and channels >= 1, got {cfg.depth}, {cfg.channels}")
        if cfg.residual and not cfg.own_mask:
            raise ValueError("residual=True refines the pass's own mask: it needs own_mask=True")
        if cfg.context and not cfg.own_mask:
            raise ValueError("context=True is computed from the pass's own mask: it needs own_mask=True")
        if cfg.arch not in ("unet", "bandsplit"):
            raise ValueError(f"refiner arch must be 'unet' or 'bandsplit', got {cfg.arch!r}")
        in_cond = 2 * cfg.query_dim + 2 + (cfg.n_masks if cfg.own_mask else 0)
        self.cond = nn.Sequential(
            nn.Linear(in_cond, cfg.cond_dim), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.cond_dim, cfg.cond_dim), nn.GELU(),
        )
        if cfg.arch == "bandsplit":
            if not cfg.residual:
                raise ValueError("arch='bandsplit' corrects the pass's own mask: it needs own_mask=True and residual=True")
            self.core = BandSplitCore(cfg, 2 + cfg.n_masks + (CONTEXT_CHANNELS if cfg.context else 0))
            return
        widths = [min(cfg.channels * 2**i, cfg.max_channels) for i in range(cfg.depth + 1)]
        c_in = 1 + cfg.n_masks + (1 if cfg.own_mask else 0) + (CONTEXT_CHANNELS if cfg.context else 0)
        self.down = nn.ModuleList()
        for w in widths[:-1]:
            self.down.append(ConvBlock(c_in, w, cfg.cond_dim, cfg.groups))
            c_in = w
        self.bottleneck = ConvBlock(c_in, widths[-1], cfg.cond_dim, cfg.groups)
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        c_in = widths[-1]
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c_in, w, kernel_size=2, stride=2))
            self.up_blocks.append(ConvBlock(2 * w, w, cfg.cond_dim, cfg.groups))
            c_in = w
        self.head = nn.Conv2d(c_in, 1, kernel_size=1)
        if cfg.residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def condition(self, query: torch.Tensor, negative: torch.Tensor | None = None,
                  has_query: torch.Tensor | None = None, has_negative: torch.Tensor | None = None,
                  pass_index: torch.Tensor | None = None) -> torch.Tensor:
        """The FiLM condition ``(B, cond_dim)`` from ``[pos·p, p, neg·n, n]`` (and, with ``own_mask``,
        the one-hot pass number ``pass_index (B,)``)."""
        B, D = query.shape
        if D != self.cfg.query_dim:
            raise ValueError(f"query has {D} dims, the refiner expects query_dim={self.cfg.query_dim}")
        p = query.new_ones(B) if has_query is None else has_query.to(query.dtype)
        if negative is None or not self.cfg.use_negative:
            negative, n = torch.zeros_like(query), query.new_zeros(B)
        else:
            if negative.shape != query.shape:
                raise ValueError(f"negative {tuple(negative.shape)} must match query {tuple(query.shape)}")
            n = query.new_ones(B) if has_negative is None else has_negative.to(query.dtype)
        parts = [query * p[:, None], p[:, None], negative * n[:, None], n[:, None]]
        if self.cfg.own_mask:
            idx = self._pass_index(pass_index, B, query.device)
            parts.append(F.one_hot(idx, self.cfg.n_masks).to(query.dtype))
        return self.cond(torch.cat(parts, dim=1))

    def _pass_index(self, pass_index: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor:
        if pass_index is None:
            return torch.zeros(B, dtype=torch.long, device=device)  # pass 1
        idx = torch.as_tensor(pass_index, device=device).long().view(-1)
        if idx.numel() != B or int(idx.min()) < 0 or int(idx.max()) >= self.cfg.n_masks:
            raise ValueError(f"pass_index must be {B} pass numbers in [0, {self.cfg.n_masks}), got {idx.tolist()}")
        return idx

    def features(self, mixture_mag: torch.Tensor, baseline_masks: torch.Tensor,
                 pass_index: torch.Tensor | None = None) -> torch.Tensor:
        """Input channels ``(B, 1+K, F, T)``: standardised log-magnitude, then the K masks (with
        ``own_mask``: ``(B, 2+K, F, T)``, the refined pass's own mask before the K masks; with ``context``
        :data:`CONTEXT_CHANNELS` more after them, from :func:`context_features`)."""
        if baseline_masks.shape[1] != self.cfg.n_masks:
            raise ValueError(f"got {baseline_masks.shape[1]} baseline masks, the refiner expects n_masks={self.cfg.n_masks}")
        if baseline_masks.shape[0] != mixture_mag.shape[0] or baseline_masks.shape[2:] != mixture_mag.shape[1:]:
            raise ValueError(f"baseline masks {tuple(baseline_masks.shape)} do not match the mixture {tuple(mixture_mag.shape)}")
        logmag = torch.log(mixture_mag.clamp_min(self.cfg.log_floor))
        # Per-example standardisation: the input level (random gain) does not change the features.
        mean = logmag.mean(dim=(1, 2), keepdim=True)
        std = logmag.std(dim=(1, 2), keepdim=True).clamp_min(1e-3) if logmag[0].numel() > 1 else torch.ones_like(mean)
        logmag = (logmag - mean) / std
        masks = baseline_masks.to(logmag.dtype)
        parts = [logmag.unsqueeze(1)]
        if self.cfg.own_mask:
            own = self.own(masks, pass_index)
            parts.append(own)
        parts.append(masks)
        if self.cfg.context:
            ctx = context_features(mixture_mag.to(logmag.dtype), own[:, 0], self.cfg.log_floor)
            parts.append((ctx - mean.unsqueeze(1)) / std.unsqueeze(1))
        return torch.cat(parts, dim=1)

    def own(self, baseline_masks: torch.Tensor, pass_index: torch.Tensor | None) -> torch.Tensor:
        """The refined pass's baseline mask ``(B, 1, F, T)`` of ``baseline_masks (B, K, F, T)``."""
        B = baseline_masks.shape[0]
        idx = self._pass_index(pass_index, B, baseline_masks.device)
        return baseline_masks[torch.arange(B, device=baseline_masks.device), idx].unsqueeze(1)

    def forward(self, mixture_mag: torch.Tensor, baseline_masks: torch.Tensor, query: torch.Tensor,
                negative: torch.Tensor | None = None, has_query: torch.Tensor | None = None,
                has_negative: torch.Tensor | None = None, pass_index: torch.Tensor | None = None) -> torch.Tensor:
        B, Fb, T = mixture_mag.shape
        cond = self.condition(query.to(mixture_mag.dtype), None if negative is None else negative.to(mixture_mag.dtype),
                              has_query, has_negative, pass_index)
        x = self.features(mixture_mag, baseline_masks, pass_index)
        if self.cfg.arch == "bandsplit":
            return self._residual_mask(self.core(x, cond), baseline_masks, pass_index)
        m = 2 ** self.cfg.depth
        pad_f, pad_t = (-Fb) % m, (-T) % m
        x = F.pad(x, (0, pad_t, 0, pad_f))
        skips = []
        for block in self.down:
            x = block(x, cond)
            skips.append(x)
            x = F.avg_pool2d(x, 2)
        x = self.bottleneck(x, cond)
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1), cond)
        logits = self.head(x)[:, 0, :Fb, :T]
        if self.cfg.residual:
            return self._residual_mask(logits, baseline_masks, pass_index)
        return torch.sigmoid(logits)

    def _residual_mask(self, correction: torch.Tensor, baseline_masks: torch.Tensor,
                       pass_index: torch.Tensor | None) -> torch.Tensor:
        """``sigmoid(logit(own mask) + correction)``: a zero correction gives back the baseline's mask."""
        own = self.own(baseline_masks.to(correction.dtype), pass_index)[:, 0].clamp(1e-3, 1 - 1e-3)
        return torch.sigmoid(correction + torch.log(own) - torch.log1p(-own))


CONTEXT_CHANNELS = 4


def context_features(mixture_mag: torch.Tensor, own: torch.Tensor, floor: float) -> torch.Tensor:
    """``(B, 4, F, T)`` log magnitudes from ``mixture_mag (B,F,T)`` and the pass's mask ``own (B,F,T)``:
    the estimate's and the rest's profiles (mean power per bin over the frames, each frame weighted
    by its mask) and activities (mean power per frame over the bins), each broadcast over the other axis."""
    power = mixture_mag.square()
    rest = 1.0 - own
    eps = 1e-3
    prof_src = (own * power).sum(-1) / (own.sum(-1) + eps)  # (B, F)
    prof_rest = (rest * power).sum(-1) / (rest.sum(-1) + eps)
    act_src = (own * power).mean(-2)  # (B, T)
    act_rest = (rest * power).mean(-2)
    B, Fb, T = mixture_mag.shape

    def log_mag(p: torch.Tensor) -> torch.Tensor:  # on the (B, F) / (B, T) summaries, before broadcasting
        return 0.5 * torch.log(p.clamp_min(floor * floor))

    chans = [log_mag(prof_src)[:, :, None].expand(B, Fb, T), log_mag(prof_rest)[:, :, None].expand(B, Fb, T),
             log_mag(act_src)[:, None, :].expand(B, Fb, T), log_mag(act_rest)[:, None, :].expand(B, Fb, T)]
    return torch.stack(chans, dim=1)


class CoreBlock(nn.Module):
    """A residual ConvNeXt-style block on bands: depthwise 3×3 conv (time dilation ``d``) → GroupNorm →
    1×1 up to 2C → GELU → 1×1 back to C, FiLM, plus the input. ``(B,C,NB,T) -> (B,C,NB,T)``."""

    def __init__(self, channels: int, cond_dim: int, groups: int, dilation: int):
        super().__init__()
        g = max(1, min(groups, channels))
        while channels % g:
            g -= 1
        self.dw = nn.Conv2d(channels, channels, 3, padding=(1, dilation), dilation=(1, dilation), groups=channels)
        self.norm = nn.GroupNorm(g, channels)
        self.pw = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1), nn.GELU(), nn.Conv2d(2 * channels, channels, 1))
        self.film = FiLM(cond_dim, channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x + self.film(self.pw(self.norm(self.dw(x))), cond)


class BandSplitCore(nn.Module):
    """The ``bandsplit`` refiner's body: features ``(B,Cin,F,T)`` → correction logit ``(B,F,T)``.

    Most of a U-Net's cost is at full F×T resolution, where it can afford only a few channels. Here a
    light full-resolution stem (one 3×3 conv) feeds a band split (BSRNN): each frequency region is cut
    into bands of ``band_width`` bins (narrower at low frequencies), each band projected to
    ``core_channels`` by a strided conv; the core (``core_blocks`` residual blocks, time dilations 1, 2,
    4, ... up to ``max_dilation``: a receptive field of seconds) works on the ~57 bands; each band is
    projected back to its bins and a full-resolution head combines that with the stem's features
    (the mixture's fine structure, the own mask) into the correction, whose last layer starts at zero.
    """

    def __init__(self, cfg: RefinerConfig, c_in: int):
        super().__init__()
        h, d = cfg.head_channels, cfg.core_channels
        widths, edges = tuple(int(w) for w in cfg.band_width), tuple(int(e) for e in cfg.band_edges)
        if len(widths) != len(edges) + 1 or min(widths) < 1 or list(edges) != sorted(edges):
            raise ValueError(f"band_width needs one width per region (len(band_edges)+1), got {widths}, {edges}")
        self.widths, self.edges = widths, edges
        self.stem = nn.Sequential(nn.Conv2d(c_in, h, 3, padding=1), nn.GELU())
        self.ts = ts = int(cfg.time_stride)
        if ts < 1:
            raise ValueError(f"time_stride must be >= 1, got {ts}")
        self.split = nn.ModuleList(nn.Conv2d(c_in + h, d, (w, 2 * ts + 1), stride=(w, ts), padding=(0, ts)) for w in widths)
        g = max(1, min(cfg.groups, d))
        while d % g:
            g -= 1
        self.split_norm = nn.GroupNorm(g, d)
        dils, k = [], 1
        for _ in range(cfg.core_blocks):
            dils.append(k)
            k = 1 if 2 * k > cfg.max_dilation else 2 * k
        self.blocks = nn.ModuleList(CoreBlock(d, cfg.cond_dim, cfg.groups, k) for k in dils)
        self.merge = nn.ModuleList(nn.Conv2d(d, h * w * ts, 1) for w in widths)
        self.head = nn.Sequential(nn.Conv2d(2 * h, h, 3, padding=1), nn.GELU(), nn.Conv2d(h, 1, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def regions(self, Fb: int) -> list[tuple[int, int, int]]:
        """``(start, stop, n_bands)`` per region for ``Fb`` bins (the last region is padded to whole bands)."""
        starts = [0, *(min(e, Fb) for e in self.edges)]
        stops = [*(min(e, Fb) for e in self.edges), Fb]
        return [(a, b, -(-(b - a) // w)) for a, b, w in zip(starts, stops, self.widths)]

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, _, Fb, T = x.shape
        s = self.stem(x)
        xs = torch.cat([x, s], dim=1)
        ts = self.ts
        xs = F.pad(xs, (0, (-T) % ts))
        bands, used = [], []
        for conv, merge, w, (a, b, n) in zip(self.split, self.merge, self.widths, self.regions(Fb)):
            if n:  # a region can be empty for short spectra (few bins)
                bands.append(conv(F.pad(xs[:, :, a:b], (0, 0, 0, n * w - (b - a)))))
                used.append((merge, w, a, b, n))
        z = F.gelu(self.split_norm(torch.cat(bands, dim=2)))  # (B, D, NB, T)
        for block in self.blocks:
            z = block(z, cond)
        up, i = [], 0
        Tc = z.shape[-1]
        for merge, w, a, b, n in used:  # each band back to its w bins (and ts frames): (B, h*w*ts, n, Tc) -> (B, h, n*w, Tc*ts)
            y = merge(z[:, :, i:i + n]).view(B, -1, w, ts, n, Tc).permute(0, 1, 4, 2, 5, 3).reshape(B, -1, n * w, Tc * ts)
            up.append(y[:, :, : b - a, :T])
            i += n
        return self.head(torch.cat([torch.cat(up, dim=2), s], dim=1))[:, 0]


def refine(net: MaskRefiner, mixture: torch.Tensor, baseline_masks: torch.Tensor, query: torch.Tensor,
           stft_cfg, negative: torch.Tensor | None = None, has_query: torch.Tensor | None = None,
           has_negative: torch.Tensor | None = None, pass_index: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one STFT → refiner → mask → iSTFT path, shared by training (:class:`astsep.lit.RefinerModule`)
    and inference (:class:`astsep.refiner.Refiner`).

    ``mixture (B,N)`` 16 kHz, ``baseline_masks (B,K,F,T)``, ``query (B,D)``, optional ``negative (B,D)``,
    flags ``(B,)`` and ``pass_index (B,)`` (the pass each row refines, 0-based). The STFT and iSTFT run
    in float32 outside autocast. Returns ``(estimate (B,N), mask (B,F,T), spec (B,F,T) complex)``.
    """
    with torch.autocast(mixture.device.type, enabled=False):
        spec = stft(mixture.float(), stft_cfg)
    mask = net(spec.abs(), baseline_masks, query, negative, has_query, has_negative, pass_index)
    with torch.autocast(mixture.device.type, enabled=False):
        est = apply_mask(spec, mask.float(), stft_cfg, mixture.shape[-1])
    return est, mask, spec

