"""Turning separated sources into event records: label, category, level, where they sound."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from datetime import datetime, timedelta, timezone

import torch

from .audio import rms_db
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
    db = rms_db(torch.nn.functional.pad(x.float(), (0, pad)).view(-1, hop), floor=0.0)  # -inf: a silent frame
    if not bool(torch.isfinite(db.max())):
        return None
    on = (db >= db.max() + threshold_db) & (db >= floor_dbfs)
    if not bool(on.any()):
        return None
    idx = on.nonzero().squeeze(1)
    return float(idx[0]) * hop / SAMPLE_RATE, min(n, float(idx[-1] + 1) * hop) / SAMPLE_RATE


def class_records(ids: torch.Tensor | list[int], probs: torch.Tensor | list[float], labels: list[str]) -> list[dict]:
    """An event's ``top5`` list, ``[{"label", "class_id", "prob"}]``, from class ids ``(k,)`` and
    their probabilities ``(k,)`` (:func:`astsep.guide.top_classes`); padding ids (−1) are left out."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    probs = probs.tolist() if isinstance(probs, torch.Tensor) else probs
    return [{"label": labels[int(a)], "class_id": int(a), "prob": round(float(b), 6)} for a, b in zip(ids, probs) if a >= 0]


def event_id(input_key: str, window: int, pass_index: int | str) -> str:
    """Stable id of an event: the same input and settings give the same id (idempotent delivery)."""
    return hashlib.sha256(f"{input_key}:{window}:{pass_index}".encode()).hexdigest()[:32]


def content_key(x: torch.Tensor, salt: str = "", block: int = 1 << 20) -> str:
    """SHA-256 of ``salt``, the length and the float32 samples of ``x`` ``(N,)``: the content only,
    never where it came from. Hashed ``block`` samples at a time (no copy of the whole signal)."""
    h = hashlib.sha256(salt.encode())
    h.update(str(x.numel()).encode())
    flat = x.detach().reshape(-1)
    for i in range(0, flat.numel(), block):
        part = flat[i:i + block].to("cpu", torch.float32).contiguous().numpy()
        h.update(memoryview(part).cast("B"))
    return h.hexdigest()


def _mergeable(ev: dict) -> bool:
    """Sources, and residuals confident enough to be reported as a sound."""
    return ev.get("start_sec") is not None and (ev.get("kind") == "source" or bool(ev.get("confident")))


def merge_window_events(events: list[dict], gap_sec: float) -> list[dict]:
    """One event per sound, not per window: an event of the same kind and class as an event of
    *another* window whose time span overlaps it (within ``gap_sec`` seconds, ``window.merge_gap_sec``:
    spans of one sound seen by two overlapping windows may miss each other by a frame or two where the
    cross-fade ramps them down) is merged into that one. Overlapping windows see the same sound twice; two passes of one window are two sounds and
    never merge. The merged event keeps the first event's id, spans both, takes the higher
    confidence (with its top-5) and level, adds the energy shares, and lists its ``windows``.
    Every returned event has ``windows``; the input list is not changed."""
    out: list[dict] = []
    for ev in events:
        ev = dict(ev, windows=list(ev.get("windows", [ev.get("window")])))
        target = None
        if _mergeable(ev):
            for m in out:
                if (_mergeable(m) and m["kind"] == ev["kind"] and m["class_id"] == ev["class_id"]
                        and m.get("label") == ev.get("label") and not set(ev["windows"]) & set(m["windows"])
                        and ev["start_sec"] <= m["end_sec"] + gap_sec and ev["end_sec"] >= m["start_sec"] - gap_sec):
                    target = m
                    break
        if target is None:
            out.append(ev)
            continue
        target["start_sec"] = min(target["start_sec"], ev["start_sec"])
        target["end_sec"] = max(target["end_sec"], ev["end_sec"])
        target["windows"] = sorted(set(target["windows"]) | set(ev["windows"]))
        if (ev.get("confidence") or 0) > (target.get("confidence") or 0):
            target["confidence"], target["top5"] = ev["confidence"], ev.get("top5", [])
        levels = [v for v in (target.get("level_dbfs"), ev.get("level_dbfs")) if v is not None]
        target["level_dbfs"] = max(levels) if levels else None
        if "energy_share" in target:
            target["energy_share"] = round(target["energy_share"] + ev.get("energy_share", 0.0), 6)
    return out


def stamp_occurred_at(events: list[dict], recording_start: datetime | None, source: str) -> None:
    """Give every event the wall-clock time its sound started: ``occurred_at`` (ISO-8601 UTC) =
    ``recording_start`` + the event's ``start_sec`` (its window's start when it has no span), and
    ``occurred_at_source`` saying where the recording's start came from (``recorded_at``: the
    user said; ``file_mtime``: the file's modification time minus its duration; ``queued``: unknown,
    so ``occurred_at`` is null and delivery sends the time the event was queued)."""
    for ev in events:
        if recording_start is None:
            ev["occurred_at"], ev["occurred_at_source"] = None, "queued"
            continue
        offset = ev.get("start_sec")
        if offset is None:
            offset = ev.get("window_start_sec") or 0.0
        when = recording_start.astimezone(timezone.utc) + timedelta(seconds=float(offset))
        ev["occurred_at"] = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        ev["occurred_at_source"] = source
