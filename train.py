"""``python train.py fit|validate|test|predict --config configs/refiner_tiny.yaml``: fine-tune the refiner.

A thin LightningCLI over :class:`astsep.lit.RefinerModule` and
:class:`astsep.data.AudioCapsDataModule`; every hyper-parameter lives in the YAML config
(``--print_config`` shows the full, resolved one). See ``docs/training.md``.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from astsep.data import AudioCapsDataModule
from astsep.errors import AstsepError
from astsep.lit import RefinerModule


def cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run``, execute) the CLI; ``args`` replaces ``sys.argv[1:]``."""
    return LightningCLI(RefinerModule, AudioCapsDataModule, args=args, run=run, seed_everything_default=1234,
                        save_config_kwargs={"overwrite": True})


def main(args: list[str] | None = None) -> int:
    try:
        cli(args)
    except AstsepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
