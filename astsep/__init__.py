"""astsep: hybrid sound separation.

A deterministic, AST-guided, cached multi-pass separator (no training) and a small
FiLM-conditioned mask refiner fine-tuned with Lightning.
"""

__version__ = "0.1.0"

from .pipeline import SeparationResult, separate  # noqa: E402

__all__ = ["separate", "SeparationResult", "__version__"]
