"""The one builder under every front end: options in, configured objects out.

``infer.py`` (batch and ``--live``), the web demo and any other entry point turn what their user
gave into a :class:`RunOptions` and call these builders, in this order::

    opts = RunOptions(model="ast_model", refiner="best.ckpt", query="a dog barking")
    cfg = build_config(opts)                 # YAML < --section.key < shortcut options
    check_queries(opts)                      # query rules that need no model (one line each)
    refiner = build_refiner(opts)            # None without --refiner; checks the queries it can take
    pipe = build_pipeline(opts, cfg, refiner)
    query = build_query(opts, pipe)          # None without --query / --query-audio
    sink = build_delivery(opts, cfg)         # None without --backend-url: a Dispatcher (client + outbox)

Nothing here parses a command line or prints; the front ends (:mod:`astsep.frontends`) do both.
Importing this module imports neither torch nor transformers: the builders import what they need.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import SAMPLE_RATE, AstsepConfig, apply_overrides, load_config, parse_value, shortcut_overrides
from .errors import AstsepError, ConfigError, naming_option

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "separator.yaml"


def default_outbox() -> Path:
    """Where undelivered events wait by default: ``$XDG_CACHE_HOME/astsep/outbox.sqlite3``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "astsep" / "outbox.sqlite3"


@dataclass
class RunOptions:
    """What a user can choose for one run, whatever the front end. ``None``: not given (the
    config's value holds). Option names are the ``infer.py`` options' (``--max-passes`` →
    ``max_passes``); ``config_keys`` holds ``--section.key VALUE`` texts in command-line order."""

    config: str | None = None  # YAML path; None: configs/separator.yaml when present
    config_keys: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    device: str | None = None
    cache_dir: str | None = None
    max_passes: int | None = None
    min_eratio: float | None = None
    fast: bool = False
    allow_pickle: bool = False
    # the trained refiner and its queries
    refiner: str | None = None
    query: str | None = None
    query_audio: str | None = None
    negative: str | None = None
    negative_audio: str | None = None
    query_table: str | None = None
    clap_ckpt: str | None = None
    # the written files (astsep.export): rate ("input" or Hz), sample format, sources cut to their events
    sample_rate: int | str = SAMPLE_RATE
    format: str = "float"
    crop: bool = False
    # delivery
    backend_url: str | None = None
    backend_timeout: float | None = None  # shortcut of delivery.timeout
    outbox: str | None = None
    user_id: int = 0
    angle: int | None = None

    @classmethod
    def from_values(cls, source: Any) -> "RunOptions":
        """The fields of ``source`` (an ``argparse.Namespace`` or any object) that this class has;
        missing or ``None`` ones keep their defaults."""
        values = {}
        for f in dataclasses.fields(cls):
            v = getattr(source, f.name, None)
            if v is not None:
                values[f.name] = v
        return cls(**values)


# --- config ----------------------------------------------------------------------------------------
def build_config(opts: RunOptions) -> AstsepConfig:
    """The run's config. Precedence, lowest first: the dataclass defaults < the YAML (``opts.config``,
    else ``configs/separator.yaml``) < ``opts.config_keys`` < the shortcut options (``model``,
    ``device``, ``cache_dir``, ``max_passes``, ``min_eratio``, ``allow_pickle``, ``backend_timeout``,
    then ``fast``). Every
    step goes through :func:`astsep.config.apply_overrides` (errors name the key)."""
    path = opts.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    cfg = load_config(path)
    cfg = apply_overrides(cfg, {k: parse_value(k, v) for k, v in opts.config_keys.items()})
    cfg = apply_overrides(cfg, shortcut_overrides(model=opts.model, device=opts.device, cache_dir=opts.cache_dir,
                                                  max_passes=opts.max_passes, min_eratio=opts.min_eratio,
                                                  allow_pickle=opts.allow_pickle,
                                                  backend_timeout=opts.backend_timeout))
    if opts.fast:
        from .guide import use_fast_settings

        use_fast_settings(cfg.guide)
    return cfg


