"""Mixtures split by sound class, with a seeded oracle-guide degradation per example.

The refiner is trained and measured where the guide's quality is known and controlled: the
baseline runs with the oracle guide (:mod:`astsep.oracle`) spoiled by a degradation drawn per
example, and the refiner learns to repair what the spoiled guide leaves. To measure whether it
does so on *sounds it has never heard*, the shared recordings (``../shared/data``) are split by
class, once, here (:data:`HELD_OUT`):

- **held out** (never in a training step, validation or model selection; only
  ``python -m astsep.evaluate`` and ``train.py test`` see them): 10 of the 50 ESC-50 classes, one of
  the three read-speech recordings, two of the eight music recordings;
- **training**: the other 40 ESC-50 classes, two speech recordings, six music recordings. Validation
  draws *other* mixtures (other crops, pairs, SNRs and degradations, fixed seeds) of these same
  training sounds; with one clip per ESC-50 class there is no third set of sounds to spare.

A mixture is ``target + interferer`` of two sounds of different classes: ESC-50 + ESC-50 (60 %),
speech + ESC-50 (20 %) or music + ESC-50 (20 %), in either order (either one is the target), random
crops (segments quieter than ``silence_dbfs`` are redrawn), the interferer at an SNR drawn from
``snr_db`` (−5 to +5 dB), an overall gain from ``gain_db``. Each example also draws the degradation
of its oracle guide (:class:`DegradationSampler`): some exact-oracle examples, else Gaussian blur of
0–2 patches, grid noise of 5–30 dB, a gamma, a floor, and a few uniformly random grids, with a seed
of its own. Everything about example ``i`` follows from ``(seed, i)``: the same index gives the same
mixture and degradation in every epoch and every process, which is what lets the baseline's masks be
cached (:class:`astsep.refiner.cache.BaselineCache`).

Batches: ``mixture``, ``target``, ``interferer`` ``(B, N)``; ``degradation`` (list of
``oracle:...`` specs, their seeds included); ``target_label``, ``interferer_label``, ``caption``,
``name`` (lists of str). No query: the refiner's query is made from what the baseline returns
(:class:`astsep.lit.RefinerModule`, ``query_source="pass"``), as at inference.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..audio import load_audio
from ..config import SAMPLE_RATE
from ..errors import ConfigError
from ..oracle import Degradation
from .audiocaps import MixtureDataModule, mix_at_snr
from .synthetic import synthetic_source

log = logging.getLogger(__name__)

__all__ = ["HELD_OUT", "Sound", "split_sounds", "DegradationSampler", "ClassSplitMixtures", "ClassSplitDataModule"]

SPEECH_LABEL = "Speech"
MUSIC_LABEL = "Music"
# the fixed split: what is held out (everything else of the three groups is training material)
HELD_OUT: dict[str, tuple[str, ...]] = {
    "esc50": ("cat", "chainsaw", "coughing", "crow", "door_wood_knock", "keyboard_typing", "laughing", "rain",
              "sea_waves", "siren"),
    "speech": ("5703-47212-0000",),
    "music": ("Vibe_Ace", "Hungarian_Dance"),
}
SPEECH_FILES = ("198-209-0000", "3436-172162-0000", "5703-47212-0000")
MUSIC_FILES = ("sweet-waltz", "ragtime", "Hungarian_Dance", "Lets_Go_Fishin", "Sugar_Plum", "Vibe_Ace",
               "Drum-bass", "solo-trumpet")


@dataclass
class Sound:
    """One recording of the split: its class key (ESC-50 class, speech or music file), group and
    AudioSet display name."""

    key: str
    group: str  # "esc50" | "speech" | "music"
    label: str  # AudioSet display name (what an oracle guide names it)
    path: Path
    audio: torch.Tensor | None = field(default=None, repr=False)  # (N,) 16 kHz, once loaded

    def load(self) -> torch.Tensor:
        if self.audio is None:
            self.audio = load_audio(self.path)[0]
        return self.audio


def split_sounds(shared_dir: str | Path, part: str, more: bool = False) -> list[Sound]:
    """The sounds of ``part`` (``"train"`` or ``"held_out"``) of the fixed class split, in a fixed order.

    ``more``: add the clips of ``esc50_more/`` (1 to 8 more takes of every ESC-50 class), each on the side
    of its class, so a held-out class stays held out in both folders (all takes of one recording share
    a class, so they share a side too)."""
    from ..devset import ESC50_TO_AUDIOSET

    if part not in ("train", "held_out"):
        raise ConfigError(f"split part must be 'train' or 'held_out', got {part!r}")
    root = Path(shared_dir)
    esc_dir, lib_dir = root / "esc50_one_per_class", root / "librosa"
    esc = sorted(esc_dir.glob("*.flac"))
    if len(esc) != 50 or not lib_dir.is_dir():
        raise ConfigError(f"the class split needs the 50 ESC-50 clips and the librosa recordings under {root}")
    sounds: list[Sound] = []
    for f in esc:
        cls = f.name.split("__")[0]
        sounds.append(Sound(cls, "esc50", ESC50_TO_AUDIOSET[cls], f))
    if more:
        more_dir = root / "esc50_more"
        extra = sorted(more_dir.glob("*.flac"))
        if not extra:
            raise ConfigError(f"esc50_more/ clips not found under {root}")
        for f in extra:
            cls = f.name.split("__")[0]
            if cls not in ESC50_TO_AUDIOSET:
                raise ConfigError(f"{f.name}: unknown ESC-50 class {cls!r}")
            sounds.append(Sound(cls, "esc50", ESC50_TO_AUDIOSET[cls], f))
    for group, names, label in (("speech", SPEECH_FILES, SPEECH_LABEL), ("music", MUSIC_FILES, MUSIC_LABEL)):
        for name in names:
            found = sorted(p for p in lib_dir.glob("*.ogg") if name in p.name)
            if len(found) != 1:
                raise ConfigError(f"{group} recording {name!r} not found (once) in {lib_dir}")
            sounds.append(Sound(name, group, label, found[0]))
    held = {(g, k) for g, keys in HELD_OUT.items() for k in keys}
    missing = held - {(s.group, s.key) for s in sounds}
    if missing:
        raise ConfigError(f"held-out sounds missing from {root}: {sorted(missing)}")
    return [s for s in sounds if ((s.group, s.key) in held) == (part == "held_out")]


@dataclass
class DegradationSampler:
    """Draws the oracle guide's degradation of one example (uniform ranges; probabilities per kind).

    ``exact_prob`` of the examples get the exact oracle, ``random_prob`` a uniformly random grid (so the
    refiner learns not to invent a source the guide did not point at); the rest a blur σ from
    ``blur``, grid noise from ``noise_db`` with ``noise_prob``, a gamma from ``gamma`` (log-uniform)
    with ``gamma_prob``, a floor from ``floor`` with ``floor_prob``.
    """

    exact_prob: float = 0.15
    random_prob: float = 0.05
    blur: tuple[float, float] = (0.0, 2.0)
    noise_db: tuple[float, float] = (5.0, 30.0)
    noise_prob: float = 0.8
    gamma: tuple[float, float] = (0.5, 2.0)
    gamma_prob: float = 0.3
    floor: tuple[float, float] = (0.0, 0.3)
    floor_prob: float = 0.2
    embed: str = "zeros"  # the oracle's embedding (Degradation.embed); "profile": a query that knows the sound

    def draw(self, rng: np.random.Generator) -> Degradation:
        seed = int(rng.integers(0, 2**31 - 1))
        u = float(rng.uniform())
        if u < self.exact_prob:
            return Degradation(seed=seed, embed=self.embed)
        if u < self.exact_prob + self.random_prob:
            return Degradation(random=True, seed=seed, embed=self.embed)
        d = Degradation(blur=round(float(rng.uniform(*self.blur)), 3), seed=seed, embed=self.embed)
        if rng.uniform() < self.noise_prob:
            d.noise_db = round(float(rng.uniform(*self.noise_db)), 2)
        if rng.uniform() < self.gamma_prob:
            d.gamma = round(float(math.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1])))), 3)
        if rng.uniform() < self.floor_prob:
            d.floor = round(float(rng.uniform(*self.floor)), 3)
        return d


def degradation_spec(d: Degradation) -> str:
    """``oracle:...`` spec of ``d`` with its seed, as :func:`astsep.oracle.parse_guide_spec` reads it."""
    text = d.describe()
    return "oracle:" + (text + "," if text else "") + f"seed={d.seed}"


class ClassSplitMixtures(Dataset):
    """``length`` seeded mixtures of ``sounds`` (see the module docstring); item ``i`` depends only on
    ``(seed, i)``."""

    def __init__(self, sounds: list[Sound], length: int, seed: int, segment_seconds: float = 3.0,
                 snr_db: tuple[float, float] = (-5.0, 5.0), gain_db: tuple[float, float] = (-6.0, 6.0),
                 degradations: DegradationSampler | None = None, silence_dbfs: float = -50.0,
                 pair_probs: tuple[float, float, float] = (0.6, 0.2, 0.2), synthetic_prob: float = 0.0):
        groups = {g: [s for s in sounds if s.group == g] for g in ("esc50", "speech", "music")}
        if len(groups["esc50"]) < 2:
            raise ConfigError("class-split mixtures need at least two ESC-50 classes")
        self.sounds, self.groups = sounds, groups
        self.length, self.seed = int(length), int(seed)
        self.n = int(round(segment_seconds * SAMPLE_RATE))
        self.snr_db, self.gain_db = tuple(snr_db), tuple(gain_db)
        self.degradations = degradations or DegradationSampler()
        self.silence_dbfs = silence_dbfs
        if not 0.0 <= synthetic_prob <= 1.0:
            raise ConfigError(f"synthetic_prob must be in [0, 1], got {synthetic_prob}")
        self.synthetic_prob = float(synthetic_prob)
        probs = [p if groups[g] else 0.0 for p, g in zip(pair_probs, ("esc50", "speech", "music"))]
        self.pair_probs = np.asarray(probs) / sum(probs)

    def __len__(self) -> int:
        return self.length

    def _crop(self, sound: Sound, rng: np.random.Generator) -> torch.Tensor:
        audio = sound.load()
        best, best_level = None, -math.inf
        for _ in range(8):  # redraw quiet crops (ESC-50 clips hold silence); keep the loudest seen
            start = int(rng.integers(0, max(1, audio.numel() - self.n + 1)))
            seg = audio[start:start + self.n]
            seg = torch.nn.functional.pad(seg, (0, self.n - seg.numel()))
            level = 10 * math.log10(float(seg.double().pow(2).mean()) + 1e-20)
            if level > best_level:
                best, best_level = seg, level
            if level >= self.silence_dbfs:
                break
        return best

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        kind = ("esc50", "speech", "music")[int(rng.choice(3, p=self.pair_probs))]
        esc = self.groups["esc50"]
        if kind == "esc50":
            i, j = rng.choice(len(esc), 2, replace=False)
            a, b = esc[int(i)], esc[int(j)]
            while a.key == b.key:  # two takes of one class (esc50_more): draw the interferer again
                b = esc[int(rng.integers(len(esc)))]
        else:
            pool = self.groups[kind]
            a, b = pool[int(rng.integers(len(pool)))], esc[int(rng.integers(len(esc)))]
        if rng.uniform() < 0.5:
            a, b = b, a  # either one is the target
        tgt, itf = self._crop(a, rng), self._crop(b, rng)
        a_key, a_label, b_key, b_label = a.key, a.label, b.key, b.label
        if self.synthetic_prob and rng.uniform() < self.synthetic_prob:
            # the target, the interferer or both (a third each) become synthetic sources (astsep.data.synthetic)
            side = int(rng.integers(3))
            if side in (0, 2):
                kind, tgt = synthetic_source(rng, self.n)
                a_key, a_label = f"synthetic_{kind}", f"synthetic {kind}"
            if side in (1, 2):
                kind, itf = synthetic_source(rng, self.n)
                b_key, b_label = f"synthetic_{kind}", f"synthetic {kind}" + (" 2" if f"synthetic {kind}" == a_label else "")
        snr = float(rng.uniform(*self.snr_db))
        gain = float(rng.uniform(*self.gain_db))
        mixture, target = mix_at_snr(tgt, itf, snr, gain)
        deg = self.degradations.draw(rng)
        return {"mixture": mixture.float(), "target": target.float(), "interferer": (mixture - target).float(),
                "degradation": degradation_spec(deg), "target_label": a_label, "interferer_label": b_label,
                "caption": f"the sound of {a_label}", "name": f"{index:05d}_{a_key}+{b_key}@{snr:+.1f}dB"}


class ClassSplitDataModule(MixtureDataModule):
    """Training, validation and held-out test mixtures of the fixed class split (module docstring).

    Args:
        shared_dir: the shared recordings (``../shared/data``, relative to the working directory).
        segment_seconds: mixture length.
        train_examples: size of the training pool: example ``i`` is the same in every epoch, so its
            baseline masks are computed once and then read from the cache.
        val_mixtures: fixed validation mixtures of the *training* sounds (model selection).
        test_mixtures: mixtures of the *held-out* sounds (``train.py test``).
        batch_size, num_workers: the loaders'.
        snr_db, gain_db: ranges (dB, uniform) of the interferer's SNR and the overall gain.
        degradation: :class:`DegradationSampler` fields (exact_prob, blur, noise_db, ...).
        silence_dbfs: crops quieter than this are redrawn (up to 8 times).
        synthetic_prob: share of the *training* mixtures in which the target, the interferer or both are
            synthetic sources (:mod:`astsep.data.synthetic`); validation and test mixtures stay real.
        seed: the base seed; training, validation and test use ``seed``, ``seed + 1``, ``seed + 2``.
    """

    def __init__(self, shared_dir: str = "../shared/data", segment_seconds: float = 3.0, train_examples: int = 1024,
                 val_mixtures: int = 48, test_mixtures: int = 48, batch_size: int = 8, num_workers: int = 0,
                 snr_db: tuple[float, float] = (-5.0, 5.0), gain_db: tuple[float, float] = (-6.0, 6.0),
                 degradation: dict | None = None, silence_dbfs: float = -50.0, synthetic_prob: float = 0.0,
                 seed: int = 1234):
        super().__init__()
        self.save_hyperparameters()
        self.shared_dir, self.segment_seconds = shared_dir, segment_seconds
        self.train_examples, self.val_mixtures, self.test_mixtures = train_examples, val_mixtures, test_mixtures
        self.batch_size, self.num_workers = batch_size, num_workers
        self.snr_db, self.gain_db, self.silence_dbfs, self.seed = tuple(snr_db), tuple(gain_db), silence_dbfs, seed
        self.synthetic_prob = synthetic_prob
        try:
            self.sampler = DegradationSampler(**(degradation or {}))
        except TypeError as exc:
            raise ConfigError(f"data.degradation: {exc}") from None
        self.train_sounds: list[Sound] = []
        self.held_out_sounds: list[Sound] = []

    def setup(self, stage: str | None = None) -> None:
        if not self.train_sounds:
            self.train_sounds = split_sounds(self.shared_dir, "train")
            self.held_out_sounds = split_sounds(self.shared_dir, "held_out")
            log.info("class split: %d training sounds, %d held out", len(self.train_sounds), len(self.held_out_sounds))

    def _dataset(self, part: str, length: int, seed: int, synthetic_prob: float = 0.0) -> ClassSplitMixtures:
        self.setup()
        sounds = self.train_sounds if part == "train" else self.held_out_sounds
        return ClassSplitMixtures(sounds, length, seed, self.segment_seconds, self.snr_db, self.gain_db, self.sampler,
                                  self.silence_dbfs, synthetic_prob=synthetic_prob)

    def train_dataset(self) -> ClassSplitMixtures:
        return self._dataset("train", self.train_examples, self.seed, self.synthetic_prob)

    def val_dataset(self) -> ClassSplitMixtures:
        return self._dataset("train", self.val_mixtures, self.seed + 1)

    def test_dataset(self) -> ClassSplitMixtures:
        return self._dataset("held_out", self.test_mixtures, self.seed + 2)


def class_split_dev(shared_dir: str | Path, part: str, n: int, seconds: float = 5.0, seed: int = 29,
                    snr_db: float = 0.0) -> list:
    """``n`` seeded 0 dB dev mixtures (:class:`astsep.devset.DevMixture`) of one side of the class split,
    both ESC-50 folders included (:func:`split_sounds` with ``more``): ``part="train"`` to tune on,
    ``part="held_out"`` to score on (no sound, class or recording of one side is on the other).

    ESC-50 + ESC-50 of two classes (60 %), speech + ESC-50 (20 %), music + ESC-50 (20 %), either one the
    target; a ``seconds`` crop of each (quiet crops redrawn), the interferer at ``snr_db``. Each carries the
    AudioSet labels that fit its target and interferer (:func:`astsep.devset.fitting_labels`)."""
    from ..devset import DevMixture, fitting_labels

    sounds = split_sounds(shared_dir, part, more=True)
    data = ClassSplitMixtures(sounds, n, seed + (0 if part == "train" else 1_000), segment_seconds=seconds,
                              snr_db=(snr_db, snr_db), gain_db=(0.0, 0.0))
    groups = {s.key: s.group for s in sounds}
    out = []
    for i in range(n):
        ex = data[i]
        a_key, b_key = ex["name"].split("_", 1)[1].rsplit("@", 1)[0].split("+")
        kind = "esc50" if groups[a_key] == groups[b_key] == "esc50" else (
            groups[a_key] if groups[a_key] != "esc50" else groups[b_key])
        out.append(DevMixture(ex["name"], kind, snr_db, ex["mixture"], ex["target"], ex["interferer"],
                              ex["target_label"], ex["interferer_label"], fitting_labels(a_key, groups[a_key]),
                              fitting_labels(b_key, groups[b_key])))
    return out
