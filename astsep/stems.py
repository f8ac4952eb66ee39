"""Music stems: astsep's sources as MUSDB18 stems (vocals / drums / bass / other), scored with museval.

The separator names every source by its AudioSet class. :class:`StemMap` (``configs/musdb.yaml``)
says which classes make which stem; sources of one stem are summed, every unlisted class goes to
``default``, and the residual (what no pass took) to ``residual`` (both ``other`` by default).

A MUSDB18-HQ folder holds ``train/`` and ``test/``, one folder per track with ``mixture.wav``,
``vocals.wav``, ``drums.wav``, ``bass.wav`` and ``other.wav`` (44.1 kHz stereo in the real
data; any rate and channel count is read). astsep separates the 16 kHz mono downmix; each stem
estimate is resampled to the track's rate and copied to every channel, so it is scored against
the real references (the band above 8 kHz and the stereo image are lost, and that counts against
it, as it should when comparing with published MUSDB18 figures).

Scores are museval's BSS Eval v4 (``museval.evaluate``: time-invariant 512-tap distortion filters,
1 s windows and hops), SDR / SIR / ISR / SAR in dB, reduced per track and stem by the median over
frames (frames where the reference is silent are undefined and left out), as the SiSEC 2018 /
MUSDB18 tables do; a summary gives the median over tracks. A stem that no source went to has a
silent estimate, which BSS Eval cannot score: it is reported as ``null`` with ``"silent": true``.
(Each estimate's metrics depend only on that estimate and the references, so the others are exact.)
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import N_AUDIOSET_CLASSES, SAMPLE_RATE
from .errors import AudioError, ConfigError
from .yamlfile import load_yaml

log = logging.getLogger(__name__)

STEMS = ("vocals", "drums", "bass", "other")
METRICS = ("SDR", "SIR", "ISR", "SAR")
DEFAULT_STEM_MAP = Path(__file__).resolve().parents[1] / "configs" / "musdb.yaml"
EVAL_WINDOW_SEC = 1.0  # museval / SiSEC 2018: 1 s windows, 1 s hop


# --- the class → stem mapping -----------------------------------------------------------------
@dataclass
class StemMap:
    """Which AudioSet classes make which MUSDB stem."""

    stems: dict[str, list[int]] = field(default_factory=dict)  # stem → AudioSet class ids
    default: str = "other"  # stem of every class not listed
    residual: str = "other"  # stem of the residual (what no separation pass took)

    def __post_init__(self) -> None:
        if not isinstance(self.stems, dict):
            raise ConfigError("stem map: 'stems' must map stem names to lists of AudioSet class ids")
        for name in (*self.stems, self.default, self.residual):
            if name not in STEMS:
                raise ConfigError(f"stem map: unknown stem {name!r} (the MUSDB18 stems are {', '.join(STEMS)})")
        owner: dict[int, str] = {}
        for stem, ids in self.stems.items():
            if not isinstance(ids, list):
                raise ConfigError(f"stem map: stems.{stem} must be a list of AudioSet class ids")
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < N_AUDIOSET_CLASSES:
                    raise ConfigError(f"stem map: stems.{stem}: {i!r} is not an AudioSet class id "
                                      f"(0..{N_AUDIOSET_CLASSES - 1})")
                if i in owner and owner[i] != stem:
                    raise ConfigError(f"stem map: class {i} is in both {owner[i]!r} and {stem!r}")
                owner[i] = stem
        self._owner = owner

    def stem_of(self, class_id: int | None, residual: bool = False) -> str:
        if residual:
            return self.residual
        return self._owner.get(class_id, self.default) if class_id is not None else self.default


def load_stem_map(path: str | Path | None = None) -> StemMap:
    p = Path(path).expanduser() if path else DEFAULT_STEM_MAP
    data = load_yaml(p, what="stem map")
    unknown = {str(k) for k in data} - {"stems", "default", "residual"}
    if unknown:
        raise ConfigError(f"stem map {p}: unknown keys {', '.join(sorted(unknown))} (stems, default, residual)")
    return StemMap(**data)


def assign_stems(parts: list[tuple[str, int | None, bool, torch.Tensor]], stem_map: StemMap,
                 num_samples: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Sum separated parts into stems.

    ``parts``: ``(label, class_id, is_residual, samples (N,))``. Returns ``{stem: (N,)}`` for all four
    stems (zeros where nothing went) and ``[{label, class_id, residual, stem}]``.
    """
    stems = {s: torch.zeros(num_samples) for s in STEMS}
    assignment = []
    for label, class_id, is_residual, x in parts:
        stem = stem_map.stem_of(class_id, is_residual)
        stems[stem] += x[:num_samples].float().cpu()
        assignment.append({"label": label, "class_id": class_id, "residual": is_residual, "stem": stem})
    return stems, assignment


# --- reading the MUSDB18 layout ---------------------------------------------------------------
@dataclass
class StemTrack:
    """One track: ``mixture`` and every ``references[stem]`` as ``(N, channels)`` float64 at ``rate``."""

    name: str
    subset: str
    rate: int
    mixture: np.ndarray
    references: dict[str, np.ndarray]


