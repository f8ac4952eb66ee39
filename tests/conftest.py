"""Shared fixtures: real audio from ../shared/data, tiny real AST models, model folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach for the network
os.environ.setdefault("WANDB_MODE", "offline")

from astsep.audio import load_audio  # noqa: E402
from astsep.testing import LABELS_ENV, force_class, tiny_ast  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # beside the checkout (/work/wt-* too); never copied into it
# the tiny ASTs' label names, in this process and in the infer.py / train.py processes the tests start
os.environ.setdefault(LABELS_ENV, str(SHARED_DATA / "audioset" / "class_labels_indices.csv"))
ESC = SHARED_DATA / "esc50_one_per_class"
SEED_RECORDING = SHARED_DATA / "examples" / "seed_recording_16k.wav"


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared real audio. Missing, every test that needs it fails (CI must not go green
    without the tests that use real audio, the regression test among them)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared test data not found at {SHARED_DATA}: the tests that use real audio need "
                    "../shared/data beside the checkout", pytrace=False)
    return SHARED_DATA


def clip(name: str, seconds: float | None = None) -> torch.Tensor:
    """A shared ESC-50 clip by class name (``"siren"``), 16 kHz mono, optionally cut."""
    path = next(ESC.glob(f"{name}__*.flac"))
    x, _ = load_audio(path)
    return x[: int(seconds * 16000)] if seconds else x


def written_sum(result, out: Path) -> torch.Tensor:
    """Write ``result`` into ``out`` and add up, in float64, the WAV files its ``events.json`` lists:
    what a user gets back from the files, not the tensors they were made from. Shape ``(N,)``."""
    import json

    import soundfile as sf

    result.write(out)
    names = json.loads((out / "events.json").read_text())["files"]
    return torch.from_numpy(sum(sf.read(out / n, dtype="float64", always_2d=False)[0] for n in names))


def fit_and_save(module, batch: list[dict], path: Path, steps: int = 1) -> None:
    """``steps`` real optimisation steps of a ``RefinerModule`` on ``batch`` (one batch of them all),
    then a checkpoint at ``path`` saved by Lightning, as ``train.py`` saves one."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(batch, batch_size=len(batch)))
    trainer.save_checkpoint(path)


def mixture(*names: str, seconds: float = 5.0) -> torch.Tensor:
    """Sum of shared clips, each cut to ``seconds``."""
    parts = [clip(n, seconds) for n in names]
    n = min(p.numel() for p in parts)
    return sum(p[:n] for p in parts)


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_ast(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_ast")
    tiny_ast(seed=0).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def siren_model_dir(tmp_path_factory) -> Path:
    """A tiny AST whose classifier always answers 396 "Siren" (category danger)."""
    d = tmp_path_factory.mktemp("siren_ast")
    m = tiny_ast(seed=1)
    force_class(m, 396)
    m.save_pretrained(d)
    return d
