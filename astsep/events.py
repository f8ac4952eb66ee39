"""Turning separated sources into event records: label, category, level, where they sound."""

from __future__ import annotations

import hashlib
import re
import unicodedata

import torch

from .config import SAMPLE_RATE

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 60


def safe_name(label: str, fallback: str = "sound") -> str:
    """A label made safe as part of a file name: ASCII letters, digits and ``._-`` only, no ``..``,
    no leading or trailing dot, at most 60 characters, never empty.

    ``"Civil defense siren"`` → ``"Civil_defense_siren"``; ``"../../etc/passwd"`` → ``"etc_passwd"``.
    """
    text = unicodedata.normalize("NFKD", str(label)).encode("ascii", "ignore").decode()
    text = _UNSAFE.sub("_", text)
    text = re.sub(r"\.{2,}", ".", text)  # no ".." runs
    text = re.sub(r"_+", "_", text).strip("._-")
    return text[:MAX_NAME].rstrip("._-") or fallback


def active_span(x: torch.Tensor, threshold_db: float, floor_dbfs: float, hop: int = 160) -> tuple[float, float] | None:
    """Seconds ``(start, end)`` between the first and last 10 ms frame of ``x`` (samples) whose
    energy is within ``threshold_db`` of the loudest frame and above ``floor_dbfs``; None if silent."""
    n = x.numel()
    if n == 0:
        return None
    pad = (-n) % hop
    frames = torch.nn.functional.pad(x.float(), (0, pad)).view(-1, hop).pow(2).mean(dim=1)
    if float(frames.max()) <= 0:
        return None
    db = 10 * torch.log10(frames.clamp_min(1e-30))
    on = (db >= db.max() + threshold_db) & (db >= floor_dbfs)
    if not bool(on.any()):
        return None
    idx = on.nonzero().squeeze(1)
    return float(idx[0]) * hop / SAMPLE_RATE, min(n, float(idx[-1] + 1) * hop) / SAMPLE_RATE


def event_id(input_key: str, window: int, pass_index: int | str) -> str:
    """Stable id of an event: the same input and settings give the same id (idempotent delivery)."""
    return hashlib.sha256(f"{input_key}:{window}:{pass_index}".encode()).hexdigest()[:32]