def count_windows(cfg: AstsepConfig, num_samples: int) -> int:
    """Windows :meth:`astsep.pipeline.Pipeline.run` cuts ``num_samples`` (16 kHz) into (progress bars)."""
    from .pipeline import window_layout

    return len(window_layout(cfg.window, num_samples)[0])


def build_export(opts: RunOptions):
    """The :class:`astsep.export.ExportOptions` of the written files (rate, sample format, crop)."""
    from .export import ExportOptions

    rate = ExportOptions.parse_rate(opts.sample_rate) if isinstance(opts.sample_rate, str) else opts.sample_rate
    return ExportOptions(sample_rate=rate, format=opts.format, crop=opts.crop)


# --- refiner and queries ---------------------------------------------------------------------------
def check_queries(opts: RunOptions, refiner=None) -> None:
    """The query rules, one :class:`AstsepError` line each: combinations of the query options
    (always), and, given the loaded ``refiner``, what it can take (before any audio is decoded)."""
    if (opts.query or opts.query_audio or opts.negative or opts.negative_audio) and not opts.refiner:
        raise AstsepError("--query/--query-audio/--negative need a trained refiner: pass --refiner CKPT")
    if opts.query and opts.query_audio:
        raise AstsepError("give either --query or --query-audio, not both")
    if (opts.negative or opts.negative_audio) and not (opts.query or opts.query_audio):
        raise AstsepError("--negative/--negative-audio leave a sound out of a query: pass --query or --query-audio")
    if refiner is not None:
        _check_refiner_queries(opts, refiner)


def _check_refiner_queries(opts: RunOptions, refiner) -> None:
    import difflib

    if (opts.negative or opts.negative_audio) and not refiner.net.cfg.use_negative:
        raise ConfigError(f"the refiner {refiner.name} was trained without negative queries and would ignore "
                          "--negative/--negative-audio: leave the option out or use a refiner trained with negatives")
    if opts.query and refiner.query_source == "target_audio":
        raise ConfigError("this refiner was trained with audio (AST embedding) queries: use --query-audio FILE")
    texts = [t for t in (opts.query, opts.negative) if t]
    if not texts or refiner.text_encoder is not None:
        return
    if refiner.table is None:
        raise ConfigError("a text query needs its embedding: pass --query-table TABLE (python -m astsep.embed) "
                          "or --clap-ckpt CKPT (laion-clap) to embed new text")
    from .query import normalise_text

    for text in texts:
        if text in refiner.table:
            continue
        near = difflib.get_close_matches(normalise_text(text), refiner.table.texts, n=3, cutoff=0.5)
        hint = ("nearest entries: " + ", ".join(repr(t) for t in near)) if near else "no entry is close"
        raise ConfigError(f"{text!r} is not in the query table {opts.query_table} ({len(refiner.table)} entries; "
                          f"{hint}); use one of them, or pass --clap-ckpt CKPT to embed new text")


def build_refiner(opts: RunOptions):
    """The :class:`astsep.refiner.Refiner` of ``opts.refiner`` (None without one), its queries checked."""
    if not opts.refiner:
        return None
    from .refiner import Refiner

    refiner = Refiner.load(opts.refiner, table=opts.query_table, clap_ckpt=opts.clap_ckpt)
    check_queries(opts, refiner)
    return refiner


def _refiner_guide(opts: RunOptions, cfg: AstsepConfig, refiner):
    """With a refiner and no ``model`` option: the AST the refiner was trained on (its baseline masks
    and query embeddings came from it), built here; otherwise None (the pipeline loads ``cfg.guide.model``).
    Sets ``cfg.guide.model`` to it, so that the run records the model it used."""
    if refiner is None or opts.model is not None or not refiner.guide_model:
        return None
    from .ast_load import quiet_model_loading
    from .guide_loader import load_guide

    if refiner.guide_model == "tiny":
        log.warning("refiner %s was trained on a random tiny AST (a smoke-test config): separating with that "
                    "same random guide, whose labels mean nothing", refiner.name)
    cfg.guide.model = refiner.guide_model
    with quiet_model_loading():
        return load_guide(cfg, refiner.guide_model, refiner.guide_seed)


