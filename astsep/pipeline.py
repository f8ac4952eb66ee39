"""From a recording to sources and events: windows, batched separation, cross-fade, event records.
Writing them to a folder is :mod:`astsep.outputs`'s (``result.write(dir)``).

:class:`Pipeline` holds the config, the AST guide and the separator; ``Pipeline.run(x)`` gives a
:class:`~astsep.result.SeparationResult`. The functional API over it, ``astsep.separate()``, is
:mod:`astsep.api`'s.

Long inputs are cut into 10.24 s windows that overlap by ``window.overlap_sec`` and are spread
evenly over the file; each window is separated on its own (windows of a file go through the AST
together, one batched forward per pass) and the windows are cross-faded back with weights that
sum to one at every sample. Sources with the same AudioSet class share one output file. The
residual is the input minus every source, in the time domain, so the files add back up to the
16 kHz mono input exactly (float32 WAV).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .audio import AudioInfo, dbfs, rms_db
from .config import SAMPLE_RATE, SEPARATION_SECTIONS, AstsepConfig, WindowConfig
from .errors import ConfigError
from .events import active_span, class_records, content_key, event_id, merge_window_events
from .guidance import Guide, top_classes
from .guide import quiet_model_loading
from .guide_loader import load_guide
from .result import SeparationResult, Track
from .separator import BatchSeparation, PassSources, Separator

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


# --- the pipeline -----------------------------------------------------------------------------
class Pipeline:
    """Holds the configuration, the guide (AST or tagger, and its cache) and the separator."""

    def __init__(self, cfg: AstsepConfig | None = None, guide: Guide | None = None, refiner=None):
        self.cfg = cfg or AstsepConfig()
        if guide is None:
            with quiet_model_loading():
                guide = load_guide(self.cfg)
        self.guide = guide
        self.separator = Separator(self.cfg, self.guide)
        self.refiner = refiner.to(self.guide.device) if refiner is not None else None
        if self.refiner is not None and self.refiner.n_masks != self.cfg.separator.max_passes:
            raise ConfigError(f"the refiner takes {self.refiner.n_masks} baseline masks but --max-passes is "
                              f"{self.cfg.separator.max_passes}; use --max-passes {self.refiner.n_masks}")
        if self.refiner is not None:
            self.refiner.check_guide(self.guide)  # its queries are this AST's embeddings: same size
            self.refiner.check_baseline(self.cfg)  # warns, naming the keys, if trained on another baseline

    @property
    def residual_confidence(self) -> float:
        """The probability at which a residual is named as a sound: the AST's softmax threshold
        (``separator.residual_confidence``), or a multi-label tagger's sigmoid one (``tagger.residual_confidence``)."""
        if getattr(self.guide, "multilabel", False):
            return self.cfg.tagger.residual_confidence
        return self.cfg.separator.residual_confidence

    def run_config(self) -> AstsepConfig:
        """The config this pipeline separates with: its own, with the guide section its AST runs with."""
        gcfg = getattr(self.guide, "cfg", None)
        return dataclasses.replace(self.cfg, guide=gcfg) if isinstance(gcfg, type(self.cfg.guide)) else self.cfg

    @property
    def model_name(self) -> str:
        return f"refiner:{self.refiner.name}" if self.refiner is not None else f"baseline:{self.guide.name}"

    def run(self, audio: torch.Tensor, name: str = "<tensor>", info: AudioInfo | None = None,
            keep_traces: bool = False, progress: Callable[[int], None] | None = None,
            query=None, should_stop: Callable[[], bool] | None = None,
            on_source: Callable[[dict, torch.Tensor], None] | None = None) -> SeparationResult:
        """Separate ``audio`` ``(N,)`` (16 kHz mono float32, validated).

        With a refiner, every baseline source is refined; with a ``query``
        (:class:`astsep.refiner.Query`) only the queried source is extracted, plus the rest.
        ``should_stop``: asked before each pass after the first (:meth:`Separator.separate_batch`);
        True ends that window's passes early (live mode, when a newer window waits). The windows so
        cut are counted in ``stats["windows_cut"]``.
        ``on_source``: called with ``(event, samples)`` for each source as soon as its pass ends,
        before the next pass runs (live mode reports a window's first sound after one pass, not after
        all of them); ``event`` is the source's event as ``result.events`` will hold it before
        overlapping windows' events are merged, ``samples`` its cross-faded waveform in the window.
        Windows then go through the AST one at a time. Not called with a refiner (its sources are
        known only after every pass); the result is the same with or without it.
        """
        if query is not None and self.refiner is None:
            raise ConfigError("a text or audio query needs a trained refiner (--refiner CKPT)")
        t_start = time.perf_counter()
        g0 = dict(self.guide.stats())
        x = audio.float().cpu()
        n = x.numel()
        starts, win, ovl = window_layout(self.cfg.window, n)
        # the same audio gives the same event ids wherever it comes from (idempotent delivery);
        # long inputs are hashed block by block instead of as one copy of their bytes
        input_key = self.guide.key(x) if n <= 4 * win else content_key(x, self.guide.key(x[:0]))
        st = _RunState(x, starts, win, ovl, float(x.double().pow(2).sum()), input_key, query, keep_traces)
        bw = self.cfg.window.batch_windows or (32 if self.guide.device.type == "cuda" else 1)
        if on_source is not None:
            bw = 1  # a source is reported when its window's pass ends: no window waits for another
        for c0 in range(0, len(starts), bw):
            self._run_chunk(st, c0, starts[c0:c0 + bw], should_stop, on_source)
            if progress:
                progress(len(starts[c0:c0 + bw]))
        result = self._finish(st, name)
        result.stats = self._run_stats(st, result.events, name, info, g0, t_start)
        return result

    def _run_chunk(self, st: "_RunState", c0: int, chunk: list[int], should_stop, on_source=None) -> None:
        """Separate the windows starting at ``chunk`` (window ``c0`` first) in one batch; their
        sources go into ``st``'s tracks (cross-faded), their events and residual classes into ``st``."""
        xb = torch.stack([st.x[s:s + st.length] for s in chunk]).to(self.guide.device)
        on_pass = None
        if on_source is not None and self.refiner is None:
            def on_pass(p: PassSources) -> None:
                for r, j in enumerate(p.rows.tolist()):
                    cls = (int(p.class_ids[r]), float(p.confidences[r]), p.top5_ids[r], p.top5_probs[r])
                    seg = p.sources[r].cpu() * window_weight(c0 + j, st.starts, st.win, st.n, st.ovl)
                    on_source(self._event(self._track(st, cls[0]), seg, chunk[j], c0 + j, p.index, cls,
                                          st.total_energy, st.input_key), seg)
        t0 = time.perf_counter()
        out = self.separator.separate_batch(xb, keep_traces=st.keep_traces, should_stop=should_stop,
                                            on_pass=on_pass)
        st.t_sep += time.perf_counter() - t0
        st.passes_run = max(st.passes_run, out.passes_run)
        st.windows_cut += len(chunk) if out.cut else 0
        if self.refiner is not None:
            t0, before = time.perf_counter(), self.guide.forwards
            out = self._refine(xb, out, st.query)
            st.query_forwards += self.guide.forwards - before
            st.t_ref += time.perf_counter() - t0
        # windowed sources and residuals
        src = out.sources.cpu()
        res = out.residual.cpu()
        t0 = time.perf_counter()
        before = self.guide.forwards
        cls = self._classify_residuals(res, xb.cpu(), out.silent.cpu())
        st.residual_forwards += self.guide.forwards - before
        st.t_res += time.perf_counter() - t0
        for j, s in enumerate(chunk):
            w_idx = c0 + j
            wgt = window_weight(w_idx, st.starts, st.win, st.n, st.ovl)
            st.residual_cls.append(cls[j])
            if st.keep_traces:
                st.traces.append((w_idx, s, _slice_item(out, j)))
            for k in range(out.kept.shape[1]):
                if bool(out.kept[j, k]):
                    self._add_source(st, src[j, k] * wgt, s, w_idx, k, out, j)

    def _add_source(self, st: "_RunState", seg: torch.Tensor, s: int, w_idx: int, k: int, out: BatchSeparation,
                    j: int) -> None:
        """Source ``k`` of window ``w_idx`` (cross-faded ``seg``, starting at sample ``s``): onto its
        class's track (the query's with a query), and its event."""
        query = st.query
        cls = (int(out.class_ids[j, k]), float(out.confidences[j, k]), out.top5_ids[j, k], out.top5_probs[j, k])
        tr = self._track(st, cls[0])
        tr.segments.append((s, seg))
        ev = self._event(tr, seg, s, w_idx, k, cls, st.total_energy, st.input_key)
        if query is not None:
            ev["query"] = query.text
            ev["negative_query"] = query.negative_text
        st.events.append(ev)

    def _track(self, st: "_RunState", cid: int) -> Track:
        """The track of class ``cid`` (the query's with a query), made when first needed."""
        key = "query" if st.query is not None else cid
        tr = st.tracks.get(key)
        if tr is None:
            label = st.query.text if st.query is not None else self.guide.labels[cid]
            tr = st.tracks[key] = Track(len(st.tracks), label, cid, "source")
        return tr

    def _finish(self, st: "_RunState", name: str) -> SeparationResult:
        """The residual track (named by its class when every classified window agrees confidently),
        its events, and one event per sound where overlapping windows saw it twice."""
        sc = self.cfg.separator
        confident = [c for c in st.residual_cls if c is not None and c["confidence"] >= self.residual_confidence]
        classified = [c for c in st.residual_cls if c is not None]
        same = bool(classified) and len(confident) == len(classified) and len({c["class_id"] for c in confident}) == 1
        res_label = confident[0]["label"] if same else ("rest" if st.query is not None else "residual")
        res_track = Track(len(st.tracks), res_label, confident[0]["class_id"] if same else -1, "residual")
        result = SeparationResult(name, st.x, list(st.tracks.values()) + [res_track], st.events, {}, st.traces)
        resid = result.residual
        for w_idx, s in enumerate(st.starts):
            seg = resid[s:s + st.length] * window_weight(w_idx, st.starts, st.win, st.n, st.ovl)
            st.events.append(self._residual_event(res_track, seg, s, w_idx, st.residual_cls[w_idx], st.total_energy,
                                                  st.input_key, silent=dbfs(st.x[s:s + st.length]) < sc.silence_dbfs))
        # overlapping windows see one sound twice: one event per sound (no duplicate alerts)
        result.events = merge_window_events(st.events, self.cfg.window.merge_gap_sec)
        return result

    def _run_stats(self, st: "_RunState", events: list[dict], name: str, info: AudioInfo | None, g0: dict,
                   t_start: float) -> dict:
        """``result.stats``: the input, the model, what ran (windows, passes, forwards) and the seconds."""
        sc, n = self.cfg.separator, st.n
        g1 = self.guide.stats()
        return {
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
            "windows": len(st.starts),
            "passes_max": sc.max_passes,
            "passes_run": st.passes_run,  # the most passes any window ran
            "windows_cut": st.windows_cut,  # windows whose passes should_stop ended early
            "ast_forwards": g1["ast_forwards"] - g0["ast_forwards"],
            "ast_forwards_separation": (g1["ast_forwards"] - g0["ast_forwards"] - st.residual_forwards
                                        - st.query_forwards),
            "ast_forwards_residual": st.residual_forwards,
            "ast_forwards_query": st.query_forwards,
            "refiner": self.refiner.name if self.refiner is not None else None,
            "residuals_classified": sum(1 for c in st.residual_cls if c is not None),
            "ast_batches": g1["ast_batches"] - g0["ast_batches"],
            "cache_hits": g1["cache_hits"] - g0["cache_hits"],
            "sources": len(st.tracks),
            "silent": bool(all(e.get("silent") for e in events if e["kind"] == "residual")) and not st.tracks,
            # every setting of this separation by value (astsep.config.config_from_dict rebuilds it); the
            # guide section is the AST's own (e.g. float32 where bfloat16 was asked for on a CPU without it)
            "config": {k: v for k, v in self.run_config().to_dict().items() if k in SEPARATION_SECTIONS},
            "seconds": {
                "separate": round(st.t_sep, 4),
                "ast": round(g1["ast_seconds"] - g0["ast_seconds"], 4),
                "classify_residual": round(st.t_res, 4),
                "refine": round(st.t_ref, 4),
                "total": round(time.perf_counter() - t_start, 4),
            },
        }

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
        t5i = torch.full((xb.shape[0], self.cfg.separator.top_k), -1, dtype=torch.long)
        t5p = torch.zeros(xb.shape[0], self.cfg.separator.top_k)
        emb = torch.zeros(xb.shape[0], self.guide.hidden_size)
        idx = audible.nonzero().squeeze(1).cpu()
        if idx.numel():
            sel = ext[idx.to(ext.device)]
            probs = self.guide.classify(sel, rows=idx).cpu()
            conf[idx], cid[idx], t5p[idx], t5i[idx] = top_classes(probs, self.cfg.separator.top_k)
            emb[idx] = self.guide.embed(sel, rows=idx).cpu()
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
        probs = self.guide.classify(res[idx].to(self.guide.device), rows=torch.tensor(idx)).cpu()
        conf, cid, top_p, top_i = top_classes(probs, sc.top_k)
        for r, i in enumerate(idx):
            out[i] = {"class_id": int(cid[r]), "label": self.guide.labels[int(cid[r])], "confidence": float(conf[r]),
                      "top5": class_records(top_i[r], top_p[r], self.guide.labels)}
        return out

    def _event(self, tr: Track, seg: torch.Tensor, start: int, w_idx: int, k: int, cls: tuple, total_energy: float,
               input_key: str) -> dict:
        """The event of pass ``k``'s source ``seg`` in window ``w_idx``; ``cls``: its
        ``(class id, confidence, top-5 ids, top-5 probabilities)``."""
        sc = self.cfg.separator
        cid, conf, t5i, t5p = cls
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
            "confidence": round(conf, 6),
            "top5": class_records(t5i, t5p, self.guide.labels),
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
        confident = cls is not None and cls["confidence"] >= self.residual_confidence
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


