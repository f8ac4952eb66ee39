"""The AST guide: one forward gives class probabilities, where the model looks, and an embedding.

``ASTGuide`` wraps an AudioSet-trained ``ASTForAudioClassification``. Per input window it returns

- ``logits`` ``(B, C)``: the 527 AudioSet classes;
- ``grid`` ``(B, Fp, Tp)``: the last layer's attention from the CLS token to the patch grid
  (12 frequency × 101 time patches for a 10.24 s window), averaged over heads;
- ``embedding`` ``(B, H)``: the pooled (CLS + distillation) representation.

The model runs with SDPA attention (no attention maps are materialised in any layer); the last
layer's CLS row is recomputed from that layer's input hidden states, which costs one
``(1 × seq)`` attention row per head instead of the 2.3× slower eager path.

Precision: float32 (default), bfloat16, or int8 (dynamic int8 ``nn.Linear`` layers, CPU only;
what ``--fast`` uses there). With ``trim_padding`` the zero-padded tail of a short window is not
run patch by patch: its patches are merged into a few tokens that keep their share of attention
(see :meth:`ASTGuide.forward_features`).

Results are cached by content: a SHA-256 over the samples, the model's fingerprint and every
setting that changes the output. The cache lives in memory (LRU) and optionally on disk. The
fingerprint is needed only by the disk cache (the memory cache belongs to one guide, one model),
and computed on first use: a SHA-256 of the weight files' bytes when the model came from files,
else of the parameters.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .audio import write_bytes_atomic
from .config import PRECISIONS, GuideConfig
from .errors import ConfigError, ModelError
from .features import PatchLayout, ast_input

log = logging.getLogger(__name__)


@dataclass
class GuideOutput:
    """Batched AST results. ``tp_valid`` time patches of ``grid`` cover real audio."""

    logits: torch.Tensor  # (B, C) float32
    grid: torch.Tensor  # (B, Fp, Tp) float32, rows sum to < 1 (CLS→patch share of attention)
    embedding: torch.Tensor  # (B, H) float32
    tp_valid: int
    # True when ``grid`` already is the named sound's share of the energy per patch (an oracle);
    # False for attention, whose scale the separator normalises
    calibrated: bool = False

    @property
    def probs(self) -> torch.Tensor:
        # AudioSet is multi-label; AST checkpoints are trained with BCE. The reference reports
        # softmax probabilities, and its thresholds (0.7, 0.8) are calibrated on those.
        return torch.softmax(self.logits, dim=-1)


TOP_K = 5  # classes listed per source and residual (the events' "top5")


def top_classes(probs: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The most probable class and the ``k`` most probable ones of class probabilities ``(..., C)``.

    Returns ``(confidence (...), class_id (...), top_probs (..., k), top_ids (..., k))``, best
    first; with fewer than ``k`` classes (an oracle's own label list) the tail is padded with
    probability 0 and id −1.
    """
    confidence, class_id = probs.max(dim=-1)
    top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)
    if top_i.shape[-1] < k:
        top_p = torch.nn.functional.pad(top_p, (0, k - top_p.shape[-1]))
        top_i = torch.nn.functional.pad(top_i, (0, k - top_i.shape[-1]), value=-1)
    return confidence, class_id, top_p, top_i


def check_precision(dtype: str, device: torch.device) -> None:
    if dtype not in PRECISIONS:
        raise ModelError(f"unknown guide dtype {dtype!r} ({', '.join(PRECISIONS)})")
    if dtype == "int8" and device.type != "cpu":
        raise ModelError("guide dtype int8 runs on the CPU only; use bfloat16 (or --fast) on a GPU")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (AVX512 / AMX, as torch reports it).
    Without (AVX2-only machines), a bfloat16 AST forward is about 5x slower than float32."""
    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    return "AVX512" in cap or "AMX" in cap


def fast_precision(device: torch.device) -> str:
    """The precision ``--fast`` uses: int8 Linear layers on the CPU (about 1.5x faster than
    bfloat16 there, see benchmarks/README.md), bfloat16 on a GPU."""
    return "int8" if device.type == "cpu" else "bfloat16"


def use_fast_settings(cfg: GuideConfig) -> None:
    """What ``--fast`` changes in a guide config: the device's fast precision and trimmed padding."""
    cfg.dtype = fast_precision(resolve_device(cfg.device))
    cfg.trim_padding = True


