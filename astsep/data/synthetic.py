"""Synthetic sound sources: an unlimited supply of the structures real sounds are made of.

The class split trains the refiner on 48 recordings; what it must learn to repair a guide is generic
(a harmonic series belongs together, an onset is shared across bins, a noise band is continuous), and
48 recordings hold few examples of each. :func:`synthetic_source` draws a new source from a seeded
generator: a harmonic tone sequence (glides, vibrato, a spectral tilt, notes with attacks and decays),
a noise texture (a random band, steady with slow modulation or in bursts), an impulse train (knocks,
steps, typing: short filtered bursts at a jittered rate) or a sweeping siren-like tone. Each is
peak-normalised; the mixing code sets its level. Used by :class:`~astsep.data.classsplit.ClassSplitMixtures`
with ``synthetic_prob`` (training only: validation and held-out mixtures stay real).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["KINDS", "synthetic_source"]

KINDS = ("harmonic", "noise", "impulses", "sweep")


def synthetic_source(rng: np.random.Generator, n: int, sample_rate: int = 16000) -> tuple[str, torch.Tensor]:
    """``(kind, audio (n,))``: one synthetic source of ``n`` samples, a pure function of ``rng``'s state."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    t = np.arange(n) / sample_rate
    if kind == "harmonic":
        x = _harmonic(rng, t, sample_rate) * _notes(rng, n, sample_rate)
    elif kind == "noise":
        x = _noise_band(rng, n, sample_rate) * (_notes(rng, n, sample_rate) if rng.uniform() < 0.5 else _slow_am(rng, t))
    elif kind == "impulses":
        x = _impulses(rng, n, sample_rate)
    else:
        x = _sweep(rng, t, sample_rate) * _slow_am(rng, t)
    peak = float(np.abs(x).max())
    return kind, torch.from_numpy((x / peak if peak > 0 else x).astype(np.float32))


def _harmonic(rng: np.random.Generator, t: np.ndarray, sr: int, max_harmonics: int = 30) -> np.ndarray:
    """A harmonic series on a gliding f0 (log-uniform 80-1200 Hz) with vibrato and a random tilt."""
    f0 = math.exp(rng.uniform(math.log(80), math.log(1200)))
    glide = f0 * np.exp(np.log(rng.uniform(0.7, 1.4)) * t / max(t[-1], 1e-9))
    vib = 1 + rng.uniform(0, 0.03) * np.sin(2 * np.pi * rng.uniform(3, 8) * t)
    phase = 2 * np.pi * np.cumsum(glide * vib) / sr
    tilt = rng.uniform(0.5, 2.5)
    x = np.zeros_like(t)
    for k in range(1, max_harmonics + 1):
        if k * f0 * 1.5 >= sr / 2:
            break
        x += k ** -tilt * rng.uniform(0.3, 1.0) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return x


def _noise_band(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """White noise shaped by a random band (centre 200-6000 Hz, 0.3-3 octaves wide) in the frequency domain."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sr)
    centre, width = math.exp(rng.uniform(math.log(200), math.log(6000))), rng.uniform(0.3, 3.0)
    octaves = np.log2(np.maximum(f, 1.0) / centre)
    return np.fft.irfft(spec * np.exp(-0.5 * (octaves / (width / 2)) ** 2), n)


def _notes(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """An envelope of notes (0.1-0.8 s) and gaps (0-0.4 s), each note a fast attack, an exponential decay
    and a 10 ms release (no click where it ends)."""
    env = np.zeros(n)
    pos = int(rng.uniform(0, 0.3) * sr)
    while pos < n:
        length = int(rng.uniform(0.1, 0.8) * sr)
        k = np.arange(min(length, n - pos)) / sr
        attack = rng.uniform(0.005, 0.05)
        release = np.minimum((length / sr - k) / 0.01, 1.0)
        env[pos:pos + k.size] = np.minimum(k / attack, 1.0) * np.exp(-k * rng.uniform(0.0, 8.0)) * release * rng.uniform(0.5, 1.0)
        pos += length + int(rng.uniform(0.0, 0.4) * sr)
    return env


def _slow_am(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A steady level with a slow modulation (0.1-3 Hz, depth 0-0.8)."""
    return 1 - rng.uniform(0, 0.8) * 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(0.1, 3.0) * t + rng.uniform(0, 2 * np.pi)))


def _impulses(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Short filtered bursts (decay 3-50 ms) at a jittered rate of 2-20 per second."""
    band = _noise_band(rng, n, sr)
    rate, decay = rng.uniform(2, 20), rng.uniform(0.003, 0.05)
    env = np.zeros(n)
    pos = rng.uniform(0, 1 / rate)
    while pos * sr < n:
        i = int(pos * sr)
        k = np.arange(min(int(6 * decay * sr), n - i)) / sr
        env[i:i + k.size] += np.exp(-k / decay) * rng.uniform(0.4, 1.0)
        pos += rng.uniform(0.5, 1.5) / rate
    return band * env


def _sweep(rng: np.random.Generator, t: np.ndarray, sr: int) -> np.ndarray:
    """A tone whose pitch sweeps up and down (0.2-4 Hz) over 300-3000 Hz, with a few harmonics."""
    lo = math.exp(rng.uniform(math.log(300), math.log(1500)))
    hi = lo * rng.uniform(1.2, 2.0)
    f = lo + (hi - lo) * 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(0.2, 4.0) * t + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(f) / sr
    return sum(rng.uniform(0.2, 1.0) / k * np.sin(k * phase) for k in range(1, int(rng.integers(1, 4)) + 1))
