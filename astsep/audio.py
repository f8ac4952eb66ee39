"""Audio I/O: decode anything soundfile reads, downmix, resample to 16 kHz, validate, write atomically.

torchaudio's own load/save need torchcodec, so decoding goes through soundfile; torchaudio is used
for DSP (resampling) only.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from .config import SAMPLE_RATE
from .errors import AudioError, OutputError

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf", ".opus"}


@dataclass
class AudioInfo:
    """What the input file was, before downmix and resampling."""

    path: str
    sample_rate: int
    channels: int
    frames: int
    duration_sec: float
    format: str
    subtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def _read(path: Path) -> tuple[np.ndarray, AudioInfo]:
    if not path.exists():
        raise AudioError(f"input not found: {path}")
    if path.is_dir():
        raise AudioError(f"input is a folder, not an audio file: {path}")
    if path.stat().st_size == 0:
        raise AudioError(f"input is an empty file (0 bytes): {path}")
    try:
        with sf.SoundFile(str(path)) as f:
            sr, channels, fmt, subtype = f.samplerate, f.channels, f.format, f.subtype
            data = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AudioError(f"cannot decode {path} as audio: {msg}") from exc
    info = AudioInfo(str(path), int(sr), int(channels), int(data.shape[0]), data.shape[0] / float(sr), fmt, subtype)
    return data, info


def to_mono_16k(data: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Downmix ``(frames, channels)`` or ``(frames,)`` audio to mono and resample it to 16 kHz.

    Returns a float32 tensor of shape ``(samples,)``.
    """
    x = torch.as_tensor(np.asarray(data, dtype=np.float32) if isinstance(data, np.ndarray) else data).float()
    if x.dim() == 2:
        x = x.mean(dim=1)
    elif x.dim() != 1:
        raise AudioError(f"audio must be (samples,) or (samples, channels), got shape {tuple(x.shape)}")
    if sample_rate <= 0:
        raise AudioError(f"invalid sample rate {sample_rate}")
    if sample_rate != SAMPLE_RATE and x.numel() > 0:
        x = AF.resample(x, int(sample_rate), SAMPLE_RATE)
    return x.contiguous()


def validate(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        raise AudioError(f"input holds no samples: {name}")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        first = int((~finite).nonzero()[0, 0])
        raise AudioError(f"input holds {bad} non-finite sample(s) (NaN or inf), first at sample {first}: {name}")


def load_audio(path: str | os.PathLike) -> tuple[torch.Tensor, AudioInfo]:
    """Read a file, validate it, and return ``(mono 16 kHz float32 samples, info)``."""
    p = Path(path)
    data, info = _read(p)
    if data.shape[0] == 0:
        raise AudioError(f"input holds no samples: {p}")
    if not np.isfinite(data).all():
        validate(torch.from_numpy(data.reshape(-1)), str(p))
    x = to_mono_16k(data, info.sample_rate)
    validate(x, str(p))
    return x, info


def find_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (audio files directly inside, sorted) into a list of files."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise AudioError(f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in folder {p}")
            out.extend(found)
        elif not p.exists():
            raise AudioError(f"input not found: {p}")
        else:
            out.append(p)
    return out


def write_wav_atomic(path: str | os.PathLike, x: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float32 WAV to a temporary file in the same folder, fsync, then rename.

    Float WAV keeps the samples exactly (no clipping, no quantisation), so files add back up
    to the input.
    """
    path = Path(path)
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = arr.astype(np.float32, copy=False).reshape(-1)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".wav.tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            sf.write(fh, arr, sample_rate, subtype="FLOAT", format="WAV")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def dbfs(x: torch.Tensor) -> float:
    """RMS level in dB relative to full scale (1.0); -inf for silence."""
    if x.numel() == 0:
        return float("-inf")
    rms = float(torch.sqrt(torch.mean(x.double() ** 2)))
    return 20.0 * float(np.log10(rms)) if rms > 0 else float("-inf")
