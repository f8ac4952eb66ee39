"""Training data: clip lists (AudioCaps or ``path, caption`` CSVs), on-the-fly mixtures, DataModule."""

from .audiocaps import AudioCapsDataModule, Clip, MixtureDataset, mix_at_snr, read_clip_csv, segment_is_silent

__all__ = ["AudioCapsDataModule", "Clip", "MixtureDataset", "mix_at_snr", "read_clip_csv", "segment_is_silent"]
