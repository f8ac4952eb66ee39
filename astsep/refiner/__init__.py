"""The FiLM mask refiner: the network and the inference wrapper around a trained one.

- :mod:`astsep.refiner.network`: :class:`MaskRefiner` (a plain ``nn.Module``) and its
  :class:`RefinerConfig`; trained by :class:`astsep.lit.RefinerModule`.
- :mod:`astsep.refiner.inference`: :class:`Refiner` (a trained network loaded from a checkpoint,
  with what it needs to embed queries) and :class:`Query`; used by ``infer.py --refiner``.

Both are importable from here (``astsep.refiner.MaskRefiner``), the class paths configs and
older code name.
"""

from __future__ import annotations

from .inference import Query, Refiner
from .network import MaskRefiner, RefinerConfig, count_parameters

__all__ = ["MaskRefiner", "RefinerConfig", "count_parameters", "Refiner", "Query"]
