"""Regression vectors of the separator: what it makes of the seed recording with ``tiny_ast(seed=0)``
(as it is, and three times over for two cross-faded windows), and how well it separates four dev
mixtures guided by the oracle (exact, and blurred + noisy): per-pass SI-SDR, labels and spans.

    python tests/make_regression.py          # rewrites tests/data/separator_regression.json

``tests/test_regression.py`` recomputes the same vectors and compares them, so a change to the
algorithm (or to the default config) shows up as a deliberate update of that JSON file in the same
commit. The vectors hold:

- ``classes``: per event, its kind, pass, window, label, class id, top-5 class ids and confidence;
- ``anchors``: per event, where the source sits and how much it holds: ``start_sec``, ``end_sec``,
  ``energy_share``, ``level_dbfs``;
- ``masks``: per window and pass, whether it ran and was kept, its class id, and checksums of its
  mask ``(F, T)`` (sum, mean, quantiles) plus its trust and energy ratio;
- ``oracle``: per dev mixture and oracle guide, each pass's class, kept flag and the SI-SDR of its
  source against the target and the interferer (held to 0.05 dB), and the events' labels and spans.

Floats are stored to 6 significant digits; the test compares them with a relative tolerance (see
``RTOL`` there), so float noise across machines and thread counts does not break it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `python tests/make_regression.py` from a checkout, not installed

from conftest import SHARED_DATA  # noqa: E402 - sets the tiny ASTs' label file too

SEED_RECORDING = SHARED_DATA / "examples" / "seed_recording_16k.wav"
VECTORS = HERE / "data" / "separator_regression.json"
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def _num(x: float) -> float | None:
    """``x`` to 6 significant digits (None for NaN/inf, which JSON cannot hold)."""
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None


def regression_vectors() -> dict[str, Any]:
    """The vectors of both inputs: the seed recording (5.06 s, one window) and the same recording
    three times over (15.2 s: two overlapping windows, cross-faded, their events merged)."""
    from astsep.audio import load_audio

    x, _ = load_audio(SEED_RECORDING)
    return {"seed": summarise(x), "seed_x3": summarise(x.repeat(3)), "oracle": oracle_vectors()}


#: Dev mixtures (``astsep.devset.dev_mixtures`` indices) whose separation quality is pinned: two ESC-50
#: pairs at 0 and -5 dB, speech over a sound, a sound over music.
ORACLE_ITEMS = (0, 29, 32, 41)
#: Guides: the exact oracle, and one spoiled the way a real attention map is (blur 1 patch, 10 dB noise).
ORACLE_GUIDES = {"exact": "", "blur1_noise10": "blur=1,noise_db=10"}


def oracle_vectors() -> dict[str, Any]:
    """Per dev mixture and guide: each pass's label, kept flag and SI-SDR (dB) of its source against the
    target and the interferer, and the events' labels and spans. A random AST picks one class whatever
    it hears, so those vectors pin arithmetic; these pin what the separator achieves with real guidance."""
    from astsep.config import AstsepConfig
    from astsep.devset import dev_mixtures, label_id
    from astsep.metrics import si_sdr
    from astsep.oracle import Degradation, OracleGuide
    from astsep.pipeline import Pipeline
    from astsep.testing import audioset_labels

    names = audioset_labels()
    labels = [names[i] for i in range(527)]
    cfg = AstsepConfig()
    cfg.guide.device = "cpu"
    items = dev_mixtures(SHARED_DATA)
    out: dict[str, Any] = {}
    for index in ORACLE_ITEMS:
        it = items[index]
        ids = [label_id(labels, it.target_label), label_id(labels, it.interferer_label)]
        per_guide = {}
        for gname, spec in ORACLE_GUIDES.items():
            guide = OracleGuide(it.mixture, torch.stack([it.target, it.interferer]), ids, labels,
                                Degradation.parse(spec), cfg.stft)
            res = Pipeline(cfg, guide).run(it.mixture, it.name, keep_traces=True)
            item = res.traces[0][2]
            passes = []
            for tr, src in zip(item["traces"], item["sources"]):
                if not bool(tr["ran"]):
                    continue
                silent = float(src.abs().max()) == 0.0
                passes.append({"pass": tr["index"], "class_id": int(tr["class_id"]), "kept": bool(tr["kept"]),
                               "si_sdr_target": None if silent else _num(si_sdr(src, it.target)),
                               "si_sdr_interferer": None if silent else _num(si_sdr(src, it.interferer))})
            events = [{"label": e["label"], "kind": e["kind"], "start_sec": _num(e["start_sec"]),
                       "end_sec": _num(e["end_sec"])} for e in res.events]
            per_guide[gname] = {"passes": passes, "events": events}
        out[it.name] = per_guide
    return out


def summarise(x: torch.Tensor) -> dict[str, Any]:
    """Separate ``x`` (16 kHz mono, ``(N,)``) on CPU with the default config and a random tiny AST
    (seed 0), and summarise the result as plain JSON data (see the module docstring)."""
    import astsep
    from astsep.config import SAMPLE_RATE, load_config
    from astsep.guide import ASTGuide
    from astsep.testing import tiny_ast

    cfg = load_config(None)
    cfg.guide.device = "cpu"
    res = astsep.separate(x, SAMPLE_RATE, guide=ASTGuide(tiny_ast(seed=0), cfg.guide), config=cfg,
                          keep_traces=True)
    classes = [{"kind": e["kind"], "pass": e.get("pass"), "window": e.get("window"), "label": e["label"],
                "class_id": e["class_id"], "top5": [t["class_id"] for t in e.get("top5") or []],
                "confidence": _num(e["confidence"]) if e.get("confidence") is not None else None}
               for e in res.events]
    anchors = [{"file": e["file"], "start_sec": _num(e["start_sec"]), "end_sec": _num(e["end_sec"]),
                "energy_share": _num(e["energy_share"]), "level_dbfs": e["level_dbfs"]} for e in res.events]
    masks = []
    for window, start, item in res.traces:
        for tr in item["traces"]:
            mask = tr["mask"].double().flatten()
            masks.append({
                "window": window, "start": start, "pass": tr["index"], "ran": bool(tr["ran"]),
                "kept": bool(tr["kept"]), "class_id": int(tr["class_id"]), "shape": list(tr["mask"].shape),
                "sum": _num(mask.sum()), "mean": _num(mask.mean()),
                "quantiles": [_num(q) for q in torch.quantile(mask, torch.tensor(QUANTILES, dtype=mask.dtype))],
                "trust": _num(tr["trust"]), "eratio": _num(tr["eratio"]),
            })
    return {"model": "tiny_ast(seed=0)", "num_samples": res.num_samples,
            "files": [tr.filename for tr in res.tracks], "classes": classes, "anchors": anchors, "masks": masks}


def main() -> None:
    VECTORS.parent.mkdir(parents=True, exist_ok=True)
    VECTORS.write_text(json.dumps(regression_vectors(), indent=1) + "\n")
    print(f"wrote {VECTORS}")


if __name__ == "__main__":
    main()
