"""AudioCaps-style clip lists, mixtures made on the fly, and the Lightning DataModule.

Clip lists come from a CSV in one of two layouts:

- AudioCaps: ``audiocap_id, youtube_id, start_time, caption``; the clip is looked up in
  ``audio_dir`` as ``<audiocap_id>.<ext>``, ``<youtube_id>_<start_time>.<ext>`` (optionally with
  AudioSet's ``Y`` prefix), or any file whose name starts with ``<youtube_id>``;
- plain: ``path`` (or ``file``) and ``caption``; relative paths are resolved against ``audio_dir``
  when given, else against the CSV's folder (so ``esc50_one_per_class/manifest.csv`` works as is).

Clips that are missing, unreadable or shorter than ``min_seconds`` are skipped when the list is
read; segments that are silent or fail to decode are skipped when drawn (another one is drawn).
Every skip is counted by reason and logged, never raised.

A mixture (AudioSep's recipe) is a target segment plus a segment of a *different* clip, the
interferer rescaled to the target's energy (0 dB SNR, or a random SNR from ``snr_db``), then a
random overall gain from ``gain_db``; when the mixture would clip, both are scaled to a 0.9 peak.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset

from ..audio import AUDIO_SUFFIXES, dbfs, to_mono_16k
from ..config import SAMPLE_RATE
from ..errors import ConfigError
from ..query import EmbeddingTable

try:  # the DataModule is Lightning's; the datasets are plain torch
    import lightning.pytorch as pl
    _DataModuleBase = pl.LightningDataModule
except ImportError:  # pragma: no cover - lightning is a dependency
    _DataModuleBase = object

log = logging.getLogger(__name__)

__all__ = ["Clip", "read_clip_csv", "MixtureDataset", "AudioCapsDataModule", "mix_at_snr", "segment_is_silent"]

PEAK_LIMIT = 0.9  # AudioSep rescales a clipping mixture (and its target) to this peak


@dataclass(frozen=True)
class Clip:
    """One usable clip: where it is, what it is, and its native format."""

    path: str
    caption: str
    clip_id: str
    sample_rate: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / float(self.sample_rate)


def _index_audio_dir(audio_dir: Path) -> dict[str, Path]:
    """``{stem: path}`` of every audio file under ``audio_dir`` (recursive), plus YouTube-id keys."""
    index: dict[str, Path] = {}
    prefixes: dict[str, Path] = {}
    for root, _dirs, files in os.walk(audio_dir):
        for name in sorted(files):
            p = Path(root) / name
            if p.suffix.lower() not in AUDIO_SUFFIXES:
                continue
            stem = p.stem
            index.setdefault(stem, p)
            for key in (stem[:11], stem[1:12] if stem.startswith("Y") else None):  # YouTube ids are 11 chars
                if key:
                    prefixes.setdefault("yt:" + key, p)
    index.update(prefixes)
    return index


def _audiocaps_path(row: dict, index: dict[str, Path]) -> Path | None:
    acid = str(row.get("audiocap_id", "")).strip()
    ytid = str(row.get("youtube_id", "")).strip()
    start = str(row.get("start_time", "")).strip()
    for key in (acid, f"{ytid}_{start}", f"Y{ytid}_{start}", f"{ytid}_{start}.000", f"Y{ytid}_{start}.000", ytid, f"Y{ytid}"):
        if key and key in index:
            return index[key]
    return index.get("yt:" + ytid) if ytid else None



def read_csv_rows(csv_path: str | Path, what: str) -> tuple[Path, set[str], list[dict]]:
    """``(path, column names, rows)`` of a CSV; :class:`ConfigError` naming ``what`` when it is missing."""
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise ConfigError(f"{what} not found: {csv_path}")
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a BOM (Excel's UTF-8 export) is not part of the first column's name
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{what} {csv_path} is not UTF-8 text: line {line} holds the byte 0x{raw[exc.start]:02x}; "
                          f"save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return csv_path, set(reader.fieldnames or []), list(reader)

def read_clip_csv(csv_path: str | os.PathLike, audio_dir: str | os.PathLike | None = None,
                  min_seconds: float = 1.0, skipped: Counter | None = None) -> list[Clip]:
    """Read an AudioCaps or ``path, caption`` CSV into usable clips.

    Unusable rows are counted in ``skipped`` by reason (``missing``, ``unreadable``,
    ``too_short``, ``no_caption``) and logged; the function raises only when the CSV itself
    cannot be read or has neither layout.
    """
    skipped = Counter() if skipped is None else skipped
    csv_path, fields, rows = read_csv_rows(csv_path, "clip list")
    base = Path(audio_dir).expanduser() if audio_dir else csv_path.parent
    audiocaps = {"youtube_id", "caption"} <= fields
    path_col = "path" if "path" in fields else "file" if "file" in fields else None
    if not audiocaps and (path_col is None or "caption" not in fields):
        raise ConfigError(f"{csv_path} needs columns 'audiocap_id, youtube_id, start_time, caption' (AudioCaps) "
                          f"or 'path, caption'; it has {', '.join(sorted(fields)) or 'none'}")
    index = None
    if audiocaps and path_col is None:
        if not base.is_dir():
            raise ConfigError(f"audio_dir {base} is not a folder (AudioCaps CSVs need the folder of clips)")
        index = _index_audio_dir(base)
    clips: list[Clip] = []
    for n, row in enumerate(rows):
        caption = " ".join(str(row.get("caption") or "").split())
        if not caption:
            skipped["no_caption"] += 1
            continue
        if index is not None:
            path = _audiocaps_path(row, index)
            clip_id = str(row.get("audiocap_id") or row.get("youtube_id") or n)
            if path is None:
                skipped["missing"] += 1
                log.debug("no clip for AudioCaps row %s (%s)", clip_id, row.get("youtube_id"))
                continue
        else:
            raw = Path(str(row[path_col]).strip()).expanduser()
            path = raw if raw.is_absolute() else base / raw
            clip_id = raw.stem
            if not path.is_file():
                skipped["missing"] += 1
                log.debug("missing clip %s", path)
                continue
        try:
            info = sf.info(str(path))
        except Exception as exc:  # soundfile raises several types for foreign files
            skipped["unreadable"] += 1
            log.debug("unreadable clip %s: %s", path, exc)
            continue
        if info.samplerate <= 0 or info.frames / float(info.samplerate) < min_seconds:
            skipped["too_short"] += 1
            continue
        clips.append(Clip(str(path), caption, clip_id, int(info.samplerate), int(info.frames)))
    if skipped:
        log.warning("%s: %d usable clips; skipped %s", csv_path.name, len(clips),
                    ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
    else:
        log.info("%s: %d usable clips", csv_path.name, len(clips))
    return clips


def segment_is_silent(x: torch.Tensor, silence_dbfs: float) -> bool:
    """True when ``x`` (samples) is all zeros or its RMS level is below ``silence_dbfs`` (dB re 1.0)."""
    level = dbfs(x)
    return level == float("-inf") or level < silence_dbfs


def mix_at_snr(target: torch.Tensor, interferer: torch.Tensor, snr_db: float = 0.0, gain_db: float = 0.0,
               peak_limit: float = PEAK_LIMIT, eps: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mixture, target)`` of ``(..., N)`` signals: interferer at ``snr_db`` below the target's
    energy, overall gain ``gain_db``, both rescaled when the mixture's peak exceeds ``peak_limit``."""
    e_t = target.pow(2).sum(-1, keepdim=True)
    e_i = interferer.pow(2).sum(-1, keepdim=True)
    scaled = interferer * torch.sqrt(e_t / (e_i + eps)) * 10.0 ** (-snr_db / 20.0)
    g = 10.0 ** (gain_db / 20.0)
    mixture, target = (target + scaled) * g, target * g
    peak = mixture.abs().amax(-1, keepdim=True)
    scale = torch.where(peak > peak_limit, peak_limit / peak.clamp_min(eps), torch.ones_like(peak))
    return mixture * scale, target * scale


