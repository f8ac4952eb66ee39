"""The deterministic AST-guided multi-pass separator, as batched tensor code.

One pass, for every window of the batch at once (``B`` windows of ``N`` samples, ``F`` STFT bins,
``T`` frames, ``M`` mel bands):

1. STFT power of the current signal (the mixture, then what earlier passes left);
   time regions separated earlier are suppressed to 0.1 % before the AST sees the signal.
2. One AST forward: class, confidence, top-5, embedding, CLS→patch attention grid.
   Time attention = grid mean over frequency → frames, smoothed, 0-1; frequency attention =
   grid mean over time → mel bands, 0-1.
3. Purity per frame (energy and spectral-entropy blend); anchor score = attention^α · purity^β.
4. Anchor: among the top-30 % attention frames outside earlier anchors (with a buffer), the frame
   of highest purity; a 0.512 s window around it; its core is the run around the score peak
   that stays above the window's median score.
5. Frequency support ω (anchor band energy × AST frequency attention, soft), spectral template
   from the core, presence from energy in ω, cosine similarity of every frame to the template.
6. Mask: frames more similar than the AST's confidence keep their similarity, others a floor and
   at most 1 % of the anchor's energy; frequency weights from the anchor's loudest bins and the
   AST attention (conservative, or aggressive when the previous pass removed most of the energy);
   weak anchors get a stricter mask.
7. Source = mask · current STFT; the rest goes on. An item stops when its pass removes less than
   ``min_eratio`` of the energy, or when nothing audible is left.

Energies that set thresholds are compared in dB relative to the window's maximum, so the
algorithm behaves the same for a quiet and a loud recording (the reference's raw-energy sigmoids
did not, which is why it amplified quiet inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import SAMPLE_RATE, AstsepConfig
from .features import istft, mel_power, mel_to_linear, stft
from .guide import ASTGuide


# --- small batched helpers ----------------------------------------------------------------------
def smooth1d(x: torch.Tensor, k: int) -> torch.Tensor:
    """Moving average of length ``k`` along the last axis of ``(B, T)`` (edges replicated)."""
    if k <= 1 or x.shape[-1] < 2:
        return x
    k = min(k, 2 * x.shape[-1] - 1)
    if k % 2 == 0:
        k -= 1
    pad = k // 2
    xp = F.pad(x.unsqueeze(1), (pad, pad), mode="replicate")
    return F.avg_pool1d(xp, kernel_size=k, stride=1).squeeze(1)


def norm01(x: torch.Tensor) -> torch.Tensor:
    """Per-row min-max normalisation of ``(B, T)`` to [0, 1] (a constant row becomes 0)."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def rel_db(e: torch.Tensor, floor_db: float = -100.0) -> torch.Tensor:
    """Power ``(B, …)`` in dB relative to each row's maximum, floored (≤ 0)."""
    ref = e.flatten(1).amax(dim=1).clamp_min(1e-20).view(-1, *([1] * (e.dim() - 1)))
    return (10.0 * torch.log10(e.clamp_min(1e-20) / ref)).clamp_min(floor_db)


def row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile per row of ``(B, T)``, shape ``(B, 1)``."""
    return torch.quantile(x.float(), q, dim=-1, keepdim=True).to(x.dtype)


def masked_argmax(values: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax per row over allowed positions; also whether any position was allowed."""
    v = values.masked_fill(~allowed, float("-inf"))
    return v.argmax(dim=-1), allowed.any(dim=-1)


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
    power: torch.Tensor  # (B, F, T) power of the pass's input
    time_attention: torch.Tensor  # (B, T)
    anchor_score: torch.Tensor  # (B, T)
    similarity: torch.Tensor  # (B, T)
    anchor: torch.Tensor  # (B, 2) frames [start, end)
    core: torch.Tensor  # (B, 2) frames [start, end)
    grid: torch.Tensor  # (B, Fp, Tp_valid)
    aggressive: torch.Tensor  # (B,) bool
    weak: torch.Tensor  # (B,) bool
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


