"""How the separated tracks are written: sample rate, sample format and cropping.

Separation runs on 16 kHz mono. By default the files are that: float32 WAV, full length, and they add
up to the 16 kHz mono input exactly. Users of separation tools also want (issue 19 item 12):

- **the input's sample rate** (or any rate): each source's 16 kHz estimate is resampled to that rate,
  and the residual is taken at that rate as *the input downmixed to mono at that rate minus the
  resampled sources*, so the files still add up to the (mono) input, now with its full band: what
  lies above 8 kHz was never separated and stays in the residual;
- **a sample format**: ``float`` (32-bit float WAV, exact), ``wav16`` / ``wav24`` (PCM WAV) or
  ``flac`` (24-bit FLAC); integer formats clip at full scale, and the number of clipped samples is
  reported;
- **cropped sources**: each source file cut to the span of its events (plus a margin), its offset in
  seconds recorded, so a 10-minute recording with a 3 s siren gives a 3 s siren file. The residual
  stays full length and takes what a source held outside its span, so placing every file at its
  offset, they still add up to the input.

Functions over a :class:`~astsep.pipeline.SeparationResult`-like object (``tracks``, ``audio``,
``residual``, ``num_samples``, ``events``); :mod:`astsep.outputs` writes what :func:`export_tracks`
makes, one file at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .config import SAMPLE_RATE
from .errors import AudioError, ConfigError

if TYPE_CHECKING:  # numpy, soundfile and torch load only when files are made: ExportOptions checks options
    import numpy as np  # in the front ends before torch is imported
    import torch

#: ``--format`` → (soundfile container, subtype, file suffix)
FORMATS: dict[str, tuple[str, str, str]] = {
    "float": ("WAV", "FLOAT", ".wav"),
    "wav16": ("WAV", "PCM_16", ".wav"),
    "wav24": ("WAV", "PCM_24", ".wav"),
    "flac": ("FLAC", "PCM_24", ".flac"),
}
MIN_OUTPUT_RATE, MAX_OUTPUT_RATE = 8000, 384000
# decode block for reading the input again at its own rate (seconds of audio)
_BLOCK_SEC = 8.0


@dataclass(frozen=True)
class ExportOptions:
    """What the written files look like (defaults: 16 kHz float32 WAV, full length, as analysed)."""

    sample_rate: int | str = SAMPLE_RATE  # Hz, or "input": the input file's own rate
    format: str = "float"  # one of FORMATS
    crop: bool = False  # cut sources to the span of their events
    crop_margin_sec: float = 0.25  # kept before the first and after the last event of a source

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"output format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.sample_rate != "input":
            if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, int) or \
                    not MIN_OUTPUT_RATE <= self.sample_rate <= MAX_OUTPUT_RATE:
                raise ConfigError(f"output sample rate must be 'input' or an integer from {MIN_OUTPUT_RATE} to "
                                  f"{MAX_OUTPUT_RATE} Hz, got {self.sample_rate!r}")
        if not (math.isfinite(self.crop_margin_sec) and self.crop_margin_sec >= 0):
            raise ConfigError(f"crop margin must be >= 0 seconds, got {self.crop_margin_sec!r}")

    @classmethod
    def parse_rate(cls, text: str) -> int | str:
        """``"input"`` or an integer rate in Hz from a command-line value."""
        if text.strip().lower() == "input":
            return "input"
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--sample-rate takes 'input' or a rate in Hz, not {text!r}") from None

    @property
    def suffix(self) -> str:
        return FORMATS[self.format][2]

    @property
    def is_default(self) -> bool:
        return self == ExportOptions()


@dataclass
class ExportedTrack:
    """One file to write: ``samples (n,)`` float32 at ``sample_rate``, starting ``offset_sec`` into the input."""

    filename: str
    samples: np.ndarray
    sample_rate: int
    offset_sec: float = 0.0
    clipped: int = 0  # samples beyond full scale, clipped by an integer format


class Export:
    """The files of one result, made one at a time (a 1 h input's tracks do not all fit in memory at
    once): :meth:`tracks` yields them in the result's order, residual last; offsets and clipping are
    known once they have been made."""

    def __init__(self, result, options: ExportOptions, residual: torch.Tensor, rate: int, n: int,
                 crops: dict[int, tuple[int, int]]):
        self.result, self.options, self.rate, self.n = result, options, rate, n
        self._residual, self._crops = residual, crops  # crops: id(track) -> (start, end) samples
        suffix = FORMATS[options.format][2]
        self.renamed = {tr.filename: tr.filename[: -len(".wav")] + suffix for tr in result.tracks
                        if not tr.filename.endswith(suffix)}
        self.offsets_sec = {self.name(tr): crops[id(tr)][0] / rate for tr in result.tracks if id(tr) in crops}
        self.clipped: dict[str, int] = {}

    def name(self, track) -> str:
        return self.renamed.get(track.filename, track.filename)

    def tracks(self) -> Iterator[ExportedTrack]:
        import numpy as np

        integer = FORMATS[self.options.format][1] != "FLOAT"
        for tr in self.result.tracks:
            if tr.kind == "residual":
                x, offset = self._residual, 0
            else:
                x = _source_at(tr, self.result.num_samples, self.rate, self.n)
                offset, end = self._crops.get(id(tr), (0, self.n))
                x = x[offset:end]
            arr = x.detach().cpu().numpy().astype(np.float32, copy=False)
            if integer:
                over = int(np.count_nonzero(np.abs(arr) > 1.0))
                if over:
                    self.clipped[self.name(tr)] = over
                    arr = np.clip(arr, -1.0, 1.0)
            yield ExportedTrack(self.name(tr), arr, self.rate, offset / self.rate, self.clipped.get(self.name(tr), 0))

    def manifest_entry(self) -> dict:
        return {"sample_rate": self.rate, "format": self.options.format, "cropped": self.options.crop,
                "offsets_sec": {k: round(v, 4) for k, v in self.offsets_sec.items()},
                "clipped_samples": dict(self.clipped)}


def read_mono_at(path: str | Path, sample_rate: int | str) -> tuple[torch.Tensor, int]:
    """The input file downmixed to mono at ``sample_rate`` (``"input"``: its own), ``((n,), rate)``."""
    import numpy as np
    import soundfile as sf
    import torch
    from torchaudio.functional import resample

    try:
        with sf.SoundFile(str(path)) as f:
            rate = int(f.samplerate)
            blocks = []
            while True:
                data = f.read(max(1, int(_BLOCK_SEC * rate)), dtype="float32", always_2d=True)
                if data.shape[0] == 0:
                    break
                blocks.append(data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0].copy())
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"cannot read {path} again at its own rate: {exc}") from exc
    x = torch.from_numpy(np.concatenate(blocks)) if blocks else torch.zeros(0)
    target = rate if sample_rate == "input" else int(sample_rate)
    if target != rate:
        x = resample(x, rate, target)
    return x, target


def _source_at(track, num_samples: int, rate: int, n: int) -> torch.Tensor:
    """A source track (16 kHz) at ``rate``, exactly ``n`` samples long."""
    import torch

    x = track.render(num_samples)
    if rate != SAMPLE_RATE:
        from torchaudio.functional import resample

        x = resample(x, SAMPLE_RATE, rate)
    if x.numel() >= n:
        return x[:n]
    return torch.nn.functional.pad(x, (0, n - x.numel()))


def _spans_by_file(events: list[dict]) -> dict[str, tuple[float, float]]:
    spans: dict[str, tuple[float, float]] = {}
    for ev in events:
        name, start, end = ev.get("file"), ev.get("start_sec"), ev.get("end_sec")
        if name is None or start is None or end is None:
            continue
        lo, hi = spans.get(name, (math.inf, -math.inf))
        spans[name] = (min(lo, float(start)), max(hi, float(end)))
    return spans


def export_tracks(result, options: ExportOptions, reference: torch.Tensor | None = None,
                  reference_rate: int | None = None) -> Export:
    """The files of ``result`` as ``options`` asks (made lazily by :meth:`Export.tracks`).

    ``reference``: the input, mono, at ``reference_rate`` (required when that rate is not 16 kHz; the
    residual is taken against it). At 16 kHz the result's own input is the reference.
    """
    rate = SAMPLE_RATE if reference_rate is None else int(reference_rate)
    if rate != SAMPLE_RATE and reference is None:
        raise ValueError("a reference at the output rate is needed to write at a rate other than 16 kHz")
    n = int(reference.numel()) if rate != SAMPLE_RATE else result.num_samples
    spans = _spans_by_file(result.events) if options.crop else {}
    # the residual is the reference minus what the source files hold, so the files add up to the input
    # whatever the rate and the crop: a source's samples outside its cropped span go to the residual
    if rate == SAMPLE_RATE and not spans:
        return Export(result, options, result.residual, rate, n, {})
    residual = reference.clone() if rate != SAMPLE_RATE else result.audio.clone()
    crops: dict[int, tuple[int, int]] = {}
    for tr in result.tracks:
        if tr.kind == "residual":
            continue
        x = _source_at(tr, result.num_samples, rate, n)
        start, end = 0, n
        if tr.filename in spans:
            lo, hi = spans[tr.filename]
            start = min(n - 1, max(0, int(math.floor((lo - options.crop_margin_sec) * rate))))
            end = max(start + 1, min(n, int(math.ceil((hi + options.crop_margin_sec) * rate))))
            crops[id(tr)] = (start, end)
        residual[start:end] -= x[start:end]
        del x
    return Export(result, options, residual, rate, n, crops)


def rename_in_events(events: list[dict], export: Export) -> list[dict]:
    """Events whose ``file`` names what was written, with ``file_offset_sec`` where a file is cropped."""
    offsets = export.offsets_sec
    out = []
    for ev in events:
        ev = dict(ev)
        if ev.get("file") is not None:
            ev["file"] = export.renamed.get(ev["file"], ev["file"])
            if offsets.get(ev["file"]):
                ev["file_offset_sec"] = round(offsets[ev["file"]], 4)
        out.append(ev)
    return out
