"""The guide's content-addressed cache and the fingerprint of the weights its disk files are keyed by.

:class:`GuideCache` keeps results in memory (LRU) and optionally as files on disk. Only the disk
cache, which other guides and processes read, needs the model's fingerprint in its keys:
:func:`fingerprint_files` hashes the weight files' bytes (the same weights in another folder share a
cache), :func:`fingerprint_params` an in-memory model's parameters. :class:`astsep.guide.ASTGuide`
builds the keys and uses both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from .audio import write_bytes_atomic

log = logging.getLogger(__name__)


def weight_files(name_or_path: str) -> list[Path]:
    """The weight files a model was loaded from: a local folder's, or the Hugging Face cache's
    snapshot of a Hub id; ``[]`` when they cannot be found (the fingerprint then uses the parameters)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (or not a Hub id): no files to hash
            return []
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    return [f for f in files if f.is_file()]


def file_stats(files: list[Path]) -> list[tuple[int, int]]:
    return [(f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def fingerprint_files(files: list[Path], model) -> str:
    """SHA-256 of the config and of every weight file's bytes (header and tensors), by file name,
    so that the same weights in another folder share a disk cache."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str).encode())
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "f" + h.hexdigest()[:15]


def fingerprint_params(model) -> str:
    """Fingerprint of an in-memory model's parameters (no files to hash)."""
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():  # every tensor: a few values and two moments (cheap even for 86 M parameters)
        for name, p in model.named_parameters():
            flat = p.detach().float().reshape(-1)
            h.update(name.encode())
            h.update(flat[:16].cpu().numpy().tobytes())
            h.update(repr((float(flat.sum()), float(flat.square().sum()))).encode())
    return h.hexdigest()[:16]


class GuideCache:
    """LRU in memory, content-addressed files on disk (``<dir>/<k[:2]>/<k>.pt``). Thread-safe: one
    guide may serve two pipelines at once (the web demo's lanes)."""

    def __init__(self, size: int, directory: str | None):
        self.size = size
        self.mem: OrderedDict[str, dict] = OrderedDict()
        self.dir = Path(directory).expanduser() if directory else None
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            item = self.mem.get(key)
            if item is not None:
                self.mem.move_to_end(key)
                return item
        if self.dir is not None:
            f = self.dir / key[:2] / f"{key}.pt"
            if f.is_file():
                try:
                    item = torch.load(f, map_location="cpu", weights_only=True)
                except Exception as exc:  # a torn or foreign file is a miss, never a crash
                    log.warning("ignoring unreadable cache file %s: %s", f, exc)
                    return None
                self._remember(key, item)
                return item
        return None

    def put(self, key: str, item: dict) -> None:
        self._remember(key, item)
        if self.dir is not None:
            d = self.dir / key[:2]
            try:
                d.mkdir(parents=True, exist_ok=True)
                import io

                buf = io.BytesIO()
                torch.save(item, buf)
                write_bytes_atomic(d / f"{key}.pt", buf.getvalue())
            except OSError as exc:
                log.warning("cannot write AST cache to %s: %s", d, exc)

    @property
    def enabled(self) -> bool:
        return self.size > 0 or self.dir is not None

    def fetch(self, x: torch.Tensor, key, compute) -> tuple[list[dict], int]:
        """Every row of ``x (B, N)`` from the cache, computing the missing ones in one batch.

        ``key(row)`` is a row's content key; ``compute(rows (b, N))`` returns ``{name: (b, ...) tensor}``.
        Returns one ``{name: tensor}`` per row (float32, on the CPU) and how many came from the cache."""
        keys = [key(row) for row in x] if self.enabled else [None] * x.shape[0]
        found = [self.get(k) if k is not None else None for k in keys]
        miss = [i for i, f in enumerate(found) if f is None]
        if miss:
            fresh = compute(x[miss])
            for j, i in enumerate(miss):
                item = {name: t[j].detach().to("cpu", torch.float32).clone() for name, t in fresh.items()}
                if keys[i] is not None:
                    self.put(keys[i], item)
                found[i] = item
        return found, len(keys) - len(miss)

    def _remember(self, key: str, item: dict) -> None:
        with self._lock:
            self.mem[key] = item
            self.mem.move_to_end(key)
            while len(self.mem) > self.size:
                self.mem.popitem(last=False)