class ClipReader:
    """Reads segments of clips as 16 kHz mono tensors; optionally keeps whole clips in memory."""

    def __init__(self, cache: bool = False):
        self.cache = cache
        self._mem: dict[str, torch.Tensor] = {}

    def read(self, clip: Clip, start_sec: float, seconds: float) -> torch.Tensor:
        """Samples ``[start, start+seconds)`` at 16 kHz, shape ``(<= seconds*16000,)``; raises on decode errors."""
        if self.cache:
            whole = self._mem.get(clip.path)
            if whole is None:
                data, sr = sf.read(clip.path, dtype="float32", always_2d=True)
                whole = self._mem[clip.path] = to_mono_16k(data, sr)
            a = int(round(start_sec * SAMPLE_RATE))
            return whole[a:a + int(round(seconds * SAMPLE_RATE))]
        with sf.SoundFile(clip.path) as f:
            sr = f.samplerate
            f.seek(min(int(start_sec * sr), max(f.frames - 1, 0)))
            data = f.read(int(math.ceil(seconds * sr)), dtype="float32", always_2d=True)
        x = to_mono_16k(data, sr)
        return x[: int(round(seconds * SAMPLE_RATE))]


class MixtureDataset(Dataset):
    """Target + interferer mixtures made on the fly.

    Item ``i`` uses clip ``i % len(clips)`` as the target (re-drawn if unusable) and a random clip
    with another caption as the interferer. With ``fixed_seed`` every item is a pure function of
    ``(fixed_seed, i)``: fixed validation mixtures. Without it, items are random (seeded per
    DataLoader worker by torch).

    Item: ``mixture (N,)``, ``target (N,)``, ``query (D,)``, ``has_query ()``, ``negative (D,)``,
    ``has_negative ()``, ``caption`` str, ``negative_caption`` str, with ``N`` the segment length
    in samples.
    """

    def __init__(self, clips: list[Clip], length: int, segment_seconds: float = 5.0,
                 table: EmbeddingTable | None = None, query_dim: int = 512, negative_prob: float = 0.0,
                 snr_db: tuple[float, float] = (0.0, 0.0), gain_db: tuple[float, float] = (0.0, 0.0),
                 silence_dbfs: float = -60.0, fixed_seed: int | None = None, cache_audio: bool = False,
                 max_tries: int = 8):
        if len(clips) < 2:
            raise ConfigError(f"mixtures need at least 2 usable clips, got {len(clips)}")
        self.clips = clips
        self.length = int(length)
        self.segment_seconds = float(segment_seconds)
        self.n_samples = int(round(segment_seconds * SAMPLE_RATE))
        self.table = table
        self.query_dim = table.dim if table is not None else int(query_dim)
        self.negative_prob = float(negative_prob)
        self.snr_db = tuple(float(v) for v in snr_db)
        self.gain_db = tuple(float(v) for v in gain_db)
        self.silence_dbfs = float(silence_dbfs)
        self.fixed_seed = fixed_seed
        self.reader = ClipReader(cache_audio)
        self.max_tries = max_tries
        self.skipped: Counter = Counter()
        self._bad: set[str] = set()

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if self.fixed_seed is not None:
            return np.random.default_rng([int(self.fixed_seed), int(index)])
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()) ^ index)

    def _segment(self, clip: Clip, rng: np.random.Generator) -> torch.Tensor | None:
        """A random ``segment_seconds`` segment (zero-padded when the clip is shorter), or None."""
        if clip.path in self._bad:
            return None
        span = max(0.0, clip.seconds - self.segment_seconds)
        start = float(rng.uniform(0.0, span)) if span > 0 else 0.0
        try:
            x = self.reader.read(clip, start, self.segment_seconds)
        except Exception as exc:  # decode errors of a damaged file: skip the clip from now on
            self._bad.add(clip.path)
            self.skipped["unreadable"] += 1
            log.warning("skipping unreadable clip %s: %s", clip.path, str(exc).splitlines()[0] if str(exc) else exc)
            return None
        if not bool(torch.isfinite(x).all()):
            self._bad.add(clip.path)
            self.skipped["non_finite"] += 1
            log.warning("skipping clip with non-finite samples: %s", clip.path)
            return None
        if x.numel() < self.n_samples:
            x = torch.nn.functional.pad(x, (0, self.n_samples - x.numel()))
        if segment_is_silent(x, self.silence_dbfs):
            self.skipped["silent"] += 1
            log.debug("silent segment of %s at %.2f s", clip.path, start)
            return None
        return x

    def _draw(self, rng: np.random.Generator, first: int | None, avoid_caption: str | None) -> tuple[Clip, torch.Tensor]:
        n = len(self.clips)
        for attempt in range(self.max_tries * 4):
            if attempt == 0 and first is not None:
                k = first
            else:
                k = int(rng.integers(n))
            clip = self.clips[k]
            if avoid_caption is not None and clip.caption == avoid_caption and attempt < self.max_tries * 3:
                continue
            x = self._segment(clip, rng)
            if x is not None:
                return clip, x
        raise RuntimeError(f"no usable segment after {self.max_tries * 4} draws ({dict(self.skipped)}); "
                           "are the clips silent? lower silence_dbfs")

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        target_clip, target = self._draw(rng, index % len(self.clips), None)
        other_clip, interferer = self._draw(rng, None, target_clip.caption)
        snr = float(rng.uniform(*self.snr_db)) if self.snr_db[1] > self.snr_db[0] else self.snr_db[0]
        gain = float(rng.uniform(*self.gain_db)) if self.gain_db[1] > self.gain_db[0] else self.gain_db[0]
        mixture, target = mix_at_snr(target, interferer, snr, gain)
        D = self.query_dim
        query, negative = torch.zeros(D), torch.zeros(D)
        has_query = has_negative = False
        if self.table is not None:
            query, has_query = self.table.lookup(target_clip.caption), True
            use_neg = self.negative_prob > 0 and float(rng.uniform()) < self.negative_prob
            if use_neg and other_clip.caption in self.table:
                negative, has_negative = self.table.lookup(other_clip.caption), True
        return {
            "mixture": mixture.float(), "target": target.float(),
            "query": query, "has_query": torch.tensor(has_query), "negative": negative,
            "has_negative": torch.tensor(has_negative),
            "caption": target_clip.caption, "negative_caption": other_clip.caption,
        }


