"""Configuration objects: one dataclass per component, mirrored in ``configs/*.yaml``.

Every number the algorithm uses lives here, with a comment saying what it does and, where it
comes from the reference separator (``Bentlytrucker/ast_source_sep``), the reference's name.

These dataclasses are the one config system: ``infer.py`` (its ``--section.key`` options are made
from their fields, :func:`config_keys`), ``separate()`` and ``train.py`` (LightningCLI / jsonargparse
parses ``model.separator_config`` as an :class:`AstsepConfig`) all build them, every change goes
through :func:`apply_overrides`, and each checks its fields in ``__post_init__``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .config_base import DEFAULT_MODEL, MAX_WINDOW_SEC, N_AUDIOSET_CLASSES, PRECISIONS, SAMPLE_RATE
from .config_base import check_bool as _bool
from .config_base import check_float as _float
from .config_base import check_int as _int
from .config_base import check_str as _str
from .config_base import describe as _describe
from .config_service import DOA_METHODS, DeliveryConfig, DOAConfig, LiveConfig
from .config_tagger import TaggerConfig
from .errors import ConfigError
from .yamlfile import load_yaml

__all__ = ["DEFAULT_MODEL", "DOA_METHODS", "MAX_WINDOW_SEC", "N_AUDIOSET_CLASSES", "PRECISIONS", "SAMPLE_RATE",
           "AstsepConfig", "CategoryConfig", "DOAConfig", "DeliveryConfig", "GuideConfig", "LiveConfig",
           "STFTConfig", "SeparatorConfig", "TaggerConfig", "WindowConfig", "apply_overrides", "baseline_settings",
           "config_from_dict", "config_from_settings", "config_keys", "load_config", "parse_value",
           "settings_differences", "shortcut_overrides", "type_name", "SEPARATION_SECTIONS", "DEFAULT_CATEGORIES",
           "BASELINE_GUIDE_KEYS", "UNCOMPARED_KEYS"]

@dataclass
class STFTConfig:
    """STFT the masks are estimated and applied on (16 kHz), independent of the AST's own fbank.

    64 ms Hann windows with a 16 ms hop: on the dev mixtures (oracle guide) pass 1 gains 0.2 dB
    SI-SDRi over the reference's 25 ms / 10 ms (11.81 against 11.59), under every degraded guide too,
    for +0.05 s per 10.24 s window (``benchmarks/README.md``).
    """

    n_fft: int = 1024
    hop: int = 256  # samples; 16 ms
    win_length: int = 1024
    n_mels: int = 128  # slaney mel bands used for templates and similarity (reference N_MELS)

    def __post_init__(self) -> None:
        _int("stft", "n_fft", self.n_fft, lo=2)
        _int("stft", "hop", self.hop, lo=1)
        _int("stft", "win_length", self.win_length, lo=1, hi=self.n_fft)
        if self.hop > self.win_length:
            raise ConfigError(f"stft.hop ({self.hop}) must be <= stft.win_length ({self.win_length}): "
                              "otherwise samples between frames are lost")
        _int("stft", "n_mels", self.n_mels, lo=1)


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
    # dominant sound by the mixture's own structure (the NMF components whose activations move with
    # the most energetic one), fading back to the map up to grid_contrast_high.
    grid_contrast_low: float = 0.05
    grid_contrast_high: float = 0.15
    # How alike two components' log activations must be to count as one sound in that split:
    # affinity exp((correlation - 1) / flat_affinity_tau).
    flat_affinity_tau: float = 0.5
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
    trust_residual_low: float = 0.05
    trust_residual_high: float = 0.09
    # bound on the accumulated per-patch log correction of the fit, from fit_min_log_ratio (trust 0:
    # e^0.125 = 1.13x) to fit_max_log_ratio (trust 1: e^4, the grid's shares are met), on a log scale
    fit_min_log_ratio: float = 0.125
    fit_max_log_ratio: float = 4.0
    # windows trusted at least this much (and whose grid is all the guide's own, not the flat-map
    # fallback) are refined with one NMF per side of the mask (the target's and the rest's own
    # templates), fitted to the grid again, source_nmf_rounds times. One round: +0.25 dB with an
    # exact grid, -0.1 dB with a lightly spoiled one; two rounds lose more there (benchmarks/README.md)
    source_nmf_min_trust: float = 0.25
    source_nmf_rounds: int = 1
    source_nmf_components: int = 16
    source_nmf_iterations: int = 20  # per later round (the first uses nmf_iterations)
    prior_clamp: float = 0.01  # posteriors are kept in [0.01, 0.99] before the fit (no bin is certain)
    # the final mask's log-odds are multiplied by this (1: the fitted posterior as it is). Most bins
    # of these mixtures are dominated by one sound (the binary ideal mask beats the ratio one), so a
    # posterior smoothed by an imprecise grid gains from being pushed towards 0 / 1. It fades out
    # for a flat attention map replaced by the structure fallback.
    mask_sharpness: float = 1.25
    # frames an earlier source dominated are turned down by this much (power dB) in what the guide
    # sees in later passes; 0 turns it off
    suppression_db: float = -30.0
    region_share: float = 0.5  # a frame belongs to a source's region when it took this share of its energy
    active_threshold_db: float = -30.0  # event start/end: frames within this of the source's loudest frame
    residual_min_share: float = 0.05  # classify the residual only if it holds >= 5 % of the input energy
    residual_confidence: float = 0.70  # a residual this confident is saved as a sound (RESIDUAL_CONFIDENCE_THRESHOLD)
    top_k: int = 5  # classes listed with their probabilities per source and residual (the events' "top5")
    silence_dbfs: float = -80.0  # an input (or residual) whose RMS is below this (dB re full scale) is silence
    # a window stops when what is left is this far below its input's energy (dB, relative: not dBFS)
    residual_floor_db: float = -80.0
    eps: float = 1e-10

    def __post_init__(self) -> None:
        sec = "separator"
        _int(sec, "max_passes", self.max_passes, lo=1)
        _float(sec, "min_eratio", self.min_eratio, lo=0, hi=1, hi_open=True)
        _float(sec, "grid_quantile", self.grid_quantile, lo=0, hi=1, lo_open=True)
        _float(sec, "grid_contrast_low", self.grid_contrast_low, lo=0)
        _float(sec, "grid_contrast_high", self.grid_contrast_high, lo=self.grid_contrast_low, lo_open=True)
        _float(sec, "flat_affinity_tau", self.flat_affinity_tau, lo=0, lo_open=True)
        _int(sec, "nmf_components", self.nmf_components, lo=1)
        _int(sec, "nmf_iterations", self.nmf_iterations, lo=1)
        _int(sec, "nmf_warm_iterations", self.nmf_warm_iterations, lo=0)
        _float(sec, "nmf_power", self.nmf_power, lo=0, lo_open=True)
        _int(sec, "nmf_seed", self.nmf_seed, lo=0)
        _int(sec, "rounds", self.rounds, lo=1)
        _int(sec, "fit_iterations", self.fit_iterations, lo=0)
        _float(sec, "trust_residual_low", self.trust_residual_low, lo=0)
        _float(sec, "trust_residual_high", self.trust_residual_high, lo=self.trust_residual_low, lo_open=True)
        _float(sec, "fit_min_log_ratio", self.fit_min_log_ratio, lo=0, lo_open=True)
        _float(sec, "fit_max_log_ratio", self.fit_max_log_ratio, lo=self.fit_min_log_ratio)
        _float(sec, "source_nmf_min_trust", self.source_nmf_min_trust, lo=0, hi=1)
        _int(sec, "source_nmf_rounds", self.source_nmf_rounds, lo=0)
        _int(sec, "source_nmf_components", self.source_nmf_components, lo=1)
        _int(sec, "source_nmf_iterations", self.source_nmf_iterations, lo=1)
        _float(sec, "prior_clamp", self.prior_clamp, lo=0, hi=0.5, hi_open=True)
        _float(sec, "mask_sharpness", self.mask_sharpness, lo=0, lo_open=True)
        _float(sec, "suppression_db", self.suppression_db, hi=0)
        _float(sec, "region_share", self.region_share, lo=0, hi=1, lo_open=True)
        _float(sec, "active_threshold_db", self.active_threshold_db, hi=0)
        _float(sec, "residual_min_share", self.residual_min_share, lo=0, hi=1)
        _float(sec, "residual_confidence", self.residual_confidence, lo=0, hi=1)
        _int(sec, "top_k", self.top_k, lo=1)
        _float(sec, "silence_dbfs", self.silence_dbfs, hi=0)
        _float(sec, "residual_floor_db", self.residual_floor_db, hi=0)
        _float(sec, "eps", self.eps, lo=0, lo_open=True)


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

    def __post_init__(self) -> None:
        sec = "guide"
        _str(sec, "model", self.model)
        _str(sec, "device", self.device)
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"guide.device must be auto, cpu or cuda[:N], got {self.device!r}")
        _str(sec, "dtype", self.dtype, choices=PRECISIONS)
        _bool(sec, "trim_padding", self.trim_padding)
        _int(sec, "pad_merge", self.pad_merge, lo=0)
        _int(sec, "max_frames", self.max_frames, lo=16)  # at least one 16-frame patch
        _float(sec, "fbank_mean", self.fbank_mean)
        _float(sec, "fbank_std", self.fbank_std, lo=0, lo_open=True)
        _int(sec, "cache_size", self.cache_size, lo=0)
        _str(sec, "cache_dir", self.cache_dir, optional=True)  # a folder (str or Path) or null
        _bool(sec, "allow_pickle", self.allow_pickle)


@dataclass
class WindowConfig:
    """How long inputs are cut into AST windows."""

    window_sec: float = 10.24
    overlap_sec: float = 1.0  # cross-faded linearly
    # windows processed together (one batched AST forward per pass); 0 = auto: 1 on CPU, where
    # batching buys no speed and intermediate memory would grow with it, 32 on a GPU
    batch_windows: int = 0
    # events of one class in overlapping windows closer than this (seconds) are one event
    merge_gap_sec: float = 0.1

    def __post_init__(self) -> None:
        _float("window", "window_sec", self.window_sec, lo=0, hi=MAX_WINDOW_SEC, lo_open=True)
        # the hop between windows is window_sec - overlap_sec: it must be positive, or the windows never advance
        _float("window", "overlap_sec", self.overlap_sec, lo=0, hi=self.window_sec, hi_open=True)
        _int("window", "batch_windows", self.batch_windows, lo=0)
        _float("window", "merge_gap_sec", self.merge_gap_sec, lo=0.0, hi=MAX_WINDOW_SEC)


# AudioSet class ids per alert category (DESIGN.md).
DEFAULT_CATEGORIES: dict[str, list[int]] = {
    "danger": [396, 397, 398, 399, 400, 426, 436],
    "help": [14, 23, 354, 355, 356, 359],
    "warning": [288, 364, 388, 389, 390, 391, 392, 393, 395, 439, 440, 441, 443, 456, 469, 470, 478, 479],
}


@dataclass
class CategoryConfig:
    sets: dict[str, list[int]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_CATEGORIES.items()})

    def __post_init__(self) -> None:
        if not isinstance(self.sets, dict):
            raise ConfigError(f"categories.sets must be a mapping of category name to a list of AudioSet class ids, "
                              f"got {_describe(self.sets)}")
        owner: dict[int, str] = {}
        for name, ids in self.sets.items():
            if not isinstance(name, str) or not name or name == "other":
                raise ConfigError(f"categories.sets: {name!r} is not a usable category name ('other' is what "
                                  "every unlisted class gets)")
            if not isinstance(ids, (list, tuple)):
                raise ConfigError(f"categories.sets.{name} must be a list of AudioSet class ids, got {_describe(ids)}")
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int):
                    raise ConfigError(f"categories.sets.{name}: class id {_describe(i)} is not an integer "
                                      f"(write 390, not \"390\")")
                if not 0 <= i < N_AUDIOSET_CLASSES:
                    raise ConfigError(f"categories.sets.{name}: class id {i} is not an AudioSet class "
                                      f"(0..{N_AUDIOSET_CLASSES - 1})")
                if owner.get(i, name) != name:
                    raise ConfigError(f"categories.sets: class id {i} is in both {owner[i]!r} and {name!r}; "
                                      "a class belongs to one category")
                owner[i] = name

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
    tagger: TaggerConfig = field(default_factory=TaggerConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    categories: CategoryConfig = field(default_factory=CategoryConfig)
    # what infer.py --live, its direction of arrival and delivery to the backend use
    live: LiveConfig = field(default_factory=LiveConfig)
    doa: DOAConfig = field(default_factory=DOAConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)

    def to_dict(self) -> dict[str, Any]:
        """Every section by value, in plain types (JSON, YAML, a checkpoint's hyper-parameters):
        :func:`config_from_dict` builds the same config back."""
        data = dataclasses.asdict(self)
        for values in data.values():
            for key, value in values.items():
                if isinstance(value, Path):  # guide.cache_dir may be given as a Path
                    values[key] = str(value)
        return data


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        def near(key: str) -> str:
            match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            dotted = match[0] if where == "config" else f"{where}.{match[0]}" if match else ""
            return f"{key} (did you mean {dotted}?)" if match else key

        raise ConfigError(f"unknown key(s) in {where}: {', '.join(near(k) for k in sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            section = name if where == "config" else f"{where}.{name}"
            if not isinstance(value, dict):
                raise ConfigError(f"{section} must be a mapping of keys (or be left out for the defaults), "
                                  f"got {_describe(value)}")
            kwargs[name] = _build(type(default), value, section)
        else:
            kwargs[name] = value
    return cls(**kwargs)


# The sections that shape what a separation gives; a run's events.json records these (stats.config).
# live, doa and delivery decide which windows are separated and where events go, not the separation.
SEPARATION_SECTIONS = ("stft", "separator", "guide", "tagger", "window", "categories")

# What makes two baselines the same: every STFT and separator value and these guide values. The
# device, cache and model-loading options do not change the masks; ``dtype`` is recorded but not
# compared (float32 / bfloat16 / int8 change the AST's logits by a few hundredths, not the algorithm).
BASELINE_GUIDE_KEYS = ("dtype", "trim_padding", "pad_merge", "max_frames", "fbank_mean", "fbank_std")
UNCOMPARED_KEYS = ("guide.dtype",)


def baseline_settings(cfg: AstsepConfig) -> dict[str, dict[str, Any]]:
    """The settings that define the baseline's masks, by value (plain types: fit for a checkpoint's
    hyper-parameters or a report): ``{"stft": {...}, "separator": {...}, "guide": {...}}``."""
    return {"stft": dataclasses.asdict(cfg.stft), "separator": dataclasses.asdict(cfg.separator),
            "guide": {k: getattr(cfg.guide, k) for k in BASELINE_GUIDE_KEYS}}


def config_from_settings(settings: dict[str, Any], base: AstsepConfig | None = None,
                         where: str = "baseline settings") -> AstsepConfig:
    """``base`` (default: the defaults) with ``settings`` (:func:`baseline_settings`' layout) applied, checked."""
    data = (base or AstsepConfig()).to_dict()
    for section, values in (settings or {}).items():
        if section not in data or not isinstance(values, dict):
            raise ConfigError(f"{where}: unknown or malformed section {section!r}")
        data[section].update(values)
    try:
        return _build(AstsepConfig, data, "config")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def settings_differences(recorded: dict[str, Any], cfg: AstsepConfig) -> list[str]:
    """``["guide.trim_padding: True here False", …]``: the compared keys where ``cfg`` differs
    from ``recorded`` (:func:`baseline_settings`' layout); keys missing from ``recorded`` are skipped."""
    now = baseline_settings(cfg)
    out = []
    for section, values in (recorded or {}).items():
        for key, was in (values or {}).items():
            name = f"{section}.{key}"
            if name in UNCOMPARED_KEYS or key not in now.get(section, {}):
                continue
            if now[section][key] != was:
                out.append(f"{name} (trained with {was!r}, now {now[section][key]!r})")
    return out


def config_from_dict(data: Mapping[str, Any] | None, where: str = "config") -> AstsepConfig:
    """An :class:`AstsepConfig` from ``{"section": {"key": value}}`` (any key left out: its default),
    e.g. ``events.json``'s ``stats["config"]`` or a refiner checkpoint's ``separator_config``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of sections, got {_describe(data)}")
    try:
        return _build(AstsepConfig, dict(data), "config")
    except ConfigError as exc:
        if where == "config":
            raise
        raise ConfigError(f"{where}: {exc}") from None


# --- overrides: the one way a config is changed by name ----------------------------------------------
def _sections() -> dict[str, type]:
    return {f.name: type(f.default_factory()) for f in fields(AstsepConfig)}  # type: ignore[misc]


def config_keys() -> dict[str, tuple[Any, Any]]:
    """``{"separator.max_passes": (type, default), …}``: every key of :class:`AstsepConfig`, read from
    the dataclass fields (``infer.py`` makes one ``--section.key`` option of each)."""
    out: dict[str, tuple[Any, Any]] = {}
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        default = cls()
        for f in fields(cls):
            out[f"{section}.{f.name}"] = (hints[f.name], getattr(default, f.name))
    return out


def type_name(tp: Any) -> str:
    """``int``, ``float``, ``str | null``, ``mapping``: what a key takes, for help texts."""
    args = typing.get_args(tp)
    if type(None) in args:
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if tp in (bool, int, float, str):
        return tp.__name__
    return "mapping" if typing.get_origin(tp) is dict else str(tp)


def parse_value(dotted: str, text: str) -> Any:
    """The value of a ``--section.key TEXT`` option, typed by the field: ``int``/``float`` as numbers,
    ``bool`` as true/false, ``str`` as is (``null`` for an optional one), anything else as YAML.
    Range and choice checks are the dataclass's (:func:`apply_overrides`)."""
    keys = config_keys()
    if dotted not in keys:
        raise ConfigError(_unknown_key(dotted, keys))
    tp = keys[dotted][0]
    args = typing.get_args(tp)
    if type(None) in args and text.strip().lower() in ("null", "none", "~"):
        return None
    base = next((a for a in args if a is not type(None)), tp) if args and typing.get_origin(tp) is not dict else tp
    try:
        if base is bool:
            low = text.strip().lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is str:
            return text
        return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(base, f"YAML of a {type_name(tp)}")
        raise ConfigError(f"{dotted} must be {expected}, got {text!r}") from None


def _unknown_key(dotted: str, keys: Mapping[str, Any]) -> str:
    near = difflib.get_close_matches(dotted, list(keys), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(near)}?)" if near else " (keys are section.key, e.g. separator.max_passes)"
    return f"unknown config key {dotted}{hint}"


