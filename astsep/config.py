"""Configuration objects: one dataclass per component, mirrored in ``configs/*.yaml``.

Every number the algorithm uses lives here, with a comment saying what it does and, where it
comes from the reference separator (``Bentlytrucker/ast_source_sep``), the reference's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

SAMPLE_RATE = 16_000  # Hz; the AST's rate and the rate of every output file

DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"


@dataclass
class STFTConfig:
    """STFT used for masking (the reference's N_FFT, HOP, WINLEN at 16 kHz)."""

    n_fft: int = 400
    hop: int = 160  # samples; 10 ms
    win_length: int = 400
    n_mels: int = 128  # slaney mel bands used for templates and similarity (reference N_MELS)


@dataclass
class SeparatorConfig:
    """Every parameter of the deterministic multi-pass separator."""

    max_passes: int = 3  # reference MAX_PASSES
    min_eratio: float = 0.001  # stop when a pass removes less than this share of energy (MIN_ERATIO)
    anchor_sec: float = 0.512  # length of the anchor window (ANCHOR_SEC)
    smooth_frames: int = 19  # moving-average length for attention, purity and score (SMOOTH_T)
    alpha_attention: float = 0.80  # anchor score = attention^alpha * purity^beta (ALPHA_ATT)
    beta_purity: float = 1.20  # (BETA_PUR)
    purity_energy_weight: float = 0.30  # purity = w*energy + (1-w)*(1-entropy) (W_E)
    attention_top_share: float = 0.30  # anchors are searched among the top 30 % attention frames
    anchor_buffer_share: float = 0.20  # earlier anchors are excluded with a 20 % buffer
    core_quantile: float = 0.50  # core = run around the peak above this quantile (TOP_PCT_CORE_IN_ANCHOR)
    omega_energy_quantile: float = 0.20  # band energy threshold for the frequency support (OMEGA_Q_CONSERVATIVE)
    omega_min_bins: int = 5  # at least this many mel bands in the support (OMEGA_MIN_BINS)
    # Sigmoid slopes on energies are per 10 dB (energies are compared in dB re the window's maximum,
    # so a quiet and a loud recording give the same masks); on attention they are per unit (0-1).
    omega_slope: float = 10.0  # soft frequency support: band energy and AST frequency attention
    ast_freq_quantile: float = 0.40  # AST frequency attention threshold (AST_FREQ_QUANTILE_CONSERVATIVE)
    ast_freq_quantile_aggressive: float = 0.20
    ast_freq_slope: float = 8.0
    presence_smooth_frames: int = 9
    presence_quantile: float = 0.20
    presence_slope: float = 5.0
    similarity_floor: float = 0.10  # mask value of frames whose similarity does not beat the AST confidence
    low_similarity_energy_share: float = 0.01  # such frames keep at most 1 % of the anchor's energy
    amp_quantile: float = 0.80  # "loudest bins" of the anchor: above this quantile of per-bin peaks
    amp_slope: float = 6.0
    boost_conservative: float = 0.5  # frequency weight 1 + 0.5 * boost
    boost_aggressive: float = 0.2  # frequency weight 1 + 0.2 * boost
    aggressive_below_eratio: float = 0.3  # aggressive when the previous pass kept < 30 % of the energy
    weak_anchor_db: float = -20.0  # an anchor this far below the loudest frame is a weak sound
    weak_mask_power: float = 2.0  # weak sounds get mask**power (stricter) and no similarity floor
    suppression: float = 0.999  # separated time regions are suppressed to 0.1 % before the next pass
    region_mask_threshold: float = 0.10  # a frame belongs to a source's region when its mean mask exceeds this
    active_threshold_db: float = -30.0  # event start/end: frames within this of the source's loudest frame
    residual_min_share: float = 0.05  # classify the residual only if it holds >= 5 % of the input energy
    residual_confidence: float = 0.70  # a residual this confident is saved as a sound (RESIDUAL_CONFIDENCE_THRESHOLD)
    silence_dbfs: float = -80.0  # an input (or residual) quieter than this RMS is treated as silence
    eps: float = 1e-10


@dataclass
class GuideConfig:
    """The AST guide: model, precision, and how much of the window it looks at."""

    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 | int8 (dynamic int8 Linear layers, CPU only)
    trim_padding: bool = False  # run the AST only on the patches that hold audio (fast option)
    # with trim_padding: padded time patches are averaged this many to a token per frequency row and
    # attended in proportion to their count (keeps the padding's share of attention); 0 drops them
    pad_merge: int = 8
    max_frames: int = 1024  # AST input frames (10.24 s)
    fbank_mean: float = -4.2677393  # AudioSet statistics used by the published AST checkpoints
    fbank_std: float = 4.5689974
    cache_size: int = 512  # in-memory cache entries
    cache_dir: str | None = None
    allow_pickle: bool = False  # load non-safetensors weights (pickle) only when asked


@dataclass
class WindowConfig:
    """How long inputs are cut into AST windows."""

    window_sec: float = 10.24
    overlap_sec: float = 1.0  # cross-faded linearly
    # windows processed together (one batched AST forward per pass); 0 = auto: 1 on CPU, where
    # batching buys no speed and intermediate memory would grow with it, 32 on a GPU
    batch_windows: int = 0


# AudioSet class ids per alert category (DESIGN.md).
DEFAULT_CATEGORIES: dict[str, list[int]] = {
    "danger": [396, 397, 398, 399, 400, 426, 436],
    "help": [14, 23, 354, 355, 356, 359],
    "warning": [288, 364, 388, 389, 390, 391, 392, 393, 395, 439, 440, 441, 443, 456, 469, 470, 478, 479],
}


@dataclass
class CategoryConfig:
    sets: dict[str, list[int]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_CATEGORIES.items()})

    def category(self, class_id: int) -> str:
        for name, ids in self.sets.items():
            if int(class_id) in ids:
                return name
        return "other"


@dataclass
class AstsepConfig:
    """Everything ``infer.py`` needs, as one object (``configs/separator.yaml``)."""

    stft: STFTConfig = field(default_factory=STFTConfig)
    separator: SeparatorConfig = field(default_factory=SeparatorConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    categories: CategoryConfig = field(default_factory=CategoryConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> AstsepConfig:
    """Read a YAML config (every key optional) and apply ``{"section.key": value}`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping")
    cfg = _build(AstsepConfig, data, "config")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        obj = getattr(cfg, section)
        if not hasattr(obj, key):
            raise ConfigError(f"unknown config key {dotted}")
        setattr(obj, key, value)
    return cfg
