"""``astsep.separate()``: the functional API, one call from a recording to a
:class:`~astsep.result.SeparationResult`::

    result = astsep.separate("recording.wav")            # or a tensor plus sample_rate
    result.sources        # {"00_Speech": tensor (N,), …, "03_residual": tensor (N,)}
    result.events         # list of event dicts (see README)
    result.write("out/")  # NN_<label>.wav …, events.json
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
import torch

from .audio import load_audio, samples_to_mono_16k
from .config import AstsepConfig, apply_overrides, load_config, shortcut_overrides
from .errors import AudioError, ConfigError
from .guide import use_fast_settings
from .guidance import Guide
from .pipeline import Pipeline
from .result import SeparationResult

_GUIDES: dict[str, Guide] = {}


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
    key = _frozen(cfg.guide) + _frozen(cfg.tagger) + _frozen(cfg.stft)  # a tagger's grid depends on both
    guide = _GUIDES.get(key)
    if guide is None:
        pipe = Pipeline(cfg)
        _GUIDES[key] = pipe.guide
        return pipe
    return Pipeline(cfg, guide)


def separate(audio: str | os.PathLike | torch.Tensor | np.ndarray, sample_rate: int | None = None, *,
             model: str | None = None, config: AstsepConfig | str | os.PathLike | None = None,
             guide: Guide | None = None, max_passes: int | None = None, min_eratio: float | None = None,
             device: str | None = None, cache_dir: str | None = None, keep_traces: bool = False,
             refiner=None, query=None, fast: bool = False) -> SeparationResult:
    """Separate a recording into sources, classify them, and describe them as events.

    Args:
        audio: a path to any file soundfile decodes, or samples: ``(N,)``, ``(N, channels)`` or
            ``(channels, N)`` with at most 8 channels (an ambiguous shape is refused); integer PCM
            (int16, int32, …) is scaled by its dtype's range.
        sample_rate: rate of ``audio`` in Hz when it is samples (required then); ignored for paths.
        model: AST Hub id or local folder, or an EfficientAT tagger folder (``../shared/models/efficientat_mn04_as``;
            :mod:`astsep.guide_loader`) (default: the config's, ``MIT/ast-finetuned-audioset-10-10-0.4593``).
        config: an :class:`AstsepConfig` or a YAML path (``configs/separator.yaml``).
        guide: an already built guide (:class:`~astsep.guidance.Guide`: tests, notebooks); overrides ``model``.
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
