"""Fuzzing and properties, bounded for CI (about 20 s in all).

- decoding: real WAV / FLAC / Ogg bytes, mutated (flipped bytes, overwritten runs, truncation,
  inserted garbage) → ``load_audio`` returns finite, non-empty 16 kHz audio or raises AudioError;
  nothing else (no other exception, no hang: a SIGALRM guard fails the example after 5 s);
- separation: random signals of any length, rate, channel count and level come back as files
  that add up to the input (multichannel arrays of 8 samples or fewer have no clear layout and are
  refused).
"""

from __future__ import annotations

import io
import json
import signal

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import astsep
from astsep.audio import load_audio
from astsep.errors import AudioError
from astsep.guide import ASTGuide
from astsep.testing import tiny_ast

from conftest import clip

FORMATS = {"wav": ("WAV", "PCM_16"), "wav24": ("WAV", "PCM_24"), "flac": ("FLAC", "PCM_16"),
           "ogg": ("OGG", "VORBIS")}


def _seed_bytes(kind: str) -> bytes:
    try:
        x = clip("dog", 0.6).numpy()
    except (StopIteration, OSError):
        x = (0.1 * np.sin(np.arange(9600) * 0.07)).astype(np.float32)
    stereo = np.stack([x, 0.5 * x], axis=1)
    buf = io.BytesIO()
    fmt, sub = FORMATS[kind]
    sf.write(buf, stereo, 22050 if kind == "wav24" else 16000, format=fmt, subtype=sub)
    return buf.getvalue()


SEEDS = {k: _seed_bytes(k) for k in FORMATS}

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10 ** 6), st.integers(1, 255)),
    st.tuples(st.just("overwrite"), st.integers(0, 10 ** 6), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("truncate"), st.integers(0, 10 ** 6), st.just(b"")),
    st.tuples(st.just("insert"), st.integers(0, 10 ** 6), st.binary(min_size=1, max_size=64)),
)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        if not b:
            break
        pos %= len(b)
        if op == "flip":
            b[pos] ^= arg
        elif op == "overwrite":
            b[pos:pos + len(arg)] = arg
        elif op == "truncate":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = arg
    return bytes(b)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_mutated_files_decode_to_finite_audio_or_raise_audio_error(tmp_path, kind):
    path = tmp_path / f"fuzz.{kind[:4] if kind != 'wav24' else 'wav'}"
    outcomes = {"decoded": 0, "refused": 0}

    @settings(max_examples=50, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(mutation, min_size=1, max_size=4))
    def check(ops):
        path.write_bytes(mutate(SEEDS[kind], ops))
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(5)
        try:
            x, info = load_audio(path)
        except AudioError as exc:
            assert str(exc) and "\n" not in str(exc)
            outcomes["refused"] += 1
            return
        except _Hang:
            pytest.fail(f"decoding hung on {ops}")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        assert x.dtype == torch.float32 and x.dim() == 1 and x.numel() > 0
        assert bool(torch.isfinite(x).all())
        assert info.frames > 0 and info.sample_rate > 0
        outcomes["decoded"] += 1

    # check's source seeds the derandomized examples, so it stays as it is (counters included); the sum
    # of the counters is no test (it is positive whenever hypothesis ran), and asking for both
    # outcomes fails for Ogg, where all 50 mutations are refused
    check()


@pytest.fixture(scope="module")
def guide():
    return ASTGuide(tiny_ast(seed=0))


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 24000), rate=st.sampled_from([8000, 16000, 22050, 44100, 48000]),
       channels=st.integers(1, 3), level=st.sampled_from([0.0, 1e-6, 0.05, 1.0, 8.0]),
       kind=st.sampled_from(["noise", "tone", "impulses"]), seed=st.integers(0, 2 ** 16))
def test_random_signals_come_back_as_files_that_add_up_to_the_input(tmp_path_factory, guide, n, rate, channels,
                                                                    level, kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "noise":
        x = rng.standard_normal((n, channels))
    elif kind == "tone":
        x = np.sin(2 * np.pi * rng.uniform(50, 4000) * np.arange(n) / rate)[:, None].repeat(channels, 1)
    else:
        x = (rng.random((n, channels)) < 0.001).astype(np.float64)
    x = (level * x).astype(np.float32)
    if channels == 1:
        x = x[:, 0]  # mono as (N,): an (N, 1) array of N <= 8 samples has no clear layout
    elif n <= 8:  # (n, channels) with both at most 8: channels first or last? refused, never guessed
        with pytest.raises(AudioError, match="ambiguous"):
            astsep.separate(x, rate, guide=guide)
        return
    res = astsep.separate(x, rate, guide=guide)
    out = tmp_path_factory.mktemp("prop")
    res.write(out)
    m = json.loads((out / "events.json").read_text())
    total = sum(sf.read(out / f, dtype="float64")[0] for f in m["files"])
    ref = res.audio.double().numpy()
    assert total.shape == ref.shape
    np.testing.assert_allclose(total, ref, atol=1e-5 * max(1.0, level), rtol=0)
