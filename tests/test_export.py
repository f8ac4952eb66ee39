"""Output files at the input's rate, in a chosen sample format, cropped to their sounds (issue 19 item 12)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from astsep.errors import ConfigError
from astsep.export import ExportOptions, export_tracks, read_mono_at, rename_in_events
from conftest import mixture


@pytest.fixture(scope="module")
def stereo_44k(shared, tmp_path_factory):
    """A real 44.1 kHz stereo file: siren + dog, the two channels at different gains, plus content above 8 kHz."""
    from torchaudio.functional import resample

    x = resample(mixture("siren", "dog", seconds=4.0), 16000, 44100)
    t = torch.arange(x.numel()) / 44100
    x = x + 0.01 * torch.sin(2 * torch.pi * 12000 * t)  # a 12 kHz tone the 16 kHz analysis never sees
    stereo = torch.stack([0.9 * x, 0.5 * x], dim=1).numpy()
    path = tmp_path_factory.mktemp("in") / "rec44k.wav"
    sf.write(path, stereo, 44100, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def result(stereo_44k, tiny_model):
    import astsep
    from astsep.config import load_config
    from astsep.guide import ASTGuide

    cfg = load_config(None)
    cfg.guide.device = "cpu"
    return astsep.separate(stereo_44k, guide=ASTGuide(tiny_model, cfg.guide), config=cfg)


def test_default_options_write_the_16k_float_files_as_analysed(result):
    exp = export_tracks(result, ExportOptions())
    tracks = list(exp.tracks())
    assert [t.filename for t in tracks] == [tr.filename for tr in result.tracks]
    assert all(t.sample_rate == 16000 and t.samples.size == result.num_samples for t in tracks)
    total = sum(t.samples.astype(np.float64) for t in tracks)
    assert np.max(np.abs(total - result.audio.double().numpy())) < 1e-5
    assert exp.renamed == {}


def test_at_the_input_rate_the_files_add_up_to_the_full_band_mono_input(result, stereo_44k):
    ref, rate = read_mono_at(stereo_44k, "input")
    assert rate == 44100
    tracks = list(export_tracks(result, ExportOptions(sample_rate="input"), ref, rate).tracks())
    assert all(t.sample_rate == 44100 and t.samples.size == ref.numel() for t in tracks)
    total = sum(t.samples.astype(np.float64) for t in tracks)
    err = np.sum((total - ref.double().numpy()) ** 2) / np.sum(ref.double().numpy() ** 2)
    assert 10 * np.log10(1 / err) > 60
    # the 12 kHz tone is above what the analysis saw: it stays in the residual, not in a source
    residual = next(t for t in tracks if t.filename.endswith("residual.wav")).samples
    spec = np.abs(np.fft.rfft(residual))
    freqs = np.fft.rfftfreq(residual.size, 1 / 44100)
    assert spec[np.argmin(np.abs(freqs - 12000))] > 100 * np.median(spec[(freqs > 9000) & (freqs < 15000)])


def test_integer_formats_clip_and_count_and_flac_renames_the_files_in_the_events(result):
    loud = ExportOptions(format="wav16")
    assert all(np.max(np.abs(t.samples)) <= 1.0 for t in export_tracks(result, loud).tracks())
    flac = export_tracks(result, ExportOptions(format="flac"))
    names = [t.filename for t in flac.tracks()]
    assert all(n.endswith(".flac") for n in names)
    events = rename_in_events(result.events, flac)
    assert {e["file"] for e in events if e.get("file")} <= set(names)


def test_an_integer_format_reports_the_samples_it_clipped():
    from astsep.pipeline import Track

    class Loud:  # a result whose one source peaks at 2.0 (a source can exceed the mixture's peak)
        audio = torch.zeros(1600)
        num_samples = 1600
        events: list = []
        tracks = [Track(0, "Siren", 396, "source", [(0, torch.full((1600,), 2.0))]),
                  Track(1, "residual", -1, "residual")]
        residual = -torch.full((1600,), 2.0)

    exp = export_tracks(Loud(), ExportOptions(format="wav24"))
    assert [t.clipped for t in exp.tracks()] == [1600, 1600]
    assert exp.manifest_entry()["clipped_samples"] == {
        "00_Siren.wav": 1600, "01_residual.wav": 1600}


def test_cropped_sources_keep_their_offsets_and_still_add_up_placed_there(result):
    events = [{"file": result.tracks[0].filename, "start_sec": 1.0, "end_sec": 2.0}]
    result_events, result.events = result.events, events
    try:
        exp = export_tracks(result, ExportOptions(crop=True, crop_margin_sec=0.25))
    finally:
        result.events = result_events
    tracks = list(exp.tracks())
    first = tracks[0]
    assert first.offset_sec == pytest.approx(0.75)
    assert first.samples.size == int(1.5 * 16000)
    total = np.zeros(result.num_samples)
    for t in tracks:
        start = round(t.offset_sec * t.sample_rate)
        total[start:start + t.samples.size] += t.samples
    # what the source held outside its span went to the residual: the files add up everywhere
    assert np.max(np.abs(total - result.audio.double().numpy())) < 1e-5
    assert tracks[-1].samples.size == result.num_samples  # the residual is never cropped
    assert rename_in_events(events, exp)[0]["file_offset_sec"] == pytest.approx(0.75)


def test_bad_options_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="output format must be one of float, wav16, wav24, flac"):
        ExportOptions(format="mp3")
    with pytest.raises(ConfigError, match="output sample rate must be 'input' or an integer"):
        ExportOptions(sample_rate=50)
    with pytest.raises(ConfigError, match="--sample-rate takes 'input' or a rate in Hz"):
        ExportOptions.parse_rate("fast")
    assert ExportOptions.parse_rate("INPUT") == "input" and ExportOptions.parse_rate("48000") == 48000


def test_written_at_the_input_rate_as_cropped_flac_the_files_add_up_and_events_json_says_how(result, tmp_path):
    import json

    out = tmp_path / "out"
    result.write(out, options=ExportOptions(sample_rate="input", format="flac", crop=True))
    manifest = json.loads((out / "events.json").read_text())
    assert manifest["output"]["sample_rate"] == 44100 and manifest["output"]["format"] == "flac"
    assert all(name.endswith(".flac") for name in manifest["files"])
    offsets = manifest["output"]["offsets_sec"]
    total = None
    for name in manifest["files"]:
        x, sr = sf.read(out / name, dtype="float64")
        assert sr == 44100 and sf.info(out / name).subtype == "PCM_24"
        if total is None:
            total = np.zeros(round(result.num_samples / 16000 * 44100) + 44100)
        start = round(offsets.get(name, 0.0) * sr)
        total[start:start + x.size] += x
    ref, _ = read_mono_at(result.input, "input")
    ref = ref.double().numpy()
    err = np.sum((total[:ref.size] - ref) ** 2) / np.sum(ref ** 2)
    assert 10 * np.log10(1 / err) > 40  # 24-bit quantisation of each file, no more
    for ev in manifest["events"]:
        if ev.get("file") and ev["file"] in offsets and offsets[ev["file"]]:
            assert ev["file_offset_sec"] == offsets[ev["file"]]


def test_writing_at_another_rate_needs_the_input_file(tiny_model):
    import astsep
    from astsep.config import load_config
    from astsep.guide import ASTGuide

    cfg = load_config(None)
    cfg.guide.device = "cpu"
    res = astsep.separate(mixture("siren", seconds=1.0).numpy(), 16000, guide=ASTGuide(tiny_model, cfg.guide),
                          config=cfg)
    with pytest.raises(ConfigError, match="needs the input file"):
        res.write("/nonexistent/never", options=ExportOptions(sample_rate=48000))


def test_infer_writes_at_the_input_rate_in_wav24_with_cropped_sources(stereo_44k, tiny_model_dir, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(root / "infer.py"), "-i", str(stereo_44k), "-o", str(out), "-m",
                           str(tiny_model_dir), "--sample-rate", "input", "--format", "wav24", "--crop", "-q"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "events.json").read_text())
    assert manifest["output"]["sample_rate"] == 44100 and manifest["output"]["format"] == "wav24"
    for name in manifest["files"]:
        info = sf.info(out / name)
        assert info.samplerate == 44100 and info.subtype == "PCM_24" and info.channels == 1
    residual = next(n for n in manifest["files"] if n.endswith("residual.wav"))
    assert sf.info(out / residual).frames == sf.info(stereo_44k).frames
