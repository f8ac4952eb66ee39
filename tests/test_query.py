"""Query encoders and embedding tables (the table path runs with a deterministic text encoder)."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys

import pytest
import torch

from astsep.config import GuideConfig
from astsep.embed import main as embed_main
from astsep.embed import text_table
from astsep.errors import ConfigError, ModelError
from astsep.guide import ASTGuide
from astsep.query import ASTQueryEncoder, ClapQueryEncoder, EmbeddingTable, QueryEncoder, label_prompt
from conftest import ESC, clip


class HashTextEncoder(QueryEncoder):
    """Deterministic text encoder: a seeded normal vector per text (stand-in for CLAP offline)."""

    name = "hash-text"

    def __init__(self, dim: int = 24):
        self._dim = dim
        self.calls = 0

    @property
    def dim(self) -> int:
        return self._dim

    def encode_text(self, texts):
        self.calls += 1
        seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in texts]
        return torch.stack([torch.randn(self._dim, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def encode_audio(self, x):
        raise NotImplementedError


def test_table_round_trips_through_a_weights_only_file_and_looks_up_by_text(tmp_path, shared):
    enc = HashTextEncoder()
    table = text_table(enc, ESC / "manifest.csv")
    assert len(table) == 50 and table.dim == 24 and table.encoder == "hash-text"
    table.save(tmp_path / "t.pt")
    data = torch.load(tmp_path / "t.pt", weights_only=True)  # plain tensors and strings only
    assert set(data) == {"texts", "embeddings", "encoder"}
    loaded = EmbeddingTable.load(tmp_path / "t.pt")
    torch.testing.assert_close(loaded.lookup("the sound of dog"), enc.encode_text(["the sound of dog"])[0])
    torch.testing.assert_close(loaded.lookup("  the sound   of dog "), loaded.lookup("the sound of dog"))
    assert loaded.lookup_many(["the sound of rain", "the sound of cat"]).shape == (2, 24)
    with pytest.raises(KeyError, match="not in the embedding table"):
        loaded.lookup("the sound of a theremin")


def test_each_distinct_text_is_embedded_once_in_batches():
    enc = HashTextEncoder()
    table = EmbeddingTable.from_texts(enc, ["a", "b", "a", "c"], batch_size=2)
    assert table.texts == ["a", "b", "c"] and enc.calls == 2


def test_bad_tables_are_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="duplicate"):
        EmbeddingTable(["a", "a"], torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="not found"):
        EmbeddingTable.load(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not an embedding table"):
        EmbeddingTable.load(tmp_path / "other.pt")


def test_label_prompt_turns_a_label_into_a_text_query():
    assert label_prompt(" Dog ") == "The sound of Dog"


def test_ast_query_encoder_embeds_audio_and_refuses_text(tiny_model, shared):
    enc = ASTQueryEncoder(ASTGuide.from_model(tiny_model, GuideConfig(device="cpu", trim_padding=True)))
    x = torch.stack([clip("dog", 2.0), clip("siren", 2.0)])
    e = enc.encode_audio(x)
    assert e.shape == (2, enc.dim) and enc.dim == tiny_model.config.hidden_size
    torch.testing.assert_close(enc.encode_audio(x[:1]), e[:1])
    assert not torch.allclose(e[0], e[1])
    with pytest.raises(ModelError, match="no text branch"):
        enc.encode_text(["a dog"])


def test_clap_encoder_without_a_checkpoint_or_offline_models_raises_model_error(tmp_path):
    with pytest.raises(ModelError, match="CLAP checkpoint not found"):
        ClapQueryEncoder(tmp_path / "630k-audioset-best.pt")
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError):  # offline: roberta-base is not cached (or the file is not a checkpoint)
        ClapQueryEncoder(bogus)


def test_laion_clap_import_survives_a_host_program_with_its_own_options(tmp_path):
    """laion-clap parses sys.argv at import time; `infer.py --clap-ckpt …` must not die of it."""
    pytest.importorskip("laion_clap", reason="the clap extra is not installed")
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    code = ("import sys; from astsep.errors import ModelError; from astsep.query import ClapQueryEncoder\n"
            "sys.argv = ['infer.py', '-q', '--clap-ckpt', sys.argv[1]]\n"
            "try:\n    ClapQueryEncoder(sys.argv[3])\nexcept ModelError as e:\n    print('MODEL-ERROR', e)\n"
            "print('ARGV', sys.argv[1:])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(bogus)], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MODEL-ERROR" in r.stdout and "unrecognized arguments" not in r.stderr
    assert f"ARGV ['-q', '--clap-ckpt', '{bogus}']" in r.stdout  # the host's argv is given back


def test_embed_cli_writes_ast_audio_prototypes_per_caption(tmp_path, shared):
    rows = [("dog__", "a dog"), ("rain__", "rain"), ("crow__", "a dog")]
    paths = [str(next(ESC.glob(f"{p}*.flac"))) for p, _ in rows]
    with open(tmp_path / "clips.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "caption"])
        w.writerows((p, c) for p, (_, c) in zip(paths, rows))
    assert embed_main(["--csv", str(tmp_path / "clips.csv"), "--out", str(tmp_path / "t.pt"),
                       "--encoder", "ast", "--ast-model", "tiny"]) == 0
    table = EmbeddingTable.load(tmp_path / "t.pt")
    assert table.texts == ["a dog", "rain"] and table.dim == 32 and "audio-prototype" in table.encoder
    assert embed_main(["--csv", str(tmp_path / "clips.csv"), "--out", str(tmp_path / "u.pt")]) == 2  # clap needs a ckpt
