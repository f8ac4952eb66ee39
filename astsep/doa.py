"""Direction of arrival from a microphone array, with ``pyroomacoustics.doa`` (SRP-PHAT, MUSIC, …).

Geometry: a preset name (``respeaker4``, ``respeaker6``, ``linear2``) or a YAML file::

    # mics.yaml: one [x, y] or [x, y, z] per microphone, metres, in the order of the input channels
    mics:
      - [-0.032, 0.0]
      - [0.0, -0.032]
      - [0.032, 0.0]
      - [0.0, 0.032]

Angles are azimuths in degrees, counter-clockwise from the x axis of that geometry, in 0..360.
``pyroomacoustics`` belongs to the optional extra ``astsep[live]``; nothing here imports it (or
numpy's heavier users) before an estimator is built.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .config import DOA_METHODS, SAMPLE_RATE, DOAConfig
from .errors import ConfigError, MissingExtraError

SPEED_OF_SOUND = 343.0  # m/s at about 20 °C

# Microphone positions (metres, x/y), in channel order. The ReSpeaker 4-mic arrays (the Pi HAT and
# the USB Mic Array v2.0) hold 4 mics on a circle of radius 32 mm at 0°, 90°, ... as ODAS's
# configuration files for them give: (-0.032, 0), (0, -0.032), (0.032, 0), (0, 0.032).
PRESETS: dict[str, list[tuple[float, float]]] = {
    "respeaker4": [(-0.032, 0.0), (0.0, -0.032), (0.032, 0.0), (0.0, 0.032)],
    # ReSpeaker 6-mic circular array: radius 46.3 mm, mics every 60°
    "respeaker6": [(0.0463 * math.cos(math.radians(a)), 0.0463 * math.sin(math.radians(a)))
                   for a in (0, 60, 120, 180, 240, 300)],
    # two mics 10 cm apart on the x axis (a stereo pair): only 0..180° can be told apart
    "linear2": [(-0.05, 0.0), (0.05, 0.0)],
}
# Fewest time-frequency bins a separated source must dominate for its own direction (see
# DOAEstimator.estimate); below, the whole signal's. Each bin is one noisy phase observation per mic
# pair (reverberation, leakage of the other sound). Measured on the tests' simulated room (siren at
# 45° + crying baby at 250°, 4-mic ReSpeaker), estimating from k randomly drawn source-dominated
# bins, 40 draws: with SRP-PHAT, k = 8 missed by > 10° in 25-30 % of draws, k = 16 in 8-15 %, k = 32
# in 0-10 %, k = 64 and more in none; MUSIC is noisier (64: 8-10 %, 128: 0-3 %). 64 bins is about
# two thirds of one 32 ms frame's band (300..3500 Hz: 102 bins at nfft 512).
MIN_SOURCE_BINS = 64
METHODS = DOA_METHODS


def load_geometry(spec: str) -> np.ndarray:
    """Microphone positions ``(2, M)`` (metres) from a preset name or a YAML file (see module doc)."""
    if spec in PRESETS:
        return np.asarray(PRESETS[spec], dtype=float).T
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--mic-geometry {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    from .yamlfile import load_yaml

    data = load_yaml(path, what="--mic-geometry")
    mics = data.get("mics") if isinstance(data, dict) else None
    try:
        arr = np.asarray(mics, dtype=float)
    except (TypeError, ValueError):
        arr = np.zeros((0,))
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] not in (2, 3) or not np.isfinite(arr).all():
        raise ConfigError(f"--mic-geometry {path}: 'mics' must be a list of at least 2 [x, y] or [x, y, z] "
                          "positions in metres, one per input channel")
    return arr[:, :2].T.copy()  # azimuth only: the array's plane


def _pyroomacoustics():
    try:
        import pyroomacoustics as pra
    except ImportError as exc:
        raise MissingExtraError("direction of arrival (--mic-geometry)", "live", exc.name) from exc
    return pra


class DOAEstimator:
    """Azimuth of the strongest source in a multichannel signal, by ``pyroomacoustics.doa``."""

    def __init__(self, geometry: np.ndarray, cfg: DOAConfig | None = None, sample_rate: int = SAMPLE_RATE):
        self.cfg = cfg or DOAConfig()
        self.geometry = np.asarray(geometry, dtype=float)
        if self.geometry.ndim != 2 or self.geometry.shape[0] != 2 or self.geometry.shape[1] < 2:
            raise ConfigError(f"a microphone geometry is (2, M) with M >= 2 mics, got {self.geometry.shape}")
        self.sample_rate = sample_rate
        pra = _pyroomacoustics()
        self._pra = pra
        self.used_source = False  # set by each estimate(): see there
        self.source_bins: int | None = None
        self._grid = np.linspace(0, 2 * np.pi, self.cfg.grid, endpoint=False)
        self._algo = pra.doa.algorithms[self.cfg.method](self.geometry, sample_rate, self.cfg.nfft,
                                                         c=SPEED_OF_SOUND, num_src=1, azimuth=self._grid)

    @property
    def channels(self) -> int:
        return int(self.geometry.shape[1])

    @property
    def name(self) -> str:
        return f"{self.cfg.method.lower()}-phat" if self.cfg.method == "SRP" else self.cfg.method.lower()

    def estimate(self, x: np.ndarray, source: np.ndarray | None = None) -> float | None:
        """Azimuth in degrees (0..360) of ``x`` ``(M, N)`` (channels in geometry order, 16 kHz), or
        None when ``x`` is shorter than two STFT frames or silent.

        ``source``: a separated source's mono waveform ``(N,)``, sample-aligned with ``x`` (a part of
        the channel mean that separation attributed to one sound). Then only the time-frequency bins
        where that source dominates the rest of the mean (``|S|² ≥ |mean − S|²``, an ideal binary
        mask's test, on this estimator's STFT and frequency range) are kept, on every channel: the
        direction is the source's, not that of whatever else is louder in the span. When fewer than
        :data:`MIN_SOURCE_BINS` bins pass, the whole signal is used instead. After each call,
        :attr:`used_source` says which it was (True: the source's bins) and :attr:`source_bins`
        how many bins passed (None without ``source``)."""
        self.used_source = False
        self.source_bins = None
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != self.channels:
            raise ConfigError(f"DOA needs {self.channels} channels (the geometry's mics), got shape {x.shape}")
        if source is not None:
            source = np.asarray(source, dtype=np.float64)
            if source.shape != (x.shape[1],):
                raise ConfigError(f"a DOA source is ({x.shape[1]},), sample-aligned with the channels, "
                                  f"got shape {source.shape}")
        n = self.cfg.nfft
        hop = n // 2
        frames = (x.shape[1] - n) // hop + 1
        if frames < 2 or not np.any(x):
            return None
        win = np.hanning(n)
        idx = np.arange(n)[None, :] + hop * np.arange(frames)[:, None]  # (frames, n)
        spec = np.fft.rfft(x[:, idx] * win, axis=-1)  # (M, frames, n/2+1)
        X = np.transpose(spec, (0, 2, 1))  # (M, freq, frames): what pyroomacoustics takes
        if source is not None:
            keep = self._source_bins(X, np.fft.rfft(source[idx] * win, axis=-1).T)
            self.source_bins = int(keep.sum())
            if self.source_bins >= MIN_SOURCE_BINS:
                X = X * keep  # every channel: a zeroed bin adds nothing to the spatial spectrum (below)
                self.used_source = True
        self._algo.locate_sources(X, freq_range=[self.cfg.freq_low, self.cfg.freq_high])
        az = self._algo.azimuth_recon
        if az is None or len(az) == 0:
            return None
        return float(np.degrees(az[0]) % 360.0)

    def _source_bins(self, X: np.ndarray, S: np.ndarray) -> np.ndarray:
        """``(freq, frames)`` bool: the bins of the band that the source ``S`` ``(freq, frames)``
        dominates in the channel mean of ``X`` ``(M, freq, frames)``.

        Binary, not a soft weight: SRP-PHAT (pyroomacoustics ``doa/srp.py``, ``SRP._process``)
        divides each bin by its magnitude (``pX = X / max(|X|, 1e-14)``) before summing the
        cross-correlations over bins and frames, so any weight would be divided out again, whereas a
        zeroed bin gives ``pX = 0`` and adds nothing to any pair's cross-correlation (only to the
        constant ``DC_offset``, the same for every angle). MUSIC (``doa/music.py``) averages
        ``X Xᴴ`` over frames per bin, so zeroed frames add nothing (the scale does not move the
        eigenvectors), and a bin zeroed in every frame has a zero covariance whose pseudo-spectrum
        ``1 / |aᴴ (I − e eᴴ) a|`` is ``1 / (M − 1)`` at every angle (unit-modulus steering vectors;
        checked: 1/3 for 4 mics), a constant offset, not a direction."""
        mean = X.mean(axis=0)
        ps, pr = np.abs(S) ** 2, np.abs(mean - S) ** 2
        keep = (ps >= pr) & (ps > 0)  # a silent source dominates nothing, not even silence
        lo, hi = (int(round(f / self.sample_rate * self.cfg.nfft)) for f in (self.cfg.freq_low, self.cfg.freq_high))
        keep[:lo] = False  # the band pyroomacoustics uses: bins lo..hi-1
        keep[hi:] = False
        return keep
