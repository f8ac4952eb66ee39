#!/usr/bin/env python
"""Separate a corpus on several processes, GPUs or nodes: ``python batch.py -h``.

    python batch.py -i corpus/ -o out/ -m ast_model --devices 4 --strategy ddp        # 4 GPUs
    python batch.py --list files.txt -o out/ --accelerator cpu --devices 2 --strategy ddp

Each input gets ``out/<name>/`` exactly as ``python infer.py -i <the same inputs> -o out/`` writes it;
inputs already complete there are skipped (run the same command again after a crash); failures are
reported per file and in ``out/batch_report.json``. A front end over :mod:`astsep.batch`; nothing
imports it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from astsep.errors import AstsepError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "separator.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="batch.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("inputs and outputs")
    src.add_argument("-i", "--input", nargs="+", default=[], metavar="PATH",
                     help="audio files or folders (their audio files, sorted)")
    src.add_argument("--list", metavar="FILE", help="a text file of input paths, one per line (# comments)")
    src.add_argument("-o", "--output", required=True, help="output root: one folder per input")
    src.add_argument("--redo", action="store_true", help="separate inputs whose outputs are complete too")
    sep = p.add_argument_group("separation (as infer.py)")
    sep.add_argument("-m", "--model", help="AST: Hub id or local folder (default: the config's guide.model)")
    sep.add_argument("--config", help="YAML config (default configs/separator.yaml)")
    sep.add_argument("--fast", action="store_true", help="int8 AST on CPUs, bfloat16 on GPUs, trimmed padding")
    run = p.add_argument_group("processes (Lightning Trainer options, as trainer.* in training)")
    run.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default)")
    run.add_argument("--devices", default="1", help="processes per node: a number, or auto (default 1)")
    run.add_argument("--strategy", default="auto", help="ddp for several devices (default auto)")
    run.add_argument("--num-nodes", type=int, default=1, help="machines (default 1)")
    run.add_argument("--num-workers", type=int, default=0, help="decoding workers per process (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return p


def _inputs(args) -> list[Path]:
    from astsep.inputs import find_inputs

    raw = list(args.input)
    if args.list:
        try:
            lines = Path(args.list).read_text().splitlines()
        except OSError as exc:
            raise AstsepError(f"cannot read --list {args.list}: {exc.strerror or exc}") from exc
        raw += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not raw:
        raise AstsepError("no inputs: give -i PATH... or --list FILE")
    return find_inputs(raw)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        warnings.filterwarnings("ignore")
        logging.getLogger("lightning").setLevel(logging.ERROR)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    try:
        from astsep.config import apply_overrides, load_config

        inputs = _inputs(args)
        cfg = load_config(args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None))
        if args.model:
            cfg = apply_overrides(cfg, {"guide.model": args.model})
        from astsep.batch import BatchOptions, run_batch

        devices = int(args.devices) if args.devices.isdigit() else args.devices
        opts = BatchOptions(accelerator=args.accelerator, devices=devices, strategy=args.strategy,
                            num_nodes=args.num_nodes, fast=args.fast, redo=args.redo, num_workers=args.num_workers,
                            progress=not args.quiet and sys.stderr.isatty())
        report = run_batch(inputs, args.output, cfg, opts)
    except AstsepError as exc:
        print(f"astsep: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if report is None:  # not process 0: it reports for all
        return 0
    for f in report.failed:
        print(f"astsep: error: {f['input']}: {f['error']}", file=sys.stderr)
    if not args.quiet:
        print(f"{len(report.done)} separated, {len(report.skipped)} already done, {len(report.failed)} failed "
              f"in {report.seconds:.1f} s on {report.processes} process(es) -> {args.output}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
