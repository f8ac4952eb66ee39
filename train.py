"""``python train.py fit|validate|test --config configs/refiner_tiny.yaml``: fine-tune the refiner.

A thin LightningCLI over :class:`astsep.lit.RefinerModule` and
:class:`astsep.data.AudioCapsDataModule`; every hyper-parameter lives in the YAML config
(``--print_config`` shows the full, resolved one). See ``docs/training.md``.
"""

from __future__ import annotations

import sys

from astsep.deps import require_when_main

require_when_main(__name__, ("torch", "torchaudio", "transformers", "soundfile", "lightning"))

from lightning.pytorch.cli import LightningCLI  # noqa: E402  (after the dependency check)

from astsep.data import AudioCapsDataModule  # noqa: E402
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
    return RefinerCLI(RefinerModule, AudioCapsDataModule, args=args, run=run, seed_everything_default=1234,
                      save_config_kwargs={"overwrite": True}, parser_kwargs={"description": DESCRIPTION})


def main(args: list[str] | None = None) -> int:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["predict"]:
        print(f"error: {NO_PREDICT}", file=sys.stderr)
        return 2
    ok = False
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