class Separator:
    """Deterministic multi-pass separator over an :class:`ASTGuide`.

    ``separate_batch(x)`` takes ``(B, N)`` float32 windows at 16 kHz, ``N`` ≤ 10.24 s of samples.
    """

    def __init__(self, cfg: AstsepConfig, guide: ASTGuide):
        self.cfg = cfg
        self.guide = guide

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def separate_batch(self, x: torch.Tensor, keep_traces: bool = False) -> BatchSeparation:
        sc, st = self.cfg.separator, self.cfg.stft
        if x.dim() == 1:
            x = x.unsqueeze(0)
        x = x.float()
        B, N = x.shape
        dev = x.device
        X = stft(x, st)  # (B, F, T)
        Fb, T = X.shape[-2:]
        K = max(1, int(sc.max_passes))
        H = self.guide.hidden_size

        rms_db = 10 * torch.log10(x.pow(2).mean(dim=1).clamp_min(1e-30))
        silent = rms_db < sc.silence_dbfs
        running = ~silent

        cur = X.clone()  # current (residual) spectrum
        keep_share = torch.ones(B, Fb, T, device=dev)  # Π (1 − M_j): share of the mixture still left
        region = torch.zeros(B, T, device=dev)  # time regions separated so far (0..1)
        prev_anchors: list[torch.Tensor] = []  # each (B, 2); only meaningful where a pass ran
        prev_ran: list[torch.Tensor] = []
        prev_eratio = torch.ones(B, device=dev)
        top_input_energy = X.abs().pow(2).sum(dim=(1, 2))

        sources = torch.zeros(B, K, N, device=dev)
        masks = torch.zeros(B, K, Fb, T, device=dev)
        kept = torch.zeros(B, K, dtype=torch.bool, device=dev)
        class_ids = torch.full((B, K), -1, dtype=torch.long, device=dev)
        confs = torch.zeros(B, K, device=dev)
        t5i = torch.full((B, K, 5), -1, dtype=torch.long, device=dev)
        t5p = torch.zeros(B, K, 5, device=dev)
        embs = torch.zeros(B, K, H, device=dev)
        traces: list[PassTrace] = []

        for k in range(K):
            idx = running.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            res = self._pass(
                k, x.shape[1], cur[idx], region[idx], [a[idx] for a in prev_anchors], [r[idx] for r in prev_ran],
                prev_eratio[idx],
            )
            M = res["mask"]  # (b, F, T)
            src_spec = M * cur[idx]
            src = istft(src_spec, st, N)
            e_in = cur[idx].abs().pow(2).sum(dim=(1, 2)).clamp_min(1e-20)
            e_src = src_spec.abs().pow(2).sum(dim=(1, 2))
            eratio = e_src / e_in
            keep_now = eratio >= sc.min_eratio

            sel, km = idx[keep_now], keep_now  # batch rows kept, and the same rows within this pass
            sources[sel, k] = src[km]
            masks[sel, k] = (M * keep_share[idx])[km]
            kept[sel, k] = True
            class_ids[sel, k] = res["class_id"][km]
            confs[sel, k] = res["confidence"][km]
            t5i[sel, k] = res["top5_ids"][km]
            t5p[sel, k] = res["top5_probs"][km]
            embs[sel, k] = res["embedding"][km].to(embs.dtype)
            keep_share[sel] = keep_share[sel] * (1 - M[km])
            cur[sel] = cur[sel] - src_spec[km]
            region[sel] = torch.maximum(region[sel], res["region"][km])

            anchors = torch.zeros(B, 2, dtype=torch.long, device=dev)
            anchors[idx] = res["anchor"]
            ran = torch.zeros(B, dtype=torch.bool, device=dev)
            ran[sel] = True
            prev_anchors.append(anchors)
            prev_ran.append(ran)
            prev_eratio[idx] = eratio

            left = cur.abs().pow(2).sum(dim=(1, 2))
            # stop items whose pass took too little, or with nothing audible left
            stop = torch.zeros(B, dtype=torch.bool, device=dev)
            stop[idx[~keep_now]] = True
            stop |= left <= top_input_energy * 10 ** (sc.silence_dbfs / 10)
            running = running & ~stop

            if keep_traces:
                def full(t, fill=0):
                    out = torch.full((B, *t.shape[1:]), fill, dtype=t.dtype, device=dev)
                    out[idx] = t
                    return out

                ran_mask = torch.zeros(B, dtype=torch.bool, device=dev)
                ran_mask[idx] = True
                traces.append(PassTrace(
                    index=k, ran=ran_mask, kept=full(keep_now, False), class_id=full(res["class_id"], -1),
                    confidence=full(res["confidence"]), top5_ids=full(res["top5_ids"], -1),
                    top5_probs=full(res["top5_probs"]), embedding=full(res["embedding"].float()),
                    mask=full(M), power=full(res["power"]), time_attention=full(res["time_attention"]),
                    anchor_score=full(res["score"]), similarity=full(res["similarity"]),
                    anchor=full(res["anchor"]), core=full(res["core"]), grid=full(res["grid"]),
                    aggressive=full(res["aggressive"], False), weak=full(res["weak"], False),
                    eratio=full(eratio), input_energy=full(e_in), residual_energy=left.clone(),
                ))

        residual = x - sources.sum(dim=1)
        labels = [[self.guide.labels[int(c)] if c >= 0 else "" for c in row] for row in class_ids.tolist()]
        return BatchSeparation(sources, residual, masks, kept, class_ids, confs, t5i, t5p, embs, silent, traces,
                               labels)

    # ------------------------------------------------------------------------------------------
    def _pass(self, k: int, n_samples: int, cur: torch.Tensor, region: torch.Tensor,
              prev_anchors: list[torch.Tensor], prev_ran: list[torch.Tensor], prev_eratio: torch.Tensor) -> dict:
        """One pass for ``b`` windows. ``cur`` ``(b, F, T)`` complex, ``region`` ``(b, T)``."""
        sc, st = self.cfg.separator, self.cfg.stft
        b, Fb, T = cur.shape
        dev = cur.device
        eps = sc.eps

        P = cur.abs().pow(2) + eps  # (b, F, T)
        Xmel = mel_power(P, st.n_mels)  # (b, M, T)
        # Suppress regions separated earlier: the AST, purity and anchors look elsewhere.
        sup = 1.0 - sc.suppression * region  # (b, T)
        P_sup = P * sup.unsqueeze(1)
        ast_sig = istft(cur * sup.unsqueeze(1), st, n_samples)  # pass 0: nothing separated yet, sup == 1

        g = self.guide(ast_sig)
        probs = g.probs.to(dev)
        conf, cid = probs.max(dim=-1)
        top5p, top5i = probs.topk(min(5, probs.shape[-1]), dim=-1)
        grid = g.grid[:, :, : g.tp_valid].to(dev)  # (b, Fp, Tv)

        # 2. attention over time (frames) and frequency (mel bands)
        t_att_raw = F.interpolate(grid.mean(dim=1, keepdim=True), size=T, mode="linear",
                                  align_corners=False).squeeze(1)
        t_att = norm01(smooth1d(t_att_raw, sc.smooth_frames))
        f_att = norm01(F.interpolate(grid.mean(dim=2, keepdim=True).transpose(1, 2), size=st.n_mels,
                                     mode="linear", align_corners=False).squeeze(1))  # (b, M)

        # 3. purity and anchor score
        e = P_sup.sum(dim=1)
        e_n = e / e.amax(dim=-1, keepdim=True).clamp_min(eps)
        p = P_sup / P_sup.sum(dim=1, keepdim=True).clamp_min(eps)
        Hn = -(p * (p + eps).log()).sum(dim=1) / math.log(max(2, Fb))
        purity = norm01(smooth1d(sc.purity_energy_weight * e_n + (1 - sc.purity_energy_weight) * (1 - Hn),
                                 sc.smooth_frames))
        score = norm01(smooth1d(t_att.clamp(0, 1) ** sc.alpha_attention * purity.clamp(0, 1) ** sc.beta_purity,
                                sc.smooth_frames))

        # 4. anchor, excluding earlier anchors (with a buffer) and separated regions
        La = max(1, min(int(round(sc.anchor_sec * SAMPLE_RATE / st.hop)), T))
        buf = int(La * sc.anchor_buffer_share)
        frames = torch.arange(T, device=dev).unsqueeze(0)
        excluded = torch.zeros(b, T, dtype=torch.bool, device=dev)
        for a, r in zip(prev_anchors, prev_ran):
            inside = (frames >= (a[:, :1] - buf)) & (frames < (a[:, 1:] + buf)) & r.unsqueeze(1)
            excluded |= inside
            score = torch.where((frames >= a[:, :1]) & (frames < a[:, 1:]) & r.unsqueeze(1), score * 0.1, score)
        score = score * (1 - region)
        top = t_att_raw >= row_quantile(t_att_raw, 1 - sc.attention_top_share)
        peak, ok = masked_argmax(purity, top & ~excluded)
        peak2, ok2 = masked_argmax(purity, ~excluded)
        peak = torch.where(ok, peak, torch.where(ok2, peak2, score.argmax(dim=-1)))
        s = (peak - La // 2).clamp(min=0, max=T - La)
        win = s.unsqueeze(1) + torch.arange(La, device=dev).unsqueeze(0)  # (b, La)
        local = score.gather(1, win)
        lp = local.argmax(dim=-1, keepdim=True)
        above = local >= row_quantile(local, sc.core_quantile)
        below_cum = torch.cumsum((~above).long(), dim=1)
        pos = torch.arange(La, device=dev).unsqueeze(0)
        lo_idx, hi_idx = torch.minimum(pos, lp), torch.maximum(pos, lp)
        before_lo = torch.where(lo_idx > 0, below_cum.gather(1, (lo_idx - 1).clamp_min(0)), torch.zeros_like(lo_idx))
        in_core = (below_cum.gather(1, hi_idx) - before_lo) == 0  # no sub-threshold frame between
        core_s = s + torch.where(in_core, pos, La).amin(dim=1)
        core_e = s + torch.where(in_core, pos, -1).amax(dim=1) + 1
        core_mask = ((frames >= core_s.unsqueeze(1)) & (frames < core_e.unsqueeze(1))).float()  # (b, T)

        # 5. frequency support, template, presence, similarity
        Ablk = Xmel * core_mask.unsqueeze(1)  # (b, M, T), zero outside the core
        band_db = rel_db(Ablk.sum(dim=-1))  # (b, M)
        sig_e = torch.sigmoid(sc.omega_slope * (band_db - row_quantile(band_db, sc.omega_energy_quantile)) / 10.0)
        n_min = min(sc.omega_min_bins, st.n_mels)
        top_bins = F.one_hot(band_db.topk(n_min, dim=-1).indices, st.n_mels).sum(dim=1).float()
        omega = torch.where(sig_e.sum(dim=-1, keepdim=True) < n_min, torch.maximum(top_bins, 0.3 * sig_e), sig_e)
        omega = omega * torch.sigmoid(sc.omega_slope * (f_att - row_quantile(f_att, sc.ast_freq_quantile)))

        w = (Ablk * omega.unsqueeze(-1)).sum(dim=-1) / core_mask.sum(dim=-1, keepdim=True).clamp_min(1) * omega
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(eps)
        w = F.avg_pool1d(F.pad(w.unsqueeze(1), (1, 1), mode="replicate"), 3, 1).squeeze(1) * omega
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(eps)

        e_om = smooth1d((Xmel * omega.unsqueeze(-1)).sum(dim=1), sc.presence_smooth_frames)
        e_om_db = rel_db(e_om)
        presence = torch.sigmoid(sc.presence_slope * (e_om_db - row_quantile(e_om_db, sc.presence_quantile)) / 10.0)

        Xo = Xmel * omega.unsqueeze(-1)
        wn = w * omega
        wn = wn / wn.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        Xn = Xo / Xo.norm(dim=1, keepdim=True).clamp_min(1e-8)
        sim = (wn.unsqueeze(-1) * Xn).sum(dim=1).clamp(0, 1) * presence  # (b, T)

        # 6. mask
        aggressive = (prev_eratio < sc.aggressive_below_eratio) & torch.tensor(k > 0, device=dev)
        core_power = (P * core_mask.unsqueeze(1)).sum(dim=1)  # (b, T)
        core_len = core_mask.sum(dim=-1).clamp_min(1)
        anchor_frame_energy = core_power.sum(dim=-1) / core_len  # mean energy per core frame
        frame_energy = P.sum(dim=1)
        weak = 10 * torch.log10(anchor_frame_energy / frame_energy.amax(dim=-1).clamp_min(eps)) < sc.weak_anchor_db

        high = sim > conf.unsqueeze(1)
        floor = torch.where(weak, torch.zeros_like(conf), torch.full_like(conf, sc.similarity_floor)).unsqueeze(1)
        cos_p = torch.where(high, sim, floor)

        omega_lin = mel_to_linear(omega, Fb)
        omega_lin = omega_lin / omega_lin.amax(dim=-1, keepdim=True).clamp_min(eps)
        anchor_peak = (P * core_mask.unsqueeze(1)).amax(dim=-1)  # (b, F)
        peak_db = rel_db(anchor_peak)
        high_amp = torch.sigmoid(sc.amp_slope * (peak_db - row_quantile(peak_db, sc.amp_quantile)) / 10.0)
        ast_thr = torch.where(aggressive.unsqueeze(1), row_quantile(f_att, sc.ast_freq_quantile_aggressive),
                              row_quantile(f_att, sc.ast_freq_quantile))
        ast_active = mel_to_linear(torch.sigmoid(sc.ast_freq_slope * (f_att - ast_thr)), Fb)
        boost = torch.maximum(high_amp, ast_active)
        gain = torch.where(aggressive, sc.boost_aggressive, sc.boost_conservative).unsqueeze(1)
        fw = 1.0 + gain * boost  # (b, F)

        M = (omega_lin.unsqueeze(-1) * cos_p.unsqueeze(1) * fw.unsqueeze(-1)).clamp(0, 1)
        M = torch.where(weak.view(-1, 1, 1), M ** sc.weak_mask_power, M)
        # frames that do not resemble the template keep at most 1 % of the anchor's energy
        target = sc.low_similarity_energy_share * anchor_frame_energy.unsqueeze(1)
        took = (M.pow(2) * P).sum(dim=1)
        scale = torch.where(~high & (took > target), (target / took.clamp_min(eps)).sqrt(), torch.ones_like(took))
        M = (M * scale.unsqueeze(1)).clamp(0, 1)

        region_now = (M.mean(dim=1) > sc.region_mask_threshold).float()
        return {
            "mask": M, "power": P, "class_id": cid, "confidence": conf, "top5_ids": top5i, "top5_probs": top5p,
            "embedding": g.embedding.to(dev), "time_attention": t_att, "score": score, "similarity": sim,
            "anchor": torch.stack([s, s + La], dim=1), "core": torch.stack([core_s, core_e], dim=1),
            "grid": F.pad(grid, (0, g.grid.shape[-1] - grid.shape[-1])), "aggressive": aggressive, "weak": weak,
            "region": region_now,
        }
