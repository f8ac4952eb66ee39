"""EfficientAT's MobileNetV3 AudioSet tagger (``mn04_as``), written here from its published layout.

A real, trained, multi-label AudioSet tagger small enough to run many times per window (about 1 M
parameters; the AST has 87 M). :class:`MobileNetTagger` is a MobileNetV3-Large layout at width 0.4
on a one-channel log-mel input, laid out so that the published ``state_dict`` loads exactly (every
one of its 312 tensors, ``strict=True``):

- ``features.0``: a 3×3 stride-2 stem of 8 channels (conv, batch norm, Hardswish);
- ``features.1`` … ``features.15``: inverted residual blocks (1×1 expansion unless the block does
  not expand, depthwise k×k, a channel squeeze-excitation in some, 1×1 projection; a skip where the
  shape allows). Four of them halve both axes (:data:`MN04_BLOCKS`);
- ``features.16``: a 1×1 conv to 384 channels;
- ``classifier``: global average pooling, 384 → 512, Hardswish, dropout, 512 → 527 logits.

The layer plan is read off the checkpoint's tensor shapes and MobileNetV3's published design; the
strides, activations and the squeeze-excitation's gate are fixed by that design. Nothing here is
EfficientAT's code.

:class:`MelFrontEnd` is the front end the weights were trained with (the model folder's README):
32 kHz mono, pre-emphasis 0.97, a centred STFT (n_fft 1024, an 800-sample symmetric Hann window,
hop 320 = 10 ms), power, 128 Kaldi/HTK mel bands from 0 Hz to 15 kHz, ``(ln(mel + 1e-5) + 4.5) / 5``.

Shapes: waveforms ``(B, N)`` at 32 kHz; mel ``(B, 1, 128, frames)``; the last feature map
``(B, 384, 4, ceil(frames / 32))``; logits ``(B, 527)``; embedding ``(B, 384)`` (the pooled feature
map, what the classifier sees).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
from torch import nn

from .errors import ModelLoadError

TAGGER_RATE = 32000  # the rate its front end was trained at
WEIGHTS_NAME = "mn04_as_mAP_432.pt"  # the file name of the published checkpoint in a model folder
MN04_SHA256 = "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c"


@dataclass(frozen=True)
class Block:
    """One inverted residual block: ``kernel``, expanded and output channels, squeeze-excitation,
    Hardswish (else ReLU), stride."""

    kernel: int
    expanded: int
    out: int
    se: bool
    hswish: bool
    stride: int


# mn04 (width 0.4) read off the checkpoint: kernels, expansions and outputs from the tensor shapes,
# strides and activations from MobileNetV3-Large (blocks 2, 4, 7 and 13 halve the map; 7 on use Hardswish)
MN04_BLOCKS: tuple[Block, ...] = (
    Block(3, 8, 8, False, False, 1),
    Block(3, 24, 16, False, False, 2),
    Block(3, 32, 16, False, False, 1),
    Block(5, 32, 16, True, False, 2),
    Block(5, 48, 16, True, False, 1),
    Block(5, 48, 16, True, False, 1),
    Block(3, 96, 32, False, True, 2),
    Block(3, 80, 32, False, True, 1),
    Block(3, 72, 32, False, True, 1),
    Block(3, 72, 32, False, True, 1),
    Block(3, 192, 48, True, True, 1),
    Block(3, 272, 48, True, True, 1),
    Block(5, 272, 64, True, True, 2),
    Block(5, 384, 64, True, True, 1),
    Block(5, 384, 64, True, True, 1),
)
STEM_CHANNELS = 8
LAST_CHANNELS = 384
HEAD_CHANNELS = 512
NUM_CLASSES = 527


def _divisible(v: float, divisor: int = 8) -> int:
    # MobileNet's channel rounding: to a multiple of 8, never more than 10 % below v
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = None) -> nn.Sequential:
    """Conv (no bias), batch norm, optional activation: keys ``0.weight``, ``1.*`` as the checkpoint's."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout, eps=0.001, momentum=0.01)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class ChannelSE(nn.Module):
    """Squeeze-excitation over channels: mean over frequency and time, two linear layers (ReLU between),
    a sigmoid gate multiplying every channel (the gate the
    checkpoint was trained with: a hard sigmoid mislabels the shared clips, e.g. a crying baby as laughter). Held in ``conc_se_layers.0`` as in the checkpoint."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        layer = nn.Module()
        layer.fc1 = nn.Linear(channels, squeeze)
        layer.fc2 = nn.Linear(squeeze, channels)
        self.conc_se_layers = nn.ModuleList([layer])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.conc_se_layers[0]
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(layer.fc2(F.relu(layer.fc1(s))))
        return x * s[:, :, None, None]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, b: Block):
        super().__init__()
        act = nn.Hardswish if b.hswish else nn.ReLU
        layers: list[nn.Module] = []
        if b.expanded != cin:
            layers.append(conv_bn(cin, b.expanded, 1, act=act))
        layers.append(conv_bn(b.expanded, b.expanded, b.kernel, b.stride, groups=b.expanded, act=act))
        if b.se:
            layers.append(ChannelSE(b.expanded, _divisible(b.expanded // 4)))
        layers.append(conv_bn(b.expanded, b.out, 1))
        self.block = nn.Sequential(*layers)
        self.skip = b.stride == 1 and cin == b.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.skip else y


class MobileNetTagger(nn.Module):
    """The mn04 tagger: ``forward(mel (B, 1, 128, T))`` → logits ``(B, 527)``; :meth:`features_map` and
    :meth:`head` give the parts (per-position class maps apply the head to every position)."""

    def __init__(self, blocks: tuple[Block, ...] = MN04_BLOCKS, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(1, STEM_CHANNELS, 3, 2, act=nn.Hardswish)]
        cin = STEM_CHANNELS
        for b in blocks:
            layers.append(InvertedResidual(cin, b))
            cin = b.out
        layers.append(conv_bn(cin, LAST_CHANNELS, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(LAST_CHANNELS, HEAD_CHANNELS),
                                        nn.Hardswish(), nn.Dropout(0.2), nn.Linear(HEAD_CHANNELS, num_classes))
        self.num_classes = num_classes

    @property
    def hidden_size(self) -> int:
        return LAST_CHANNELS

    def features_map(self, mel: torch.Tensor) -> torch.Tensor:
        """``(B, 384, F', T')`` last feature map of ``mel (B, 1, 128, T)``."""
        return self.features(mel)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., 527)`` of pooled features ``(..., 384)``."""
        return self.classifier[5](self.classifier[4](self.classifier[3](self.classifier[2](pooled))))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.head(self.features_map(mel).mean(dim=(2, 3)))