def list_tracks(root: str | Path, subsets: tuple[str, ...] = ("test",), names: list[str] | None = None) -> list[Path]:
    """Track folders of a MUSDB18(-HQ) root, sorted, optionally only those ``names``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"MUSDB folder not found: {root}")
    folders = []
    for subset in subsets:
        d = root / subset
        if not d.is_dir():
            raise ConfigError(f"{root} has no {subset}/ folder (MUSDB18 layout: train|test/<track>/mixture.wav, "
                              "vocals.wav, drums.wav, bass.wav, other.wav)")
        folders += sorted(p for p in d.iterdir() if p.is_dir())
    if names:
        missing = sorted(set(names) - {p.name for p in folders})
        if missing:
            raise ConfigError(f"track {missing[0]!r} not found under {root} ({', '.join(subsets)})")
        folders = [p for p in folders if p.name in names]
    if not folders:
        raise ConfigError(f"no tracks under {root} ({', '.join(subsets)})")
    return folders


def read_track(folder: str | Path, max_seconds: float | None = None) -> StemTrack:
    """Read a track folder (WAV files; ``.stem.mp4`` MUSDB18 must be decoded to WAV first, e.g. with
    ``musdbconvert`` from the ``musdb`` package)."""
    import soundfile as sf

    folder = Path(folder)
    audio, rates = {}, set()
    for name in ("mixture", *STEMS):
        p = folder / f"{name}.wav"
        if not p.is_file():
            raise AudioError(f"{folder.name}: {name}.wav is missing (MUSDB18 layout; decode .stem.mp4 files with "
                             "musdbconvert first)")
        try:
            frames = None if max_seconds is None else int(max_seconds * sf.info(str(p)).samplerate)
            x, rate = sf.read(str(p), frames=-1 if frames is None else frames, dtype="float64", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as exc:
            raise AudioError(f"cannot decode {p}: {exc}") from None
        if not np.isfinite(x).all():
            raise AudioError(f"{p} holds non-finite samples")
        audio[name], rates = x, rates | {rate}
    if len(rates) > 1:
        raise AudioError(f"{folder.name}: the files have different sample rates ({sorted(rates)})")
    if len({a.shape[1] for a in audio.values()}) > 1:
        raise AudioError(f"{folder.name}: the files have different channel counts")
    n = min(a.shape[0] for a in audio.values())
    if n == 0:
        raise AudioError(f"{folder.name}: empty audio")
    return StemTrack(folder.name, folder.parent.name, rates.pop(), audio["mixture"][:n],
                     {s: audio[s][:n] for s in STEMS})


# --- separating and scoring -------------------------------------------------------------------
def separate_stems(pipeline, mixture: np.ndarray, rate: int, stem_map: StemMap,
                   name: str = "<track>") -> tuple[dict[str, np.ndarray], list[dict]]:
    """Stem estimates ``{stem: (N, channels)}`` at ``rate`` from a mixture ``(N, channels)``.

    ``pipeline``: an :class:`astsep.pipeline.Pipeline`. Its sources (16 kHz mono) are assigned to
    stems, resampled to ``rate`` and copied to every channel.
    """
    import torchaudio.functional as AF

    from .audio import samples_to_mono_16k

    x, info = samples_to_mono_16k(mixture.astype(np.float32), rate)
    result = pipeline.run(x, name, info)
    n16 = result.num_samples
    parts = [(tr.label, None if tr.kind == "residual" else tr.class_id, tr.kind == "residual",
              result.residual if tr.kind == "residual" else tr.render(n16)) for tr in result.tracks]
    stems16, assignment = assign_stems(parts, stem_map, n16)
    n, channels = mixture.shape
    out = {}
    for stem, y in stems16.items():
        y = AF.resample(y.double(), SAMPLE_RATE, rate) if rate != SAMPLE_RATE else y.double()
        y = torch.nn.functional.pad(y[:n], (0, max(0, n - y.numel())))
        out[stem] = np.repeat(y.numpy()[:, None], channels, axis=1)
    return out, assignment


def _median(values: np.ndarray) -> float | None:
    """Median over frames, leaving out undefined (NaN) ones as museval does; an exact estimate's
    frames are +inf dB and stay in."""
    defined = values[~np.isnan(values)]
    return float(np.median(defined)) if defined.size else None


def score_stems(references: dict[str, np.ndarray], estimates: dict[str, np.ndarray], rate: int,
                window_sec: float = EVAL_WINDOW_SEC) -> dict[str, dict]:
    """museval BSS Eval v4 of every stem: ``{stem: {SDR, SIR, ISR, SAR (median over frames, dB),
    "silent", "frames": {metric: [per-window values]}}}``. Arrays are ``(N, channels)``."""
    import museval

    stems = [s for s in STEMS if s in references]
    silent = {s: not np.any(estimates[s]) for s in stems}
    mix = sum(references[s] for s in stems)
    # a silent estimate cannot be scored; any stand-in works, as no estimate's scores depend on another's
    est = np.stack([mix if silent[s] else estimates[s] for s in stems])
    ref = np.stack([references[s] for s in stems])
    if any(not np.any(r) for r in ref):
        raise AudioError("a reference stem is silent throughout; BSS Eval needs every reference to sound")
    win = int(round(window_sec * rate))
    sdr, isr, sir, sar = museval.evaluate(ref, est, win=win, hop=win, mode="v4")
    out = {}
    for j, s in enumerate(stems):
        frames = {"SDR": sdr[j], "SIR": sir[j], "ISR": isr[j], "SAR": sar[j]}
        if silent[s]:
            out[s] = {m: None for m in METRICS} | {"silent": True, "frames": {m: [] for m in METRICS}}
        else:
            out[s] = {m: _median(frames[m]) for m in METRICS} | {
                "silent": False, "frames": {m: [None if math.isnan(v) else float(v) for v in frames[m]]
                                            for m in METRICS}}
    return out


def museval_json(track: str, scores: dict[str, dict], window_sec: float = EVAL_WINDOW_SEC) -> str:
    """museval's own per-track JSON (``museval.TrackStore``), so museval's tools can aggregate it."""
    import museval

    store = museval.TrackStore(track_name=track, win=window_sec, hop=window_sec, frames_agg="median")
    for stem, sc in scores.items():
        if not sc["silent"]:
            store.add_target(stem, {m: [np.nan if v is None else v for v in sc["frames"][m]] for m in METRICS})
    return store.json


def evaluate_musdb(root: str | Path, pipeline, stem_map: StemMap, subsets: tuple[str, ...] = ("test",),
                   names: list[str] | None = None, max_seconds: float | None = None, out_dir: str | Path | None = None,
                   progress: bool = False) -> dict:
    """Separate and score every track; ``{"tracks": [...], "summary": {stem: {metric: median over tracks}}}``.
    With ``out_dir``, museval's per-track JSON goes to ``out_dir/museval/<subset>/<track>.json``."""
    from tqdm.auto import tqdm

    from .audio import write_bytes_atomic

    rows = []
    for folder in tqdm(list_tracks(root, subsets, names), desc="tracks", disable=not progress):
        track = read_track(folder, max_seconds)
        estimates, assignment = separate_stems(pipeline, track.mixture, track.rate, stem_map, track.name)
        scores = score_stems(track.references, estimates, track.rate)
        if out_dir is not None:
            p = Path(out_dir) / "museval" / track.subset / f"{track.name}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(p, museval_json(track.name, scores).encode())
        rows.append({"track": track.name, "subset": track.subset, "rate": track.rate,
                     "channels": int(track.mixture.shape[1]), "seconds": track.mixture.shape[0] / track.rate,
                     "sources": assignment,
                     "stems": {s: {k: v for k, v in sc.items() if k != "frames"} for s, sc in scores.items()}})
        log.info("%s: %s", track.name, {s: sc["SDR"] for s, sc in scores.items()})
    summary = {}
    for s in STEMS:
        summary[s] = {}
        for m in METRICS:
            vals = [r["stems"][s][m] for r in rows if r["stems"][s][m] is not None]
            summary[s][m] = statistics.median(vals) if vals else None
        summary[s]["scored_tracks"] = sum(not r["stems"][s]["silent"] for r in rows)
    return {"n": len(rows), "tracks": rows, "summary": summary,
            "metric": "museval BSS Eval v4, 1 s windows; median over frames per track, median over tracks"}


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def markdown_musdb(results: dict, title: str = "MUSDB18-style stem evaluation") -> str:
    lines = [f"# {title}", "", f"{results['n']} tracks; {results['metric']}; values in dB; – = no source went to "
             "that stem (BSS Eval cannot score a silent estimate).", "",
             "| stem | SDR | SIR | ISR | SAR | tracks scored |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for s, v in results["summary"].items():
        lines.append(f"| {s} | " + " | ".join(_fmt(v[m]) for m in METRICS) + f" | {v['scored_tracks']} |")
    lines += ["", "| track | stem | SDR | SIR | ISR | SAR | sources |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results["tracks"]:
        for s, v in r["stems"].items():
            names = ", ".join(a["label"] + (" (residual)" if a["residual"] else "")
                              for a in r["sources"] if a["stem"] == s)
            lines.append(f"| {r['subset']}/{r['track']} | {s} | " + " | ".join(_fmt(v[m]) for m in METRICS)
                         + f" | {names or '–'} |")
    return "\n".join(lines) + "\n"


def write_musdb_report(results: dict, out_dir: str | Path) -> Path:
    from .audio import write_bytes_atomic

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    md = out / "musdb.md"
    write_bytes_atomic(md, markdown_musdb(results).encode())
    write_bytes_atomic(out / "musdb.json", json.dumps(results, indent=2).encode())
    return md
