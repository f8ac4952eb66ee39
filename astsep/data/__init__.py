"""Training data: clip lists (AudioCaps or ``path, caption`` CSVs), on-the-fly mixtures, DataModule."""

from .classsplit import ClassSplitDataModule, ClassSplitMixtures, split_sounds
from .audiocaps import AudioCapsDataModule, Clip, MixtureDataset, mix_at_snr, read_clip_csv, segment_is_silent

__all__ = ["AudioCapsDataModule", "ClassSplitDataModule", "ClassSplitMixtures", "split_sounds", "Clip", "MixtureDataset", "mix_at_snr", "read_clip_csv", "segment_is_silent"]