class Int8Linear(torch.nn.Module):
    """An ``nn.Linear`` as torch.ao's dynamic int8 ``Linear`` runs it: weights quantised per tensor
    (symmetric min/max, as ``quantize_dynamic``'s default qconfig does), activations per call by
    the same ``quantized::linear_dynamic`` op, so the numbers are the same (tested). Built with one
    weight packing where ``quantize_dynamic`` packs three times (two placeholders first; packing the
    full-size AST took 0.74 s instead of 1.42 s on 2 busy cores), and without copying the model
    (``quantize_dynamic`` deep-copies it unless ``inplace``: 1.5 s more)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        from torch.ao.quantization.observer import MinMaxObserver

        w = linear.weight.detach().float()
        observer = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        observer(w)
        scale, zero_point = observer.calculate_qparams()
        qweight = torch.quantize_per_tensor(w, float(scale), int(zero_point), torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=True).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype=qint8"


def quantize_int8(model):
    """Dynamic int8 quantisation of every ``nn.Linear`` (weights int8 per tensor, activations
    quantised per batch at run time; attention, layer norms and the patch convolution stay float32),
    as ``torch.ao.quantization.quantize_dynamic`` does it (:class:`Int8Linear`). CPU only.
    Modifies and returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, Int8Linear(child))
    return model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but no CUDA device is available (use --device cpu)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ModelError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)


def load_ast_model(name_or_path: str, *, allow_pickle: bool = False, option: str = "--model"):
    """Load the AST (``ASTForAudioClassification``'s network) from a Hub id or a local folder, SDPA attention.

    Local folders must hold ``config.json`` and safetensors weights; pickle weights
    (``pytorch_model.bin``) are refused unless ``allow_pickle`` is set, since unpickling runs code.
    Raises :class:`ModelError` with a message naming ``option`` (the command-line option that takes
    the model, ``--model`` for ``infer.py``) when the model cannot be had.

    Safetensors weights of an AST (a folder, or a Hub id in the local cache) load into
    :class:`astsep.ast_model.CompactAST`, the same network in plain torch, without importing
    transformers' modeling stack (seconds of start-up); anything else (pickle weights, a download)
    loads with transformers.
    """
    path = Path(name_or_path).expanduser()
    hint = (f"download it on a connected machine (e.g. `hf download MIT/ast-finetuned-audioset-10-10-0.4593 "
            f"--local-dir ast_model`) and pass the folder with {option} ast_model")
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json; {option} takes a Hub id or a folder "
                             "saved with save_pretrained()")
        has_st = any(path.glob("*.safetensors"))
        has_pickle = any(path.glob("pytorch_model*.bin"))
        if not has_st and not (has_pickle and allow_pickle):
            if has_pickle:
                raise ModelError(f"model folder {path} holds only pickle weights (pytorch_model.bin), which can run "
                                 "code when loaded; convert it to safetensors or pass --allow-pickle if you trust it")
            raise ModelError(f"model folder {path} holds no weights (*.safetensors)")
        if has_st:
            compact = _compact_or_none(path, name_or_path)
            if compact is not None:
                return compact
        kwargs = {"use_safetensors": has_st}
        source = str(path)
    else:
        looks_like_path = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").replace("/", "", 1)
        if looks_like_path or name_or_path.count("/") > 1:
            raise ModelError(f"model folder not found: {name_or_path} ({option} takes a Hub id or a local folder)")
        kwargs = {} if allow_pickle else {"use_safetensors": True}
        source = name_or_path
    hub = not path.exists()
    if hub:  # a Hub id in the local cache: its snapshot folder
        snapshot = _cached_snapshot(name_or_path)
        if snapshot is not None and (snapshot / "config.json").is_file() and any(snapshot.glob("*.safetensors")):
            compact = _compact_or_none(snapshot, name_or_path)
            if compact is not None:
                return compact
    with quiet_model_loading(load_transformers=True):
        return _load_with_transformers(name_or_path, source, kwargs, hint, hub)


