"""What separating one input gives: :class:`SeparationResult` (its tracks, events and statistics)
and :class:`Track` (one output file). Writing it to a folder is :mod:`astsep.outputs`'s."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import SAMPLE_RATE
from .errors import ConfigError
from .events import safe_name
from .export import ExportOptions, export_tracks, read_mono_at
from .outputs import write_outputs
from .version import __version__

if TYPE_CHECKING:
    from .config import AstsepConfig


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
