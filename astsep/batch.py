"""Separate a corpus on many processes: Lightning's predict loop, its DDP strategy, a prediction writer.

A list of recordings is planned once (:func:`plan`): every input gets the output folder that
``infer.py`` gives it when it separates the same list (``OUT/<name>/``, names from
:func:`output_names`), and inputs whose folder already holds a complete ``events.json`` for that
input are skipped, so a killed job restarts where it stopped. The rest is sharded across the
processes by Lightning's predict sampler (each input once, no padding), each process builds its own
pipeline on its own device (:class:`SeparationModule`), and :class:`OutputWriter` writes every
input's folder as soon as it is separated, all or nothing, with the same
:func:`astsep.outputs.write_outputs` that ``infer.py`` uses. A file that cannot be decoded,
separated or written is reported (one line per file, and in ``batch_report.json``) and the others go on.

Processes, devices and nodes are Lightning's: ``accelerator``, ``devices``, ``strategy`` and
``num_nodes`` mean what they mean in ``train.py``'s ``trainer:`` section (``devices=2,
strategy="ddp"`` on the CPU runs two gloo processes).

    report = run_batch(inputs, "out/", cfg, BatchOptions(devices=2, strategy="ddp"))
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .audio import write_bytes_atomic
from .config import AstsepConfig
from .errors import AstsepError
from .inputs import output_names

log = logging.getLogger(__name__)

REPORT = "batch_report.json"
_RANK_REPORT = ".astsep-batch-rank{rank}.jsonl"


@dataclass
class BatchItem:
    """One input: its position in the list, its path as given, and its output folder."""

    index: int
    path: str
    out_dir: str


@dataclass
class BatchOptions:
    """How the corpus runs. ``accelerator``/``devices``/``strategy``/``num_nodes`` go to the
    Lightning ``Trainer`` as in training; ``fast``: ``--fast`` settings on each process's device;
    ``redo``: separate inputs whose outputs are already complete too; ``num_workers``: decoding
    processes per separating process (0: decode in the separating process)."""

    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    fast: bool = False
    redo: bool = False
    num_workers: int = 0
    progress: bool = False


@dataclass
class BatchReport:
    """What happened to every input: ``done`` (separated now), ``skipped`` (complete from an earlier
    run), ``failed`` (``{"input", "output", "error"}`` each)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    processes: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_done(item: BatchItem) -> bool:
    """Whether ``item``'s folder holds a complete ``events.json`` written for this same input
    (``write_outputs`` puts it in place last, with the folder, so its presence means complete)."""
    manifest = Path(item.out_dir) / "events.json"
    try:
        data = json.loads(manifest.read_text())
        given = data["stats"]["input"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return given == item.path or Path(given).resolve() == Path(item.path).resolve()


def plan(inputs: list[Path], out_root: str | os.PathLike, redo: bool = False) -> tuple[list[BatchItem], list[BatchItem]]:
    """``(to do, already done)`` for ``inputs`` written under ``out_root`` (names from the whole list,
    so that a restart, whatever is left, writes the same folders)."""
    out_root = Path(out_root)
    items = [BatchItem(i, str(p), str(out_root / name)) for i, (p, name) in enumerate(zip(inputs, output_names(inputs)))]
    if redo:
        return items, []
    done = [it for it in items if is_done(it)]
    skip = {it.index for it in done}
    return [it for it in items if it.index not in skip], done


def recording_start(path: str, duration_sec: float) -> tuple[datetime | None, str]:
    """When the recording started as ``infer.py`` tells it without ``--recorded-at``: the file's
    modification time minus its duration (a recorder writes the file until it stops)."""
    try:
        mtime = Path(path).stat().st_mtime
    except OSError:
        return None, "queued"
    return datetime.fromtimestamp(mtime - duration_sec, tz=timezone.utc), "file_mtime"


class InputFiles(torch.utils.data.Dataset):
    """Decodes the planned inputs: ``{"item", "audio" (N,) float32 16 kHz, "info", "decode" (s)}``,
    or ``{"item", "error"}`` for a file that cannot be decoded."""

    def __init__(self, items: list[BatchItem]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from .audio import load_audio

        item = self.items[i]
        t0 = time.perf_counter()
        try:
            x, info = load_audio(item.path)
        except AstsepError as exc:
            return {"item": item, "error": str(exc)}
        return {"item": item, "audio": x, "info": info, "decode": time.perf_counter() - t0}


def _first(batch: list[dict]) -> dict:
    return batch[0]


def _module_class():
    import lightning.pytorch as pl

    class SeparationModule(pl.LightningModule):
        """One pipeline per process, built on that process's device when prediction starts; its
        ``predict_step`` separates one decoded input (``batch_size`` 1: inputs differ in length)."""

        def __init__(self, cfg: AstsepConfig, fast: bool = False):
            super().__init__()
            self.cfg = cfg
            self.fast = fast
            self.pipe = None
            self.model_load = 0.0

        def on_predict_start(self) -> None:
            from .guide import resolve_device, use_fast_settings
            from .guide_loader import load_guide
            from .pipeline import Pipeline

            t0 = time.perf_counter()
            device = self.trainer.strategy.root_device
            if resolve_device(self.cfg.guide.device) != device:  # "auto" stays "auto" where it means this device
                self.cfg.guide.device = str(device)
            if self.fast:
                use_fast_settings(self.cfg.guide)
            self.pipe = Pipeline(self.cfg, load_guide(self.cfg))
            self.model_load = time.perf_counter() - t0
            log.info("rank %d: model %s on %s in %.2f s", self.global_rank, self.cfg.guide.model, device,
                     self.model_load)

        def transfer_batch_to_device(self, batch: dict, device, dataloader_idx: int) -> dict:
            return batch  # samples stay on the CPU: the pipeline moves each window to its guide's device

        def predict_step(self, batch: dict, batch_idx: int) -> dict:
            from .events import stamp_occurred_at

            item = batch["item"]
            if "error" in batch:
                return {"item": item, "error": batch["error"]}
            try:
                result = self.pipe.run(batch["audio"], item.path, batch["info"])
            except Exception as exc:  # noqa: BLE001 - one bad input must not end a corpus job
                log.debug("separating %s failed", item.path, exc_info=True)
                return {"item": item, "error": f"{type(exc).__name__}: {exc}"}
            result.stats["seconds"]["decode"] = round(batch["decode"], 4)
            result.stats["seconds"]["model_load"] = round(self.model_load, 4)
            stamp_occurred_at(result.events, *recording_start(item.path, batch["info"].duration_sec))
            return {"item": item, "result": result}

    return SeparationModule


def _writer_class():
    from lightning.pytorch.callbacks import BasePredictionWriter

    class OutputWriter(BasePredictionWriter):
        """Writes each separated input's folder as soon as its batch ends (all or nothing, as
        ``infer.py`` writes it) and appends its outcome to this process's report lines."""

        def __init__(self, out_root: Path, cfg: AstsepConfig):
            super().__init__(write_interval="batch")
            self.out_root = Path(out_root)
            self.cfg = cfg

        def rank_file(self, rank: int) -> Path:
            return self.out_root / _RANK_REPORT.format(rank=rank)

        def on_predict_start(self, trainer, pl_module) -> None:
            self.rank_file(trainer.global_rank).unlink(missing_ok=True)

        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                               dataloader_idx) -> None:
            from .errors import OutputError

            item = prediction["item"]
            line = {"input": item.path, "output": item.out_dir}
            if "error" in prediction:
                line["error"] = prediction["error"]
            else:
                try:
                    prediction["result"].write(item.out_dir, config=pl_module.pipe.run_config())
                except (OutputError, OSError) as exc:
                    line["error"] = str(exc)
            if "error" in line:
                log.warning("%s: %s", item.path, line["error"])
            with open(self.rank_file(trainer.global_rank), "a") as fh:
                fh.write(json.dumps(line) + "\n")

    return OutputWriter


def _merge_reports(out_root: Path, world: int, skipped: list[BatchItem], refused: list[dict[str, str]],
                   seconds: float) -> BatchReport:
    report = BatchReport(skipped=[it.path for it in skipped], failed=list(refused), seconds=round(seconds, 3),
                         processes=world)
    for rank in range(world):
        f = out_root / _RANK_REPORT.format(rank=rank)
        if not f.is_file():
            continue
        for ln in f.read_text().splitlines():
            rec = json.loads(ln)
            if "error" in rec:
                report.failed.append(rec)
            else:
                report.done.append(rec["input"])
        f.unlink()
    write_bytes_atomic(out_root / REPORT, json.dumps(report.to_dict(), indent=2).encode())
    return report


def run_batch(inputs: list[Path], out_root: str | os.PathLike, cfg: AstsepConfig,
              opts: BatchOptions | None = None) -> BatchReport | None:
    """Separate ``inputs`` into ``out_root/<name>/`` on ``opts.devices`` processes. Every process runs
    this function (Lightning's DDP launcher starts the others from the same command); process 0
    returns the merged :class:`BatchReport` (also written to ``out_root/batch_report.json``), the
    others ``None``."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from .outputs import check_output_folder

    opts = opts or BatchOptions()
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    todo, done = plan(inputs, out_root, redo=opts.redo)
    bad: list[dict[str, str]] = []
    ok: list[BatchItem] = []
    for it in todo:  # refused folders (a file in the way, a foreign folder) fail at once, before any model work
        try:
            check_output_folder(it.out_dir)
            ok.append(it)
        except AstsepError as exc:
            bad.append({"input": it.path, "output": it.out_dir, "error": str(exc)})
    t0 = time.perf_counter()
    trainer = pl.Trainer(accelerator=opts.accelerator, devices=opts.devices, strategy=opts.strategy,
                         num_nodes=opts.num_nodes, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=opts.progress,
                         callbacks=[_writer_class()(out_root, cfg)], use_distributed_sampler=True)
    module = _module_class()(cfg, fast=opts.fast)
    loader = DataLoader(InputFiles(ok), batch_size=1, shuffle=False, num_workers=opts.num_workers,
                        collate_fn=_first)
    if ok:
        trainer.predict(module, loader, return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    return _merge_reports(out_root, trainer.world_size, done, bad, time.perf_counter() - t0)
