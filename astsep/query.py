"""Query encoders and precomputed embedding tables: *which* source the refiner should return.

- :class:`QueryEncoder` is the interface: ``encode_text(list[str]) -> (N, D)``,
  ``encode_audio((B, N) 16 kHz) -> (B, D)``, ``dim`` and a ``name``.
- :class:`ClapQueryEncoder`: LAION-CLAP text and audio embeddings (512-d), from a local checkpoint.
  laion-clap is imported lazily: importing it loads three Hub tokenizers and building it loads
  ``roberta-base``, so it only works where those are cached (or with ``download=True`` online).
- :class:`ASTQueryEncoder`: the guide's pooled AST embedding of an audio query (no text branch).
- :class:`EmbeddingTable`: text → embedding, computed once (``python -m astsep.embed``) and saved
  as ``{"texts": [...], "embeddings": (N, D) float32, "encoder": str}`` with ``torch.save``;
  loaded with ``weights_only=True`` (no code runs when a table is opened).
"""

from __future__ import annotations

import abc
import logging
import os
from pathlib import Path
from typing import Iterable

import torch

from .config import SAMPLE_RATE
from .errors import ConfigError, MissingExtraError, ModelError

log = logging.getLogger(__name__)

__all__ = ["QueryEncoder", "ClapQueryEncoder", "ASTQueryEncoder", "EmbeddingTable", "label_prompt"]

PROMPT = "The sound of {}"  # how an AudioSet/ESC label becomes a text query


def label_prompt(label: str) -> str:
    """``"dog bark" -> "The sound of dog bark"`` (text queries for class labels)."""
    return PROMPT.format(label.strip())


def normalise_text(text: str) -> str:
    """Lookup key of a caption: whitespace collapsed, case kept (CLAP is case-sensitive)."""
    return " ".join(str(text).split())


