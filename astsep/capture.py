"""Audio sources for live mode: blocks of float32 samples ``(frames, channels)`` as they arrive.

* :class:`StreamSource` – a byte stream (stdin): a WAV stream (``arecord``'s header, with an
  unknown or bogus length, is fine) or raw PCM described by ``--raw-format`` (``s16le:16000:1``);
* :class:`SoundDeviceSource` – a sound card through PortAudio (``sounddevice``, extra ``astsep[live]``);
* :class:`ArraySource` – samples already in memory, optionally paced at real time (tests, benchmarks).

Every source is an iterator of blocks and has ``sample_rate``, ``channels``, ``name`` and
``close()``. None of them imports torch.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from typing import BinaryIO, Callable, Iterator

import numpy as np

from .errors import AudioError, ConfigError, MissingExtraError

log = logging.getLogger(__name__)

# --raw-format sample types: numpy dtype and full-scale divisor
RAW_TYPES: dict[str, tuple[str, float]] = {
    "s16le": ("<i2", 32768.0), "s32le": ("<i4", 2147483648.0), "f32le": ("<f4", 1.0), "u8": ("u1", 128.0),
}
MAX_CHANNELS = 64
MIN_RATE, MAX_RATE = 1000, 384000  # Hz, for WAV headers and --raw-format alike
MAX_FMT_BYTES = 64  # a fmt chunk is 16, 18 or 40 bytes; more is not a WAV header
MAX_HEADER_BYTES = 16 * 2**20  # all chunks before the data together (LIST, JUNK, bext… are KiB)
SKIP_BLOCK = 64 * 1024  # chunks before the data are skipped this many bytes at a time


def parse_raw_format(spec: str) -> tuple[str, int, int]:
    """``"s16le:16000:1"`` → ``("s16le", 16000, 1)`` (sample type, rate in Hz, channels)."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in RAW_TYPES:
        raise ConfigError(f"--raw-format {spec!r}: expected TYPE:RATE:CHANNELS with TYPE one of "
                          f"{', '.join(RAW_TYPES)} (e.g. s16le:16000:1)")
    try:
        rate, channels = int(parts[1]), int(parts[2])
    except ValueError:
        raise ConfigError(f"--raw-format {spec!r}: rate and channels must be integers") from None
    if not MIN_RATE <= rate <= MAX_RATE or not 1 <= channels <= MAX_CHANNELS:
        raise ConfigError(f"--raw-format {spec!r}: rate must be {MIN_RATE}..{MAX_RATE} Hz and channels 1..{MAX_CHANNELS}")
    return parts[0], rate, channels


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only at the end of the stream."""
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _skip(stream: BinaryIO, n: int) -> int:
    """Read and drop ``n`` bytes, :data:`SKIP_BLOCK` at a time (a pipe cannot seek); returns how many
    were there before the stream ended."""
    left = n
    while left > 0:
        chunk = stream.read(min(SKIP_BLOCK, left))
        if not chunk:
            break
        left -= len(chunk)
    return n - left


def _chunk_name(cid: bytes) -> str:
    return cid.decode("ascii", "replace") if all(32 <= b < 127 for b in cid) else cid.hex()


def read_wav_header(stream: BinaryIO) -> tuple[str, int, int]:
    """Read a RIFF/WAVE header up to its ``data`` chunk from a non-seekable stream.

    Returns ``(sample type, rate, channels)`` as :func:`parse_raw_format` does. The data chunk's
    length is ignored: a recorder streaming to a pipe writes 0 or 0xFFFFFFFF there.

    Nothing in the header is trusted: the ``fmt `` chunk must be 16..:data:`MAX_FMT_BYTES` bytes,
    the rate 1 kHz..384 kHz, the channels 1..:data:`MAX_CHANNELS`; other chunks before the data
    (``LIST``, ``JUNK``…) are skipped by streaming them :data:`SKIP_BLOCK` bytes at a time, and all
    of the header together may be :data:`MAX_HEADER_BYTES` at most. Anything else is an
    :class:`~astsep.errors.AudioError` of one line, read in bounded memory.
    """
    head = _read_exact(stream, 12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise AudioError("stdin is not a WAV stream (no RIFF/WAVE header); for raw PCM pass --raw-format "
                         "TYPE:RATE:CHANNELS, e.g. s16le:16000:1")
    fmt = None
    consumed = 12
    while True:
        ch = _read_exact(stream, 8)
        if len(ch) < 8:
            raise AudioError(f"WAV stream on stdin ended before its data chunk (after {consumed + len(ch)} bytes)")
        consumed += 8
        cid, size = ch[:4], struct.unpack("<I", ch[4:])[0]
        if cid == b"data":
            break
        padded = size + (size & 1)
        if cid == b"fmt " and not 16 <= size <= MAX_FMT_BYTES:
            raise AudioError(f"WAV stream on stdin: its fmt chunk is {size} bytes (16..{MAX_FMT_BYTES} expected)")
        if consumed + padded > MAX_HEADER_BYTES:
            raise AudioError(f"WAV stream on stdin: chunk '{_chunk_name(cid)}' of {size} bytes before the data makes "
                             f"a header over {MAX_HEADER_BYTES // 2**20} MiB; not a stream astsep reads")
        if cid == b"fmt ":
            body = _read_exact(stream, padded)
            if len(body) < size:
                raise AudioError("WAV stream on stdin ended inside its fmt chunk")
            tag, channels, rate = struct.unpack("<HHI", body[:8])
            bits = struct.unpack("<H", body[14:16])[0]
            if tag == 0xFFFE:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's first 2 bytes
                if size < 26:
                    raise AudioError(f"WAV stream on stdin: extensible fmt chunk of {size} bytes has no sub-format")
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, channels, rate, bits)
        elif _skip(stream, padded) < size:
            raise AudioError(f"WAV stream on stdin ended inside its '{_chunk_name(cid)}' chunk")
        consumed += padded
    if fmt is None:
        raise AudioError("WAV stream on stdin has no fmt chunk before its data")
    tag, channels, rate, bits = fmt
    kinds = {(1, 16): "s16le", (1, 32): "s32le", (3, 32): "f32le", (1, 8): "u8"}
    if (tag, bits) not in kinds:
        raise AudioError(f"WAV stream on stdin: format {tag} with {bits} bits is not supported "
                         "(16/32-bit PCM, 8-bit PCM, 32-bit float)")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"WAV stream on stdin: {rate} Hz is not usable ({MIN_RATE}..{MAX_RATE} Hz)")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"WAV stream on stdin: {channels} channel(s) is not usable (1..{MAX_CHANNELS})")
    return kinds[(tag, bits)], rate, channels


class StreamSource:
    """Blocks from a byte stream: WAV (header parsed) or raw PCM (``raw_format``)."""

    def __init__(self, stream: BinaryIO, raw_format: str | None = None, block_sec: float = 0.032,
                 name: str = "stdin"):
        self.stream = stream
        kind, self.sample_rate, self.channels = (parse_raw_format(raw_format) if raw_format
                                                 else read_wav_header(stream))
        self._dtype, self._scale = RAW_TYPES[kind]
        self._frame_bytes = np.dtype(self._dtype).itemsize * self.channels
        self.block_frames = max(1, int(round(block_sec * self.sample_rate)))
        self.name = name
        self.format = kind

    def __iter__(self) -> Iterator[np.ndarray]:
        pending = b""
        while True:
            data = self.stream.read1(self.block_frames * self._frame_bytes) if hasattr(self.stream, "read1") \
                else self.stream.read(self.block_frames * self._frame_bytes)
            if not data:
                return
            data = pending + data
            usable = len(data) - len(data) % self._frame_bytes
            pending = data[usable:]
            if not usable:
                continue
            x = np.frombuffer(data[:usable], dtype=self._dtype).reshape(-1, self.channels).astype(np.float32)
            if self._dtype == "u1":
                x -= 128.0
            yield x / self._scale if self._scale != 1.0 else x

    def close(self) -> None:
        pass


def check_sound_card_support():
    """``sounddevice`` (extra ``astsep[live]``) with its PortAudio library, or one clear error line."""
    try:
        import sounddevice as sd
    except (ImportError, OSError) as exc:  # OSError: the PortAudio library (libportaudio2) is missing
        missing = getattr(exc, "name", None) or "PortAudio (libportaudio2)"
        raise MissingExtraError("live capture from a sound card", "live", missing,
                                hint=" (and the system library libportaudio2)") from exc
    return sd


class SoundDeviceSource:
    """Blocks from a sound card input (PortAudio via ``sounddevice``), at ``sample_rate``.

    PortAudio's callback only copies each block into a queue (it never waits); a block that does
    not fit (the consumer stalled for ``max_queue_sec``) is counted in ``overruns`` and dropped."""

    def __init__(self, device: int | str | None = None, channels: int = 1, sample_rate: int = 16000,
                 block_sec: float = 0.032, max_queue_sec: float = 30.0):
        sd = check_sound_card_support()
        self.sample_rate, self.channels = sample_rate, channels
        self.block_frames = max(1, int(round(block_sec * sample_rate)))
        self.overruns = 0
        self._q: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=max(1, int(max_queue_sec / block_sec)))
        self._closed = threading.Event()

        def callback(indata, frames, t, status) -> None:  # PortAudio's thread: never block here
            if status:
                log.debug("sound card: %s", status)
            try:
                self._q.put_nowait(indata.copy())
            except queue.Full:
                self.overruns += 1

        try:
            self._stream = sd.InputStream(device=device, channels=channels, samplerate=sample_rate,
                                          blocksize=self.block_frames, dtype="float32", callback=callback)
            self._stream.start()
        except Exception as exc:  # noqa: BLE001 - PortAudio errors: unknown device, unsupported rate, ...
            raise AudioError(f"cannot open sound card input {device if device is not None else '(default)'} "
                             f"with {channels} channel(s) at {sample_rate} Hz: {exc}") from None
        info = sd.query_devices(self._stream.device)
        self.name = f"sound card {self._stream.device}: {info['name']}"

    def __iter__(self) -> Iterator[np.ndarray]:
        while not self._closed.is_set():
            try:
                block = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            if block is None:
                return
            yield block

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            try:
                self._stream.stop()
                self._stream.close()
            except Exception:  # noqa: BLE001 - closing a stream PortAudio already lost
                pass


class ArraySource:
    """Blocks of ``x`` ``(N,)`` or ``(N, channels)``; with ``realtime`` a block is given no earlier
    than its time in the stream (a live microphone's pace, measured from the first block)."""

    def __init__(self, x: np.ndarray, sample_rate: int = 16000, block_sec: float = 0.032, realtime: bool = True,
                 name: str = "array"):
        x = np.asarray(x, dtype=np.float32)
        self.x = x[:, None] if x.ndim == 1 else x
        self.sample_rate, self.channels = sample_rate, self.x.shape[1]
        self.block_frames = max(1, int(round(block_sec * sample_rate)))
        self.realtime = realtime
        self.name = name
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[np.ndarray]:
        t0 = time.monotonic()
        for s in range(0, len(self.x), self.block_frames):
            if self._closed.is_set():
                return
            if self.realtime:  # block s..s+B exists only once its last sample has been "recorded"
                wait = t0 + (s + self.block_frames) / self.sample_rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            yield self.x[s:s + self.block_frames]

    def close(self) -> None:
        self._closed.set()


class FileSource:
    """Blocks of an audio file (anything libsndfile decodes, channels kept), decoded as they are read."""

    def __init__(self, path: str, block_sec: float = 0.032):
        import soundfile as sf

        try:
            self._file = sf.SoundFile(path)
        except (sf.LibsndfileError, RuntimeError, OSError) as exc:
            raise AudioError(f"cannot decode {path} as audio: {exc}") from exc
        self.sample_rate, self.channels = int(self._file.samplerate), int(self._file.channels)
        self.block_frames = max(1, int(round(block_sec * self.sample_rate)))
        self.name = str(path)
        self.format = self._file.subtype

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            x = self._file.read(self.block_frames, dtype="float32", always_2d=True)
            if not len(x):
                return
            yield x

    def close(self) -> None:
        self._file.close()


class Paced:
    """``source``'s blocks, each given no earlier than its time in the stream (measured from the first):
    a file or a pipe played at a microphone's pace. Without it a pipe is read as fast as it comes and
    live mode, which keeps only the newest window, drops most of it.

    ``monotonic``/``sleep`` are injectable (tests step a fake clock)."""

    def __init__(self, source, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.source, self._monotonic, self._sleep = source, monotonic, sleep
        self.sample_rate, self.channels = source.sample_rate, source.channels
        self.name = getattr(source, "name", "stream")
        self.block_frames = getattr(source, "block_frames", None)
        self.format = getattr(source, "format", None)

    def __iter__(self) -> Iterator[np.ndarray]:
        t0 = None
        frames = 0
        for block in self.source:
            if t0 is None:
                t0 = self._monotonic()
            frames += len(block)
            wait = t0 + frames / self.sample_rate - self._monotonic()  # the block's last sample "recorded"
            if wait > 0:
                self._sleep(wait)
            yield block

    def close(self) -> None:
        self.source.close()