@contextlib.contextmanager
def quiet_model_loading(load_transformers: bool = False):
    """No "Loading weights" progress bars from transformers while a model loads (library code prints
    nothing); the caller's setting is restored afterwards.

    Only where transformers is imported already, unless ``load_transformers`` (the fallback below, about
    to use it): a safetensors AST loads without it (:mod:`astsep.ast_model`), and importing
    ``transformers.utils`` just to quiet it would add its 0.5-0.8 s to every command-line run."""
    if not load_transformers and "transformers" not in sys.modules:
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _load_with_transformers(name_or_path: str, source: str, kwargs: dict, hint: str, hub: bool):
    from safetensors import SafetensorError
    from transformers import ASTForAudioClassification

    if hub:  # a Hub id: the local HF cache first, the network only if reachable
        try:
            return ASTForAudioClassification.from_pretrained(source, attn_implementation="sdpa",
                                                             local_files_only=True, **kwargs)
        except _WEIGHTS_REFUSED as exc:
            raise _weights_refused(name_or_path, exc) from None
        except (OSError, ValueError):
            if not _hub_reachable():
                raise ModelError(f"cannot load AST model {name_or_path!r}: it is not in the local Hugging Face "
                                 f"cache and the Hub cannot be reached; {hint}") from None
    try:
        model = ASTForAudioClassification.from_pretrained(source, attn_implementation="sdpa", **kwargs)
    except _WEIGHTS_REFUSED as exc:
        raise _weights_refused(name_or_path, exc) from None
    except (OSError, ValueError, EnvironmentError, SafetensorError) as exc:  # e.g. a torn weight file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load AST model {name_or_path!r} ({first[:160]}); no network or weights here? "
                         f"{hint}") from exc
    return model


def _compact_or_none(folder: Path, name: str):
    """:class:`astsep.ast_model.CompactAST` from a folder with safetensors weights, or None (logged)
    when it holds something the compact forward does not run; transformers then loads it."""
    from safetensors import SafetensorError

    from .ast_model import load_compact_ast

    try:
        return load_compact_ast(folder, name_or_path=name)
    except (ValueError, KeyError, OSError, SafetensorError) as exc:  # transformers says what is wrong, if anything
        log.info("loading %s with transformers (the compact AST forward cannot: %s)", name, exc)
        return None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot folder of a Hub id, or None (never the network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a valid id): transformers decides what to say
        return None


_WEIGHTS_REFUSED = (pickle.UnpicklingError, EOFError, RuntimeError)  # a crafted or torn pytorch_model.bin


def _weights_refused(name: str, exc: BaseException) -> ModelError:
    return ModelError(f"cannot load AST model {name!r}: its weights file was refused ({describe_load_error(exc)})")


def describe_load_error(exc: BaseException) -> str:
    """One line saying why torch / transformers could not load a weights file: for torch's refusal
    of a pickle (``Weights only load failed…``), the line naming what it refused; else the first
    non-empty line of the exception's text. At most 200 characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Weights only load failed"):
        why = [ln for ln in lines[1:] if not ln.startswith(("Please file an issue", "Check the documentation"))]
        return f"unpickling refused: {why[0] if why else 'not plain tensors'}"[:200]
    return lines[0][:200]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all (offline mode or no route: no)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _weight_files(name_or_path: str) -> list[Path]:
    """The weight files a model was loaded from: a local folder's, or the Hugging Face cache's
    snapshot of a Hub id; ``[]`` when they cannot be found (the fingerprint then uses the parameters)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (or not a Hub id): no files to hash
            return []
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    return [f for f in files if f.is_file()]


