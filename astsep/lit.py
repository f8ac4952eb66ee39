"""Lightning wiring for the refiner: baseline → refiner → loss, metrics, logging. Thin on purpose.

The plain parts live elsewhere and run without Lightning: the frozen AST guide (``guide.py``),
the deterministic separator (``separator.py``), the network (``refiner/network.py``), the metrics,
the loss and the baseline's oracle selection (``metrics.py``), the LR schedule
(``refiner/schedule.py``). :class:`RefinerModule` joins them, as asteroid's ``System`` does: one
:meth:`~RefinerModule.common_step` shared by training, validation and test, an injectable
``loss``, the schedule's settings in the config:

``mixture (B,N)`` → separator (no gradients, float32; results cached per example,
:mod:`astsep.refiner.cache`) → ``K`` baseline masks ``(B,K,F,T)`` → :func:`astsep.refiner.network.refine`
(the same STFT → :class:`MaskRefiner` → mask · mixture STFT → iSTFT path ``infer.py --refiner`` runs)
with the query → estimate → ``loss(estimate, target)`` (default ``-λ·SDR - (1-λ)·SI-SDR``).

**Which pass is refined.** Every row refines one pass of its baseline: the kept pass whose source is
closest (SI-SDR) to the target (pass 1 where none was kept). That choice uses the target only to
pick which output to train, as permutation-invariant training does; the refiner's *inputs* are
that pass's own mask (``refiner.own_mask``), its pass number and its query, all of which
inference has for every pass.

**Oracle batches.** A batch that carries ``degradation`` specs (``astsep.data.ClassSplitDataModule``)
runs the baseline with an oracle guide per row, built from that row's target and interferer and
spoiled by that row's degradation (:mod:`astsep.oracle`): the setting where the guide's quality is
known and the refiner learns to repair it.

**Baseline in the validation metrics.** The separator returns up to K sources without knowing the
query. The reported baseline is, per mixture, the separated source with the highest SI-SDR
against the target (oracle selection; the input mixture when no pass kept a source). It is an
upper bound of what any query-matching rule could pick from the baseline's sources, so the
refiner's margin over it is, if anything, understated.

**Query sources.** ``query_source="table"`` uses the batch's ``query`` (caption embeddings from an
``EmbeddingTable``, e.g. CLAP text); ``"pass"`` uses the guide's embedding of the refined pass as
the separator returned it (``BatchSeparation.embeddings``), exactly the query ``infer.py --refiner``
gives each pass; it needs no table (the oracle guide's embeddings are zeros: under it the refiner
is told only which pass it refines and sees its mask). The clean target never enters the query;
the former ``"target_audio"`` (the target's own AST embedding) is refused for that reason.

The guide and separator are not submodules: they are frozen, rebuilt from the config on load,
and kept out of checkpoints (which hold only the refiner).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from .config import AstsepConfig, GuideConfig, baseline_settings, config_from_dict, config_from_settings, load_config
from .errors import ConfigError
from .features import apply_mask, stft
from .guide_loader import build_guide
from .lit_callbacks import AutoWandbLogger, ProgressLog, ValidateOnLastStep, check_logger_packages  # noqa: F401 - re-exported
from .metrics import METRICS, SdrSiSdrLoss, best_source, separation_metrics
from .refiner.cache import BaselineCache, baseline_key
from .refiner.network import MaskRefiner, RefinerConfig, refine
from .refiner.schedule import SCHEDULES, lr_factor

log = logging.getLogger(__name__)

__all__ = ["RefinerModule", "StepOutput", "AutoWandbLogger", "check_logger_packages", "ValidateOnLastStep",
           "ProgressLog"]

_PLAIN = (bool, int, float, str, type(None))


def _loss_spec(loss: nn.Module) -> dict:
    """``{"class_path", "init_args"}`` of a loss module, in plain types (checkpoints load with
    ``weights_only``): the constructor arguments the module keeps as attributes of the same name."""
    cls = type(loss)
    args = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or not hasattr(loss, name):
            continue
        value = getattr(loss, name)
        if isinstance(value, _PLAIN) or (isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value)):
            args[name] = list(value) if isinstance(value, tuple) else value
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}


def _build_loss(spec: dict) -> nn.Module:
    """The loss module a :func:`_loss_spec` describes (a checkpoint's ``hyper_parameters["loss"]``).

    Only a class of an already imported module is built, so a checkpoint cannot make this import
    code (the rule Lightning applies to the module's own class path).
    """
    path = spec.get("class_path") if isinstance(spec, dict) else None
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"loss must be a module or {{class_path, init_args}}, got {spec!r}")
    module_name, name = path.rsplit(".", 1)
    module = sys.modules.get(module_name)
    cls = getattr(module, name, None) if module is not None else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"loss class {path} is not an nn.Module of an imported module; import it before "
                          "loading the checkpoint")
    return cls(**(spec.get("init_args") or {}))


def _separator_config(value: Any) -> AstsepConfig:
    """``RefinerModule``'s ``separator_config`` as a new :class:`AstsepConfig`: a copy of a config, a
    mapping of its values (a checkpoint's, a training YAML's), or a YAML path read now; None: defaults."""
    if isinstance(value, AstsepConfig):
        return config_from_dict(value.to_dict())  # a copy, checked again
    if value is None or isinstance(value, (str, os.PathLike)):
        return load_config(value)
    if isinstance(value, dict):
        return config_from_dict(value, where="model.separator_config")
    raise ConfigError(f"model.separator_config must be a mapping of config sections, a YAML path or null, "
                      f"got {value!r}")


@dataclasses.dataclass
class StepOutput:
    """What :meth:`RefinerModule.common_step` computed for a batch of ``B`` mixtures of ``N`` samples."""

    loss: torch.Tensor  # () the loss of the refined estimate against the target
    estimate: torch.Tensor  # (B, N) the refined estimate
    mask: torch.Tensor  # (B, F, T) the refiner's mask
    baseline_masks: torch.Tensor  # (B, K, F, T) the separator's masks, the refiner's input
    sources: torch.Tensor  # (B, K, N) the separator's sources
    kept: torch.Tensor  # (B, K) bool: which passes kept a source
    pass_index: torch.Tensor  # (B,) the pass each row refined (0-based)


class RefinerModule(pl.LightningModule):
    """Trains :class:`MaskRefiner` on top of the frozen AST-guided separator.

    Args:
        refiner: network size and conditioning (``n_masks`` must equal the separator's passes).
        guide_model: AST Hub id, local folder, or ``"tiny"`` (random tiny AST for smoke tests): the one
            name of the training AST. ``separator_config``'s ``guide.model`` is set to it; a
            ``separator_config`` that names another AST there (not the default) is refused.
        guide_seed: seed of the ``"tiny"`` guide.
        separator_config: the separator's config (STFT, separator, guide, window, categories): an
            :class:`~astsep.config.AstsepConfig`, its values as a mapping (any key left out: its
            default; in a training YAML, or ``--model.separator_config.separator.rounds=2``), or the path
            of a YAML in ``configs/separator.yaml``'s layout, read here. Whichever it was, the module
            stores the resolved values in its hyper-parameters (so in every checkpoint: loading one
            needs no YAML). Default: the defaults (= ``configs/separator.yaml``). The AST's precision,
            ``trim_padding`` and ``pad_merge`` are its ``guide`` section's (one name each).
        query_source: ``"table"`` (batch ``query``) or ``"pass"`` (the guide's embedding of the refined
            pass, as at inference).
        loss: a module of ``(estimate (B,N), target (B,N)) -> ()`` to minimise (YAML: ``class_path``
            and ``init_args``); None: :class:`~astsep.metrics.SdrSiSdrLoss` ``-λ·SDR - (1-λ)·SI-SDR``
            with λ 0.5. Checkpoints record it as ``{class_path, init_args}`` (:func:`_loss_spec`).
        sdr_weight: leave it null. λ of the default loss in checkpoints written before ``loss``
            existed, which still load; new configs set ``loss.init_args.sdr_weight``.
        lr, weight_decay, betas: AdamW.
        warmup_steps, schedule, min_lr_ratio: the LR schedule (:func:`astsep.refiner.schedule.lr_factor`):
            linear warm-up; then ``"cosine"`` (to ``min_lr_ratio·lr`` at the last step) or ``"constant"``.
        example_every_n_val: log audio examples and mask images every N validations (0: never).
        n_examples: examples per logging.
        cache_val_baseline: keep the baseline's results of the fixed validation batches in memory.
        cache_train_baseline: cache the training batches' baseline results too (a fixed pool of
            examples, as ``ClassSplitDataModule`` draws, is then computed once; random mixtures never hit).
        baseline_cache_dir: also keep the cached results on disk there (reused by later runs).
        oracle_hidden_size: length of the oracle guide's (zero) embeddings; None: ``refiner.query_dim``.
        baseline: leave it null. The STFT, separator and guide settings by value
            (:func:`astsep.config.baseline_settings`), which the module writes into its
            hyper-parameters so that a checkpoint says what baseline the refiner was trained on,
            wherever it is loaded (``infer.py --refiner`` compares them with its own). When given
            (loading a checkpoint), they replace those of ``separator_config``.
    """

    def __init__(self, refiner: RefinerConfig | dict | None = None, guide_model: str = "tiny", guide_seed: int = 0,
                 separator_config: AstsepConfig | str | None = AstsepConfig(), query_source: str = "table",
                 loss: nn.Module | None = None, sdr_weight: float | None = None,
                 lr: float = 1e-3, weight_decay: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_steps: int = 0, schedule: str = "cosine", min_lr_ratio: float = 0.05, example_every_n_val: int = 5,
                 n_examples: int = 2, cache_val_baseline: bool = True, cache_train_baseline: bool = True,
                 baseline_cache_dir: str | None = None, oracle_hidden_size: int | None = None,
                 baseline: dict | None = None):
        super().__init__()
        if isinstance(refiner, dict):
            refiner = RefinerConfig(**refiner)
        refiner = refiner or RefinerConfig()
        if query_source == "target_audio":
            raise ConfigError("query_source 'target_audio' queried the refiner with the clean target's own embedding, "
                              "which inference never has; use 'pass' (the guide's embedding of the refined pass)")
        if query_source not in ("table", "pass"):
            raise ConfigError(f"query_source must be 'table' or 'pass', got {query_source!r}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.loss_func = self._make_loss(loss, sdr_weight)
        self.save_hyperparameters(ignore=["loss"])
        self.hparams["refiner"] = dataclasses.asdict(refiner)  # plain types: checkpoints load with weights_only
        self.hparams["loss"] = _loss_spec(self.loss_func)
        if baseline is not None:  # a checkpoint: the settings it was trained with, not a path
            # checkpoints written before separator_config was stored by value hold its path (or None):
            # their baseline settings are all that counts, the path is not read
            base = None if separator_config is None or isinstance(separator_config, (str, os.PathLike)) else \
                _separator_config(separator_config)
            cfg = config_from_settings(baseline, base, where="the checkpoint's baseline settings")
        else:
            cfg = _separator_config(separator_config)
        if cfg.guide.model not in (guide_model, GuideConfig.model):
            raise ConfigError(f"model.separator_config.guide.model ({cfg.guide.model}) and model.guide_model "
                              f"({guide_model}) name two ASTs: set model.guide_model only")
        cfg.guide = dataclasses.replace(cfg.guide, model=guide_model)  # the AST guide_model picks, recorded
        # by value, whatever was given (a path, a mapping, a dataclass): checkpoints load without the YAML
        self.hparams["separator_config"] = cfg.to_dict()
        self.hparams["baseline"] = baseline_settings(cfg)
        # training mixtures never repeat; validation is cached here instead
        cfg.guide = dataclasses.replace(cfg.guide, cache_size=0)
        self.cfg = cfg
        if self.cfg.separator.max_passes != refiner.n_masks:
            raise ConfigError(f"refiner.n_masks={refiner.n_masks} must equal the separator's max_passes="
                              f"{self.cfg.separator.max_passes}")
        self.refiner = MaskRefiner(refiner)
        self._baseline = None  # (guide, separator), built on first use on the batch's device
        self.baseline_cache = BaselineCache(baseline_cache_dir)
        self._examples: list[dict] = []
        self.n_validations = 0
        self.skipped_steps = 0
        self.baseline_seconds = 0.0  # wall time spent in the baseline (benchmarks read it)

    @staticmethod
    def _make_loss(loss: nn.Module | dict | None, sdr_weight: float | None) -> nn.Module:
        """The loss module: given, rebuilt from a checkpoint's spec, or the default (λ ``sdr_weight``)."""
        if isinstance(loss, dict):
            loss = _build_loss(loss)
        if loss is None:
            return SdrSiSdrLoss(0.5 if sdr_weight is None else sdr_weight)
        if sdr_weight is not None and getattr(loss, "sdr_weight", None) != sdr_weight:
            raise ConfigError(f"sdr_weight={sdr_weight} (a checkpoint written before model.loss existed) disagrees "
                              f"with model.loss {_loss_spec(loss)}; set model.loss.init_args.sdr_weight instead")
        return loss

    # --- baseline ---------------------------------------------------------------------------------
    def baseline(self, device: torch.device):
        if self._baseline is None or self._baseline[0].device != device:
            from .separator import Separator

            gcfg = dataclasses.replace(self.cfg.guide, device=str(device))
            guide = build_guide(self.hparams.guide_model, gcfg, self.hparams.guide_seed)
            self._baseline = (guide, Separator(self.cfg, guide))
        return self._baseline

    @torch.no_grad()
    def run_baseline(self, mixture: torch.Tensor, cache: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Baseline ``(masks (B,K,F,T), sources (B,K,N), kept (B,K))`` of ``(B,N)`` mixtures with the AST guide."""
        masks, sources, kept, _ = self.baseline_batch({"mixture": mixture}, cache)
        return masks, sources, kept

    @torch.no_grad()
    def baseline_batch(self, batch: dict, cache: bool = False) -> tuple[torch.Tensor, ...]:
        """The frozen baseline of a batch: ``(masks (B,K,F,T), sources (B,K,N), kept (B,K), embeddings
        (B,K,H))``, float32 on the mixtures' device. With ``degradation`` in the batch each row gets an
        oracle guide (module docstring), else the AST. ``cache``: read and fill :attr:`baseline_cache`.
        Sources are the masks applied to the mixture STFT (what the separator returns, from the
        stored masks, so a cached and a computed row give the same numbers)."""
        mixture = batch["mixture"]
        t0 = time.perf_counter()
        B = mixture.shape[0]
        oracle = "degradation" in batch
        settings = self.hparams.baseline
        keys: list[str | None] = [None] * B
        rows: list[dict | None] = [None] * B
        x_cpu = mixture.detach().float().cpu()
        srcs = None
        if oracle:
            srcs = torch.stack([batch["target"], batch["mixture"] - batch["target"]], dim=1).detach().float().cpu()
        for i in range(B):
            if cache:
                guide_name = batch["degradation"][i] if oracle else f"{self.hparams.guide_model}:{self.hparams.guide_seed}"
                keys[i] = baseline_key(x_cpu[i], guide_name, settings, None if srcs is None else srcs[i])
                rows[i] = self.baseline_cache.get(keys[i])
        todo = [i for i in range(B) if rows[i] is None]
        if todo:
            computed = self._oracle_rows(batch, x_cpu, srcs, todo) if oracle else self._ast_rows(mixture, todo)
            for i, value in zip(todo, computed):
                rows[i] = self.baseline_cache.put(keys[i], value) if keys[i] is not None else {
                    "masks": value["masks"].float().cpu(), "kept": value["kept"].cpu(),
                    "embeddings": value["embeddings"].float().cpu()}
        dev = mixture.device
        masks = torch.stack([r["masks"] for r in rows]).to(dev, torch.float32)
        kept = torch.stack([r["kept"] for r in rows]).to(dev)
        emb = torch.stack([r["embeddings"] for r in rows]).to(dev, torch.float32)
        with torch.autocast(dev.type, enabled=False):
            spec = stft(mixture.float(), self.cfg.stft)
            sources = apply_mask(spec, masks, self.cfg.stft, mixture.shape[-1])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.baseline_seconds += time.perf_counter() - t0
        return masks, sources, kept, emb

    def _ast_rows(self, mixture: torch.Tensor, todo: list[int]) -> list[dict]:
        _, separator = self.baseline(mixture.device)
        with torch.autocast(mixture.device.type, enabled=False):
            res = separator.separate_batch(mixture[todo].float())
        return [{"masks": res.masks[j], "kept": res.kept[j], "embeddings": res.embeddings[j]} for j in range(len(todo))]

    def _oracle_rows(self, batch: dict, x: torch.Tensor, srcs: torch.Tensor, todo: list[int]) -> list[dict]:
        from .oracle import OracleGuide, parse_guide_spec
        from .separator import Separator

        hidden = self.hparams.oracle_hidden_size or self.refiner.cfg.query_dim
        out = []
        for i in todo:  # one guide per row: every row has its own sources and degradation
            tl, il = batch["target_label"][i], batch["interferer_label"][i]
            labels = list(dict.fromkeys([tl, il]))
            guide = OracleGuide(x[i], srcs[i], [0, labels.index(il)], labels, parse_guide_spec(batch["degradation"][i]),
                                self.cfg.stft, hidden_size=hidden)
            res = Separator(self.cfg, guide).separate_batch(x[i:i + 1])
            out.append({"masks": res.masks[0], "kept": res.kept[0], "embeddings": res.embeddings[0]})
        return out

    def _query(self, batch: dict, embeddings: torch.Tensor, pass_index: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(query (B,D), has_query, negative, has_negative)``; ``"pass"``: the refined pass's embedding."""
        if self.hparams.query_source == "pass":
            q = embeddings[torch.arange(embeddings.shape[0], device=embeddings.device), pass_index]
            has_q = torch.ones(q.shape[0], device=q.device)
        else:
            q, has_q = batch["query"], batch.get("has_query")
        if q.shape[-1] != self.refiner.cfg.query_dim:
            raise ConfigError(f"queries have {q.shape[-1]} dims but refiner.query_dim={self.refiner.cfg.query_dim} "
                              f"(query_source={self.hparams.query_source}); set refiner.query_dim to match")
        neg = batch.get("negative") if self.refiner.cfg.use_negative else None
        has_neg = batch.get("has_negative") if neg is not None else None
        return q, has_q, neg, has_neg

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, mixture: torch.Tensor, masks: torch.Tensor, query: torch.Tensor,
                negative: torch.Tensor | None = None, has_query: torch.Tensor | None = None,
                has_negative: torch.Tensor | None = None, pass_index: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refined ``(estimate (B,N), mask (B,F,T))`` from mixtures ``(B,N)`` and baseline masks, through
        :func:`astsep.refiner.network.refine` (the path inference takes)."""
        est, mask, _ = refine(self.refiner, mixture, masks, query, self.cfg.stft, negative, has_query, has_negative,
                              pass_index)
        return est, mask

    # --- steps ------------------------------------------------------------------------------------
    def _refine_batch(self, batch: dict, cache_baseline: bool = False) -> tuple[torch.Tensor, ...]:
        """Baseline, query and refiner on a batch: ``(estimate (B,N), mask (B,F,T), baseline masks
        (B,K,F,T), sources (B,K,N), kept (B,K), pass_index (B,))``."""
        mixture = batch["mixture"]
        masks, sources, kept, emb = self.baseline_batch(batch, cache=cache_baseline)
        if "target" in batch:
            _, idx = best_source(sources, kept, mixture, batch["target"])
            pass_index = idx.clamp_min(0)
        else:
            pass_index = torch.zeros(mixture.shape[0], dtype=torch.long, device=mixture.device)
        q, has_q, neg, has_neg = self._query(batch, emb, pass_index)
        est, mask = self(mixture, masks, q, neg, has_q, has_neg, pass_index)
        return est, mask, masks, sources, kept, pass_index

    def common_step(self, batch: dict, batch_idx: int, cache_baseline: bool = False) -> StepOutput:
        """The step training, validation and test share: refine the batch's mixtures and score the
        estimates with the loss. ``batch``: ``mixture``, ``target`` ``(B,N)``, and the queries (or
        the oracle's ``degradation`` specs and labels)."""
        est, mask, masks, sources, kept, idx = self._refine_batch(batch, cache_baseline)
        return StepOutput(self.loss_func(est, batch["target"]), est, mask, masks, sources, kept, idx)

    def training_step(self, batch: dict, batch_idx: int):
        loss = self.common_step(batch, batch_idx, cache_baseline=self.hparams.cache_train_baseline).loss
        n = batch["mixture"].shape[0]
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            log.warning("skipping step %d: loss is %s (%d skipped so far)", self.global_step, loss.item(), self.skipped_steps)
            if self._trainer is not None:
                self.log("train/skipped_steps", float(self.skipped_steps), batch_size=n)
            if self._trainer is not None and self._trainer.world_size > 1:
                # every rank must join the all-reduce: a zero loss with zero gradients
                return sum(p.sum() for p in self.refiner.parameters()) * 0.0
            return None  # Lightning skips backward and the optimizer step
        if self._trainer is not None:
            self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> dict:
        mixture, target = batch["mixture"], batch["target"]
        out = self.common_step(batch, batch_idx, cache_baseline=self.hparams.cache_val_baseline and stage == "val")
        base, _ = best_source(out.sources, out.kept, mixture, target)
        B = mixture.shape[0]
        scores = {}
        for name, estimate in (("refined", out.estimate), ("baseline", base)):
            m = separation_metrics(estimate, mixture, target)
            for k in METRICS:
                self.log(f"{stage}/{name}/{k}", m[k].mean(), batch_size=B, sync_dist=True, prog_bar=(name == "refined" and k == "si_sdri"))
            scores[name] = m
        self.log(f"{stage}/loss", out.loss, batch_size=B, sync_dist=True)
        if stage == "val" and batch_idx == 0 and len(self._examples) == 0:
            n = min(self.hparams.n_examples, B)
            self._examples = [{
                "mixture": mixture[i].float().cpu(), "target": target[i].float().cpu(), "refined": out.estimate[i].float().cpu(),
                "baseline": base[i].float().cpu(), "mask": out.mask[i].float().cpu(),
                "baseline_masks": out.baseline_masks[i].float().cpu(),
                "caption": (batch.get("caption") or [""] * B)[i],
            } for i in range(n)]
        return scores

    def validation_step(self, batch: dict, batch_idx: int):
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int):
        return self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        est, mask, *_ = self._refine_batch(batch)
        return {"estimate": est.float().cpu(), "mask": mask.float().cpu(), "caption": batch.get("caption")}

    def on_validation_epoch_start(self) -> None:
        self._examples = []

    def on_validation_epoch_end(self) -> None:
        if self._trainer is not None and self._trainer.sanity_checking:
            self._examples = []
            return
        every = self.hparams.example_every_n_val
        if every and self.n_validations % every == 0 and self._examples:
            self._log_examples()
        self.n_validations += 1
        self._examples = []

    def _log_examples(self) -> None:
        import numpy as np

        for lg in self.loggers:
            if not isinstance(lg, WandbLogger):
                continue
            sr = 16_000
            keys = ("mixture", "target", "baseline", "refined")
            for i, ex in enumerate(self._examples):
                audios = [ex[k].numpy() for k in keys]
                lg.log_audio(f"examples/{i}/audio", audios, step=self.global_step, sample_rate=[sr] * 4,
                             caption=[f"{k}: {ex['caption']}" for k in keys])
                imgs = [ex["mask"]] + list(ex["baseline_masks"])
                images = [(np.flipud(m.clamp(0, 1).numpy()) * 255).astype(np.uint8) for m in imgs]
                lg.log_image(f"examples/{i}/masks", images, step=self.global_step,
                             caption=["refined"] + [f"baseline pass {k}" for k in range(len(imgs) - 1)])

    def configure_callbacks(self):
        every = self._trainer.log_every_n_steps if self._trainer is not None else 50
        return [ValidateOnLastStep(), ProgressLog(every)]

    # --- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.refiner.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = None
        if self._trainer is not None:
            try:
                total = int(self.trainer.estimated_stepping_batches)
            except Exception:  # no dataloader yet (e.g. lr-finder): constant after warm-up
                total = None

        def factor(step: int) -> float:
            return lr_factor(step, total, hp.warmup_steps, hp.schedule, hp.min_lr_ratio)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