class MixtureDataModule(_DataModuleBase):
    """The loaders every mixture data module shares: ``train_dataset()``, ``val_dataset()`` and
    ``test_dataset()`` (the subclass's) behind Lightning's ``*_dataloader`` hooks; needs
    ``batch_size`` and ``num_workers`` attributes."""

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          drop_last=shuffle, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(), True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset(), False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset(), False)


class AudioCapsDataModule(MixtureDataModule):
    """Training and fixed validation mixtures from AudioCaps (or any ``path, caption``) CSVs.

    Args:
        train_csv: clip list for training (AudioCaps or ``path, caption`` layout).
        val_csv: clip list for validation; when absent, ``val_fraction`` of the training clips
            (a seeded, clip-disjoint split) is held out.
        val_split: ``"holdout"`` (above), or ``"train"``: fixed validation mixtures drawn from the
            training clips themselves (other crops and pairings). Only for smoke tests that check
            the model learns; it does not measure generalisation.
        max_train_clips: use at most this many training clips (seeded choice; overfitting checks).
        test_csv: clip list for ``test``/``predict`` (defaults to the validation clips).
        audio_dir: folder of the clips (AudioCaps) or base of relative paths (default: CSV's folder).
        embedding_table: ``python -m astsep.embed`` output; queries are the captions' embeddings.
            Without it ``query`` is zeros of ``query_dim`` and ``has_query`` is False.
        segment_seconds: mixture length (AudioSep: 5 s).
        min_seconds: shorter clips are skipped.
        snr_db, gain_db: ranges of the interferer's SNR and of the overall gain (dB, uniform).
        negative_prob: share of items that also carry the interferer's caption as a negative query.
        epoch_size: training mixtures per epoch (default: one per training clip).
        val_mixtures: number of fixed validation (and test) mixtures.
        silence_dbfs: segments quieter than this RMS are skipped.
        cache_audio: keep decoded clips in memory (small clip sets).
    Batches: ``mixture (B,N)``, ``target (B,N)``, ``query (B,D)``, ``has_query (B,)``,
    ``negative (B,D)``, ``has_negative (B,)``, ``caption`` / ``negative_caption`` lists.
    """

    def __init__(self, train_csv: str, val_csv: str | None = None, test_csv: str | None = None,
                 audio_dir: str | None = None, embedding_table: str | None = None, query_dim: int = 512,
                 segment_seconds: float = 5.0, min_seconds: float = 1.0,
                 snr_db: tuple[float, float] = (0.0, 0.0), gain_db: tuple[float, float] = (-10.0, 10.0),
                 negative_prob: float = 0.0, batch_size: int = 8, num_workers: int = 4,
                 epoch_size: int | None = None, val_fraction: float = 0.1, val_mixtures: int = 64,
                 val_split: str = "holdout", max_train_clips: int | None = None, silence_dbfs: float = -60.0, cache_audio: bool = False, seed: int = 1234):
        super().__init__()
        if _DataModuleBase is not object:
            self.save_hyperparameters()
        self.train_csv, self.val_csv, self.test_csv = train_csv, val_csv, test_csv
        self.audio_dir, self.embedding_table = audio_dir, embedding_table
        self.query_dim = query_dim
        self.segment_seconds, self.min_seconds = segment_seconds, min_seconds
        self.snr_db, self.gain_db = tuple(snr_db), tuple(gain_db)
        self.negative_prob = negative_prob
        self.batch_size, self.num_workers = batch_size, num_workers
        self.epoch_size, self.val_fraction, self.val_mixtures = epoch_size, val_fraction, val_mixtures
        self.silence_dbfs, self.cache_audio, self.seed = silence_dbfs, cache_audio, seed
        if val_split not in ("holdout", "train"):
            raise ConfigError(f"val_split must be 'holdout' or 'train', got {val_split!r}")
        self.val_split, self.max_train_clips = val_split, max_train_clips
        self.skipped: Counter = Counter()
        self.table: EmbeddingTable | None = None
        self.train_clips: list[Clip] = []
        self.val_clips: list[Clip] = []
        self.test_clips: list[Clip] = []
        self._ready = False

    def _read(self, path: str) -> list[Clip]:
        skipped: Counter = Counter()
        clips = read_clip_csv(path, self.audio_dir, self.min_seconds, skipped)
        self.skipped.update(skipped)
        if self.table is not None:
            kept = [c for c in clips if c.caption in self.table]
            if len(kept) < len(clips):
                self.skipped["no_embedding"] += len(clips) - len(kept)
                log.warning("%d clips skipped: caption not in the embedding table %s", len(clips) - len(kept),
                            self.embedding_table)
            clips = kept
        return clips

    def _limit(self, clips: list[Clip]) -> list[Clip]:
        if self.max_train_clips is None or len(clips) <= self.max_train_clips:
            return clips
        keep = np.random.default_rng(self.seed + 7).permutation(len(clips))[: self.max_train_clips]
        return [clips[i] for i in sorted(keep)]

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        if self.embedding_table:
            self.table = EmbeddingTable.load(self.embedding_table)
            self.query_dim = self.table.dim
        clips = self._read(self.train_csv)
        if self.val_split == "train":
            self.train_clips = self._limit(clips)
            self.val_clips = self._read(self.val_csv) if self.val_csv else self.train_clips
        elif self.val_csv:
            self.train_clips, self.val_clips = clips, self._read(self.val_csv)
        else:
            order = np.random.default_rng(self.seed).permutation(len(clips))
            n_val = max(2, int(round(self.val_fraction * len(clips))))
            if len(clips) - n_val < 2:
                raise ConfigError(f"{len(clips)} usable clips are too few to split off {n_val} for validation")
            self.val_clips = [clips[i] for i in sorted(order[:n_val])]
            self.train_clips = [clips[i] for i in sorted(order[n_val:])]
        self.train_clips = self._limit(self.train_clips)
        if len(self.train_clips) < 2:
            raise ConfigError(f"{len(self.train_clips)} usable training clips; mixtures need at least 2")
        self.test_clips = self._read(self.test_csv) if self.test_csv else self.val_clips
        log.info("clips: %d train, %d validation, %d test", len(self.train_clips), len(self.val_clips), len(self.test_clips))
        self._ready = True

    def _dataset(self, clips: list[Clip], length: int, fixed_seed: int | None) -> MixtureDataset:
        return MixtureDataset(clips, length, self.segment_seconds, self.table, self.query_dim, self.negative_prob,
                              self.snr_db, self.gain_db, self.silence_dbfs, fixed_seed, self.cache_audio)

    def train_dataset(self) -> MixtureDataset:
        self.setup()
        return self._dataset(self.train_clips, self.epoch_size or len(self.train_clips), None)

    def val_dataset(self) -> MixtureDataset:
        self.setup()
        return self._dataset(self.val_clips, self.val_mixtures, self.seed)

    def test_dataset(self) -> MixtureDataset:
        self.setup()
        return self._dataset(self.test_clips, self.val_mixtures, self.seed + 1)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def seed_worker_rng(seed: int) -> None:
    """Seed python/numpy/torch RNGs (for scripts that build datasets outside Lightning)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
