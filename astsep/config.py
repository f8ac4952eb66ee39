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
    """Every parameter of the deterministic multi-pass separator (``astsep/separator.py``).

    Tuned on the dev mixtures of ``astsep.devset`` (``benchmarks/bench_quality.py``), never on one clip.
    """

    max_passes: int = 3  # sources per window at most (one guide forward each; the reference's MAX_PASSES)
    min_eratio: float = 0.001  # stop when a pass removes less than this share of the energy (MIN_ERATIO)
    # An attention map (not a calibrated share) is divided by this quantile of its patches, so its
    # strongest patches read as "all target".
    grid_quantile: float = 0.99
    # An attention map whose coefficient of variation over the patches is below grid_contrast_low
    # says nothing about where the sound is (an untrained AST's is ~0.02); it is replaced by the
    # patches' amplitude (the loudest sound), fading back to the map up to grid_contrast_high.
    grid_contrast_low: float = 0.05
    grid_contrast_high: float = 0.15
    nmf_components: int = 32  # spectral templates of the current signal (all sounds together)
    nmf_iterations: int = 30  # KL multiplicative updates in the first pass
    nmf_warm_iterations: int = 10  # later passes start from the previous pass's factorisation
    nmf_power: float = 2.0  # the factorised spectrogram is |X|^power (2: power)
    nmf_seed: int = 0  # seed of the (batch-independent) NMF start
    rounds: int = 3  # component split + patch-share fit, repeated with the sharper posterior
    fit_iterations: int = 10  # EM steps fitting the patch shares per round (0: no fit)
    # Trust in the grid: the energy-weighted RMS difference between the grid's patch shares and
    # those of the mixture's own NMF structure; trust 1 at or below trust_residual_low, 0 at or
    # above trust_residual_high (an exact oracle grid gives ~0.055, blurred by a patch ~0.085,
    # with 10 dB noise ~0.15).
    trust_residual_low: float = 0.06
    trust_residual_high: float = 0.10
    # bound on the accumulated per-patch log correction of the fit, from fit_min_log_ratio (trust 0:
    # e^0.25 = 1.3x) to fit_max_log_ratio (trust 1: the grid's shares are met), on a log scale
    fit_min_log_ratio: float = 0.25
    fit_max_log_ratio: float = 8.0
    # windows trusted at least this much are refined with one NMF per side of the mask (the target's
    # and the rest's own templates), fitted to the grid again, source_nmf_rounds times
    source_nmf_min_trust: float = 0.25
    source_nmf_rounds: int = 2
    source_nmf_components: int = 16
    source_nmf_iterations: int = 20  # per later round (the first uses nmf_iterations)
    prior_clamp: float = 0.02  # posteriors are kept in [0.02, 0.98] before the fit (no bin is certain)
    # frames an earlier source dominated are turned down by this much (power dB) in what the guide
    # sees in later passes; 0 turns it off
    suppression_db: float = -30.0
    region_share: float = 0.5  # a frame belongs to a source's region when it took this share of its energy
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
