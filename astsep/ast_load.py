"""Loading the AST the guide runs: device and precision, int8 layers, a local folder or a Hub id.

:func:`load_ast_model` takes a Hub id or a folder saved with ``save_pretrained`` and refuses pickle
weights unless allowed; safetensors weights load into :class:`astsep.ast_model.CompactAST` without
transformers' modeling stack. Its errors (:class:`~astsep.errors.ModelLoadError`) describe the model,
never a command-line option: a front end that knows its option says which (:func:`astsep.errors.naming_option`).
:class:`astsep.guide.ASTGuide` runs what this module loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
from pathlib import Path

import torch

from .config import PRECISIONS, GuideConfig
from .errors import ModelError, ModelLoadError

log = logging.getLogger(__name__)


def check_precision(dtype: str, device: torch.device) -> None:
    if dtype not in PRECISIONS:
        raise ModelError(f"unknown guide dtype {dtype!r} ({', '.join(PRECISIONS)})")
    if dtype == "int8" and device.type != "cpu":
        raise ModelError("guide dtype int8 runs on the CPU only; use bfloat16 on a GPU")


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
        raise ModelError("device cuda was asked for, but no CUDA device is available (use the cpu device)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ModelError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)


def load_ast_model(name_or_path: str, *, allow_pickle: bool = False):
    """Load the AST (``ASTForAudioClassification``'s network) from a Hub id or a local folder, SDPA attention.

    Local folders must hold ``config.json`` and safetensors weights; pickle weights
    (``pytorch_model.bin``) are refused unless ``allow_pickle`` is set, since unpickling runs code.
    Raises :class:`~astsep.errors.ModelLoadError`, whose one-line message describes the model (never a
    command-line option), when the model cannot be had.

    Safetensors weights of an AST (a folder, or a Hub id in the local cache) load into
    :class:`astsep.ast_model.CompactAST`, the same network in plain torch, without importing
    transformers' modeling stack (seconds of start-up); anything else (pickle weights, a download)
    loads with transformers.
    """
    path = Path(name_or_path).expanduser()
    hint = (f"download it on a connected machine (e.g. `hf download MIT/ast-finetuned-audioset-10-10-0.4593 "
            "--local-dir ast_model`) and give that folder as the model")
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"AST model folder {path} has no config.json (a Hugging Face Hub id or a folder "
                                 "saved with save_pretrained())")
        has_st = any(path.glob("*.safetensors"))
        has_pickle = any(path.glob("pytorch_model*.bin"))
        if not has_st and not (has_pickle and allow_pickle):
            if has_pickle:
                raise ModelLoadError(f"AST model folder {path} holds only pickle weights (pytorch_model.bin), which can run "
                                 "code when loaded; convert it to safetensors, or allow pickle weights (guide.allow_pickle) if you trust it")
            raise ModelLoadError(f"AST model folder {path} holds no weights (*.safetensors)")
        if has_st:
            compact = _compact_or_none(path, name_or_path)
            if compact is not None:
                return compact
        kwargs = {"use_safetensors": has_st}
        source = str(path)
    else:
        looks_like_path = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").replace("/", "", 1)
        if looks_like_path or name_or_path.count("/") > 1:
            raise ModelLoadError(f"AST model folder not found: {name_or_path} (a Hugging Face Hub id or a local folder)")
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
                raise ModelLoadError(f"cannot load AST model {name_or_path!r}: it is not in the local Hugging Face "
                                 f"cache and the Hub cannot be reached; {hint}") from None
    try:
        model = ASTForAudioClassification.from_pretrained(source, attn_implementation="sdpa", **kwargs)
    except _WEIGHTS_REFUSED as exc:
        raise _weights_refused(name_or_path, exc) from None
    except (OSError, ValueError, EnvironmentError, SafetensorError) as exc:  # e.g. a torn weight file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load AST model {name_or_path!r} ({first[:160]}); no network or weights here? "
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


def _weights_refused(name: str, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(f"cannot load AST model {name!r}: its weights file was refused ({describe_load_error(exc)})")


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