def build_pipeline(opts: RunOptions, cfg: AstsepConfig, refiner=None):
    """The :class:`astsep.pipeline.Pipeline` for ``cfg`` (loads the model), with ``refiner``; a
    refiner without a ``model`` option separates with the AST it was trained on. An AST that cannot be
    loaded, or that the refiner cannot take, is an error naming ``--model``, the option that chooses it."""
    from .pipeline import Pipeline

    with naming_option("--model"):
        return Pipeline(cfg, _refiner_guide(opts, cfg, refiner), refiner=refiner)


def _checked(refiner, emb, what: str):
    if emb.shape[-1] != refiner.query_dim:
        raise ConfigError(f"{what} queries have {emb.shape[-1]} dims but the refiner was trained with "
                          f"{refiner.query_dim}-dim queries ({refiner.query_source}); use the matching encoder/model")
    return emb.float()


def build_query(opts: RunOptions, pipe):
    """The ``query`` / ``query_audio`` embedding (with its negative) as an :class:`astsep.refiner.Query`,
    or None. Audio queries are cut to one separation window."""
    ref = pipe.refiner
    if ref is None or not (opts.query or opts.query_audio):
        return None
    from .audio import load_audio
    from .refiner import Query

    def audio_embedding(path: str):
        x, _ = load_audio(path)
        x = x[: int(round(pipe.cfg.window.window_sec * SAMPLE_RATE))].unsqueeze(0)
        if ref.query_source == "target_audio":
            return _checked(ref, pipe.guide.embed(x.to(pipe.guide.device)).cpu()[0], "AST audio")
        if ref.text_encoder is None:
            raise AstsepError("this refiner takes CLAP queries: pass --clap-ckpt CKPT to embed an audio query")
        return _checked(ref, ref.text_encoder.encode_audio(x)[0], "CLAP audio")

    def text_embedding(text: str):
        if ref.query_source == "target_audio":
            raise AstsepError("this refiner was trained with audio (AST embedding) queries: use --query-audio FILE")
        return ref.embed_text([text])[0]

    if opts.query:
        pos, text = text_embedding(opts.query), opts.query
    else:
        pos, text = audio_embedding(opts.query_audio), Path(opts.query_audio).stem
    neg = neg_text = None
    if opts.negative:
        neg, neg_text = text_embedding(opts.negative), opts.negative
    elif opts.negative_audio:
        neg, neg_text = audio_embedding(opts.negative_audio), Path(opts.negative_audio).stem
    return Query(pos, text, neg, neg_text)


# --- delivery ----------------------------------------------------------------------------------------
def build_delivery(opts: RunOptions, cfg: AstsepConfig):
    """An :class:`astsep.delivery.Dispatcher`: the backend client (its settings: ``cfg.delivery``,
    ``.client``) and the outbox (``.outbox``; what degraded it: ``.degraded``) for ``opts.backend_url`` (None
    without one). The outbox is ``opts.outbox``, else :func:`default_outbox`, opened so that it cannot
    stop a run (:func:`astsep.delivery.open_outbox`: an unusable one is moved aside and a fresh one
    opened). The one place both are made."""
    if not opts.backend_url:
        return None
    from .delivery import BackendClient, Dispatcher, RetryPolicy

    d = cfg.delivery
    client = BackendClient(opts.backend_url, timeout=d.timeout, retries=d.retries, backoff=d.backoff,
                           max_backoff=d.max_backoff, verify_tls=d.verify_tls)
    policy = RetryPolicy(base_delay=d.retry_base_sec, max_delay=d.retry_max_sec, park_after=d.park_after_sec)
    dispatcher = Dispatcher(client, opts.outbox or default_outbox(), user_id=opts.user_id, angle=opts.angle,
                            policy=policy, fields={"sound_icon": d.sound_icon,
                                                   "location_image_url": d.location_image_url})
    return dispatcher