class QueryEncoder(abc.ABC):
    """Turns text or audio queries into embeddings of size :attr:`dim`."""

    name: str = "query-encoder"

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Embedding size ``D``."""

    @abc.abstractmethod
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``N`` texts -> ``(N, D)`` float32 on CPU."""

    @abc.abstractmethod
    def encode_audio(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` samples at 16 kHz -> ``(B, D)`` float32 on CPU."""

    @property
    def has_text(self) -> bool:
        return True


# --- LAION-CLAP -----------------------------------------------------------------------------------
_CLAP_TEXT_MODELS = ("roberta-base", "bert-base-uncased", "facebook/bart-base")  # laion_clap loads all at import
CLAP_SAMPLE_RATE = 48_000


def _cached(repo: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo, local_files_only=True)
        return True
    except Exception:  # LocalEntryNotFoundError and friends: not in the local cache
        return False


def _import_clap_module():
    """``laion_clap.CLAP_Module``, imported so that its quirks cannot end the caller.

    laion-clap parses ``sys.argv`` with its own training parser at import time
    (``laion_clap/training/params.py``): under any host program with options of its own
    (``pytest -q``, ``infer.py --clap-ckpt``) that parser calls ``sys.exit(2)``. The import
    therefore sees only the program name, and a failure becomes one clear error.
    """
    import sys

    argv = sys.argv
    sys.argv = argv[:1]
    try:  # before the Hub check: a missing package is the first thing to fix
        from laion_clap import CLAP_Module
    except ModuleNotFoundError as exc:  # laion-clap or one of its own imports (torchvision, …)
        raise MissingExtraError("CLAP text and audio queries", "clap", exc.name) from exc
    except (Exception, SystemExit) as exc:  # ImportError, a tokenizer that failed to load at import time
        raise ModelError(f"cannot import laion-clap ({type(exc).__name__}: {str(exc)[:160]})") from exc
    finally:
        sys.argv = argv
    return CLAP_Module


class ClapQueryEncoder(QueryEncoder):
    """LAION-CLAP (``laion_clap.CLAP_Module``) text and audio embeddings, ``D = 512``.

    ``ckpt_path``: a local laion-clap checkpoint (e.g. ``630k-audioset-best.pt`` with
    ``amodel="HTSAT-tiny"``, or ``music_audioset_epoch_15_esc_90.14.pt`` with ``"HTSAT-base"``).
    It is read with ``torch.load(weights_only=True)``; laion-clap's own loader unpickles freely and
    downloads from the network, so it is not used. ``download``: allow laion-clap to fetch its
    text models (``roberta-base`` …) from the Hub; off by default so that an offline machine gets a
    clear :class:`ModelError` instead of minutes of retries.
    """

    name = "laion-clap"

    def __init__(self, ckpt_path: str | os.PathLike, amodel: str = "HTSAT-tiny", enable_fusion: bool = False,
                 device: str = "cpu", download: bool = False):
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise ModelError(f"CLAP checkpoint not found: {path} (download e.g. 630k-audioset-best.pt from "
                             "huggingface.co/lukewys/laion_clap on a connected machine and pass its path)")
        CLAP_Module = _import_clap_module()
        if not download:
            missing = [m for m in _CLAP_TEXT_MODELS if not _cached(m)]
            if missing:
                raise ModelError(f"laion-clap needs the Hub models {', '.join(missing)} in the local Hugging Face "
                                 "cache, and they are not there (offline?); run once on a connected machine, "
                                 "or pass download=True / --clap-download where the Hub can be reached")
        try:
            module = CLAP_Module(enable_fusion=enable_fusion, amodel=amodel, device=device)
        except Exception as exc:
            raise ModelError(f"cannot build laion-clap's CLAP_Module ({type(exc).__name__}: {str(exc)[:160]}); "
                             "its text model roberta-base must be loadable") from exc
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"cannot read CLAP checkpoint {path} with weights_only=True: {str(exc)[:160]}") from exc
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise ModelError(f"CLAP checkpoint {path} holds no state dict")
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        state.pop("text_branch.embeddings.position_ids", None)  # a buffer newer transformers no longer keep
        try:
            module.model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ModelError(f"CLAP checkpoint {path} does not fit amodel={amodel!r}: {str(exc)[:200]}") from exc
        module.model.eval()
        self.module = module
        self.device = device
        self.name = f"laion-clap:{path.name}"

    @property
    def dim(self) -> int:
        return 512

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        emb = self.module.get_text_embedding(list(texts), use_tensor=True)
        return emb.detach().float().cpu()

    @torch.no_grad()
    def encode_audio(self, x: torch.Tensor) -> torch.Tensor:
        import torchaudio.functional as AF

        x48 = AF.resample(x.float().to(self.device), SAMPLE_RATE, CLAP_SAMPLE_RATE)
        emb = self.module.get_audio_embedding_from_data(x=x48, use_tensor=True)
        return emb.detach().float().cpu()


class ASTQueryEncoder(QueryEncoder):
    """Audio queries as the guide's pooled AST embedding ``(B, hidden)``; no text branch."""

    def __init__(self, guide):
        self.guide = guide
        self.name = f"ast:{getattr(guide, 'name', 'ast')}"

    @property
    def dim(self) -> int:
        return int(self.guide.hidden_size)

    @property
    def has_text(self) -> bool:
        return False

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise ModelError("the AST query encoder has no text branch; use a CLAP encoder (--clap-ckpt) for text "
                         "queries, or audio prototypes (python -m astsep.embed --encoder ast)")

    @torch.no_grad()
    def encode_audio(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return self.guide.embed(x).float().cpu()


# --- precomputed tables ---------------------------------------------------------------------------
class EmbeddingTable:
    """Text → embedding lookup, ``embeddings`` ``(N, D)`` float32 aligned with ``texts``."""

    def __init__(self, texts: list[str], embeddings: torch.Tensor, encoder: str = "unknown"):
        texts = [normalise_text(t) for t in texts]
        if embeddings.dim() != 2 or embeddings.shape[0] != len(texts):
            raise ConfigError(f"embedding table needs (N, D) embeddings for N={len(texts)} texts, "
                              f"got {tuple(embeddings.shape)}")
        if len(set(texts)) != len(texts):
            raise ConfigError("embedding table holds duplicate texts")
        self.texts = texts
        self.embeddings = embeddings.detach().float().cpu().contiguous()
        self.encoder = str(encoder)
        self._index = {t: i for i, t in enumerate(texts)}

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.texts)

    def __contains__(self, text: str) -> bool:
        return normalise_text(text) in self._index

    @classmethod
    def from_texts(cls, encoder: QueryEncoder, texts: Iterable[str], batch_size: int = 64) -> "EmbeddingTable":
        """Embed each distinct text once (in ``batch_size`` chunks) with ``encoder.encode_text``."""
        unique = list(dict.fromkeys(normalise_text(t) for t in texts))
        chunks = [encoder.encode_text(unique[i:i + batch_size]) for i in range(0, len(unique), batch_size)]
        emb = torch.cat(chunks) if chunks else torch.zeros(0, encoder.dim)
        return cls(unique, emb, encoder.name)

    def lookup(self, text: str) -> torch.Tensor:
        """``(D,)`` embedding of one text; ``KeyError`` naming the text when it is absent."""
        key = normalise_text(text)
        if key not in self._index:
            raise KeyError(f"text not in the embedding table ({len(self)} entries, encoder {self.encoder}): {key!r}")
        return self.embeddings[self._index[key]]

    def lookup_many(self, texts: list[str]) -> torch.Tensor:
        """``(N, D)`` embeddings of ``N`` texts."""
        return torch.stack([self.lookup(t) for t in texts]) if texts else torch.zeros(0, self.dim)

    def save(self, path: str | os.PathLike) -> None:
        from .audio import write_bytes_atomic
        import io

        buf = io.BytesIO()
        torch.save({"texts": list(self.texts), "embeddings": self.embeddings, "encoder": self.encoder}, buf)
        write_bytes_atomic(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EmbeddingTable":
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"embedding table not found: {p} (make one with python -m astsep.embed --csv ... --out {p})")
        try:
            data = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(f"cannot read embedding table {p}: {str(exc).splitlines()[0][:160]}") from exc
        if not isinstance(data, dict) or not {"texts", "embeddings"} <= set(data):
            raise ConfigError(f"{p} is not an embedding table (needs keys 'texts' and 'embeddings')")
        return cls(list(data["texts"]), torch.as_tensor(data["embeddings"]), str(data.get("encoder", "unknown")))
