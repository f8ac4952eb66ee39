"""From a recording to sources and events: windows, batched separation, cross-fade, event records.
Writing them to a folder is :mod:`astsep.outputs`'s (``result.write(dir)``).

``separate()`` is the functional API under ``infer.py``::

    result = astsep.separate("recording.wav")            # or a tensor plus sample_rate
    result.sources        # {"00_Speech": tensor (N,), …, "03_residual": tensor (N,)}
    result.events         # list of event dicts (see README)
    result.write("out/")  # NN_<label>.wav …, events.json

Long inputs are cut into 10.24 s windows that overlap by ``window.overlap_sec`` and are spread
evenly over the file; each window is separated on its own (windows of a file go through the AST
together, one batched forward per pass) and the windows are cross-faded back with weights that
sum to one at every sample. Sources with the same AudioSet class share one output file. The
residual is the input minus every source, in the time domain, so the files add back up to the
16 kHz mono input exactly (float32 WAV).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .audio import AudioInfo, dbfs, load_audio, rms_db, samples_to_mono_16k
from .config import (SAMPLE_RATE, SEPARATION_SECTIONS, AstsepConfig, WindowConfig, apply_overrides, load_config,
                     shortcut_overrides)
from .errors import AudioError, ConfigError
from .events import active_span, class_records, content_key, event_id, merge_window_events, safe_name
from .export import ExportOptions, export_tracks, read_mono_at
from .guide import TOP_K, ASTGuide, quiet_model_loading, top_classes, use_fast_settings
from .outputs import write_outputs
from .separator import BatchSeparation, Separator
from .version import __version__

log = logging.getLogger(__name__)


# --- windows ----------------------------------------------------------------------------------
def window_starts(n: int, win: int, overlap: int) -> list[int]:
    """Start samples of windows of ``win`` samples covering ``n`` samples, spread evenly so that
    neighbours overlap by at least ``overlap`` samples. One window when ``n <= win``."""
    if n <= win:
        return [0]
    hop = max(1, win - overlap)
    count = math.ceil((n - win) / hop) + 1
    return [round(i * (n - win) / (count - 1)) for i in range(count)]


def window_layout(cfg: WindowConfig, n: int) -> tuple[list[int], int, int]:
    """``(starts, win, overlap)`` in samples: the windows :meth:`Pipeline.run` cuts ``n`` samples into."""
    win = int(round(cfg.window_sec * SAMPLE_RATE))
    ovl = int(round(cfg.overlap_sec * SAMPLE_RATE))
    return window_starts(n, win, ovl), win, ovl


def window_weight(i: int, starts: list[int], win: int, n: int, ramp: int) -> torch.Tensor:
    """Cross-fade weight ``(min(win, n),)`` of window ``i``; the weights of all windows sum to
    exactly one at every sample of the file: trapezoids with linear ramps of ``ramp`` samples
    (none at the file's ends), normalised by their sum over the windows covering each sample.
    Computed per window, so a 1-hour file never holds all of them at once."""
    length = min(win, n)
    ramp = max(1, min(ramp, length // 2))
    t = torch.arange(length, dtype=torch.float64)

    def raw(s: int) -> torch.Tensor:
        up = torch.ones(length, dtype=torch.float64) if s == 0 else ((t + 0.5) / ramp).clamp(max=1)
        down = torch.ones(length, dtype=torch.float64) if s + length >= n else ((length - t - 0.5) / ramp).clamp(max=1)
        return torch.minimum(up, down)

    s = starts[i]
    mine = raw(s)
    denom = mine.clone()
    for j in range(max(0, i - 3), min(len(starts), i + 4)):  # starts are sorted: only neighbours overlap
        s2 = starts[j]
        if j == i or s2 >= s + length or s2 + length <= s:
            continue
        lo, hi = max(s, s2), min(s, s2) + length
        denom[lo - s:hi - s] += raw(s2)[lo - s2:hi - s2]
    return (mine / denom).float()


def crossfade_weights(starts: list[int], win: int, n: int, ramp: int) -> list[torch.Tensor]:
    """:func:`window_weight` for every window (tests, short files)."""
    return [window_weight(i, starts, win, n, ramp) for i in range(len(starts))]


# --- results ----------------------------------------------------------------------------------
@dataclass
class Track:
    """One output file: the sum of (cross-faded) sources of one class, or the residual."""

    index: int
    label: str
    class_id: int
    kind: str  # "source" | "residual"
    segments: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (start sample, samples)

    @property
    def filename(self) -> str:
        return f"{self.index:02d}_{safe_name(self.label, 'sound')}.wav"

    def render(self, n: int) -> torch.Tensor:
        out = torch.zeros(n)
        for s, seg in self.segments:
            out[s:s + seg.numel()] += seg
        return out


@dataclass
class SeparationResult:
    """Everything one input gave: tracks (sources + residual), events and run statistics."""

    input: str
    audio: torch.Tensor  # (N,) the 16 kHz mono input
    tracks: list[Track]
    events: list[dict]
    stats: dict
    traces: list[tuple[int, int, Any]] = field(default_factory=list)  # (window, start, BatchSeparation item)
    _residual: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return int(self.audio.numel())

    @property
    def residual(self) -> torch.Tensor:
        if self._residual is None:
            # subtract in place: one (N,) buffer, whatever the number of sources (long inputs)
            res = self.audio.clone()
            for tr in self.tracks:
                if tr.kind == "source":
                    for s, seg in tr.segments:
                        res[s:s + seg.numel()] -= seg
            self._residual = res
        return self._residual

    @property
    def sources(self) -> dict[str, torch.Tensor]:
        """``{file stem: samples (N,)}`` for every output file, residual last."""
        out = {}
        for tr in self.tracks:
            out[tr.filename[:-4]] = self.residual if tr.kind == "residual" else tr.render(self.num_samples)
        return out

    @property
    def labels(self) -> list[str]:
        return [tr.label for tr in self.tracks if tr.kind == "source"]

    def manifest(self) -> dict:
        return {"astsep_version": __version__, "files": [tr.filename for tr in self.tracks], "events": self.events,
                "stats": self.stats}

    def write(self, out_dir: str | os.PathLike, debug: bool = False, config: AstsepConfig | None = None,
              options: ExportOptions | None = None) -> Path:
        """Write the files and ``events.json`` into ``out_dir`` (see :func:`write_outputs`), as ``options``
        asks (rate, sample format, cropping: :mod:`astsep.export`; default 16 kHz float32, full length).
        Writing at the input's rate reads the input file again (``self.input``)."""
        options = options or ExportOptions()
        reference = rate = None
        if options.sample_rate != SAMPLE_RATE:
            if not os.path.isfile(self.input):
                raise ConfigError(f"writing at {options.sample_rate} Hz needs the input file; {self.input!r} is not "
                                  "one (samples were given): resample the written 16 kHz files instead")
            reference, rate = read_mono_at(self.input, options.sample_rate)
        export = export_tracks(self, options, reference, rate)
        return write_outputs(self, Path(out_dir), debug=debug, config=config, export=export)


# --- the pipeline -----------------------------------------------------------------------------
class Pipeline:
    """Holds the configuration, the AST guide (and its cache) and the separator."""

    def __init__(self, cfg: AstsepConfig | None = None, guide: ASTGuide | None = None, refiner=None):
        self.cfg = cfg or AstsepConfig()
        if guide is None:
            with quiet_model_loading():
                guide = ASTGuide.from_pretrained(self.cfg.guide)
        self.guide = guide
        self.separator = Separator(self.cfg, self.guide)
        self.refiner = refiner.to(self.guide.device) if refiner is not None else None
        if self.refiner is not None and self.refiner.n_masks != self.cfg.separator.max_passes:
            raise ConfigError(f"the refiner takes {self.refiner.n_masks} baseline masks but --max-passes is "
                              f"{self.cfg.separator.max_passes}; use --max-passes {self.refiner.n_masks}")
        if self.refiner is not None:
            self.refiner.check_guide(self.guide)  # its queries are this AST's embeddings: same size
            self.refiner.check_baseline(self.cfg)  # warns, naming the keys, if trained on another baseline

    def run_config(self) -> AstsepConfig:
        """The config this pipeline separates with: its own, with the guide section its AST runs with."""
        gcfg = getattr(self.guide, "cfg", None)
        return dataclasses.replace(self.cfg, guide=gcfg) if isinstance(gcfg, type(self.cfg.guide)) else self.cfg

    @property
    def model_name(self) -> str:
        return f"refiner:{self.refiner.name}" if self.refiner is not None else f"baseline:{self.guide.name}"

    def run(self, audio: torch.Tensor, name: str = "<tensor>", info: AudioInfo | None = None,
            keep_traces: bool = False, progress: Callable[[int], None] | None = None,
            query=None, should_stop: Callable[[], bool] | None = None) -> SeparationResult:
        """Separate ``audio`` ``(N,)`` (16 kHz mono float32, validated).

        With a refiner, every baseline source is refined; with a ``query``
        (:class:`astsep.refiner.Query`) only the queried source is extracted, plus the rest.
        ``should_stop``: asked before each pass after the first (:meth:`Separator.separate_batch`);
        True ends that window's passes early (live mode, when a newer window waits). The windows so
        cut are counted in ``stats["windows_cut"]``.
        """
        if query is not None and self.refiner is None:
            raise ConfigError("a text or audio query needs a trained refiner (--refiner CKPT)")
        cfg, sc = self.cfg, self.cfg.separator
        t_start = time.perf_counter()
        g0 = dict(self.guide.stats())
        x = audio.float().cpu()
        n = x.numel()
        starts, win, ovl = window_layout(cfg.window, n)
        length = min(win, n)
        total_energy = float(x.double().pow(2).sum())
        # the same audio gives the same event ids wherever it comes from (idempotent delivery);
        # long inputs are hashed block by block instead of as one copy of their bytes
        input_key = self.guide.key(x) if n <= 4 * win else content_key(x, self.guide.key(x[:0]))

        tracks: dict[int, Track] = {}
        events: list[dict] = []
        residual_cls: list[dict | None] = []
        traces: list[tuple[int, int, Any]] = []
        residual_forwards = query_forwards = passes_run = windows_cut = 0
        t_sep = t_res = t_ref = 0.0
        device = self.guide.device
        bw = cfg.window.batch_windows or (32 if device.type == "cuda" else 1)
        for c0 in range(0, len(starts), bw):
            chunk = starts[c0:c0 + bw]
            xb = torch.stack([x[s:s + length] for s in chunk]).to(device)
            t0 = time.perf_counter()
            out = self.separator.separate_batch(xb, keep_traces=keep_traces, should_stop=should_stop)
            t_sep += time.perf_counter() - t0
            passes_run = max(passes_run, out.passes_run)
            windows_cut += len(chunk) if out.cut else 0
            if self.refiner is not None:
                t0, before = time.perf_counter(), self.guide.forwards
                out = self._refine(xb, out, query)
                query_forwards += self.guide.forwards - before
                t_ref += time.perf_counter() - t0
            # windowed sources and residuals
            src = out.sources.cpu()
            res = out.residual.cpu()
            t0 = time.perf_counter()
            before = self.guide.forwards
            cls = self._classify_residuals(res, xb.cpu(), out.silent.cpu())
            residual_forwards += self.guide.forwards - before
            t_res += time.perf_counter() - t0
            for j, s in enumerate(chunk):
                w_idx = c0 + j
                wgt = window_weight(w_idx, starts, win, n, ovl)
                residual_cls.append(cls[j])
                if keep_traces:
                    traces.append((w_idx, s, _slice_item(out, j)))
                for k in range(out.kept.shape[1]):
                    if not bool(out.kept[j, k]):
                        continue
                    cid = int(out.class_ids[j, k])
                    seg = src[j, k] * wgt
                    key = "query" if query is not None else cid
                    tr = tracks.get(key)
                    if tr is None:
                        label = query.text if query is not None else self.guide.labels[cid]
                        tr = tracks[key] = Track(len(tracks), label, cid, "source")
                    tr.segments.append((s, seg))
                    ev = self._event(tr, seg, s, w_idx, k, out, j, total_energy, input_key)
                    if query is not None:
                        ev["query"] = query.text
                        ev["negative_query"] = query.negative_text
                    events.append(ev)
            if progress:
                progress(len(chunk))

        # residual track: named by its class when every classified window agrees confidently
        confident = [c for c in residual_cls if c is not None and c["confidence"] >= sc.residual_confidence]
        classified = [c for c in residual_cls if c is not None]
        same = bool(classified) and len(confident) == len(classified) and len({c["class_id"] for c in confident}) == 1
        res_label = confident[0]["label"] if same else ("rest" if query is not None else "residual")
        res_track = Track(len(tracks), res_label, confident[0]["class_id"] if same else -1, "residual")
        result = SeparationResult(name, x, list(tracks.values()) + [res_track], events, {}, traces)
        resid = result.residual
        for w_idx, s in enumerate(starts):
            seg = resid[s:s + length] * window_weight(w_idx, starts, win, n, ovl)
            events.append(self._residual_event(res_track, seg, s, w_idx, residual_cls[w_idx], total_energy,
                                               input_key, silent=dbfs(x[s:s + length]) < sc.silence_dbfs))

        # overlapping windows see one sound twice: one event per sound (no duplicate alerts)
        result.events = events = merge_window_events(events, cfg.window.merge_gap_sec)
        g1 = self.guide.stats()
        result.stats = {
            "input": name,
            "duration_sec": round(n / SAMPLE_RATE, 4),
            "input_sample_rate": info.sample_rate if info else SAMPLE_RATE,
            "input_channels": info.channels if info else 1,
            "input_duration_sec": round(info.duration_sec, 4) if info else round(n / SAMPLE_RATE, 4),
            "output_sample_rate": SAMPLE_RATE,
            "model": self.guide.name,
            "device": str(self.guide.device),
            "dtype": self.guide.cfg.dtype,
            # padded patches per merged token in windows shorter than 10.24 s (0: dropped); null: full window
            "pad_merge": self.guide.cfg.pad_merge if self.guide.cfg.trim_padding else None,
            "windows": len(starts),
            "passes_max": sc.max_passes,
            "passes_run": passes_run,  # the most passes any window ran
            "windows_cut": windows_cut,  # windows whose passes should_stop ended early
            "ast_forwards": g1["ast_forwards"] - g0["ast_forwards"],
            "ast_forwards_separation": g1["ast_forwards"] - g0["ast_forwards"] - residual_forwards - query_forwards,
            "ast_forwards_residual": residual_forwards,
            "ast_forwards_query": query_forwards,
            "refiner": self.refiner.name if self.refiner is not None else None,
            "residuals_classified": sum(1 for c in residual_cls if c is not None),
            "ast_batches": g1["ast_batches"] - g0["ast_batches"],
            "cache_hits": g1["cache_hits"] - g0["cache_hits"],
            "sources": len(tracks),
            "silent": bool(all(e.get("silent") for e in events if e["kind"] == "residual")) and not tracks,
            # every setting of this separation by value (astsep.config.config_from_dict rebuilds it); the
            # guide section is the AST's own (e.g. float32 where bfloat16 was asked for on a CPU without it)
            "config": {k: v for k, v in self.run_config().to_dict().items() if k in SEPARATION_SECTIONS},
            "seconds": {
                "separate": round(t_sep, 4),
                "ast": round(g1["ast_seconds"] - g0["ast_seconds"], 4),
                "classify_residual": round(t_res, 4),
                "refine": round(t_ref, 4),
                "total": round(time.perf_counter() - t_start, 4),
            },
        }
        return result

    # ------------------------------------------------------------------------------------------
    def _refine(self, xb: torch.Tensor, out: BatchSeparation, query) -> BatchSeparation:
        """Replace the baseline's sources by refined ones, or by the queried source alone."""
        ref, st = self.refiner, self.cfg.stft
        if query is None:
            b, K = out.kept.shape
            queries = torch.zeros(b, K, ref.query_dim)
            kept = out.kept.cpu()
            if bool(kept.any()):
                if ref.query_source == "target_audio":
                    queries[kept] = ref.source_queries([], out.embeddings.cpu()[kept])
                else:
                    labels = [self.guide.labels[int(c)] for c in out.class_ids.cpu()[kept]]
                    queries[kept] = ref.source_queries(labels, torch.empty(0))
            src = ref.refine_sources(xb, out.masks, kept, queries, st).to(out.sources.device)
            out.sources = src
            out.residual = xb - src.sum(dim=1)
            return out
        ext = ref.extract(xb, out.masks, query, st).to(xb.device)
        audible = ~out.silent & (ext.pow(2).sum(dim=1) > 0)
        cid = torch.full((xb.shape[0],), -1, dtype=torch.long)
        conf = torch.zeros(xb.shape[0])
        t5i = torch.full((xb.shape[0], TOP_K), -1, dtype=torch.long)
        t5p = torch.zeros(xb.shape[0], TOP_K)
        emb = torch.zeros(xb.shape[0], self.guide.hidden_size)
        idx = audible.nonzero().squeeze(1).cpu()
        if idx.numel():
            g = self.guide(ext[idx.to(ext.device)], rows=idx)
            conf[idx], cid[idx], t5p[idx], t5i[idx] = top_classes(g.probs.cpu())
            emb[idx] = g.embedding.cpu()
        return BatchSeparation(
            sources=ext.unsqueeze(1), residual=xb - ext, masks=out.masks[:, :1] * 0, kept=audible.cpu().unsqueeze(1),
            class_ids=cid.unsqueeze(1), confidences=conf.unsqueeze(1), top5_ids=t5i.unsqueeze(1),
            top5_probs=t5p.unsqueeze(1), embeddings=emb.unsqueeze(1), silent=out.silent, traces=out.traces,
            labels=[[self.guide.labels[int(c)] if c >= 0 else ""] for c in cid])

    def _classify_residuals(self, res: torch.Tensor, xb: torch.Tensor, silent: torch.Tensor) -> list[dict | None]:
        """Classify the residual of each window when it holds enough energy to be a sound."""
        sc = self.cfg.separator
        e_res = res.double().pow(2).sum(dim=1)
        e_in = xb.double().pow(2).sum(dim=1).clamp_min(1e-30)
        cand = (~silent) & (e_res / e_in >= sc.residual_min_share) & (rms_db(res.double()) >= sc.silence_dbfs)
        out: list[dict | None] = [None] * res.shape[0]
        idx = cand.nonzero().squeeze(1).tolist()
        if not idx:
            return out
        g = self.guide(res[idx].to(self.guide.device), rows=torch.tensor(idx))
        conf, cid, top_p, top_i = top_classes(g.probs.cpu())
        for r, i in enumerate(idx):
            out[i] = {"class_id": int(cid[r]), "label": self.guide.labels[int(cid[r])], "confidence": float(conf[r]),
                      "top5": class_records(top_i[r], top_p[r], self.guide.labels)}
        return out

    def _event(self, tr: Track, seg: torch.Tensor, start: int, w_idx: int, k: int, out: BatchSeparation, j: int,
               total_energy: float, input_key: str) -> dict:
        sc = self.cfg.separator
        cid = int(out.class_ids[j, k])
        span = active_span(seg, sc.active_threshold_db, sc.silence_dbfs)
        s0, s1 = span if span else (0.0, seg.numel() / SAMPLE_RATE)
        return {
            "event_id": event_id(input_key, w_idx, k),
            "kind": "source",
            "file": tr.filename,
            "pass": k + 1,
            "window": w_idx,
            "window_start_sec": round(start / SAMPLE_RATE, 4),
            "start_sec": round(start / SAMPLE_RATE + s0, 3),
            "end_sec": round(start / SAMPLE_RATE + s1, 3),
            "label": self.guide.labels[cid],
            "class_id": cid,
            "confidence": round(float(out.confidences[j, k]), 6),
            "top5": class_records(out.top5_ids[j, k], out.top5_probs[j, k], self.guide.labels),
            "category": self.cfg.categories.category(cid),
            "level_dbfs": round_db(dbfs(seg)),
            "energy_share": round(float(seg.double().pow(2).sum()) / max(total_energy, 1e-30), 6),
            "model": self.model_name,
        }

    def _residual_event(self, tr: Track, seg: torch.Tensor, start: int, w_idx: int, cls: dict | None,
                        total_energy: float, input_key: str, silent: bool) -> dict:
        sc = self.cfg.separator
        span = active_span(seg, sc.active_threshold_db, sc.silence_dbfs)
        s0, s1 = span if span else (0.0, 0.0)
        confident = cls is not None and cls["confidence"] >= sc.residual_confidence
        return {
            "event_id": event_id(input_key, w_idx, "residual"),
            "kind": "residual",
            "file": tr.filename,
            "pass": None,
            "window": w_idx,
            "window_start_sec": round(start / SAMPLE_RATE, 4),
            "start_sec": round(start / SAMPLE_RATE + s0, 3) if span else None,
            "end_sec": round(start / SAMPLE_RATE + s1, 3) if span else None,
            "label": cls["label"] if cls else ("silence" if silent else "residual"),
            "class_id": cls["class_id"] if cls else -1,
            "confidence": round(cls["confidence"], 6) if cls else None,
            "top5": cls["top5"] if cls else [],
            "category": self.cfg.categories.category(cls["class_id"]) if confident else "other",
            "classified": cls is not None,
            "confident": bool(confident),
            "silent": bool(silent),
            "level_dbfs": round_db(dbfs(seg)),
            "energy_share": round(float(seg.double().pow(2).sum()) / max(total_energy, 1e-30), 6),
            "model": self.model_name,
        }


def round_db(v: float) -> float | None:
    """A level in dB as events carry it: 2 decimals, None for -inf (silence)."""
    return round(v, 2) if math.isfinite(v) else None


def _slice_item(out: BatchSeparation, j: int) -> dict:
    return {"traces": [{name: (getattr(tr, name)[j] if isinstance(getattr(tr, name), torch.Tensor) else
                               getattr(tr, name)) for name in tr.__dataclass_fields__} for tr in out.traces],
            "sources": out.sources[j].cpu(), "residual": out.residual[j].cpu(), "labels": out.labels[j]}


# --- functional API -------------------------------------------------------------------------
_GUIDES: dict[str, ASTGuide] = {}


def _frozen(section: Any) -> str:
    """A config section as canonical JSON: equal configs give equal keys, any change a new one."""
    return json.dumps(dataclasses.asdict(section), sort_keys=True, default=repr)


def get_pipeline(cfg: AstsepConfig) -> Pipeline:
    """A pipeline for ``cfg``. The AST guide (model and cache) is kept process-wide per *whole*
    guide config, so the model is loaded once per distinct setting and its cache is shared by
    every call with that setting; any change (``fbank_mean``, ``max_frames``, …) gets a new guide.
    The pipeline itself holds a frozen copy of the whole ``cfg``: later changes to the caller's
    object do not leak into it."""
    cfg = copy.deepcopy(cfg)
    key = _frozen(cfg.guide)
    guide = _GUIDES.get(key)
    if guide is None:
        pipe = Pipeline(cfg)
        _GUIDES[key] = pipe.guide
        return pipe
    return Pipeline(cfg, guide)


def separate(audio: str | os.PathLike | torch.Tensor | np.ndarray, sample_rate: int | None = None, *,
             model: str | None = None, config: AstsepConfig | str | os.PathLike | None = None,
             guide: ASTGuide | None = None, max_passes: int | None = None, min_eratio: float | None = None,
             device: str | None = None, cache_dir: str | None = None, keep_traces: bool = False,
             refiner=None, query=None, fast: bool = False) -> SeparationResult:
    """Separate a recording into sources, classify them, and describe them as events.

    Args:
        audio: a path to any file soundfile decodes, or samples: ``(N,)``, ``(N, channels)`` or
            ``(channels, N)`` with at most 8 channels (an ambiguous shape is refused); integer PCM
            (int16, int32, …) is scaled by its dtype's range.
        sample_rate: rate of ``audio`` in Hz when it is samples (required then); ignored for paths.
        model: AST Hub id or local folder (default: the config's, ``MIT/ast-finetuned-audioset-10-10-0.4593``).
        config: an :class:`AstsepConfig` or a YAML path (``configs/separator.yaml``).
        guide: an already built :class:`ASTGuide` (tests, notebooks); overrides ``model``.
        max_passes, min_eratio, device, cache_dir: override the config (checked like a config file's
            values; any other key: ``astsep.config.apply_overrides(cfg, {"section.key": value})``).
        keep_traces: keep per-pass internals (needed for debug figures).
        refiner: an :class:`astsep.refiner.Refiner` (``Refiner.load(ckpt)``): refine every source.
        query: an :class:`astsep.refiner.Query`: with a refiner, extract only that sound (plus the rest).
        fast: what ``infer.py --fast`` does: int8 AST on CPU (bfloat16 on GPU) and merged padding
            for inputs shorter than a window (changes against the default in benchmarks/README.md).

    Returns:
        :class:`SeparationResult` with ``sources``, ``labels``, ``events``, ``stats``; ``write(dir)``
        writes the files.
    """
    base = config if isinstance(config, AstsepConfig) else load_config(config)
    # a new, checked config: the caller's object stays as it was
    cfg = apply_overrides(base, shortcut_overrides(model=model, device=device, cache_dir=cache_dir,
                                                   max_passes=max_passes, min_eratio=min_eratio))
    if fast:
        if guide is not None:
            raise ConfigError("fast=True sets how the model is loaded; with guide=..., build the guide with "
                              "GuideConfig(dtype='int8' or 'bfloat16', trim_padding=True) instead")
        use_fast_settings(cfg.guide)
    t0 = time.perf_counter()
    info = None
    if isinstance(audio, (str, os.PathLike)):
        x, info = load_audio(audio)
        name = str(audio)
    else:
        if sample_rate is None:
            raise AudioError("sample_rate is required when audio is given as samples")
        x, info = samples_to_mono_16k(audio, int(sample_rate))
        name = "<samples>"
    t_load = time.perf_counter() - t0
    if refiner is not None:
        pipe = Pipeline(cfg, guide if guide is not None else get_pipeline(cfg).guide, refiner=refiner)
    else:
        pipe = Pipeline(cfg, guide) if guide is not None else get_pipeline(cfg)
    result = pipe.run(x, name, info, keep_traces=keep_traces, query=query)
    result.stats["seconds"]["decode"] = round(t_load, 4)
    return result