def apply_overrides(cfg: AstsepConfig, overrides: Mapping[str, Any] | None, where: str | None = None) -> AstsepConfig:
    """A new config: ``cfg`` with ``{"section.key": value}`` applied, checked by each section's
    ``__post_init__`` (``dataclasses.replace``); ``cfg`` is left as it was. Every value is applied,
    ``None`` included (callers drop the options they were not given). The keys of a section are
    applied together, so ``window.window_sec`` and ``window.overlap_sec`` can change at once.
    A bad key or value is a one-line :class:`ConfigError` (prefixed by ``where``)."""
    cfg = copy.deepcopy(cfg)
    if not overrides:
        return cfg
    keys = config_keys()
    per_section: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        if dotted not in keys:
            msg = _unknown_key(str(dotted), keys)
            raise ConfigError(f"{where}: {msg}" if where else msg)
        section, key = dotted.split(".", 1)
        per_section.setdefault(section, {})[key] = value
    try:
        return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)
                                           for section, changes in per_section.items()})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


def shortcut_overrides(*, model: str | None = None, device: str | None = None, cache_dir: str | None = None,
                       max_passes: int | None = None, min_eratio: float | None = None,
                       allow_pickle: bool = False, backend_timeout: float | None = None) -> dict[str, Any]:
    """``{"section.key": value}`` for the shortcut options every front end and :func:`astsep.separate`
    take (``--model``, ``--device``, ``--cache-dir``, ``--max-passes``, ``--min-eratio``,
    ``--allow-pickle``, ``--backend-timeout``); those not given (None, False) are left out. ``--fast`` is
    :func:`astsep.guide.use_fast_settings` (it depends on the device)."""
    given = {"guide.model": model, "guide.device": device, "guide.cache_dir": cache_dir,
             "separator.max_passes": max_passes, "separator.min_eratio": min_eratio,
             "guide.allow_pickle": True if allow_pickle else None, "delivery.timeout": backend_timeout}
    return {k: v for k, v in given.items() if v is not None}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> AstsepConfig:
    """Read a YAML config (every key optional) and apply ``{"section.key": value}`` overrides
    (:func:`apply_overrides`; a ``None`` value means "not given" and is skipped)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(path, what="config file")
    try:
        cfg = _build(AstsepConfig, data, "config")
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"config file {path}: {exc}") from None
    return apply_overrides(cfg, {k: v for k, v in (overrides or {}).items() if v is not None})
