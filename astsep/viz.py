"""Debug figures: one PNG per pass (and window) showing what the separator saw and decided."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .config import SAMPLE_RATE, AstsepConfig  # noqa: E402


def _istft_len_seconds(n: int, t0: float = 0.0) -> np.ndarray:
    return t0 + np.arange(n) / SAMPLE_RATE


def pass_figure(window_audio: torch.Tensor, trace: dict, source: torch.Tensor, residual_after: torch.Tensor,
                label: str, hop: int, path: Path, title_prefix: str = "", t0: float = 0.0) -> None:
    """Write one figure for one pass of one window; ``t0``: the window's start in seconds of the
    file, so every time axis reads in seconds of the file.

    Panels: input, source and residual waveforms; power spectrogram (dB); the guide's grid as
    target shares; the prior it gives over bins and frames; the mask; the share of every frame's
    energy the source took; energies.
    """
    P = trace["power"].float().cpu().numpy()
    M = trace["mask"].float().cpu().numpy()
    T = P.shape[-1]
    t_frames = t0 + np.arange(T) * hop / SAMPLE_RATE
    extent = (t0, t_frames[-1] if T > 1 else t0 + 1, 0, SAMPLE_RATE / 2000)
    fig, ax = plt.subplots(3, 3, figsize=(16, 11))
    fig.suptitle(f"{title_prefix}pass {trace['index'] + 1}: {label} (confidence {float(trace['confidence']):.3f}, "
                 f"energy share {float(trace['eratio']):.3f}, grid trust {float(trace['trust']):.2f}, "
                 f"map contrast {float(trace['contrast']):.2f})")
    for a, sig, name, color in ((ax[0, 0], window_audio, "pass input", "tab:blue"),
                                (ax[0, 1], source, "separated source", "tab:green"),
                                (ax[0, 2], residual_after, "what is left", "tab:red")):
        s = sig.float().cpu().numpy()
        a.plot(_istft_len_seconds(s.size, t0), s, color=color, linewidth=0.4)
        a.set_title(name)
        a.set_xlabel("s (of the file)")
    db = 10 * np.log10(P + 1e-12)
    vmin, vmax = np.percentile(db, [5, 99.5])
    im = ax[1, 0].imshow(db, aspect="auto", origin="lower", vmin=vmin, vmax=vmax, cmap="magma", extent=extent)
    ax[1, 0].set_title("power spectrogram (dB)")
    ax[1, 0].set_ylabel("kHz")
    fig.colorbar(im, ax=ax[1, 0])
    shares = trace["shares"].float().cpu().numpy()
    used = shares[:, : max(1, int((trace["grid"].float().cpu().numpy().sum(axis=0) > 0).sum()))]
    im = ax[1, 1].imshow(used, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
    ax[1, 1].set_title("guide grid as target share (freq × time patches)")
    fig.colorbar(im, ax=ax[1, 1])
    im = ax[1, 2].imshow(trace["prior"].float().cpu().numpy(), aspect="auto", origin="lower", vmin=0, vmax=1,
                         cmap="viridis", extent=extent)
    ax[1, 2].set_title("prior: the grid over bins and frames")
    fig.colorbar(im, ax=ax[1, 2])
    im = ax[2, 0].imshow(M, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis", extent=extent)
    ax[2, 0].set_title("mask (after NMF split and patch-share fit)")
    ax[2, 0].set_ylabel("kHz")
    fig.colorbar(im, ax=ax[2, 0])
    ax[2, 1].plot(t_frames, trace["presence"].float().cpu().numpy(), color="tab:purple")
    ax[2, 1].set_ylim(-0.02, 1.02)
    ax[2, 1].set_title("share of each frame's energy the source took")
    ax[2, 1].set_xlabel("s (of the file)")
    ax[2, 2].bar(["input", "source", "left"], [float(trace["input_energy"]), float(trace["eratio"] * trace["input_energy"]),
                                                 float(trace["residual_energy"])], color=["tab:blue", "tab:green", "tab:red"])
    ax[2, 2].set_title("energy (STFT domain)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def debug_figures(result, out_dir: Path, config: AstsepConfig | None = None) -> list[str]:
    """Write ``debug_pass_K.png`` (window 0) and ``debug_wNNN_pass_K.png`` (later windows)."""
    cfg = config or AstsepConfig()
    names: list[str] = []
    for w_idx, start, item in result.traces:
        cur = None
        for tr in item["traces"]:
            if not bool(tr["ran"]):
                continue
            k = int(tr["index"])
            n = item["sources"].shape[-1]
            if cur is None:
                cur = result.audio[start:start + n].clone()
            src = item["sources"][k]
            after = cur - src
            label = item["labels"][k] or "(dropped: below min_eratio)"
            name = f"debug_pass_{k + 1}.png" if w_idx == 0 else f"debug_w{w_idx:03d}_pass_{k + 1}.png"
            pass_figure(cur, tr, src, after, label, cfg.stft.hop, out_dir / name,
                        title_prefix=f"window {w_idx} " if len(result.traces) > 1 else "", t0=start / SAMPLE_RATE)
            names.append(name)
            cur = after
    return names
