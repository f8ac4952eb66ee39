"""Audio I/O: decode anything soundfile reads, downmix, resample to 16 kHz, validate, write atomically.

torchaudio's own load/save need torchcodec, so decoding goes through soundfile; torchaudio is used
for DSP (resampling) only.
"""

from __future__ import annotations

import math
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
from .inputs import AUDIO_SUFFIXES, find_inputs  # noqa: F401 - their home is the torch-free inputs.py


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


# Source seconds decoded at once: decode memory is one block of every channel, whatever the file's
# length; the block is downmixed to mono before anything else keeps it.
BLOCK_SEC = 8.0
_DECODE_ERRORS = (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError, OverflowError)
# torchaudio.functional.resample's defaults; the streaming resampler needs them to size its context
_LOWPASS_WIDTH = 6
# Sample rates accepted from a file header: a corrupt header saying 1 Hz would otherwise ask for a
# 16,000-fold upsampling (memory and hours of compute) of what is really noise.
MIN_RATE, MAX_RATE = 1000, 768000
_ROLLOFF = 0.99
# torchaudio's exact rational resampler builds a kernel of orig/gcd phases: 44101 -> 16000 Hz takes
# ~50 s per second of audio. A rate whose reduced ratio is larger than this is resampled as if it
# were the nearest rate with a small one, at most _MAX_RATE_ERROR away (0.02 %: far below a sound
# card's clock tolerance, inaudible, 0.2 ms per second of timing).
_MAX_REDUCED_RATE = 1000
_MAX_RATE_ERROR = 2e-4


def _decode_error(path: Path, exc: BaseException) -> AudioError:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return AudioError(f"cannot decode {path} as audio: {msg}")


def _check_path(path: Path) -> None:
    if not path.exists():
        raise AudioError(f"input not found: {path}")
    if path.is_dir():
        raise AudioError(f"input is a folder, not an audio file: {path}")
    if not path.is_file():
        raise AudioError(f"input is not a regular file: {path}")
    if path.stat().st_size == 0:
        raise AudioError(f"input is an empty file (0 bytes): {path}")


def _check_finite(block: np.ndarray, offset: int, name: str) -> None:
    """``block`` ``(frames, channels)``; ``offset``: index of its first frame in the file."""
    finite = np.isfinite(block)
    if not finite.all():
        bad = ~finite.all(axis=1)
        raise AudioError(f"input holds {int(bad.sum())} non-finite sample(s) (NaN or inf) in the block from "
                         f"frame {offset}, first at sample {offset + int(np.argmax(bad))}: {name}")


def effective_rate(orig: int, new: int = SAMPLE_RATE) -> int:
    """The rate ``orig`` is resampled from: itself when ``orig/gcd(orig, new)`` is at most
    ``_MAX_REDUCED_RATE``, else the nearest rate within ``_MAX_RATE_ERROR`` whose reduced ratio is
    (``orig`` itself if there is none)."""
    orig, new = int(orig), int(new)
    if orig // math.gcd(orig, new) <= _MAX_REDUCED_RATE:
        return orig
    for d in range(1, int(orig * _MAX_RATE_ERROR) + 1):
        for r in (orig - d, orig + d):
            if r > 0 and r // math.gcd(r, new) <= _MAX_REDUCED_RATE:
                return r
    return orig


