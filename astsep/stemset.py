"""``python -m astsep.stemset OUT``: a small MUSDB18-HQ-layout set with known stems, built here.

MUSDB18 cannot be downloaded on the development machine, so this writes ``OUT/test/<track>/``
with ``mixture.wav`` and the four stems from real and rendered audio:

- ``bass``: a bass line (General MIDI *Electric Bass (finger)*) and ``drums``: a kick / snare /
  hi-hat pattern (GM percussion channel), both written as MIDI with ``mido`` and rendered by
  FluidSynth with the FluidR3 General MIDI SoundFont (Debian: ``fluidsynth fluid-soundfont-gm``);
- ``vocals``: a LibriSpeech utterance from ``../shared/data/librosa`` (read speech, not singing);
- ``other``: a music recording from the same folder (string orchestra, ragtime piano, orchestral).

Stems are set to fixed RMS levels, written as 16-bit PCM (as MUSDB18-HQ), and the mixture is their
sum. The tempo and key change per track; everything is deterministic.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import AstsepError, ConfigError

log = logging.getLogger(__name__)

SOUNDFONTS = (Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"), Path("/usr/share/sounds/sf2/default-GM.sf2"))
VOCALS = ("198-209-0000.ogg", "3436-172162-0000.ogg", "5703-47212-0000.ogg")
OTHER = ("Hungarian_Dance_number_5_-_Allegro_in_F_sharp_minor_(string_orchestra).ogg",
         "442789__lena-orsa__happy-music-pistachio-ice-cream-ragtime.ogg",
         "Kevin_MacLeod_-_P_I_Tchaikovsky_Dance_of_the_Sugar_Plum_Fairy.ogg")
LEVELS_DBFS = {"vocals": -20.0, "drums": -22.0, "bass": -22.0, "other": -24.0}  # RMS of each stem
BASS_PROGRAM = 33  # GM "Electric Bass (finger)" (0-based program number)
KICK, SNARE, HIHAT = 36, 38, 42  # GM percussion keys
BASS_RIFF = (0, 0, 7, 5, 0, 0, 3, 5)  # semitones above the root, one per eighth note


def find_soundfont() -> Path | None:
    return next((p for p in SOUNDFONTS if p.is_file()), None)


def fluidsynth_available() -> bool:
    return shutil.which("fluidsynth") is not None and find_soundfont() is not None


def _midi(path: Path, seconds: float, bpm: float, notes) -> None:
    """Write a one-track MIDI file; ``notes``: ``(start_beat, beats, channel, key, velocity)``, program
    changes as ``(channel, program)`` first."""
    import mido

    tpb = 480
    mid = mido.MidiFile(ticks_per_beat=tpb)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm), time=0))
    events = []
    for start, beats, ch, key, vel in notes:
        events.append((int(start * tpb), 1, mido.Message("note_on", channel=ch, note=key, velocity=vel)))
        events.append((int((start + beats) * tpb), 0, mido.Message("note_off", channel=ch, note=key, velocity=0)))
    now = 0
    for tick, _, msg in sorted(events, key=lambda e: (e[0], e[1])):
        track.append(msg.copy(time=tick - now))
        now = tick
    mid.save(path)


def bass_midi(path: Path, seconds: float, bpm: float, root: int) -> None:
    import mido

    n = int(seconds * bpm / 60 * 2) + 1  # eighth notes
    notes = [(i / 2, 0.45, 0, root + BASS_RIFF[i % len(BASS_RIFF)], 100) for i in range(n)]
    _midi(path, seconds, bpm, notes)
    mid = mido.MidiFile(path)
    mid.tracks[0].insert(0, mido.Message("program_change", channel=0, program=BASS_PROGRAM, time=0))
    mid.save(path)


def drums_midi(path: Path, seconds: float, bpm: float) -> None:
    n = int(seconds * bpm / 60 * 2) + 1
    notes = []
    for i in range(n):
        beat = i / 2
        notes.append((beat, 0.25, 9, HIHAT, 70))
        if i % 4 == 0:
            notes.append((beat, 0.25, 9, KICK, 115))
        if i % 4 == 2:
            notes.append((beat, 0.25, 9, SNARE, 105))
    _midi(path, seconds, bpm, notes)


def render(midi: Path, rate: int, seconds: float) -> np.ndarray:
    """FluidSynth render ``(N, 2)`` float64 of ``midi``, cut or padded to ``seconds``."""
    import soundfile as sf

    sf2 = find_soundfont()
    if shutil.which("fluidsynth") is None or sf2 is None:
        raise ConfigError("FluidSynth and a General MIDI SoundFont are needed (Debian: apt-get install fluidsynth "
                          "fluid-soundfont-gm)")
    wav = midi.with_suffix(".wav")
    cmd = ["fluidsynth", "-ni", "-q", "-g", "0.6", "-r", str(rate), "-F", str(wav), str(sf2), str(midi)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not wav.is_file():
        raise ConfigError(f"FluidSynth failed on {midi.name}: {(proc.stderr or proc.stdout).strip()[:200]}")
    x, r = sf.read(str(wav), dtype="float64", always_2d=True)
    n = int(seconds * rate)
    return _fit(x if x.shape[1] == 2 else np.repeat(x[:, :1], 2, axis=1), n)


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if x.shape[0] >= n else np.pad(x, ((0, n - x.shape[0]), (0, 0)))


def read_clip(path: Path, rate: int, seconds: float, offset: float = 0.0) -> np.ndarray:
    """``seconds`` of a shared clip from ``offset``, resampled to ``rate``, as stereo ``(N, 2)``."""
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    x, r = sf.read(str(path), dtype="float32", always_2d=True)
    x = x.mean(axis=1)[int(offset * r):]
    if x.shape[0] < seconds * r:
        raise ConfigError(f"{path.name} holds less than {offset + seconds:g} s; use shorter tracks (--seconds)")
    y = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), r, rate).double().numpy()
    return np.repeat(_fit(y[:, None], int(seconds * rate)), 2, axis=1)


def _at_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x ** 2)))
    if rms == 0:
        raise ConfigError("a stem came out silent")
    return x * (10 ** (dbfs / 20) / rms)


def make_stemset(out_dir: str | Path, n_tracks: int = 2, seconds: float = 6.0, rate: int = 44100,
                 subset: str = "test", *, data: str | Path) -> list[Path]:
    """Write ``n_tracks`` (at most 3) tracks of ``seconds`` to ``out_dir/subset/``; returns their folders.
    ``data``: the shared recordings (its ``librosa`` folder gives the vocals and other stems)."""
    import soundfile as sf

    if not 1 <= n_tracks <= len(VOCALS):
        raise ConfigError(f"n_tracks must be 1..{len(VOCALS)}, not {n_tracks}")
    lib = Path(data) / "librosa"
    folders = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_tracks):
            bpm, root = 100 + 15 * i, 28 + 3 * i  # E1, G1, A#1
            bass_midi(Path(tmp) / f"bass{i}.mid", seconds + 1, bpm, root)
            drums_midi(Path(tmp) / f"drums{i}.mid", seconds + 1, bpm)
            stems = {
                "vocals": read_clip(lib / VOCALS[i], rate, seconds, offset=0.2),
                "drums": render(Path(tmp) / f"drums{i}.mid", rate, seconds),
                "bass": render(Path(tmp) / f"bass{i}.mid", rate, seconds),
                "other": read_clip(lib / OTHER[i], rate, seconds, offset=1.0),
            }
            stems = {k: _at_level(v, LEVELS_DBFS[k]) for k, v in stems.items()}
            # 16-bit PCM as MUSDB18-HQ, and the mixture the exact sum of the stems as written
            peak = float(np.abs(sum(stems.values())).max())
            scale = 32767 * min(1.0, 0.9 / peak)
            q = {k: np.round(v * scale).astype(np.int32) for k, v in stems.items()}
            q["mixture"] = sum(q.values())
            folder = Path(out_dir) / subset / f"{i:02d} - astsep synthetic {bpm} bpm"
            folder.mkdir(parents=True, exist_ok=True)
            for name, x in q.items():
                pcm = np.clip(x, -32768, 32767).astype(np.int16)
                sf.write(str(folder / f"{name}.wav"), pcm, rate, subtype="PCM_16")
            folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m astsep.stemset", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (MUSDB18-HQ layout)")
    p.add_argument("--tracks", type=int, default=3, help="number of tracks (1-3)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each track (at most 13.5)")
    p.add_argument("--rate", type=int, default=44100)
    p.add_argument("--data", default="../shared/data", metavar="DIR",
                   help="the shared recordings (default ../shared/data, from the working directory)")
    args = p.parse_args(argv)
    try:
        folders = make_stemset(args.out, args.tracks, args.seconds, args.rate, data=args.data)
    except AstsepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for f in folders:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
