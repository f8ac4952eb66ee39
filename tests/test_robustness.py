"""Bad and odd audio: every case is either processed correctly or refused with an AudioError (one
clear line from the CLI), never a crash, a hang or a half-written output folder.

Most cases go through ``astsep.separate(path, guide=...)`` in-process with a tiny AST; a few
representative ones run ``infer.py`` as a user does.
"""

from __future__ import annotations

import io
import json
import math
import struct

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

import astsep
from astsep.audio import load_audio, resample_blocks
from astsep.errors import AudioError
from astsep.guide import ASTGuide
from astsep.testing import tiny_ast

from conftest import written_sum
from infer_run import infer, one_error_line

RNG = np.random.default_rng(1234)


@pytest.fixture(scope="module")
def guide():
    return ASTGuide(tiny_ast(seed=0))


def _encoded(x: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _noise(seconds: float, sr: int = 16000, channels: int = 1) -> np.ndarray:
    x = 0.1 * RNG.standard_normal((int(seconds * sr), channels)).astype(np.float32)
    return x[:, 0] if channels == 1 else x


def make_bad(case: str, d) -> str:
    """Files that must be refused with an AudioError."""
    p = d / "in.wav"
    if case == "missing":
        return str(d / "nope.wav")
    if case == "directory":
        (d / "adir").mkdir()
        return str(d / "adir")
    if case == "zero_bytes":
        p.write_bytes(b"")
    elif case == "random_bytes_wav":
        p.write_bytes(RNG.bytes(8192))
    elif case == "text_file":
        p = d / "notes.txt"
        p.write_text("not audio at all\n" * 100)
    elif case == "truncated_flac":
        p = d / "in.flac"
        data = _encoded(_noise(2.0), 16000, "FLAC", "PCM_16")
        p.write_bytes(data[: len(data) // 2])
    elif case == "truncated_ogg_header":
        p = d / "in.ogg"
        data = _encoded(_noise(2.0), 16000, "OGG", "VORBIS")
        p.write_bytes(data[: len(data) // 20])
    elif case == "wav_header_only":
        p.write_bytes(_encoded(np.zeros(0, np.float32), 16000, "WAV", "PCM_16"))
    elif case in ("nan", "pos_inf", "neg_inf"):
        x = _noise(1.0)
        x[4000] = {"nan": np.nan, "pos_inf": np.inf, "neg_inf": -np.inf}[case]
        sf.write(p, x, 16000, subtype="FLOAT")
    elif case == "nan_in_one_channel_of_six":
        x = _noise(1.0, 48000, 6)
        x[30000, 4] = np.nan
        sf.write(p, x, 48000, subtype="FLOAT")
    else:
        raise ValueError(case)
    return str(p)


BAD = ["missing", "directory", "zero_bytes", "random_bytes_wav", "text_file", "truncated_flac",
       "truncated_ogg_header", "wav_header_only", "nan", "pos_inf", "neg_inf", "nan_in_one_channel_of_six"]


@pytest.mark.parametrize("case", BAD)
def test_bad_audio_is_refused_with_an_audio_error(tmp_path, guide, case):
    path = make_bad(case, tmp_path)
    forwards = guide.forwards  # the guide is shared by the module's tests
    with pytest.raises(AudioError) as exc:
        astsep.separate(path, guide=guide)
    msg = str(exc.value)
    assert msg and "\n" not in msg and len(msg) < 400
    assert guide.forwards == forwards  # refused before any model work


def make_good(case: str, d) -> tuple[str, int]:
    """Odd but valid files, and the number of 16 kHz samples they must give."""
    p = d / "in.wav"
    sr, sub, x = 16000, "PCM_16", None
    if case == "one_sample":
        x, sub = np.array([0.5], np.float32), "FLOAT"
    elif case == "ten_ms":
        x = _noise(0.01)
    elif case == "silence":
        x = np.zeros(32000, np.float32)
    elif case == "dc":
        x = np.full(32000, 0.5, np.float32)
    elif case == "white_noise_full_scale":
        x, sub = RNG.uniform(-1, 1, 32000).astype(np.float32), "FLOAT"
    elif case == "clipped":
        x = np.clip(4 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000), -1, 1).astype(np.float32)
    elif case.startswith("bits_"):
        sub = {"bits_8": "PCM_U8", "bits_16": "PCM_16", "bits_24": "PCM_24", "bits_32f": "FLOAT"}[case]
        x = _noise(1.0)
    elif case.startswith("rate_"):
        sr = int(case.split("_")[1])
        x = _noise(1.5, sr)
    elif case.startswith("channels_"):
        x = _noise(1.5, 16000, int(case.split("_")[1]))
    elif case == "six_channels_96k_24bit_flac":
        p, sr, sub = d / "in.flac", 96000, "PCM_24"
        x = _noise(1.2, sr, 6)
    elif case == "truncated_wav":
        data = _encoded(_noise(2.0), 16000, "WAV", "PCM_16")
        p.write_bytes(data[: len(data) // 2 + 1])  # odd length: half a sample at the end
        return str(p), (len(data) // 2 + 1 - 44) // 2
    elif case == "wav_header_claims_more":
        data = bytearray(_encoded(_noise(1.0), 16000, "WAV", "PCM_16"))
        i = data.index(b"data")
        struct.pack_into("<I", data, i + 4, 10 ** 9)  # ten times the samples the file holds
        p.write_bytes(bytes(data))
        return str(p), 16000
    elif case == "truncated_ogg":
        p = d / "in.ogg"
        data = _encoded(_noise(3.0), 16000, "OGG", "VORBIS")
        p.write_bytes(data[: int(len(data) * 0.7)])
        return str(p), -1  # whatever pages survived
    else:
        raise ValueError(case)
    sf.write(p, x, sr, subtype=sub)
    return str(p), math.ceil(x.shape[0] * 16000 / sr)


GOOD = ["one_sample", "ten_ms", "silence", "dc", "white_noise_full_scale", "clipped", "bits_8", "bits_16",
        "bits_24", "bits_32f", "rate_8000", "rate_22050", "rate_44100", "rate_48000", "rate_96000", "channels_1",
        "channels_2", "channels_6", "six_channels_96k_24bit_flac", "truncated_wav", "wav_header_claims_more",
        "truncated_ogg"]


@pytest.mark.parametrize("case", GOOD)
def test_odd_audio_is_separated_into_files_that_add_up_to_the_input(tmp_path, guide, case):
    path, expected = make_good(case, tmp_path)
    res = astsep.separate(path, guide=guide)
    if expected >= 0:
        assert res.num_samples == expected
    assert res.num_samples > 0
    srcs = res.sources
    assert list(srcs)[-1] == res.tracks[-1].filename[:-4]
    for s in srcs.values():
        assert s.shape == (res.num_samples,) and bool(torch.isfinite(s).all())
    torch.testing.assert_close(written_sum(res, tmp_path / "out"), res.audio.double(), atol=1e-5, rtol=0)
    assert all(math.isfinite(e["energy_share"]) for e in res.events)
    json.dumps(res.manifest(), allow_nan=False)  # events.json can always be written
    if case in ("silence",):
        assert res.labels == [] and res.stats["silent"] is True


def test_block_wise_decoding_equals_whole_file_decoding(tmp_path):
    """Block-wise decode + downmix + streaming resample gives what a whole-file resample gives."""
    for sr, channels, seconds in ((48000, 6, 20.3), (44100, 2, 17.0), (8000, 1, 9.1), (96000, 1, 8.5)):
        x = _noise(seconds, sr, channels)
        p = tmp_path / f"x{sr}.wav"
        sf.write(p, x, sr, subtype="FLOAT")
        y, info = load_audio(p)
        mono = torch.from_numpy(x.mean(axis=1) if channels > 1 else x)
        ref = AF.resample(mono, sr, 16000)
        assert info.frames == x.shape[0] and info.channels == channels
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, atol=2e-6, rtol=0)


def test_streaming_resampler_matches_torchaudio_for_any_block_size():
    x = torch.randn(50001)
    for sr in (8000, 22050, 44100, 48000):
        ref = AF.resample(x, sr, 16000)
        for step in (1, 999, 4096, 50001):
            if step == 1 and sr != 48000:
                continue
            y = resample_blocks((x[i:i + step] for i in range(0, x.numel(), step)), sr)
            assert y.shape == ref.shape
            torch.testing.assert_close(y, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("case", ["truncated_flac", "nan_in_one_channel_of_six", "random_bytes_wav"])
def test_cli_refuses_bad_audio_in_one_line_and_writes_nothing(tmp_path, tiny_model_dir, case):
    path = make_bad(case, tmp_path)
    out = tmp_path / "out"
    proc = infer("-i", path, "-o", str(out), "-m", str(tiny_model_dir))
    assert proc.returncode == 2
    assert one_error_line(proc).startswith("astsep: error:")
    assert not out.exists() or not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_cli_processes_odd_files_in_one_run(tmp_path, tiny_model_dir):
    paths = [make_good(c, tmp_path / c)[0] for c in ("one_sample", "wav_header_claims_more",
                                                     "six_channels_96k_24bit_flac")
             if (tmp_path / c).mkdir() is None]
    out = tmp_path / "out"
    proc = infer("-i", *paths, "-o", str(out), "-m", str(tiny_model_dir), "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""
    subs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(subs) == 3
    for sub in subs:
        m = json.loads((out / sub / "events.json").read_text())
        total = sum(sf.read(out / sub / f, dtype="float64")[0] for f in m["files"] if f.endswith(".wav"))
        assert np.all(np.isfinite(total)) and total.shape[0] >= 1


def test_an_odd_sample_rate_is_resampled_as_the_nearest_rate_with_a_small_ratio():
    """44101 Hz would need a 44,101-phase kernel (~50 s per second of audio); it is read as 44100 Hz
    instead (23 ppm), so a tone keeps its pitch within 0.02 % and the length follows the rate."""
    from astsep.audio import effective_rate

    assert effective_rate(44100) == 44100 and effective_rate(22050) == 22050 and effective_rate(8000) == 8000
    assert effective_rate(44101) == 44100
    assert effective_rate(16001) == 16000
    sr, f0 = 44101, 1000.0
    t = torch.arange(sr * 2) / sr
    y = resample_blocks([torch.sin(2 * torch.pi * f0 * t).float()], sr)
    assert abs(y.numel() - 32000) <= 2
    spec = torch.fft.rfft(y * torch.hann_window(y.numel()))
    peak_hz = float(spec.abs().argmax()) * 16000 / y.numel()
    assert abs(peak_hz - f0) <= 0.5 + f0 * 2e-4
    y16 = resample_blocks([torch.ones(16001)], 16001)  # within 0.02 % of 16 kHz: taken as it is
    assert y16.numel() == 16001