class MelFrontEnd(nn.Module):
    """The tagger's log-mel front end: ``(B, N)`` 32 kHz samples → ``(B, 1, 128, N // 320 + 1)``."""

    def __init__(self, n_mels: int = 128, n_fft: int = 1024, win_length: int = 800, hop: int = 320,
                 f_max: float = 15000.0, preemphasis: float = 0.97):
        super().__init__()
        self.n_fft, self.win_length, self.hop, self.preemphasis = n_fft, win_length, hop, preemphasis
        banks, _ = kaldi.get_mel_banks(n_mels, n_fft, float(TAGGER_RATE), 0.0, f_max, 100.0, -500.0, 1.0)
        self.register_buffer("mel_fb", F.pad(banks, (0, 1)), persistent=False)  # (M, n_fft/2 + 1): no Nyquist weight
        self.register_buffer("window", torch.hann_window(win_length, periodic=False), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = torch.cat([x[:, :1], x[:, 1:] - self.preemphasis * x[:, :-1]], dim=1)
        spec = torch.stft(x, self.n_fft, self.hop, self.win_length, self.window, center=True, return_complex=True)
        mel = self.mel_fb @ spec.abs().pow(2)  # (B, M, T)
        return ((torch.log(mel + 1e-5) + 4.5) / 5).unsqueeze(1)


def tagger_weights(path: str | Path) -> Path | None:
    """The checkpoint file of an EfficientAT model folder (or the file itself), else None."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".pt":
        return p
    if p.is_dir():
        named = p / WEIGHTS_NAME
        if named.is_file():
            return named
        found = sorted(p.glob("mn*_as*.pt"))
        if found:
            return found[0]
    return None


def is_tagger_path(path: str | Path) -> bool:
    """Whether ``path`` is an EfficientAT tagger (a folder with its ``.pt`` state_dict, or the file)."""
    return tagger_weights(path) is not None


def load_tagger(path: str | Path) -> tuple[MobileNetTagger, Path]:
    """The tagger of an EfficientAT folder / ``.pt`` file, every tensor loaded exactly (eval mode).

    Raises :class:`~astsep.errors.ModelLoadError` naming the file when it is missing, not a state_dict,
    or does not fit the mn04 layout (missing / unexpected tensors, other shapes)."""
    weights = tagger_weights(path)
    if weights is None:
        raise ModelLoadError(f"no EfficientAT weights (*.pt) in {path}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one error naming it
        raise ModelLoadError(f"cannot read EfficientAT weights {weights}: {str(exc).splitlines()[0][:160]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{weights} is not a state_dict of tensors")
    model = MobileNetTagger()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{weights} does not fit the mn04 layout: {str(exc).splitlines()[1:2] or exc}") from None
    return model.eval(), weights


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
