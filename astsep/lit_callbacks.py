"""The Lightning pieces around :class:`astsep.lit.RefinerModule` that are not the model: the W&B
logger (offline unless a key is set), the check that its package is installed, and the callbacks
the module adds (validation at a mid-epoch last step, progress as log lines). Importable from
:mod:`astsep.lit` too.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from .errors import MissingExtraError

log = logging.getLogger(__name__)


def _require_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ModuleNotFoundError as exc:
        raise MissingExtraError("W&B logging (the config's trainer.logger)", "wandb", exc.name,
                                ", or log to CSV files instead: --trainer.logger=CSVLogger --trainer.logger.save_dir=DIR") from exc


def check_logger_packages(logger: Any) -> None:
    """Refuse a W&B ``trainer.logger`` (a config's ``class_path`` entry, or a list of them) when wandb
    is not installed, with the extra to install: one line, before anything is built."""
    for item in logger if isinstance(logger, (list, tuple)) else [logger]:
        path = item.get("class_path") if hasattr(item, "get") else None
        if isinstance(path, str) and "wandb" in path.lower():
            _require_wandb()


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that runs offline (a real run folder on disk, synced later with
    ``wandb sync``) unless ``WANDB_API_KEY`` is set or ``offline`` is given explicitly."""

    def __init__(self, offline: bool | None = None, **kwargs: Any):
        _require_wandb()
        if offline is None:
            offline = not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE", "") != "online"
        kwargs.setdefault("project", "astsep-refiner")
        super().__init__(offline=offline, **kwargs)


class ValidateOnLastStep(Callback):
    """Validate after the last training step when ``trainer.max_steps`` ends a run mid-epoch.

    Lightning validates only at ``val_check_interval`` and at epoch ends, so a ``max_steps`` that
    stops inside an epoch (``--trainer.max_steps=20`` with 100-step epochs) ended without any, or
    with a stale, validation: no ``val/...`` metric for ``ModelCheckpoint`` / ``EarlyStopping``
    and no checkpoint of the final weights. Asking the trainer to stop at the last step makes its
    own loop run the validation there (the path early stopping takes), so checkpoints and
    monitors see it as usual. :class:`RefinerModule` adds it in ``configure_callbacks``.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class ProgressLog(Callback):
    """Progress as log lines, for runs whose output goes to a file (no progress bar there).

    One line per validation with its metrics (``val/refined/si_sdri``, ``val/baseline/si_sdri``, the
    loss), the step, steps/s and the baseline's share of the wall time; one line every
    ``every_n_steps`` training steps; and at the end of ``fit`` the best checkpoint with its
    monitored score. Lines go to the ``astsep.lit_callbacks`` logger (``train.py`` sends ``astsep``'s to stderr).
    """

    KEYS = ("val/refined/si_sdri", "val/baseline/si_sdri", "val/loss")

    def __init__(self, every_n_steps: int = 50):
        self.every = max(1, int(every_n_steps))
        self.t0: float | None = None
        self.b0 = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0, self.b0 = time.perf_counter(), getattr(pl_module, "baseline_seconds", 0.0)

    def _rate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        if self.t0 is None:
            return ""
        wall = max(1e-9, time.perf_counter() - self.t0)
        base = getattr(pl_module, "baseline_seconds", 0.0) - self.b0
        return (f", {trainer.global_step / wall:.2f} steps/s, {wall / 60:.1f} min, baseline {100 * base / wall:.0f} % "
                f"of the time")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and step:
            loss = trainer.callback_metrics.get("train/loss")
            log.info("step %d: train/loss %s%s", step, "n/a" if loss is None else f"{float(loss):.3f}",
                     self._rate(trainer, pl_module))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        parts = [f"{k} {float(m[k]):.2f}" for k in self.KEYS if k in m]
        log.info("validation at step %d: %s%s", trainer.global_step, ", ".join(parts) or "no metrics",
                 self._rate(trainer, pl_module))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ck = trainer.checkpoint_callback
        if ck is None or not getattr(ck, "best_model_path", ""):
            log.info("fit done at step %d (no checkpoint kept)%s", trainer.global_step, self._rate(trainer, pl_module))
            return
        score = ck.best_model_score
        log.info("fit done at step %d%s; best checkpoint %s with %s %s", trainer.global_step,
                 self._rate(trainer, pl_module), ck.best_model_path, ck.monitor,
                 "n/a" if score is None else f"{float(score):.2f}")