def _stat(files: list[Path]) -> list[tuple[int, int]]:
    return [(f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _fingerprint_files(files: list[Path], model) -> str:
    """SHA-256 of the config and of every weight file's bytes (header and tensors), by file name,
    so that the same weights in another folder share a disk cache."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str).encode())
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "f" + h.hexdigest()[:15]


def _fingerprint(model) -> str:
    """Fingerprint of an in-memory model's parameters (no files to hash)."""
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():  # every tensor: a few values and two moments (cheap even for 86 M parameters)
        for name, p in model.named_parameters():
            flat = p.detach().float().reshape(-1)
            h.update(name.encode())
            h.update(flat[:16].cpu().numpy().tobytes())
            h.update(repr((float(flat.sum()), float(flat.square().sum()))).encode())
    return h.hexdigest()[:16]


class _Cache:
    """LRU in memory, content-addressed files on disk (``<dir>/<k[:2]>/<k>.pt``). Thread-safe: one
    guide may serve two pipelines at once (the web demo's lanes)."""

    def __init__(self, size: int, directory: str | None):
        self.size = size
        self.mem: OrderedDict[str, dict] = OrderedDict()
        self.dir = Path(directory).expanduser() if directory else None
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            item = self.mem.get(key)
            if item is not None:
                self.mem.move_to_end(key)
                return item
        if self.dir is not None:
            f = self.dir / key[:2] / f"{key}.pt"
            if f.is_file():
                try:
                    item = torch.load(f, map_location="cpu", weights_only=True)
                except Exception as exc:  # a torn or foreign file is a miss, never a crash
                    log.warning("ignoring unreadable cache file %s: %s", f, exc)
                    return None
                self._remember(key, item)
                return item
        return None

    def put(self, key: str, item: dict) -> None:
        self._remember(key, item)
        if self.dir is not None:
            d = self.dir / key[:2]
            try:
                d.mkdir(parents=True, exist_ok=True)
                import io

                buf = io.BytesIO()
                torch.save(item, buf)
                write_bytes_atomic(d / f"{key}.pt", buf.getvalue())
            except OSError as exc:
                log.warning("cannot write AST cache to %s: %s", d, exc)

    def _remember(self, key: str, item: dict) -> None:
        with self._lock:
            self.mem[key] = item
            self.mem.move_to_end(key)
            while len(self.mem) > self.size:
                self.mem.popitem(last=False)


class ASTGuide:
    """Runs the AST on batches of 16 kHz windows, with a content-addressed cache.

    Counters: ``forwards`` (windows run through the AST), ``batches`` (AST calls),
    ``cache_hits`` (windows answered from the cache).
    """

    def __init__(self, model, cfg: GuideConfig | None = None, name: str | None = None,
                 weight_files: list[Path] | None = None, owns_model: bool = False):
        """``owns_model``: ``model`` was loaded for this guide alone, so it may be cast and quantised
        in place (a caller's model is copied first)."""
        self.cfg = cfg or GuideConfig()
        self.device = resolve_device(self.cfg.device)
        check_precision(self.cfg.dtype, self.device)
        if self.cfg.dtype == "bfloat16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("guide dtype bfloat16 was asked for, but this CPU has no native bfloat16 (torch reports %s): "
                        "it would run about 5x slower than float32; running the AST in float32 (--fast uses int8 "
                        "on the CPU)", torch.backends.cpu.get_cpu_capability())
            self.cfg = dataclasses.replace(self.cfg, dtype="float32")
        if int(self.cfg.pad_merge) < 0:
            raise ConfigError(f"guide.pad_merge must be >= 0 (0 drops the padding), not {self.cfg.pad_merge}")
        self.dtype = torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32
        if not owns_model and (next(model.parameters()).dtype != self.dtype or self.cfg.dtype == "int8"):
            model = copy.deepcopy(model)  # never change the caller's model in place
        model = model.to(self.device, self.dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        # the fingerprint (of the float weights; the precision is in the cache key) waits for a cache
        # that needs it, except for an in-memory model about to be quantised: its float weights go
        self._fingerprint: str | None = None
        self._weight_files = list(weight_files or [])
        self._weight_stat = _stat(self._weight_files)
        if self.cfg.dtype == "int8" and not self._weight_files:
            self._fingerprint = _fingerprint(model)
        self.model = quantize_int8(model) if self.cfg.dtype == "int8" else model
        self.name = name or str(getattr(model.config, "_name_or_path", "") or "ast")
        conf = model.config
        self.max_frames = min(self.cfg.max_frames, conf.max_length)
        self.layout = PatchLayout.of_model(conf)
        self.freq_patches = self.layout.freq_patches
        self.time_patches = self.layout.time_patches(conf.max_length)
        id2label = conf.id2label or {}
        self.labels = [str(id2label.get(i, id2label.get(str(i), f"class_{i}"))) for i in range(conf.num_labels)]
        self.cache = _Cache(self.cfg.cache_size, self.cfg.cache_dir)
        self.forwards = 0
        self.batches = 0
        self.cache_hits = 0
        self.forward_seconds = 0.0

    @classmethod
    def from_pretrained(cls, cfg: GuideConfig, option: str = "--model") -> "ASTGuide":
        """``option``: the command-line option that names the model, for error messages."""
        model = load_ast_model(cfg.model, allow_pickle=cfg.allow_pickle, option=option)
        return cls(model, cfg, name=cfg.model, weight_files=_weight_files(cfg.model), owns_model=True)

    @property
    def fingerprint(self) -> str:
        """Identity of the weights (computed once, on first use): a hash of the weight files the model
        was loaded from, or of its parameters when it came from memory or its files changed since."""
        if self._fingerprint is None:
            files = self._weight_files
            if files and all(f.is_file() for f in files) and _stat(files) == self._weight_stat:
                self._fingerprint = _fingerprint_files(files, self.model)
            else:
                self._fingerprint = _fingerprint(self.model)
        return self._fingerprint

    @classmethod
    def from_model(cls, model, cfg: GuideConfig | None = None, name: str | None = None) -> "ASTGuide":
        return cls(model, cfg, name)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def stats(self) -> dict:
        return {"ast_forwards": self.forwards, "ast_batches": self.batches, "cache_hits": self.cache_hits,
                "ast_seconds": round(self.forward_seconds, 4)}

    # --- cache keys ---------------------------------------------------------------------------
    def _settings(self) -> bytes:
        # the memory cache belongs to this guide and its one model: only files on disk, which other
        # guides and processes read, need the model's fingerprint in their key
        fp = self.fingerprint if self.cache.dir is not None else None
        return json.dumps({"fp": fp, "dtype": self.cfg.dtype, "trim": self.cfg.trim_padding,
                           "pad_merge": self.cfg.pad_merge if self.cfg.trim_padding else None,
                           "max_frames": self.max_frames, "mean": self.cfg.fbank_mean, "std": self.cfg.fbank_std,
                           "v": 1}, sort_keys=True).encode()

    def key(self, x: torch.Tensor) -> str:
        h = hashlib.sha256(self._settings())
        h.update(str(x.numel()).encode())
        h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    # --- forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> GuideOutput:
        """Guide a batch ``(B, N)`` of 16 kHz windows of equal length (at most 10.24 s are seen).

        ``rows``: which windows of the batch being separated these are. The AST judges by content
        alone and ignores it; guides built for known items (:class:`astsep.oracle.OracleGuide`) use it.
        """
        if x.dim() == 1:
            x = x.unsqueeze(0)
        cached = self.cache.size > 0 or self.cache.dir is not None
        keys = [self.key(row) for row in x] if cached else [None] * x.shape[0]
        found = [self.cache.get(k) if k is not None else None for k in keys]
        miss = [i for i, f in enumerate(found) if f is None]
        self.cache_hits += len(keys) - len(miss)
        if miss:
            fresh = self._forward(x[miss].to(self.device))
            for j, i in enumerate(miss):
                item = {name: t[j].detach().to("cpu", torch.float32).clone() for name, t in fresh.items()}
                if keys[i] is not None:
                    self.cache.put(keys[i], item)
                found[i] = item
        tp_valid = self.layout.valid_time_patches(x.shape[-1], self.max_frames, self.time_patches)
        grid = torch.stack([f["grid"] for f in found])
        return GuideOutput(
            logits=torch.stack([f["logits"] for f in found]),
            grid=grid,
            embedding=torch.stack([f["embedding"] for f in found]),
            tp_valid=min(tp_valid, grid.shape[-1]),
        )

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        feats, real = ast_input(x.float(), self.max_frames, cfg.fbank_mean, cfg.fbank_std)
        feats = feats.to(self.dtype)
        self.forwards += x.shape[0]
        self.batches += 1
        t0 = time.perf_counter()
        out = self.forward_features(feats, real if cfg.trim_padding else None)
        if out["logits"].is_cuda:
            torch.cuda.synchronize()
        self.forward_seconds += time.perf_counter() - t0
        return out

    def forward_features(self, feats: torch.Tensor, real_frames: int | None = None) -> dict[str, torch.Tensor]:
        """AST forward on normalised fbank ``(B, max_length, mel)``.

        With ``real_frames`` (the frames that hold audio, the same for the whole batch), the time
        patches that lie wholly in the zero padding are not run one by one: in each frequency row
        they are averaged in groups of ``cfg.pad_merge`` and every group token is attended as
        often as the patches it stands for (an additive ``log(count)`` bias on its keys, as in
        token merging). Padded patches differ only by their position embeddings, so this keeps the
        padding's share of the attention that simply dropping them (``pad_merge = 0``) loses; it is
        exact when the position embeddings of a group are equal (tested).
        """
        ast = self.model.audio_spectrogram_transformer
        emb = ast.embeddings
        conf = self.model.config
        B = feats.shape[0]
        patches = emb.patch_embeddings(feats)  # (B, Fp*Tp, H), frequency-major
        H = patches.shape[-1]
        Fp, Tp = self.freq_patches, self.time_patches
        pos = emb.position_embeddings
        tokens = patches + pos[:, 2:]
        tp = Tp if real_frames is None else min(Tp, max(1, math.ceil(real_frames / conf.time_stride)))
        counts = None
        if tp < Tp:  # time patch t covers frames [t*stride, t*stride + patch): audio iff t*stride < real
            grid4 = tokens.reshape(B, Fp, Tp, H)
            kept = grid4[:, :, :tp].reshape(B, Fp * tp, H)
            group = int(self.cfg.pad_merge)
            if group > 0:
                member = torch.arange(Tp - tp, device=feats.device) // group
                n_groups = int(member[-1]) + 1
                sums = grid4.new_zeros(B, Fp, n_groups, H).index_add_(2, member, grid4[:, :, tp:])
                size = torch.bincount(member, minlength=n_groups).to(sums.dtype)
                merged = (sums / size[:, None]).reshape(B, Fp * n_groups, H)
                tokens = torch.cat([kept, merged], dim=1)
                counts = torch.cat([torch.ones(2 + Fp * tp, device=feats.device, dtype=sums.dtype),
                                    size.repeat(Fp)])
            else:
                tokens = kept
        h = torch.cat([
            emb.cls_token.expand(B, -1, -1) + pos[:, :1],
            emb.distillation_token.expand(B, -1, -1) + pos[:, 1:2],
            tokens,
        ], dim=1)
        bias = None if counts is None else counts.log().view(1, 1, 1, -1)
        for layer in ast.layers[:-1]:
            h = layer(h, bias)
        last = ast.layers[-1]
        grid = self._cls_attention(last, h, bias)[:, 2:2 + Fp * tp].reshape(B, Fp, tp)
        h = last(h, bias)
        seq = ast.layernorm(h)
        pooled = (seq[:, 0] + seq[:, 1]) / 2
        logits = self.model.classifier(pooled)
        if tp != Tp:  # keep a fixed grid shape for callers; the padding is not part of the map
            grid = torch.nn.functional.pad(grid, (0, Tp - tp))
        return {"logits": logits.float(), "grid": grid.float(), "embedding": pooled.float()}

    @staticmethod
    def _cls_attention(layer, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Head-averaged attention row of the CLS token ``(B, seq)`` in ``layer``, from its input."""
        attn = layer.attention
        x = layer.layernorm_before(h)
        B, S, _ = x.shape
        nh, hd = attn.num_attention_heads, attn.head_dim
        q = attn.q_proj(x[:, :1]).view(B, 1, nh, hd).transpose(1, 2).float()  # (B, nh, 1, hd)
        k = attn.k_proj(x).view(B, S, nh, hd).transpose(1, 2).float()  # (B, nh, S, hd)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        if bias is not None:
            scores = scores + bias.float()
        return scores.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, S)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled AST embedding ``(B, H)`` of ``(B, N)`` windows (cached like every forward)."""
        return self(x).embedding


def build_guide(model: str, guide_cfg: GuideConfig, seed: int = 0, option: str = "--model") -> ASTGuide:
    """``ASTGuide`` from a Hub id / local folder, or ``"tiny"`` (random tiny AST, smoke tests);
    ``option`` names the command-line option that took ``model`` in error messages."""
    if model == "tiny":
        from .testing import tiny_ast

        return ASTGuide.from_model(tiny_ast(seed=seed), guide_cfg, name=f"tiny-ast-{seed}")
    return ASTGuide.from_pretrained(dataclasses.replace(guide_cfg, model=model), option=option)
