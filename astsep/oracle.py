"""An oracle guide: what a perfect AST could say, built from known sources, for research and diagnosis.

:class:`OracleGuide` is a :class:`~astsep.guidance.Guide`, like the AST. It is built for a batch
of mixtures whose sources are known (``sources (B, S, N)`` with a class each). Asked about a
signal, it answers like the AST would, but exactly:

- which known sound it names: the first source (in the order given: the target first) that
  still holds at least ``min_share`` of the signal's energy, else the loudest; its class
  probability is ``0.5 + share / 2`` (``share``: its share of the energy), the other sources
  split the rest by their shares;
- a calibrated grid: that sound's share of the energy in every AST patch (the AST's patch layout
  on the masking STFT; :func:`astsep.features.patch_operators`).

After a pass has taken part of the mixture, the separator hands the guide what is left. The oracle
works out how much of each source is left: the current signal is, bin by bin, a real fraction
``c(f, t)`` of the mixture's STFT (the separator applies real masks), so ``c² |S_i|²`` is what
remains of source ``i``.

Degradations stand for what a real attention map may look like (:class:`Degradation`, written as
``oracle:blur=1,noise_db=10``): Gaussian blur of σ patches, additive noise at a grid SNR in dB, a
gamma, a gain that saturates at 1, a constant floor, or a uniformly random grid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .config import GuideConfig, STFTConfig
from .errors import ConfigError
from .features import PatchLayout, patch_energy, patch_operators, stft
from .guidance import GuideOutput

_ABSENT_LOGIT = -30.0  # classes of no known source: softmax probability ~1e-13
EMBEDDINGS = ("zeros", "profile")  # what Degradation.embed may be


@dataclass
class Degradation:
    """How the oracle's grid is spoiled before the separator sees it (defaults: not at all)."""

    blur: float = 0.0  # Gaussian blur, σ in patches (both axes)
    noise_db: float | None = None  # additive Gaussian noise, grid RMS / noise RMS in dB
    gamma: float = 1.0  # g ** gamma (> 1: thinner, < 1: fatter)
    gain: float = 1.0  # g * gain, clipped to 1 (saturation)
    floor: float = 0.0  # floor + (1 - floor) * g (a constant the map never goes below)
    random: bool = False  # a uniformly random grid instead of the oracle's
    seed: int = 0  # noise and random grids
    # what the oracle's embedding of a signal carries: "zeros" (nothing, the default: the oracle does
    # not know what a sound sounds like) or "profile" (the named source's spectral profile, log power
    # in ``hidden_size`` log-spaced bands, standardised: a query that knows the sound, as a strong
    # audio encoder would; for diagnosis, it is computed from the clean source)
    embed: str = "zeros"

    @classmethod
    def parse(cls, text: str) -> "Degradation":
        """``"blur=1,noise_db=10"`` → ``Degradation(blur=1.0, noise_db=10.0)``; ``""`` → none."""
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if key not in kinds:
                raise ConfigError(f"unknown oracle degradation {key!r} (known: {', '.join(kinds)})")
            if key == "random" and not sep:
                values[key] = True
                continue
            if key == "embed":
                if raw.strip() not in EMBEDDINGS:
                    raise ConfigError(f"oracle embed must be one of {', '.join(EMBEDDINGS)}, not {raw!r}")
                values[key] = raw.strip()
                continue
            try:
                if key == "random":
                    values[key] = raw.strip().lower() in ("1", "true", "yes")
                elif key == "seed":
                    values[key] = int(raw)
                else:
                    values[key] = float(raw)
            except ValueError:
                raise ConfigError(f"oracle degradation {key} needs a number, not {raw!r}") from None
        d = cls(**values)
        if d.blur < 0 or d.gamma <= 0 or d.gain <= 0 or not 0 <= d.floor < 1:
            raise ConfigError(f"oracle degradation out of range: {text!r} (blur >= 0, gamma > 0, gain > 0, 0 <= floor < 1)")
        return d

    def describe(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name):g}" for f in fields(self)
                 if f.name not in ("random", "seed", "noise_db", "embed") and getattr(self, f.name) != f.default]
        if self.noise_db is not None:
            parts.append(f"noise_db={self.noise_db:g}")
        if self.random:
            parts.append("random")
        if self.embed != "zeros":
            parts.append(f"embed={self.embed}")
        return ",".join(parts)

    def apply(self, g: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Spoil shares ``g (b, Fp, tp)`` in [0, 1]; the result stays in [0, 1]."""
        if self.random:
            return torch.rand(g.shape, generator=generator).to(g)
        if self.blur > 0:
            g = gaussian_blur(g, self.blur)
        if self.gamma != 1.0:
            g = g.clamp_min(0) ** self.gamma
        if self.gain != 1.0:
            g = g * self.gain
        if self.floor > 0:
            g = self.floor + (1 - self.floor) * g
        if self.noise_db is not None:
            rms = g.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
            g = g + torch.randn(g.shape, generator=generator).to(g) * rms * 10 ** (-self.noise_db / 20)
        return g.clamp(0, 1)


def spectral_profile(power: torch.Tensor, bands: int) -> torch.Tensor:
    """``(b, bands)``: the log of ``power (b, F, T)`` averaged over the frames and over ``bands``
    log-spaced frequency bands (bin 0 joins the first), standardised per row (zero mean, unit variance)."""
    Fb = power.shape[1]
    edges = torch.unique(torch.logspace(0, torch.log10(torch.tensor(float(Fb))), bands + 1).round().long())
    edges[0] = 0
    edges[-1] = Fb
    per_bin = power.mean(dim=2)  # (b, F)
    means = [per_bin[:, a:z].mean(dim=1) for a, z in zip(edges[:-1].tolist(), edges[1:].tolist())]
    prof = torch.log(torch.stack(means, dim=1).clamp_min(1e-12))
    prof = F.interpolate(prof.unsqueeze(1), size=bands, mode="linear", align_corners=True).squeeze(1)
    return (prof - prof.mean(dim=1, keepdim=True)) / prof.std(dim=1, keepdim=True).clamp_min(1e-6)


def gaussian_blur(g: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(b, Fp, tp)`` grids, σ in patches, edges replicated."""
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=g.dtype, device=g.device) / sigma) ** 2)
    k = k / k.sum()
    x = g.unsqueeze(1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def parse_guide_spec(spec: str) -> Degradation | None:
    """``"ast"`` → None (the real AST); ``"oracle"`` / ``"oracle:blur=1,..."`` → a :class:`Degradation`."""
    name, _, rest = spec.partition(":")
    if name == "ast" and not rest:
        return None
    if name != "oracle":
        raise ConfigError(f"unknown guide {spec!r}: use 'ast' or 'oracle[:blur=1,noise_db=10,gamma=2,gain=2,"
                          f"floor=0.2,random,seed=0]'")
    return Degradation.parse(rest)


class OracleGuide:
    """A guide that knows the sources of ``B`` mixtures (see the module docstring).

    Args:
        mixture: ``(B, N)`` or ``(N,)`` 16 kHz mixtures the separator will be given.
        sources: ``(B, S, N)`` or ``(S, N)`` their sources (they should add up to the mixture).
        class_ids: ``(B, S)`` or ``(S,)`` each source's index into ``labels``.
        labels: class names (e.g. the 527 AudioSet display names).
        degradation: how to spoil the grid (default: a perfect grid).
        stft_cfg: the masking STFT the separator uses.
        layout: the AST patch layout (default: the published AudioSet AST's 12 × 101).
        hidden_size: length of the (all-zero) embeddings it returns.
        min_share: a source is named before later ones while it holds this share of what is left.
    """

    def __init__(self, mixture: torch.Tensor, sources: torch.Tensor, class_ids, labels: list[str],
                 degradation: Degradation | None = None, stft_cfg: STFTConfig | None = None,
                 layout: PatchLayout | None = None, hidden_size: int = 768, max_frames: int = 1024,
                 min_share: float = 0.1):
        mixture = mixture.float().cpu()
        sources = sources.float().cpu()
        if mixture.dim() == 1:
            mixture, sources = mixture.unsqueeze(0), sources.unsqueeze(0)
        class_ids = torch.as_tensor(class_ids, dtype=torch.long).view(sources.shape[0], sources.shape[1])
        if sources.shape[0] != mixture.shape[0] or sources.shape[-1] != mixture.shape[-1]:
            raise ConfigError(f"oracle sources {tuple(sources.shape)} do not match mixtures {tuple(mixture.shape)}")
        if int(class_ids.min()) < 0 or int(class_ids.max()) >= len(labels):
            raise ConfigError(f"oracle class ids must index the {len(labels)} labels")
        self.mixture, self.sources, self.class_ids = mixture, sources, class_ids
        self.labels = list(labels)
        self.degradation = degradation or Degradation()
        self.stft_cfg = stft_cfg or STFTConfig()
        self.layout = layout or PatchLayout()
        self._hidden = int(hidden_size)
        self.max_frames = int(max_frames)
        self.min_share = float(min_share)
        self.time_patches = self.layout.time_patches(self.max_frames)
        spoiled = self.degradation.describe()
        self.name = "oracle" + (f":{spoiled}" if spoiled else "")
        self.cfg = GuideConfig(model=self.name, device="cpu", dtype="float32")
        self.device = torch.device("cpu")
        self.forwards = self.batches = self.cache_hits = 0
        self.forward_seconds = 0.0
        self._X = stft(mixture, self.stft_cfg)  # (B, F, T)
        self._S = stft(sources.flatten(0, 1), self.stft_cfg).view(*sources.shape[:2], *self._X.shape[1:])

    @property
    def hidden_size(self) -> int:
        return self._hidden

    def stats(self) -> dict:
        return {"ast_forwards": self.forwards, "ast_batches": self.batches, "cache_hits": self.cache_hits,
                "ast_seconds": round(self.forward_seconds, 4)}

    def key(self, x: torch.Tensor) -> str:
        h = hashlib.sha256(self.name.encode())
        h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None, pass_index: int = 0) -> GuideOutput:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        x = x.float().cpu()
        b, n = x.shape
        rows = torch.arange(b) if rows is None else torch.as_tensor(rows).long().cpu().view(-1)
        if rows.numel() != b or int(rows.max()) >= self.mixture.shape[0]:
            raise ConfigError(f"the oracle knows {self.mixture.shape[0]} mixture(s); asked about rows {rows.tolist()}")
        if n != self.mixture.shape[-1]:
            raise ConfigError(f"the oracle was built for {self.mixture.shape[-1]} samples, not {n} (one window per "
                              f"mixture, at most 10.24 s)")
        self.forwards += b
        self.batches += 1
        X, S = self._X[rows], self._S[rows]  # (b, F, T), (b, S, F, T)
        Y = stft(x, self.stft_cfg)
        c = ((Y * X.conj()).real / X.abs().pow(2).clamp_min(1e-20)).clamp(0, 1)  # what is left of every bin
        left = c.unsqueeze(1).pow(2) * S.abs().pow(2)  # (b, S, F, T)
        tp = self.layout.valid_time_patches(n, self.max_frames, self.time_patches)
        pool_f, pool_t, _, _ = patch_operators(X.shape[-2], X.shape[-1], tp, self.stft_cfg, self.layout)
        per_patch = patch_energy(left.flatten(0, 1), pool_f, pool_t).view(b, S.shape[1], -1, tp)
        energy = left.sum(dim=(2, 3))  # (b, S)
        share = energy / energy.sum(dim=1, keepdim=True).clamp_min(1e-30)
        order = torch.arange(share.shape[1], 0, -1, dtype=share.dtype)  # earlier sources first
        top = torch.where((share >= self.min_share).any(dim=1), ((share >= self.min_share) * order).argmax(dim=1),
                          energy.argmax(dim=1))
        total = per_patch.sum(dim=1)
        grid = per_patch[torch.arange(b), top] / total.clamp_min(1e-20)
        grid = torch.where(total > 1e-12 * total.flatten(1).amax(dim=1).view(-1, 1, 1).clamp_min(1e-30), grid,
                           torch.zeros_like(grid))
        gen = torch.Generator().manual_seed(int(self.degradation.seed) * 1_000_003 + self.batches)
        grid = self.degradation.apply(grid, gen)

        # probabilities: the named source 0.5 + half its share of the energy (so it is the top class),
        # the others the rest in proportion to their shares; sources of one class add up
        probs = torch.zeros(b, len(self.labels))
        named = F.one_hot(top, share.shape[1]).to(share.dtype)
        p_src = 0.5 * share + 0.5 * named
        probs.scatter_add_(1, self.class_ids[rows], p_src)
        logits = probs.clamp_min(1e-13).log().clamp_min(_ABSENT_LOGIT)
        full = F.pad(grid, (0, self.time_patches - tp))
        if self.degradation.embed == "profile":
            embedding = spectral_profile(left[torch.arange(b), top], self._hidden)
        else:
            embedding = torch.zeros(b, self._hidden)
        return GuideOutput(logits=logits, grid=full, embedding=embedding, tp_valid=tp,
                           calibrated=True)

    multilabel = False  # softmax probabilities, like the AST whose interface it stands in for

    def classify(self, x: torch.Tensor, rows: torch.Tensor | None = None, excerpt: bool = False) -> torch.Tensor:
        """``(B, C)`` probabilities of ``x``, rows ``rows`` of the mixtures it knows (default: all, in order)."""
        return self(x, rows).probs

    def embed(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self(x, rows).embedding
