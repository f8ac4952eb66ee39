"""astsep: hybrid sound separation.

A deterministic, AST-guided, cached multi-pass separator (no training) and a small
FiLM-conditioned mask refiner fine-tuned with Lightning.
"""

from .version import __version__

__all__ = ["separate", "SeparationResult", "__version__"]


def __getattr__(name):  # lazy: `python -m astsep.delivery` must not pay for importing torch
    if name in ("separate", "SeparationResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'astsep' has no attribute {name!r}")
