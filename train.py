"""``python train.py fit|validate|test --config configs/refiner_dev.yaml``: train the refiner.

A thin LightningCLI over :class:`astsep.lit.RefinerModule` and a data module named in the config's
``data.class_path``: :class:`astsep.data.ClassSplitDataModule` (class-split mixtures with oracle
guidance, ``configs/refiner_dev.yaml``) or :class:`astsep.data.AudioCapsDataModule` (clip lists,
``configs/refiner_tiny.yaml``, ``configs/refiner_audiocaps.yaml``); every hyper-parameter lives in the
YAML config (``--print_config`` shows the full, resolved one). Progress goes to stderr as log lines
(one per validation with its metrics, the best checkpoint at the end), so a run logged to a file
shows it. See ``docs/training.md``.
"""

from __future__ import annotations

import logging
import os
import sys

# OpenMP threads that wait by spinning burn the CPU when the cores are shared (measured: ~10 CPU-s per
# step instead of ~0.6 on a 2-core machine with other jobs); waiting passively costs nothing idle.
# Set before torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from astsep.deps import require_when_main  # noqa: E402

require_when_main(__name__, ("torch", "torchaudio", "transformers", "soundfile", "lightning"))

import lightning.pytorch as pl  # noqa: E402  (after the dependency check)
import torch  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from astsep.errors import AstsepError  # noqa: E402
from astsep.lit import RefinerModule, check_logger_packages  # noqa: E402

DESCRIPTION = ("astsep: train the FiLM mask refiner that sits on the AST-guided sound separator "
               "(fit, then validate/test; every hyper-parameter in a YAML config, e.g. configs/refiner_tiny.yaml). "
               "Separate files with a trained refiner: python infer.py --refiner CKPT.")
# `predict` would only hand estimates back to Python and write nothing: refused with what to use instead
NO_PREDICT = ("train.py has no predict: to hear a refiner, run python infer.py -i MIX.wav -o OUT/ --refiner CKPT; "
              "to score it, python train.py test --config CONFIG --ckpt_path CKPT or python -m astsep.evaluate")


class RefinerCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_logger_packages(cfg.get("trainer", {}).get("logger"))  # before any model or data is built


def cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run``, execute) the CLI; ``args`` replaces ``sys.argv[1:]``."""
    return RefinerCLI(RefinerModule, pl.LightningDataModule, subclass_mode_data=True, args=args, run=run,
                      seed_everything_default=1234, save_config_kwargs={"overwrite": True},
                      parser_kwargs={"description": DESCRIPTION})


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a line is logged (not the one at set-up:
    a second ``main()`` in one process, as in the tests, must not write to a closed earlier stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property always answers
        pass


def _progress_to_stderr() -> None:
    """Send astsep's INFO lines (progress, validation metrics, the best checkpoint) to stderr."""
    logger = logging.getLogger("astsep")
    if not any(getattr(h, "_astsep_progress", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._astsep_progress = True
        logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


def main(args: list[str] | None = None) -> int:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["predict"]:
        print(f"error: {NO_PREDICT}", file=sys.stderr)
        return 2
    ok = False
    _progress_to_stderr()
    torch.set_flush_denormal(True)  # CPU: masks and spectra decay into denormals, which are ~100x slower
    try:
        cli(args)
        ok = True
    except AstsepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        _finish_wandb(ok)
    return 0


def _finish_wandb(ok: bool) -> None:
    """Close the W&B run this call opened (Lightning's ``WandbLogger`` leaves it open).

    An open run is reused by the next ``wandb.init`` of the process: a second ``main()`` (a
    sweep, a notebook, the test suite) would log into the first run's folder, and an offline
    run is only complete on disk once it is finished.
    """
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
