"""Clip lists, on-the-fly mixtures and the DataModule, on real shared clips."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from astsep.data import AudioCapsDataModule, MixtureDataset, mix_at_snr, read_clip_csv
from astsep.errors import ConfigError
from astsep.query import EmbeddingTable
from conftest import ESC, clip

NAMES = ["dog", "rain", "crow", "siren", "clapping", "engine"]


def _write_csv(path, rows, header=("path", "caption")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def clip_csv(tmp_path, shared):
    rows = [(str(next(ESC.glob(f"{n}__*.flac"))), f"the sound of {n}") for n in NAMES]
    return _write_csv(tmp_path / "clips.csv", rows)


def test_missing_unreadable_and_short_clips_are_skipped_and_counted(tmp_path, clip_csv, caplog):
    (tmp_path / "broken.wav").write_text("this is not audio")
    sf.write(tmp_path / "short.wav", np.zeros(1600, dtype=np.float32) + 0.1, 16000)  # 0.1 s
    rows = list(csv.reader(open(clip_csv)))[1:] + [
        ("gone.wav", "missing"), ("broken.wav", "broken"), ("short.wav", "short"), ("short.wav", "")]
    p = _write_csv(tmp_path / "mixed.csv", rows)
    skipped = __import__("collections").Counter()
    with caplog.at_level(logging.WARNING):
        clips = read_clip_csv(p, min_seconds=1.0, skipped=skipped)
    assert len(clips) == len(NAMES)
    assert skipped == {"missing": 1, "unreadable": 1, "too_short": 1, "no_caption": 1}
    assert "skipped" in caplog.text


def test_audiocaps_layout_finds_clips_by_audiocap_id_or_youtube_id(tmp_path, shared):
    d = tmp_path / "audio"
    d.mkdir()
    x = clip("dog", 2.0).numpy()
    sf.write(d / "91139.wav", x, 16000)
    sf.write(d / "Y--0w1YA1Hm4_30.000.flac", x, 16000)
    rows = [("91139", "r1AhAXvLwvs", "30", "a dog barks"), ("58146", "--0w1YA1Hm4", "30", "a dog again"),
            ("11111", "nonexistent", "0", "nothing")]
    p = _write_csv(tmp_path / "train.csv", rows, ("audiocap_id", "youtube_id", "start_time", "caption"))
    skipped = __import__("collections").Counter()
    clips = read_clip_csv(p, audio_dir=d, skipped=skipped)
    assert [c.path.rsplit("/", 1)[-1] for c in clips] == ["91139.wav", "Y--0w1YA1Hm4_30.000.flac"]
    assert skipped == {"missing": 1}


def test_mixing_sets_the_snr_and_keeps_the_peak_below_0_9(shared):
    s, n = clip("dog", 2.0), clip("rain", 2.0)
    for snr in (0.0, 5.0):
        x, t = mix_at_snr(s, n, snr_db=snr, gain_db=20.0)
        got = 10 * torch.log10(t.pow(2).sum() / (x - t).pow(2).sum())
        assert abs(float(got) - snr) < 1e-3
        assert float(x.abs().max()) <= 0.9 + 1e-6


def test_mixtures_pair_different_captions_and_validation_is_fixed(clip_csv):
    clips = read_clip_csv(clip_csv)
    val_a = MixtureDataset(clips, 6, segment_seconds=1.0, query_dim=8, fixed_seed=7)
    val_b = MixtureDataset(clips, 6, segment_seconds=1.0, query_dim=8, fixed_seed=7)
    for i in range(6):
        a, b = val_a[i], val_b[i]
        assert a["mixture"].shape == a["target"].shape == (16000,)
        assert a["caption"] != a["negative_caption"]
        torch.testing.assert_close(a["mixture"], b["mixture"])
        assert not bool(a["has_query"]) and a["query"].shape == (8,)
    train = MixtureDataset(clips, 6, segment_seconds=1.0, query_dim=8)
    assert not torch.equal(train[0]["mixture"], train[0]["mixture"])  # drawn afresh


def test_silent_clips_are_skipped_never_used_and_never_crash(tmp_path, clip_csv):
    sf.write(tmp_path / "silence.wav", np.zeros(48000, dtype=np.float32), 16000)
    rows = list(csv.reader(open(clip_csv)))[1:3] + [(str(tmp_path / "silence.wav"), "silence")]
    clips = read_clip_csv(_write_csv(tmp_path / "s.csv", rows))
    ds = MixtureDataset(clips, 9, segment_seconds=1.0, query_dim=4)
    items = [ds[i] for i in range(9)]  # index 2 asks for the silent clip as target
    assert all(it["caption"] != "silence" and it["negative_caption"] != "silence" for it in items)
    assert ds.skipped["silent"] >= 3


def test_datamodule_batches_carry_table_queries_and_negatives(tmp_path, clip_csv):
    captions = [f"the sound of {n}" for n in NAMES]
    table = EmbeddingTable(captions, torch.randn(len(captions), 12, generator=torch.Generator().manual_seed(0)), "test")
    table.save(tmp_path / "table.pt")
    dm = AudioCapsDataModule(str(clip_csv), embedding_table=str(tmp_path / "table.pt"), segment_seconds=0.5,
                             batch_size=3, num_workers=0, negative_prob=1.0, val_fraction=0.34, val_mixtures=4)
    dm.setup("fit")
    assert len(dm.train_clips) == 4 and len(dm.val_clips) == 2
    assert not {c.path for c in dm.train_clips} & {c.path for c in dm.val_clips}  # clip-disjoint
    batch = next(iter(dm.train_dataloader()))
    assert batch["mixture"].shape == batch["target"].shape == (3, 8000)
    assert batch["query"].shape == batch["negative"].shape == (3, 12)
    assert batch["has_query"].all() and batch["has_negative"].all()
    for i, cap in enumerate(batch["caption"]):
        torch.testing.assert_close(batch["query"][i], table.lookup(cap))
        torch.testing.assert_close(batch["negative"][i], table.lookup(batch["negative_caption"][i]))
    v1, v2 = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    torch.testing.assert_close(v1["mixture"], v2["mixture"])


def test_a_latin1_csv_is_one_clear_error_naming_the_file_and_line(tmp_path, shared):
    path = tmp_path / "clips.csv"
    dog = next(ESC.glob("dog__*.flac"))
    path.write_bytes(f"path,caption\n{dog},a dog barks\n{dog},un chien aboie pr\u00e8s du caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        read_clip_csv(path)
    msg = str(info.value)
    assert str(path) in msg and "line 3" in msg and "UTF-8" in msg and "\n" not in msg, msg


def test_a_utf8_csv_with_a_bom_reads_its_first_column(tmp_path, shared):
    path = tmp_path / "clips.csv"
    dog = next(ESC.glob("dog__*.flac"))
    path.write_bytes(f"path,caption\n{dog},caf\u00e9 dog\n".encode("utf-8-sig"))
    clips = read_clip_csv(path)
    assert len(clips) == 1 and clips[0].caption == "caf\u00e9 dog"
