"""``--record DIR``: each analysed window and its sources kept as WAV files, under a size cap."""

from __future__ import annotations

import json
import shutil
from collections import deque
from pathlib import Path

from ..config import SAMPLE_RATE
from .trigger import Analysis


class Recorder:
    """Each analysed window and its sources as WAV files under ``root/NNNNNN_<stream sec>/``; the
    oldest folders of this run are deleted to keep its total under ``max_bytes``. Numbering goes on
    after the folders already in ``root`` (an earlier run's), and a folder is never reused, so a
    second run into the same ``root`` (or two at once) never overwrites the first one's."""

    def __init__(self, root: str | Path, max_bytes: int):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.kept: deque[tuple[Path, int]] = deque()
        self.total = 0
        self.count = 1 + max((int(p.name[:6]) for p in self.root.iterdir()
                              if p.name[:6].isdigit() and p.name[6:7] == "_"), default=-1)

    def save(self, window: Analysis, result, events: list[dict]) -> None:
        from ..audio import write_wav_atomic

        while True:
            folder = self.root / f"{self.count:06d}_{window.start / SAMPLE_RATE:010.3f}s"
            try:
                folder.mkdir(parents=True)
                break
            except FileExistsError:  # another run into the same root took this number
                self.count += 1
        write_wav_atomic(folder / "window.wav", window.audio.T)
        for stem, samples in result.sources.items():
            write_wav_atomic(folder / f"{stem}.wav", samples)
        (folder / "events.json").write_text(json.dumps(events, indent=2, default=str))
        size = sum(p.stat().st_size for p in folder.iterdir())
        self.kept.append((folder, size))
        self.total += size
        self.count += 1
        while self.total > self.max_bytes and self.kept:
            old, old_size = self.kept.popleft()
            shutil.rmtree(old, ignore_errors=True)
            self.total -= old_size