class StreamResampler:
    """``torchaudio.functional.resample`` applied block by block, with the same output.

    The sinc kernel of output frame ``f`` reads input samples ``[f*O - width, f*O + width + O)``
    (``O``/``N``: the rates divided by their gcd), so a block is resampled together with ``ctx``
    samples of context on each side and only the frames whose whole support is known are kept.
    Memory: one block plus two contexts, whatever the length of the signal.
    """

    def __init__(self, orig: int, new: int = SAMPLE_RATE):
        orig = effective_rate(orig, new)
        g = math.gcd(int(orig), int(new))
        self.orig, self.new = int(orig), int(new)
        self.O, self.N = self.orig // g, self.new // g
        width = math.ceil(_LOWPASS_WIDTH * self.O / (min(self.O, self.N) * _ROLLOFF))
        self.width = width
        self.ctx = math.ceil((width + 1) / self.O) * self.O
        self.buf = torch.zeros(0)
        self.b0 = 0  # input index of buf[0]; a multiple of O
        self.next_f = 0  # next output frame to emit
        self.total_in = 0

    def push(self, x: torch.Tensor) -> torch.Tensor:
        self.buf = torch.cat([self.buf, x]) if self.buf.numel() else x
        self.total_in += x.numel()
        end = self.b0 + self.buf.numel()
        f_end = (end - self.width - self.O) // self.O + 1
        return self._emit(f_end, None) if f_end > self.next_f else torch.zeros(0)

    def finish(self) -> torch.Tensor:
        count = -(-self.N * self.total_in // self.O)  # ceil: torchaudio's output length
        f_end = -(-count // self.N)
        return self._emit(f_end, count) if f_end > self.next_f else torch.zeros(0)

    def _emit(self, f_end: int, count: int | None) -> torch.Tensor:
        y = AF.resample(self.buf, self.orig, self.new)
        f0 = self.b0 // self.O
        lo = (self.next_f - f0) * self.N
        hi = (f_end - f0) * self.N if count is None else count - f0 * self.N
        out = y[lo:hi].clone()
        self.next_f = f_end
        nb0 = max(0, f_end * self.O - self.ctx)
        self.buf = self.buf[nb0 - self.b0:].clone()
        self.b0 = nb0
        return out


def resample_blocks(blocks, sample_rate: int) -> torch.Tensor:
    """Resample an iterable of mono float32 blocks at ``sample_rate`` to one 16 kHz tensor ``(samples,)``."""
    if sample_rate <= 0:
        raise AudioError(f"invalid sample rate {sample_rate}")
    parts: list[torch.Tensor] = []
    if effective_rate(sample_rate) == SAMPLE_RATE:  # 16001 Hz is 16 kHz within _MAX_RATE_ERROR
        sample_rate = SAMPLE_RATE
    rs = StreamResampler(sample_rate) if sample_rate != SAMPLE_RATE else None
    for b in blocks:
        t = torch.as_tensor(b, dtype=torch.float32)
        parts.append(rs.push(t) if rs is not None else t)
    if rs is not None:
        parts.append(rs.finish())
    parts = [p for p in parts if p.numel()]
    if not parts:
        return torch.zeros(0)
    out = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
    return out.contiguous()


def _read_mono_16k(path: Path) -> tuple[torch.Tensor, AudioInfo]:
    """Decode ``path`` block by block, downmix each block, resample as a stream."""
    _check_path(path)
    try:
        f = sf.SoundFile(os.fsencode(path))  # bytes: a name that is not UTF-8 opens too
    except _DECODE_ERRORS as exc:
        raise _decode_error(path, exc) from exc
    with f:
        sr, channels, fmt, subtype = int(f.samplerate), int(f.channels), f.format, f.subtype
        if not MIN_RATE <= sr <= MAX_RATE or channels <= 0:
            raise AudioError(f"cannot decode {path} as audio: unsupported {sr} Hz, {channels} channel(s) "
                             f"(rates {MIN_RATE}-{MAX_RATE} Hz)")
        block = max(1, int(BLOCK_SEC * sr))
        frames = 0

        def mono_blocks():
            nonlocal frames
            while True:
                try:
                    data = f.read(block, dtype="float32", always_2d=True)
                except _DECODE_ERRORS as exc:
                    raise _decode_error(path, exc) from exc
                if data.shape[0] == 0:
                    return
                _check_finite(data, frames, str(path))
                frames += data.shape[0]
                yield data[:, 0].copy() if channels == 1 else data.mean(axis=1, dtype=np.float32)
                if data.shape[0] < block:  # short read: end of the data (even if the header claims more)
                    return

        x = resample_blocks(mono_blocks(), sr)
    info = AudioInfo(str(path), sr, channels, frames, frames / float(sr), fmt, subtype)
    return x, info


def to_mono_16k(data: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Downmix ``(frames, channels)`` or ``(frames,)`` float audio to mono and resample it to 16 kHz.

    Returns a float32 tensor of shape ``(samples,)``. The layout is taken as given; arrays from
    users go through :func:`samples_to_mono_16k`, which works out the layout and the scale.
    """
    x = torch.as_tensor(np.asarray(data, dtype=np.float32) if isinstance(data, np.ndarray) else data).float()
    if x.dim() == 2:
        x = x.mean(dim=1)
    elif x.dim() != 1:
        raise AudioError(f"audio must be (samples,) or (samples, channels), got shape {tuple(x.shape)}")
    if sample_rate <= 0:
        raise AudioError(f"invalid sample rate {sample_rate}")
    if sample_rate == SAMPLE_RATE or x.numel() == 0:
        return x.contiguous()
    step = max(1, int(BLOCK_SEC * sample_rate))
    return resample_blocks((x[i:i + step] for i in range(0, x.numel(), step)), int(sample_rate))


# A 2-D array is read as (channels, samples) or (samples, channels) only when exactly one of its
# dimensions can be a channel count: at most this many channels.
MAX_ARRAY_CHANNELS = 8


def _as_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Integer PCM scaled by its dtype's range (int16: / 32768; unsigned centred on mid-scale),
    floats as float32. Booleans, complex numbers and objects are refused."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bool or x.is_complex():
            raise AudioError(f"audio samples must be real numbers, got dtype {x.dtype}")
        if x.is_floating_point():
            return x.float()
        x = x.numpy()
    if x.dtype.kind == "f":
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x.dtype.kind not in "iu":
        raise AudioError(f"audio samples must be real numbers, got dtype {x.dtype}")
    half = float(2 ** (x.dtype.itemsize * 8 - 1))
    y = x.astype(np.float64) - (half if x.dtype.kind == "u" else 0.0)
    return torch.from_numpy((y / half).astype(np.float32))


def samples_to_mono_16k(data: np.ndarray | torch.Tensor, sample_rate: int) -> tuple[torch.Tensor, AudioInfo]:
    """User samples to validated 16 kHz mono float32 ``(samples,)`` plus an :class:`AudioInfo`.

    ``data``: ``(samples,)``, ``(samples, channels)`` or ``(channels, samples)`` (torchaudio's
    layout). A 2-D shape is unambiguous when exactly one dimension is at most
    :data:`MAX_ARRAY_CHANNELS`: that one holds the channels. Any other 2-D shape (``(2, 5)``,
    ``(16, 48000)``) is refused, as is anything with more dimensions. Integer PCM is scaled by its
    dtype's range (int16 full scale = 32768), so it comes out at the level a WAV file would.
    """
    x = data.detach().cpu() if isinstance(data, torch.Tensor) else np.asarray(data)
    dtype = str(x.dtype).replace("torch.", "")
    x = _as_float(x)
    if x.dim() == 1:
        channels = 1
    elif x.dim() == 2:
        a, b = x.shape
        if (a <= MAX_ARRAY_CHANNELS) == (b <= MAX_ARRAY_CHANNELS):
            raise AudioError(f"ambiguous audio shape {tuple(x.shape)}: pass (samples,), (samples, channels) or "
                             f"(channels, samples) with at most {MAX_ARRAY_CHANNELS} channels and more samples "
                             "than that")
        if a <= MAX_ARRAY_CHANNELS:  # channels first
            x = x.t()
        channels = int(x.shape[1])
    else:
        raise AudioError(f"audio must be (samples,), (samples, channels) or (channels, samples), "
                         f"got shape {tuple(x.shape)}")
    frames = int(x.shape[0])
    validate(x.reshape(-1), "<samples>")
    y = to_mono_16k(x, int(sample_rate))
    validate(y, "<samples>")
    info = AudioInfo("<samples>", int(sample_rate), channels, frames, frames / float(sample_rate), "array", dtype)
    return y, info


def validate(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        raise AudioError(f"input holds no samples: {name}")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        first = int((~finite).nonzero()[0, 0])
        raise AudioError(f"input holds {bad} non-finite sample(s) (NaN or inf), first at sample {first}: {name}")


def load_audio(path: str | os.PathLike) -> tuple[torch.Tensor, AudioInfo]:
    """Read a file, validate it, and return ``(mono 16 kHz float32 samples (N,), info)``.

    The file is decoded :data:`BLOCK_SEC` at a time and each block is downmixed before it is
    resampled, so decoding needs memory for the 16 kHz mono result plus one block, not for the
    whole file at its own rate and channel count. Raises :class:`AudioError` for anything that is
    not finite, non-empty audio.
    """
    p = Path(path)
    x, info = _read_mono_16k(p)
    if info.frames == 0:
        raise AudioError(f"input holds no samples: {p}")
    validate(x, str(p))
    return x, info


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """Mode a new file gets from ``open()`` under the user's umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """Mode a new folder gets from ``mkdir`` under the user's umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def _discard(tmp: str) -> None:
    """Remove a temporary file a failed atomic write left (gone already: nothing to do)."""
    try:
        os.unlink(tmp)
    except OSError:
        pass


def write_wav_atomic(path: str | os.PathLike, x: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE,
                     container: str = "WAV", subtype: str = "FLOAT") -> None:
    """Write mono audio (float32 WAV by default) to a temporary file in the same folder, fsync, then rename.

    Float WAV keeps the samples exactly (no clipping, no quantisation), so files add back up
    to the input; ``container``/``subtype`` are soundfile's (``"FLAC"``, ``"PCM_24"``…) for the
    other output formats of :mod:`astsep.export`.
    """
    path = Path(path)
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = arr.astype(np.float32, copy=False).reshape(-1)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{path.suffix}.tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), new_file_mode())  # mkstemp makes 0600; other tools honour the umask
            sink = _GuardedFile(fh)
            try:
                sf.write(sink, arr, sample_rate, subtype=subtype, format=container)
            except (AssertionError, RuntimeError):  # soundfile's answer to a short write: the OSError says why
                if sink.error is None:
                    raise
            if sink.error is not None:
                raise sink.error
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        _discard(tmp)
        raise


class _GuardedFile:
    """A binary file for soundfile's virtual I/O whose methods never raise into libsndfile's C
    callbacks (cffi would print "Exception ignored from cffi callback" for every call on a full
    disk): the first ``OSError`` is kept in ``error``, and every later call does nothing."""

    def __init__(self, fh) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def _guard(self, fn, default, *args):
        if self.error is not None:
            return default
        try:
            return fn(*args)
        except OSError as exc:
            self.error = exc
            return default

    def write(self, data) -> int:
        return self._guard(self._fh.write, 0, data)

    def read(self, n: int = -1) -> bytes:
        return self._guard(self._fh.read, b"", n)

    def readinto(self, buf) -> int:
        return self._guard(self._fh.readinto, 0, buf)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._guard(self._fh.seek, -1, offset, whence)

    def tell(self) -> int:
        return self._guard(self._fh.tell, -1)

    def flush(self) -> None:
        self._guard(self._fh.flush, None)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a temporary file in the same folder, fsync, then rename. The file gets the
    mode ``open()`` would give it under the user's umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), new_file_mode())  # mkstemp makes 0600; other tools honour the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def rms_db(x: torch.Tensor, floor: float = 1e-30) -> torch.Tensor:
    """RMS level in dB re full scale (1.0) of each signal: ``(..., N)`` samples → ``(...)`` dB.

    ``10·log10(mean(x²))``, the mean square floored at ``floor`` (1e-30: −300 dB; 0 gives −inf for
    silence), in ``x``'s dtype.
    """
    return 10 * torch.log10(x.pow(2).mean(dim=-1).clamp_min(floor))


def dbfs(x: torch.Tensor) -> float:
    """RMS level of all of ``x`` in dB re full scale (1.0), in float64; -inf for silence."""
    if x.numel() == 0:
        return float("-inf")
    return float(rms_db(x.double().reshape(-1), floor=0.0))