@dataclass
class _RunState:
    """What one :meth:`Pipeline.run` gathers window by window (samples: 16 kHz)."""

    x: torch.Tensor  # (N,) the input
    starts: list[int]  # window start samples
    win: int  # window length
    ovl: int  # overlap
    total_energy: float
    input_key: str
    query: Any
    keep_traces: bool
    tracks: dict[Any, Track] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    residual_cls: list[dict | None] = field(default_factory=list)
    traces: list[tuple[int, int, Any]] = field(default_factory=list)
    residual_forwards: int = 0
    query_forwards: int = 0
    passes_run: int = 0
    windows_cut: int = 0
    t_sep: float = 0.0
    t_res: float = 0.0
    t_ref: float = 0.0

    @property
    def n(self) -> int:
        return self.x.numel()

    @property
    def length(self) -> int:
        return min(self.win, self.n)


def round_db(v: float) -> float | None:
    """A level in dB as events carry it: 2 decimals, None for -inf (silence)."""
    return round(v, 2) if math.isfinite(v) else None


def _slice_item(out: BatchSeparation, j: int) -> dict:
    return {"traces": [{name: (getattr(tr, name)[j] if isinstance(getattr(tr, name), torch.Tensor) else
                               getattr(tr, name)) for name in tr.__dataclass_fields__} for tr in out.traces],
            "sources": out.sources[j].cpu(), "residual": out.residual[j].cpu(), "labels": out.labels[j]}
