"""The fast alert stage: one guide forward (AST or tagger) on a short excerpt, no separation.

An alertable class (category other than ``other``, unless ``emit_other``) among the excerpt's top 5
at or above ``alert_threshold`` is a detection at once; the separation stage confirms, updates or
retracts it later (:mod:`astsep.live.occurrences`).
"""

from __future__ import annotations

import numpy as np

from ..config import SAMPLE_RATE, LiveConfig
from .separation import active_runs
from .trigger import Analysis


def excerpt_probs(guide, x) -> "torch.Tensor":  # noqa: F821 - torch is imported when called
    """Class probabilities ``(C,)`` of one excerpt ``x`` ``(N,)``: the guide's ``classify`` of an excerpt
    (uncached; softmax for the AST, its zero padding trimmed; sigmoid for a multi-label tagger)."""
    import torch

    with torch.no_grad():
        return guide.classify(x[None].to(guide.device), excerpt=True)[0].float()


class AlertStage:
    """Classifies alert excerpts with ``pipeline``'s guide (:meth:`detect`)."""

    def __init__(self, pipeline, cfg: LiveConfig):
        self.pipe = pipeline
        self.cfg = cfg

    def detect(self, item: Analysis) -> dict | None:
        """The most probable alertable class of the excerpt's top 5 at or above ``alert_threshold``
        (``tagger.alert_threshold`` for a multi-label tagger),
        as a detection in seconds of the excerpt (``start_sec`` / ``end_sec``: the sound's span,
        :meth:`span`), with ``kind: "mixture"``; None when there is none."""
        import torch

        from ..audio import dbfs
        from ..events import class_records
        from ..guidance import top_classes
        from ..pipeline import round_db  # the separation events' level_dbfs, the same way

        mono = item.audio.mean(axis=0)
        probs = excerpt_probs(self.pipe.guide, torch.from_numpy(mono))
        _, _, top_p, top_i = top_classes(probs[None].cpu(), self.pipe.cfg.separator.top_k)
        cats = self.pipe.cfg.categories
        labels = self.pipe.guide.labels
        found = None
        # a multi-label tagger's sigmoid probabilities have their own scale (tagger.alert_threshold)
        threshold = self.pipe.cfg.tagger.alert_threshold if getattr(self.pipe.guide, "multilabel", False) \
            else self.cfg.alert_threshold
        for p, cid in zip(top_p[0].tolist(), top_i[0].tolist()):
            if p < threshold:
                break
            if cid >= 0 and (self.cfg.emit_other or cats.category(cid) != "other"):
                found = (p, cid)
                break
        if found is None:
            return None
        a, b = self.span(item, mono)
        level = dbfs(torch.from_numpy(mono[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)]))
        return {"label": labels[found[1]], "class_id": found[1], "confidence": round(found[0], 6),
                "top5": class_records(top_i[0], top_p[0], labels), "category": cats.category(found[1]),
                "level_dbfs": round_db(level), "kind": "mixture", "start_sec": a, "end_sec": b}

    def span(self, item: Analysis, mono: np.ndarray) -> tuple[float, float]:
        """Seconds of the excerpt ``(start, end)`` of the sound the alert is about: from the level
        trigger's latest onset in the excerpt (else the start of the run of activity holding the
        loudest 10 ms frame; runs closer than 0.25 s joined: the mixture's background must not
        bridge a longer gap) to the end of the last run."""
        sc = self.pipe.cfg.separator
        dur = mono.size / SAMPLE_RATE
        runs = active_runs(mono, sc.active_threshold_db, sc.silence_dbfs, min(0.25, self.cfg.hold_off_sec))
        end = runs[-1][1] if runs else dur
        if item.onset is not None:
            return (item.onset - item.start) / SAMPLE_RATE, max(end, (item.onset - item.start) / SAMPLE_RATE)
        if not runs:
            return 0.0, dur
        n = mono.size // 160
        loudest = (int(np.argmax(np.mean(mono[: n * 160].reshape(n, 160).astype(np.float64) ** 2, axis=1))) * 160
                   / SAMPLE_RATE) if n else 0.0
        start = next((a for a, b in runs if a <= loudest < b + 0.01), runs[-1][0])
        return start, end
