"""A real CNN tagger as a guide: :class:`TaggerGuide` over EfficientAT's mn04 (:mod:`astsep.efficientat`).

A tagger says *what* sounds, well (its top-3 labels fit 43 of the 50 shared ESC-50 clips), but not
*where*: its last feature map is 4 × 32 positions for 10 s. Two ways to get a grid from it
(``TaggerConfig.method``), both in the AST's patch layout so the separator sees one geometry:

- ``classmap``: the classifier head applied at every position of the last feature map gives a map of
  the named class's probability (``4 × T/32``), interpolated onto the patch grid; an uncalibrated
  grid, which the separator treats like attention. Measured: no better than a random model.
- ``loop`` (the default), the tagger *in the loop*: the window's power spectrogram is factorised
  (NMF, ``components`` templates × activations, the separator's KL updates), each component is rebuilt
  as a signal (its Wiener share of the mixture STFT) and the tagger embeds every component in one batch.
  ``assign: cluster`` (the default) splits the components into two sounds by those embeddings (a
  spectral split, then an energy-weighted 2-means), rebuilds and tags both groups, and names one of
  them (``name_by``: the louder, or the one the tagger is surer of); its label is its group's tags
  weighed with the window's (``label_mix``). Two groups the tagger hears alike are one sound: in the
  first pass the window is given to it whole; in a later pass nothing more is separated
  (``GuideOutput.done``: what is left stays the residual, classified whole). The grid is the named
  sound's share of the energy in every patch: calibrated, like an oracle's, so the separator fits its
  mask to it. ``assign: rival | prob`` instead give each component to the mixture's top class by its
  own tags (with ``iterations``: the mask ↔ tagger loop); measured far below the clustering
  (``benchmarks/README.md``), kept to compare.

Shapes: windows ``(B, N)`` at 16 kHz (resampled to 32 kHz for the tagger, which was trained there);
logits ``(B, 527)`` multi-label (sigmoid); grids ``(B, 12, 101)``; embeddings ``(B, 384)``.
Results are cached by content like the AST's (:class:`astsep.guide_cache.GuideCache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from .config import SAMPLE_RATE, GuideConfig, SeparatorConfig, STFTConfig, TaggerConfig
from .efficientat import TAGGER_RATE, MelFrontEnd, MobileNetTagger, file_sha256, load_tagger
from .features import PatchLayout, apply_mask, htk_mel, interp_matrix, patch_energy, patch_operators, stft
from .guidance import GuideOutput
from .guide_cache import GuideCache
from .masking import nmf, nmf_init

AST_MAX_FRAMES = 1024  # fbank frames of a full 10.24 s window: the patch grid every guide speaks
TAGGER_F_MAX = 15000.0  # the tagger's mel range (Hz)
CLUSTER_STEPS = 20  # 2-means updates after the spectral start (it settles in a few)


def tagger_row_coords(freq_rows: int, layout: PatchLayout, f_max: float = TAGGER_F_MAX) -> torch.Tensor:
    """``(Fp,)`` fractional row of the tagger's feature map (``freq_rows`` rows evenly over its 0-15 kHz
    HTK mel axis) at the centre frequency of every AST frequency patch (20 Hz-8 kHz HTK mel axis)."""
    mel = lambda f: htk_mel(torch.tensor(f, dtype=torch.float64))  # noqa: E731
    lo, hi = mel(20.0), mel(SAMPLE_RATE / 2)
    delta = (hi - lo) / (layout.n_mels + 1)
    centre_band = torch.arange(layout.freq_patches, dtype=torch.float64) * layout.freq_stride + (layout.patch - 1) / 2
    centre_mel = lo + (centre_band + 1) * delta
    return (centre_mel / mel(f_max) * freq_rows - 0.5).float()


class TaggerGuide:
    """The mn04 tagger as a :class:`~astsep.guidance.Guide` (module docstring).

    Args:
        model: the tagger (:func:`astsep.efficientat.load_tagger`).
        labels: its 527 class names (AudioSet order).
        cfg: the guide section (device, cache); ``cfg.dtype`` is float32 or bfloat16 (int8 is for the AST).
        tagger: how the grid is made (:class:`~astsep.config.TaggerConfig`).
        stft_cfg: the masking STFT the separator uses (the loop factorises the window on it).
        weights: the checkpoint file (fingerprint for a disk cache).
    """

    multilabel = True

    def __init__(self, model: MobileNetTagger, labels: list[str], cfg: GuideConfig | None = None,
                 tagger: TaggerConfig | None = None, stft_cfg: STFTConfig | None = None, name: str = "mn04_as",
                 weights: Path | None = None):
        from .ast_load import resolve_device

        self.cfg = cfg or GuideConfig()
        self.tcfg = tagger or TaggerConfig()
        self.stft_cfg = stft_cfg or STFTConfig()
        self.device = resolve_device(self.cfg.device)
        # bfloat16 autocast where asked (a GPU); int8 (--fast on a CPU) is the AST's: the 1 M-parameter
        # tagger runs in float32 there
        self.dtype = torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.front = MelFrontEnd().to(self.device)
        if len(labels) != model.num_classes:
            raise ValueError(f"{len(labels)} labels for a tagger of {model.num_classes} classes")
        self.labels = list(labels)
        self.name = name
        self.layout = PatchLayout()
        self.max_frames = AST_MAX_FRAMES
        self.time_patches = self.layout.time_patches(AST_MAX_FRAMES)
        self.freq_patches = self.layout.freq_patches
        self._weights = weights
        self._fingerprint: str | None = None
        self.cache = GuideCache(self.cfg.cache_size, self.cfg.cache_dir)
        self.forwards = self.batches = self.cache_hits = 0
        self.tagged_components = 0
        self.forward_seconds = 0.0

    @classmethod
    def from_folder(cls, path: str | Path, labels: list[str], cfg: GuideConfig | None = None,
                    tagger: TaggerConfig | None = None, stft_cfg: STFTConfig | None = None) -> "TaggerGuide":
        model, weights = load_tagger(path)
        return cls(model, labels, cfg, tagger, stft_cfg, name=str(path), weights=weights)

    @property
    def hidden_size(self) -> int:
        return self.model.hidden_size

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            if self._weights is not None and self._weights.is_file():
                self._fingerprint = file_sha256(self._weights)
            else:
                h = hashlib.sha256()
                for t in self.model.state_dict().values():
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
                self._fingerprint = h.hexdigest()
        return self._fingerprint

    def stats(self) -> dict:
        return {"ast_forwards": self.forwards, "ast_batches": self.batches, "cache_hits": self.cache_hits,
                "ast_seconds": round(self.forward_seconds, 4), "tagged_components": self.tagged_components}

    def key(self, x: torch.Tensor, later: bool = False) -> str:
        """Content key of ``x`` under every setting that changes the answer (``later``: a pass after the first)."""
        settings = {"later": bool(later), "fp": self.fingerprint if self.cache.dir is not None else None, "tagger": vars(self.tcfg),
                    "stft": vars(self.stft_cfg), "dtype": self.cfg.dtype, "v": 1}
        h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        h.update(str(x.numel()).encode())
        h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    # --- the tagger ---------------------------------------------------------------------------
    def tag(self, x: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tagger on ``x (B, N)`` 16 kHz signals: logits ``(B, C)``, embeddings ``(B, 384)`` and the
        last feature map ``(B, 384, 4, T')``; in chunks of ``chunk`` signals."""
        logits, embs, maps = [], [], []
        t0 = time.perf_counter()
        for part in x.split(chunk):
            x32 = AF.resample(part.float().to(self.device), SAMPLE_RATE, TAGGER_RATE)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                fmap = self.model.features_map(self.front(x32)).float()
            pooled = fmap.mean(dim=(2, 3))
            logits.append(self.model.head(pooled).float())
            embs.append(pooled)
            maps.append(fmap)
        self.forward_seconds += time.perf_counter() - t0
        self.batches += 1
        return torch.cat(logits), torch.cat(embs), torch.cat(maps)

    @torch.no_grad()
    def classify(self, x: torch.Tensor, rows: torch.Tensor | None = None, excerpt: bool = False) -> torch.Tensor:
        """Sigmoid probabilities ``(B, 527)`` of ``(B, N)`` 16 kHz signals: the tagger on each whole (uncached;
        ``rows`` and ``excerpt`` change nothing: it judges by content and needs no padding)."""
        if x.dim() == 1:
            x = x.unsqueeze(0)
        self.forwards += x.shape[0]
        return torch.sigmoid(self.tag(x)[0]).cpu()

    @torch.no_grad()
    def embed(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 384)`` pooled embeddings of whole signals (the tagger alone, no separation)."""
        if x.dim() == 1:
            x = x.unsqueeze(0)
        self.forwards += x.shape[0]
        return self.tag(x)[1].cpu()

    # --- the guide ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None, pass_index: int = 0) -> GuideOutput:
        """Guide ``x (B, N)`` 16 kHz windows (≤ 10.24 s); ``rows`` is ignored (judged by content);
        ``pass_index`` picks the one-sound threshold (``one_sound`` for the mixture, ``one_sound_later``)."""
        if x.dim() == 1:
            x = x.unsqueeze(0)
        later = int(pass_index) > 0
        found, hits = self.cache.fetch(x, lambda row: self.key(row, later),
                                       lambda rows: self._guide(rows.float().to(self.device), later))
        self.cache_hits += hits
        tp = self.layout.valid_time_patches(x.shape[-1], self.max_frames, self.time_patches)
        return GuideOutput(logits=torch.stack([f["logits"] for f in found]), grid=torch.stack([f["grid"] for f in found]),
                           embedding=torch.stack([f["embedding"] for f in found]), tp_valid=tp,
                           calibrated=self.tcfg.method == "loop", multilabel=True,
                           done=torch.stack([f["done"] for f in found]).bool())

    def _guide(self, x: torch.Tensor, later: bool = False) -> dict[str, torch.Tensor]:
        b, n = x.shape
        self.forwards += b
        logits, emb, fmap = self.tag(x)
        cls = torch.sigmoid(logits).argmax(dim=1)
        tp = self.layout.valid_time_patches(n, self.max_frames, self.time_patches)
        done = torch.zeros(b, dtype=torch.bool, device=x.device)
        if self.tcfg.method == "classmap":
            grid = self.class_map(fmap, cls, tp)
        else:
            grid, named, one = self.loop_grid(x, cls, tp, later)
            if later:  # what earlier passes left is one sound: it stays the residual, classified whole
                done = one
            if named is not None:
                logits = self.label_logits(logits, named, one)
        grid = F.pad(grid, (0, self.time_patches - tp))
        return {"logits": logits, "grid": grid, "embedding": emb, "done": done.float()}

    def class_map(self, fmap: torch.Tensor, cls: torch.Tensor, tp: int) -> torch.Tensor:
        """``(b, Fp, tp)``: the probability of class ``cls (b,)`` at every position of the feature map
        ``fmap (b, 384, R, T')`` (the head applied per position), interpolated onto the patch grid."""
        per_pos = self.model.head(fmap.permute(0, 2, 3, 1))  # (b, R, T', C)
        idx = cls.view(-1, 1, 1, 1).expand(-1, per_pos.shape[1], per_pos.shape[2], 1)
        pmap = torch.sigmoid(per_pos.gather(3, idx).squeeze(3))  # (b, R, T')
        up = interp_matrix(tagger_row_coords(pmap.shape[1], self.layout), pmap.shape[1]).to(pmap)  # (Fp, R)
        rows = up @ pmap  # (b, Fp, T')
        # the map's T' positions cover the window's frames evenly; the grid's tp patches the audio part
        return F.interpolate(rows, size=tp, mode="linear", align_corners=False)

    def loop_grid(self, x: torch.Tensor, cls: torch.Tensor, tp: int, later: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(b, Fp, tp)``: the share of every patch's energy that the tagged NMF components give the
        named sound (module docstring), the logits ``(b, 2, C)`` of the named group and the other (``assign: cluster``;
        None for the class votes, which name ``cls (b,)``, the mixture's top class) and which windows
        were heard as one sound ``(b,)``."""
        mask, P, named, one = self.named_mask(x, cls, later)
        pool_f, pool_t, _, _ = patch_operators(P.shape[1], P.shape[2], tp, self.stft_cfg, self.layout, P.device)
        grid = patch_energy(mask * P, pool_f, pool_t) / patch_energy(P, pool_f, pool_t).clamp_min(1e-20)
        return grid.clamp(0, 1), named, one

    def label_logits(self, window: torch.Tensor, groups: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
        """The named sound's class logits ``(b, C)`` from the window's ``(b, C)`` and both groups' ``(b, 2, C)``.

        ``label_by: contrast`` (the default): a class is what the window holds (its probability there)
        times how much more the named group holds it than the other, squared: ``p_w · (p_1 / (p_1 + p_2))²``
        (training-side mixtures: the label of 61 % of the groups fit the sound they hold in its top 3,
        against 55 % for the group's own tags). ``group``: the named group's tags weighed geometrically
        with the window's, ``label_mix`` the window's share. A window heard as one sound keeps its own."""
        pw = torch.sigmoid(window)
        if self.tcfg.label_by == "contrast":
            p1, p2 = torch.sigmoid(groups[:, 0]), torch.sigmoid(groups[:, 1])
            p = pw * (p1 / (p1 + p2).clamp_min(1e-6)).pow(2)
        else:
            lam = float(self.tcfg.label_mix)
            p = torch.exp((1 - lam) * F.logsigmoid(groups[:, 0]) + lam * F.logsigmoid(window))
        p = torch.where(one.view(-1, 1), pw, p).clamp(1e-7, 1 - 1e-6)
        return torch.log(p) - torch.log1p(-p)

    def named_mask(self, x: torch.Tensor, cls: torch.Tensor, later: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The named sound's soft mask ``(b, F, T)`` on the window's STFT, its power ``(b, F, T)``, the
        logits of the named group and the other ``(b, 2, C)`` (None for the class votes) and which windows were heard as one
        sound ``(b,)`` (their mask is all ones). With ``ensemble`` > 1 the clustering
        runs on that many factorisations (seeds ``seed``, ``seed + 1``, …) and the masks are averaged, each
        member's groups matched to the first's by their embeddings."""
        tc = self.tcfg
        if tc.assign != "cluster":
            mask, P, _ = self.vote_mask(x, cls)
            return mask, P, None, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        one_sound = tc.one_sound_later if later else tc.one_sound
        masks, named, P = None, None, None
        for e in range(int(tc.ensemble)):
            X, P, C, H = self.decompose(x, int(tc.seed) + e)
            _, emb = self.tag_components(X, C, x.shape[-1])
            mask, lg, ge, one = self.cluster(X, C, P, emb, x.shape[-1], one_sound)
            if masks is None:
                masks, named, ref, whole = [mask], lg, ge[:, 0], one
                continue
            swap = ((ge[:, 1] * ref).sum(dim=1) > (ge[:, 0] * ref).sum(dim=1)).view(-1, 1, 1)
            masks.append(torch.where(swap, 1 - mask, mask))
        mask = torch.stack(masks).mean(dim=0)
        mask = torch.where(whole.view(-1, 1, 1), masks[0], mask)  # the first member heard one sound: it stands
        return mask, P, named, whole

    def decompose(self, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """NMF of the windows ``x (b, N)`` from a start seeded by ``seed``: the mixture STFT ``(b, F, T)``, its
        power, the components' Wiener shares of every bin ``(b, K, F, T)`` and their activations ``(b, K, T)``."""
        tc = self.tcfg
        X = stft(x, self.stft_cfg)
        P = X.abs().pow(2)
        b, Fb, T = P.shape
        start = dataclasses.replace(SeparatorConfig(), nmf_components=int(tc.components), nmf_seed=int(seed))
        W, H = nmf_init(b, Fb, T, P.mean(dim=(1, 2)), start, P.device)  # the separator's seeded start
        W, H = nmf(P, W, H, int(tc.nmf_iterations), 1e-12)
        parts = W.transpose(1, 2).unsqueeze(3) * H.unsqueeze(2)  # (b, K, F, T)
        return X, P, parts / parts.sum(dim=1, keepdim=True).clamp_min(1e-20), H

    def tag_components(self, X: torch.Tensor, C: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every component rebuilt as a signal (its Wiener share ``C (b, K, F, T)`` of the STFT ``X``) and
        tagged in one batch: logits ``(b, K, 527)`` and embeddings ``(b, K, 384)``."""
        b, K = C.shape[:2]
        logits, emb, _ = self.tag(apply_mask(X, C, self.stft_cfg, n).flatten(0, 1))
        self.tagged_components += b * K
        return logits.view(b, K, -1), emb.view(b, K, -1)

    def cluster(self, X: torch.Tensor, C: torch.Tensor, P: torch.Tensor, emb: torch.Tensor, n: int,
                one_sound: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Two sounds from the tagged components: components whose tagger embeddings ``emb (b, K, D)`` are
        alike are one sound. A spectral split (the Fiedler vector of the clipped cosine similarity) starts
        an energy-weighted 2-means in embedding space. Both groups are rebuilt and tagged; the named one is
        the one ``name_by`` prefers. When the two groups sound alike (the mean of their embedding and
        class-probability cosines at least ``one_sound``) the window holds one sound and all of it is
        named. Returns the named mask ``(b, F, T)``, both groups' logits ``(b, 2, C)`` and embeddings
        ``(b, 2, D)`` (named first), and which windows were heard as one sound ``(b,)``."""
        tc, st = self.tcfg, self.stft_cfg
        b = X.shape[0]
        E = F.normalize(emb, dim=2)
        w = (C * P.unsqueeze(1)).sum(dim=(2, 3))
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-20)  # (b, K) energy shares
        sim = (E @ E.transpose(1, 2)).clamp_min(0)
        norm = sim.sum(dim=2).clamp_min(1e-9).rsqrt()
        lap = torch.eye(sim.shape[1], device=sim.device) - norm.unsqueeze(2) * sim * norm.unsqueeze(1)
        _, vecs = torch.linalg.eigh(lap)
        a = ((vecs[:, :, 1] * norm) > 0).float()  # (b, K)
        for _ in range(CLUSTER_STEPS):
            c1 = F.normalize(torch.einsum("bk,bkd->bd", a * w, E), dim=1)
            c0 = F.normalize(torch.einsum("bk,bkd->bd", (1 - a) * w, E), dim=1)
            a = ((E @ c1.unsqueeze(2)).squeeze(2) > (E @ c0.unsqueeze(2)).squeeze(2)).float()
        mask = torch.einsum("bk,bkft->bft", a, C)
        groups = apply_mask(X, torch.stack([mask, 1 - mask], dim=1), st, n)  # (b, 2, N)
        lg, ge, _ = self.tag(groups.flatten(0, 1))
        lg, ge = lg.view(b, 2, -1), F.normalize(ge.view(b, 2, -1), dim=2)
        prob = torch.sigmoid(lg)
        share1 = (a * w).sum(dim=1)
        rank = {"sure": prob.amax(dim=2), "energy": torch.stack([share1, 1 - share1], dim=1)}[tc.name_by]
        swap = rank[:, 1] > rank[:, 0]
        mask = torch.where(swap.view(-1, 1, 1), 1 - mask, mask)
        lg = torch.where(swap.view(-1, 1, 1), lg.flip(1), lg)
        ge = torch.where(swap.view(-1, 1, 1), ge.flip(1), ge)
        pn = F.normalize(prob, dim=2)
        alike = ((ge[:, 0] * ge[:, 1]).sum(dim=1) + (pn[:, 0] * pn[:, 1]).sum(dim=1)) / 2
        one = alike >= one_sound
        return torch.where(one.view(-1, 1, 1), torch.ones_like(mask), mask), lg, ge, one

    def vote_mask(self, x: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The class-vote candidates (``assign: rival | prob``): each component's share of the mixture's top
        class ``cls (b,)`` from its own tags (:meth:`vote`); with ``iterations`` the mask <-> tagger loop
        rebuilds the named sound and the rest from the shares, tags both, and votes again against the class
        the rest favours most. Measured far below ``cluster`` (benchmarks/README.md); kept to compare."""
        tc = self.tcfg
        X, P, C, _ = self.decompose(x, int(tc.seed))
        logits, _ = self.tag_components(X, C, x.shape[-1])
        share = self.vote(logits, cls)
        b = x.shape[0]
        for _ in range(int(tc.iterations)):
            tgt = apply_mask(X, torch.einsum("bk,bkft->bft", share, C), self.stft_cfg, x.shape[-1])
            both, _, _ = self.tag(torch.cat([tgt, x - tgt]))
            share = self.vote(logits, cls, (torch.sigmoid(both[b:]) - torch.sigmoid(both[:b])).argmax(dim=1))
        return torch.einsum("bk,bkft->bft", share, C), P, None

    def vote(self, logits: torch.Tensor, cls: torch.Tensor, rival: torch.Tensor | None = None) -> torch.Tensor:
        """Each component's share of class ``cls (b,)`` from its logits ``(b, K, C)``: its probability
        (``prob``), or a sigmoid of the log-odds of ``cls`` against the ``rival`` class ``(b,)`` (default: the
        class the components that least favour ``cls`` favour most), times ``sharpness``, plus ``bias``."""
        tc = self.tcfg
        b, K, _ = logits.shape
        rows = torch.arange(b, device=logits.device)
        lc = logits.gather(2, cls.view(-1, 1, 1).expand(-1, K, 1)).squeeze(2)  # (b, K)
        if tc.assign == "prob":
            return torch.sigmoid(lc)
        if rival is None:
            away = torch.softmax(-lc * tc.sharpness, dim=1)  # weight on the components least like cls
            votes = torch.einsum("bk,bkc->bc", away, torch.sigmoid(logits))
            votes[rows, cls] = -1.0
            rival = votes.argmax(dim=1)
        lr = logits.gather(2, rival.view(-1, 1, 1).expand(-1, K, 1)).squeeze(2)
        return torch.sigmoid(tc.sharpness * (lc - lr) + tc.bias)
