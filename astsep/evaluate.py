"""``python -m astsep.evaluate``: SDR / SDRi / SI-SDR / SI-SDRi on a list of mixtures with references.

The list is a CSV in one of two layouts (relative paths are relative to the CSV's folder):

- ``mixture, target[, caption]``: a recorded or premixed mixture and its target reference;
- ``target, interferer[, snr_db][, caption]``: the mixture is made here, the interferer rescaled
  to ``snr_db`` (default 0 dB) below the target's energy.

For every row it scores four estimates of the target:

- ``mixture``: the unprocessed mixture (SDRi = 0 by definition);
- ``baseline``: the deterministic separator's source with the best SI-SDR against the target
  (oracle selection among its up to K sources: :func:`astsep.metrics.best_source`). It is always made with the
  evaluation's own settings (``--separator-config``, default ``configs/separator.yaml``, the ones
  ``infer.py`` uses) and ``--guide-model``, with or without ``--refiner``, and the report says which;
  a refiner is still fed the baseline it was trained on (its checkpoint's settings), and the report
  lists where those differ;
- ``refined``: the trained refiner (``--refiner best.ckpt``), queried with the caption's embedding
  (``--embedding-table``) or with the target's AST embedding, as it was trained;
- ``oracle_irm``: the ideal ratio mask ``sqrt(|S|² / (|S|² + |N|²))`` on the mixture STFT, an
  upper bound for any mask on this STFT.

``--guide oracle[:blur=1,noise_db=10,…]`` runs the baseline with an oracle guide
(:mod:`astsep.oracle`) built from each row's target and interferer instead of the AST: what the
separator makes of a perfect, or deliberately spoiled, guide. Optional ``target_label`` and
``interferer_label`` columns name the two sounds.

and writes ``report.md`` and ``report.json`` (mean and median per metric, plus every row) to
``--out``.

``--musdb DIR`` instead scores music stems on a MUSDB18(-HQ) folder: astsep's sources are mapped
to vocals / drums / bass / other by their AudioSet classes (``--stem-map``, default
``configs/musdb.yaml``) and scored with museval (see :mod:`astsep.stems`); it writes ``musdb.md``,
``musdb.json`` and museval's per-track JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from .deps import require_when_main

require_when_main(__name__)  # python -m: a dependency that cannot be loaded is one line, exit 3

import torch

from .audio import load_audio, write_bytes_atomic
from .config import DEFAULT_MODEL, SAMPLE_RATE, STFTConfig, baseline_settings, load_config, settings_differences
from .data.audiocaps import mix_at_snr, read_csv_rows
from .errors import AstsepError, ConfigError
from .features import apply_mask, stft
from .metrics import METRICS, best_source, separation_metrics

log = logging.getLogger(__name__)

DEFAULT_SEPARATOR_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "separator.yaml"  # as infer.py

METHODS = ("mixture", "baseline", "refined", "oracle_irm")


@dataclass
class EvalItem:
    """One evaluation mixture: ``mixture`` and ``target`` ``(N,)`` at 16 kHz."""

    name: str
    mixture: torch.Tensor
    target: torch.Tensor
    caption: str = ""
    target_label: str = "target"
    interferer_label: str = "interferer"


def _resolve(base: Path, raw: str) -> Path:
    p = Path(raw.strip()).expanduser()
    return p if p.is_absolute() else base / p


def read_eval_csv(csv_path: str | Path, max_seconds: float | None = None) -> list[EvalItem]:
    """Read either CSV layout into :class:`EvalItem` s (lengths trimmed to the shorter signal)."""
    csv_path, fields, rows = read_csv_rows(csv_path, "mixture list")
    if {"mixture", "target"} <= fields:
        layout = "mixture"
    elif {"target", "interferer"} <= fields:
        layout = "pair"
    else:
        raise ConfigError(f"{csv_path} needs columns 'mixture, target' or 'target, interferer[, snr_db]'; "
                          f"it has {', '.join(sorted(fields)) or 'none'}")
    if not rows:
        raise ConfigError(f"{csv_path} lists no mixtures")
    base = csv_path.parent
    limit = int(max_seconds * SAMPLE_RATE) if max_seconds else None
    items = []
    for i, row in enumerate(rows):
        target, _ = load_audio(_resolve(base, row["target"]))
        if layout == "mixture":
            mixture, _ = load_audio(_resolve(base, row["mixture"]))
            n = min(mixture.numel(), target.numel(), limit or math.inf)
            mixture, target = mixture[:n], target[:n]
            name = Path(row["mixture"]).stem
        else:
            interferer, _ = load_audio(_resolve(base, row["interferer"]))
            n = min(interferer.numel(), target.numel(), limit or math.inf)
            snr = float(row.get("snr_db") or 0.0)
            mixture, target = mix_at_snr(target[:n], interferer[:n], snr_db=snr, gain_db=0.0)
            name = f"{Path(row['target']).stem}+{Path(row['interferer']).stem}@{snr:g}dB"
        items.append(EvalItem(name=f"{i:04d}_{name}", mixture=mixture, target=target,
                              caption=(row.get("caption") or "").strip(),
                              target_label=(row.get("target_label") or "").strip() or "target",
                              interferer_label=(row.get("interferer_label") or "").strip() or "interferer"))
    return items


def oracle_irm(mixture: torch.Tensor, target: torch.Tensor, stft_cfg: STFTConfig) -> torch.Tensor:
    """Ideal-ratio-mask estimate ``(B,N)``: ``sqrt(|S|²/(|S|²+|N|²))`` on the mixture STFT, ``N = x − s``."""
    X, S, Nz = stft(mixture, stft_cfg), stft(target, stft_cfg), stft(mixture - target, stft_cfg)
    ps, pn = S.abs().pow(2), Nz.abs().pow(2)
    mask = torch.sqrt(ps / (ps + pn).clamp_min(1e-20))
    return apply_mask(X, mask, stft_cfg, mixture.shape[-1])


def summarise(rows: list[dict]) -> dict:
    """``{method: {metric: {"mean", "median"}}}`` over rows of ``{method: {metric: float}}``."""
    out: dict = {}
    for method in METHODS:
        vals = [r[method] for r in rows if method in r]
        if not vals:
            continue
        out[method] = {m: {"mean": statistics.fmean(v[m] for v in vals), "median": statistics.median(v[m] for v in vals)}
                       for m in METRICS}
    return out


def evaluate(items: list[EvalItem], module=None, separator=None, table=None, stft_cfg: STFTConfig | None = None,
             progress: bool = True, oracle=None, config=None) -> dict:
    """Score every item; returns ``{"n", "summary", "rows"}``.

    ``module``: a trained ``RefinerModule`` (gives ``refined``; and ``baseline`` from its own guide
    when no ``separator`` is given); ``separator``: a ``Separator`` that makes ``baseline`` (with or
    without a module); ``table``: an
    ``EmbeddingTable`` for caption queries when the module was trained on a table; ``oracle``: a
    :class:`~astsep.oracle.Degradation` for a baseline guided by an oracle built from each item
    (separator settings from ``config``, an :class:`AstsepConfig`).
    """
    from tqdm.auto import tqdm

    stft_cfg = stft_cfg or STFTConfig()
    rows = []
    for item in tqdm(items, desc="evaluating", unit="mix", disable=not progress):
        x, s = item.mixture.unsqueeze(0), item.target.unsqueeze(0)
        ests = {"mixture": x, "oracle_irm": oracle_irm(x, s, stft_cfg)}
        if module is not None:
            dev = module.device
            xd, sd = x.to(dev), s.to(dev)
            if module.hparams.query_source == "target_audio":
                query = module.query_from_audio(sd)
            else:
                if table is None or not item.caption:
                    raise ConfigError("this refiner was trained with caption queries: pass --embedding-table and a "
                                      "'caption' column")
                query = table.lookup(item.caption).unsqueeze(0).to(dev)
            out = module.separate(xd, query)
            ests["refined"] = out["estimate"].float().cpu()
            if separator is None:
                ests["baseline"] = best_source(out["sources"].cpu(), out["kept"].cpu(), x, s)[0]
        if separator is not None:
            res = separator.separate_batch(x)
            ests["baseline"] = best_source(res.sources.cpu(), res.kept.cpu(), x, s)[0]
        elif oracle is not None and module is None:
            from .oracle import OracleGuide
            from .separator import Separator

            labels = list(dict.fromkeys([item.target_label, item.interferer_label]))
            guide = OracleGuide(x, torch.stack([s, x - s], dim=1), [[0, labels.index(item.interferer_label)]],
                                labels, oracle, stft_cfg)
            res = Separator(config or load_config(None), guide).separate_batch(x)
            ests["baseline"] = best_source(res.sources.cpu(), res.kept.cpu(), x, s)[0]
        row = {"name": item.name, "caption": item.caption, "seconds": x.shape[-1] / SAMPLE_RATE}
        for method, est in ests.items():
            m = separation_metrics(est, x, s)
            row[method] = {k: float(v) for k, v in m.items()}
        rows.append(row)
    return {"n": len(rows), "summary": summarise(rows), "rows": rows}


def markdown(results: dict, title: str = "Separation quality") -> str:
    lines = [f"# {title}", "", f"{results['n']} mixtures. Values in dB; mean (median).", "",
             "| method | SDR | SDRi | SI-SDR | SI-SDRi |", "| --- | ---: | ---: | ---: | ---: |"]
    for method, vals in results["summary"].items():
        cells = [f"{vals[m]['mean']:.2f} ({vals[m]['median']:.2f})" for m in METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    base = results.get("baseline")
    if base:
        g = base["settings"]["guide"]
        lines += ["", f"Baseline: guide `{base['guide_model']}`, " + ", ".join(f"{k} {v}" for k, v in g.items())
                  + f"; separator and STFT settings from {base['config']} (every value in report.json)."]
    ref = results.get("refiner")
    if ref:
        diff = ref["baseline_differences"]
        lines.append(f"Refiner `{ref['checkpoint']}` is fed the baseline it was trained on" + (
            " (its checkpoint records no settings)." if diff is None else
            f", which differs in: {'; '.join(diff)}." if diff else ", the same settings."))
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path, title: str = "Separation quality") -> tuple[Path, Path]:
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    write_bytes_atomic(md, markdown(results, title).encode())
    write_bytes_atomic(js, json.dumps(results, indent=2).encode())
    return md, js


def load_refiner(path: str | Path, device: str = "cpu"):
    """A trained ``RefinerModule`` from a Lightning checkpoint (refiner weights only, guide rebuilt)."""
    from .errors import ModelError
    from .lit import RefinerModule

    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"refiner checkpoint not found: {p}")
    try:
        module = RefinerModule.load_from_checkpoint(str(p), map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a crafted, torn or foreign file: one line, never a traceback
        from .guide import describe_load_error

        raise ModelError(f"cannot read refiner checkpoint {p}: {describe_load_error(exc)}") from None
    return module.to(device).eval()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m astsep.evaluate", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--mixtures", metavar="CSV",
                      help="'mixture,target[,caption]' or 'target,interferer[,snr_db][,caption]' CSV")
    what.add_argument("--musdb", metavar="DIR", help="MUSDB18(-HQ) folder: score vocals/drums/bass/other stems")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the reports")
    p.add_argument("--subset", choices=["test", "train", "both"], default="test", help="--musdb: which tracks")
    p.add_argument("--tracks", nargs="+", default=None, metavar="NAME", help="--musdb: only these track folders")
    p.add_argument("--stem-map", default=None, metavar="YAML",
                   help="--musdb: AudioSet classes per stem (default configs/musdb.yaml)")
    p.add_argument("--refiner", default=None, metavar="CKPT", help="trained refiner checkpoint (adds 'refined')")
    p.add_argument("--embedding-table", default=None, metavar="PT", help="caption embeddings for table-trained refiners")
    p.add_argument("--guide-model", default=None,
                   help="AST for the baseline: Hub id, local folder, or 'tiny' (default: the refiner's guide with "
                        f"--refiner, else {DEFAULT_MODEL})")
    p.add_argument("--separator-config", default=None, metavar="YAML",
                   help="separator and guide settings of the baseline (default configs/separator.yaml, as infer.py)")
    p.add_argument("--guide", default="ast", metavar="SPEC",
                   help="guide of the baseline: 'ast' (the AST, default) or 'oracle[:blur=1,noise_db=10,gamma=2,"
                        "gain=2,floor=0.2,random,seed=0]' (built from each row's known target)")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline (no AST needed)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="evaluate at most this much of each row (default 10.24) or track (default: all of it)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    if args.musdb:
        return main_musdb(args)
    if args.max_seconds is None:
        args.max_seconds = 10.24
    try:
        from .oracle import parse_guide_spec

        oracle = parse_guide_spec(args.guide)
        if oracle is not None and args.refiner:
            raise ConfigError("--guide oracle scores the baseline separator; it cannot be combined with --refiner")
        if oracle is not None and args.max_seconds is not None and args.max_seconds > 10.24:
            raise ConfigError("--guide oracle scores one 10.24 s window per row: --max-seconds must be <= 10.24")
        module = separator = table = None
        default_config = DEFAULT_SEPARATOR_CONFIG if DEFAULT_SEPARATOR_CONFIG.is_file() else None
        config_path = args.separator_config or default_config
        cfg = load_config(config_path)
        cfg.guide.device = args.device
        if args.refiner:
            module = load_refiner(args.refiner, args.device)
        guide_model = args.guide_model or (module.hparams.guide_model if module is not None else DEFAULT_MODEL)
        info: dict = {"guide": args.guide}
        if not args.no_baseline and oracle is None:
            # one baseline: the evaluation's settings, whether or not a refiner is scored
            info["baseline"] = {"guide_model": guide_model, "config": str(config_path or "defaults"),
                                "settings": baseline_settings(cfg)}
            same_as_refiner = (module is not None and guide_model == module.hparams.guide_model
                               and module.hparams.baseline == baseline_settings(cfg))
            if not same_as_refiner:  # else the refiner's own baseline run is this very baseline
                from .guide import build_guide
                from .separator import Separator

                separator = Separator(cfg, build_guide(guide_model, cfg.guide, option="--guide-model"))
        if module is not None:
            info["refiner"] = {"checkpoint": str(args.refiner), "guide_model": module.hparams.guide_model,
                               "baseline": module.hparams.baseline,
                               "baseline_differences": (settings_differences(module.hparams.baseline, cfg)
                                                        if module.hparams.baseline else None)}
        items = read_eval_csv(args.mixtures, args.max_seconds)
        if args.embedding_table:
            from .query import EmbeddingTable

            table = EmbeddingTable.load(args.embedding_table)
        results = evaluate(items, module, separator, table, oracle=None if args.no_baseline else oracle, config=cfg)
        if args.no_baseline:
            results["summary"].pop("baseline", None)
            for row in results["rows"]:
                row.pop("baseline", None)
        results.update(info)
        title = "Separation quality" + (f" (guide: {args.guide})" if oracle is not None else "")
        md, _ = write_report(results, args.out, title)
    except AstsepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    sys.stdout.write(md.read_text())
    return 0


def main_musdb(args: argparse.Namespace) -> int:
    """``--musdb DIR``: separate every track, map sources to stems, score them with museval."""
    try:
        if args.refiner or args.no_baseline or args.guide != "ast" or args.embedding_table:
            raise ConfigError("--musdb scores the AST-guided separator's stems; --refiner, --embedding-table, "
                              "--guide and --no-baseline do not apply")
        if args.max_seconds is not None and args.max_seconds <= 0:
            raise ConfigError(f"--max-seconds must be > 0, not {args.max_seconds}")
        from .stems import evaluate_musdb, load_stem_map, write_musdb_report

        try:
            import museval  # noqa: F401 - fail here, in one line, not after the first separation
        except (ImportError, RuntimeError) as exc:  # museval imports musdb → stempeg, which needs ffmpeg
            raise ConfigError(f"--musdb needs museval: {str(exc).splitlines()[0]}") from None
        stem_map = load_stem_map(args.stem_map)
        default_config = DEFAULT_SEPARATOR_CONFIG if DEFAULT_SEPARATOR_CONFIG.is_file() else None
        cfg = load_config(args.separator_config or default_config)
        cfg.guide.device = args.device
        from .guide import build_guide
        from .pipeline import Pipeline, quiet_model_loading

        guide_model = args.guide_model or DEFAULT_MODEL
        with quiet_model_loading():
            pipe = Pipeline(cfg, build_guide(guide_model, cfg.guide, option="--guide-model"))
        subsets = ("train", "test") if args.subset == "both" else (args.subset,)
        results = evaluate_musdb(args.musdb, pipe, stem_map, subsets, args.tracks, args.max_seconds, args.out,
                                 progress=sys.stderr.isatty())
        results.update(guide_model=guide_model, separator_config=str(args.separator_config or default_config),
                       stem_map=str(args.stem_map or "configs/musdb.yaml"))
        md = write_musdb_report(results, args.out)
    except AstsepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    sys.stdout.write(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
