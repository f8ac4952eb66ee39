"""A cache of the frozen baseline's results per training example, so training is not bound by it.

The baseline separator is deterministic given the mixture, the guide (for an oracle guide: the
sources it is built from and the degradation with its seed) and the separator / STFT / guide
settings. :func:`baseline_key` hashes exactly these; :class:`BaselineCache` keeps what the refiner
needs of a result under that key: the masks ``(K, F, T)`` (stored as float16: masks are in [0, 1],
so the rounding is below 5e-4), which passes were kept ``(K,)`` and the guide's embedding of each
pass ``(K, H)`` (the refiner's query). A hit returns exactly what the miss stored, and a miss returns
the stored (rounded) form too, so a step sees the same numbers whether its example was cached or not.

Entries live in memory (up to ``max_bytes``, oldest dropped first) and, with ``directory``, also on
disk as ``<key>.pt`` files (read with ``weights_only``), which later runs with the same data and
settings reuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["BaselineCache", "baseline_key"]

FIELDS = ("masks", "kept", "embeddings")


def baseline_key(mixture: torch.Tensor, guide: str, settings: dict, sources: torch.Tensor | None = None) -> str:
    """SHA-256 of what decides a baseline result: the mixture's samples ``(N,)``, the guide's name
    (an AST model and seed, or an ``oracle:...`` spec with its degradation seed), the baseline
    settings (:func:`astsep.config.baseline_settings`) and, for an oracle guide, its sources ``(S, N)``."""
    h = hashlib.sha256()
    h.update(guide.encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for t in (mixture, sources):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _stored(value: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"masks": value["masks"].detach().to("cpu", torch.float16).contiguous(),
            "kept": value["kept"].detach().to("cpu", torch.bool).contiguous(),
            "embeddings": value["embeddings"].detach().to("cpu", torch.float32).contiguous()}


class BaselineCache:
    """Baseline results by :func:`baseline_key` (module docstring); counts ``hits`` and ``misses``."""

    def __init__(self, directory: str | os.PathLike | None = None, max_bytes: int = 4 * 2**30):
        self.directory = Path(directory).expanduser() if directory else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._mem: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._mem)

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The stored result (CPU tensors ``masks (K,F,T)`` float16, ``kept (K,)``, ``embeddings (K,H)``), or None."""
        value = self._mem.get(key)
        if value is None and self.directory is not None:
            path = self.directory / f"{key}.pt"
            if path.is_file():
                try:
                    value = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as exc:  # a torn or foreign file: recompute it
                    log.warning("baseline cache: cannot read %s (%s); recomputing", path, str(exc).splitlines()[0][:120])
                    value = None
                if value is not None and set(value) == set(FIELDS):
                    self._remember(key, value)
                else:
                    value = None
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store one result (``masks (K,F,T)``, ``kept (K,)``, ``embeddings (K,H)``); returns the stored form."""
        stored = _stored(value)
        self._remember(key, stored)
        if self.directory is not None:
            path = self.directory / f"{key}.pt"
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(stored, tmp)
            os.replace(tmp, path)
        return stored

    def _remember(self, key: str, value: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in value.values())
        if key in self._mem:
            return
        self._mem[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._mem) > 1:
            _, old = self._mem.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in old.values())
