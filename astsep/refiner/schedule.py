"""The learning-rate schedule of refiner training, as a pure function of the step.

A linear warm-up over ``warmup_steps``, then either a constant rate or a half cosine from the
peak down to ``min_lr_ratio`` of it at the last step. :class:`astsep.lit.RefinerModule` wraps
:func:`lr_factor` in a ``LambdaLR`` stepped every optimisation step; its arguments are the
``model.*`` keys of the training configs.
"""

from __future__ import annotations

import math

from ..errors import ConfigError

__all__ = ["SCHEDULES", "lr_factor"]

SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, total_steps: int | float | None, warmup_steps: int = 0, schedule: str = "cosine",
              min_lr_ratio: float = 0.05) -> float:
    """Multiplier of the peak learning rate at optimisation step ``step`` (0-based).

    ``total_steps``: the run's last step (Lightning's ``estimated_stepping_batches``); None,
    infinite or not beyond the warm-up: constant after the warm-up (no end to decay towards).
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    warm = max(0, int(warmup_steps))
    if warm and step < warm:
        return (step + 1) / warm
    if schedule == "constant" or not total_steps or not math.isfinite(total_steps) or total_steps <= warm:
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
