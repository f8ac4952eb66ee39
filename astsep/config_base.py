"""Under every config section: the constants and the value checks each ``__post_init__`` uses (one
line each, naming ``section.key``). :mod:`astsep.config` re-exports the constants."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import ConfigError

SAMPLE_RATE = 16_000  # Hz; the AST's rate and the rate of every output file

DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"

N_AUDIOSET_CLASSES = 527  # class ids 0..526 of the AST AudioSet checkpoints
MAX_WINDOW_SEC = 10.24  # the AST's input (1024 fbank frames of 10 ms): it never sees more of a window
PRECISIONS = ("float32", "bfloat16", "int8")


# --- value checks: every dataclass below checks its own fields in __post_init__ ---------------------
def describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(section: str, key: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    """``value`` must be an int (not a bool, not a string) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{section}.{key} must be an integer, got {describe(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{section}.{key} must be an integer {bound}, got {value}")


def check_float(section: str, key: str, value: Any, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> None:
    """``value`` must be a finite number (int or float, not a bool or a string) within the bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{section}.{key} must be a finite number, got {describe(value)}")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi:g}")
        raise ConfigError(f"{section}.{key} must be {' and '.join(parts)}, got {value:g}")


def check_bool(section: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{section}.{key} must be true or false, got {describe(value)}")


def check_str(section: str, key: str, value: Any, choices: tuple[str, ...] | None = None, optional: bool = False) -> None:
    if optional and (value is None or isinstance(value, Path)):
        return
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{section}.{key} must be a non-empty string{' or null' if optional else ''}, "
                          f"got {describe(value)}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{section}.{key} must be one of {', '.join(choices)}, got {value!r}")
