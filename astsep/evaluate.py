"""``python -m astsep.evaluate``: SDR / SDRi / SI-SDR / SI-SDRi of the baseline and the refiner, beside the IRM.

The mixtures come from a CSV in one of two layouts (relative paths are relative to the CSV's folder):

- ``mixture, target[, caption]``: a recorded or premixed mixture and its target reference;
- ``target, interferer[, snr_db][, caption]``: the mixture is made here, the interferer rescaled
  to ``snr_db`` (default 0 dB) below the target's energy;

or, with ``--heldout``, are made from the held-out sounds of the refiner's class split
(:mod:`astsep.data.classsplit`): sounds no training step, validation or model selection saw.

Every row goes through ``infer.py``'s pipeline (:class:`astsep.pipeline.Pipeline`), and a refiner is
loaded with :meth:`astsep.refiner.Refiner.load` and run as ``infer.py --refiner`` runs it (each pass
queried with its own embedding or label; the written files still add up to the input). Scored:

- ``mixture``: the unprocessed mixture (SDRi = 0 by definition);
- ``baseline``: the deterministic separator, with the evaluation's settings (``--separator-config``,
  default ``configs/separator.yaml``, as ``infer.py``) and ``--model`` (or an oracle guide);
- ``refined``: the same with the trained refiner (``--refiner CKPT``); a refiner trained on caption
  queries extracts the row's ``caption`` instead (``--embedding-table``, as ``infer.py --query``);
- ``oracle_irm``: the ideal ratio mask ``sqrt(|S|² / (|S|² + |N|²))`` on the mixture STFT, an
  upper bound for any mask on this STFT.

Under an oracle guide ``baseline`` and ``refined`` are the first pass's source (the oracle names the
target first); under the AST, the source closest to the target (oracle selection,
:func:`astsep.metrics.best_source`). With both, the report gives the share of rows the refiner
improved and how closely the written files add up to the input.

``--guide SPEC [SPEC ...]`` picks the baseline's guide(s), each scored in turn: ``ast`` (default),
``oracle[:blur=1,noise_db=10,…]`` (:mod:`astsep.oracle`, built from each row's target and
interferer: what the separator makes of a perfect, or deliberately spoiled, guide; optional
``target_label`` / ``interferer_label`` columns name the sounds) or ``sweep`` (exact oracle, blur 1,
noise 10 dB, blur 1 + noise 10 dB, blur 2, random grid: :data:`SWEEP`). It writes ``report.md``
(a side-by-side table, then one table per guide) and ``report.json`` (every row) to ``--out``.

``--musdb DIR`` instead scores music stems on a MUSDB18(-HQ) folder: astsep's sources are mapped
to vocals / drums / bass / other by their AudioSet classes (``--stem-map``, default
``configs/musdb.yaml``) and scored with museval (see :mod:`astsep.stems`); it writes ``musdb.md``,
``musdb.json`` and museval's per-track JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from .deps import require_when_main

require_when_main(__name__)  # python -m: a dependency that cannot be loaded is one line, exit 3

import torch

from .audio import load_audio
from .config import DEFAULT_MODEL, SAMPLE_RATE, STFTConfig, baseline_settings, load_config, settings_differences
from .data.audiocaps import mix_at_snr, read_csv_rows
from .errors import AstsepError, ConfigError, naming_option
from .eval_report import METHODS, markdown, write_report  # noqa: F401 - markdown: re-exported
from .features import apply_mask, stft
from .metrics import METRICS, best_source, separation_metrics

log = logging.getLogger(__name__)

DEFAULT_SEPARATOR_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "separator.yaml"  # as infer.py



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
    """``{method: {metric: {"mean", "median"}}}`` over rows of ``{method: {metric: float}}``; with both
    ``baseline`` and ``refined`` also ``"improved"``: the share of rows where refined has the higher SI-SDRi."""
    out: dict = {}
    for method in METHODS:
        vals = [r[method] for r in rows if method in r]
        if not vals:
            continue
        out[method] = {m: {"mean": statistics.fmean(v[m] for v in vals), "median": statistics.median(v[m] for v in vals)}
                       for m in METRICS}
    both = [r for r in rows if "baseline" in r and "refined" in r]
    if both:
        out["improved"] = sum(r["refined"]["si_sdri"] > r["baseline"]["si_sdri"] for r in both) / len(both)
    adds = [r["adds_up_db"] for r in rows if "adds_up_db" in r]
    if adds:
        out["adds_up_db_min"] = min(adds)
    return out


def _oracle_guide(item: EvalItem, degradation, index: int, stft_cfg: STFTConfig, hidden_size: int):
    """A fresh oracle guide for ``item`` (its noise seeded by the condition's seed and the row)."""
    from .oracle import OracleGuide

    x, s = item.mixture.unsqueeze(0), item.target.unsqueeze(0)
    labels = list(dict.fromkeys([item.target_label, item.interferer_label]))
    deg = dataclasses.replace(degradation, seed=int(degradation.seed) * 100_003 + index)
    return OracleGuide(x, torch.stack([s, x - s], dim=1), [[0, labels.index(item.interferer_label)]], labels, deg,
                       stft_cfg, hidden_size=hidden_size)


def _pass_sources(result) -> torch.Tensor:
    """``(K, N)`` per-pass sources of a one-window :class:`~astsep.pipeline.SeparationResult` run with traces."""
    return result.traces[0][2]["sources"].float()


def baseline_sources(result, x: torch.Tensor, stft_cfg: STFTConfig) -> torch.Tensor:
    """``(K, N)`` the baseline's per-pass sources of a one-window run with traces, refined or not: each
    kept pass's mask (on what the earlier passes left) times the mixture STFT, as the separator makes
    them (equal to its own sources up to float rounding). A refined run thus also gives its baseline."""
    traces = result.traces[0][2]["traces"]
    X = stft(x.float().view(1, -1), stft_cfg)[0]
    share = torch.ones_like(X.real)
    out = torch.zeros(len(traces), x.numel())
    for k, tr in enumerate(traces):
        if not bool(tr["ran"]) or not bool(tr["kept"]):
            continue
        M = tr["mask"].float().cpu()
        out[k] = apply_mask(X.unsqueeze(0), (M * share).unsqueeze(0), stft_cfg, x.numel())[0]
        share = share * (1 - M)
    return out


def separate_item(audio: torch.Tensor, cfg, guide, refiner=None, query=None, name: str = "<item>"):
    """One row through ``infer.py``'s pipeline (:class:`astsep.pipeline.Pipeline`, with the refiner as
    ``infer.py --refiner`` runs it): a :class:`~astsep.pipeline.SeparationResult` with per-pass traces."""
    from .pipeline import Pipeline

    return Pipeline(cfg, guide, refiner=refiner).run(audio, name, keep_traces=True, query=query)


def evaluate(items: list[EvalItem], config=None, guide=None, refiner=None, oracle=None, table=None,
             baseline: bool = True, progress: bool = False) -> dict:
    """Score every item through ``infer.py``'s pipeline; returns ``{"n", "summary", "rows"}``.
    (Stays whole: one loop over the rows, scoring each estimate of a row in the same place.)

    ``config``: the :class:`~astsep.config.AstsepConfig` of the separator (default: defaults);
    ``guide``: the AST guide of the baseline, or ``oracle``: a :class:`~astsep.oracle.Degradation`
    for an oracle guide built per row from its target and interferer (a fresh one per run, its noise
    seeded by the row); ``refiner``: an :class:`astsep.refiner.Refiner` (``Refiner.load``, the loader
    and refine path ``infer.py --refiner`` runs) that adds ``refined``; ``table``: an
    ``EmbeddingTable`` for refiners queried with captions (then ``refined`` is the extracted
    caption's source, as ``infer.py --query``). Rows must fit one window (≤ ``window_sec``).

    Scored estimates: ``baseline`` and ``refined`` are the first pass's source with an oracle guide
    (it names the target first), else the source closest to the target (oracle selection,
    :func:`astsep.metrics.best_source`); ``oracle_irm`` the ideal ratio mask. ``adds_up_db``: with a
    refiner, the input's energy over that of (input − Σ written sources) in dB.
    """
    from tqdm.auto import tqdm

    from .refiner import Query

    cfg = config or load_config(None)
    st = cfg.stft
    if oracle is None and guide is None and (baseline or refiner is not None):
        raise ConfigError("evaluate needs a guide (an AST) or an oracle degradation")
    hidden = refiner.query_dim if refiner is not None else 768
    rows = []
    for idx, item in enumerate(tqdm(items, desc="evaluating", unit="mix", disable=not progress)):
        x, s = item.mixture.unsqueeze(0), item.target.unsqueeze(0)
        ests = {"mixture": x, "oracle_irm": oracle_irm(x, s, st)}

        def make_guide():
            return guide if oracle is None else _oracle_guide(item, oracle, idx, st, hidden)

        def pick(srcs: torch.Tensor) -> torch.Tensor:
            if oracle is not None:
                return srcs[:1]
            kept = srcs.pow(2).sum(dim=-1) > 0
            return best_source(srcs.unsqueeze(0), kept.unsqueeze(0), x, s)[0]

        row = {"name": item.name, "caption": item.caption, "seconds": x.shape[-1] / SAMPLE_RATE}
        if baseline and refiner is None:
            ests["baseline"] = pick(_pass_sources(separate_item(item.mixture, cfg, make_guide(), name=item.name)))
        if refiner is not None:
            query = None
            if refiner.query_source == "table":
                if table is None or not item.caption:
                    raise ConfigError("this refiner was trained with caption queries: pass --embedding-table and a "
                                      "'caption' column")
                query = Query(table.lookup(item.caption), item.caption)
            res = separate_item(item.mixture, cfg, make_guide(), refiner, query, item.name)
            ests["refined"] = _pass_sources(res)[:1] if query is not None else pick(_pass_sources(res))
            if baseline:  # the same run's baseline (one separation per row, not two)
                ests["baseline"] = pick(baseline_sources(res, item.mixture, st))
            total = sum(v.double() for v in res.sources.values())
            err = (item.mixture.double() - total).pow(2).sum().clamp_min(1e-300)
            row["adds_up_db"] = float(10 * torch.log10(item.mixture.double().pow(2).sum().clamp_min(1e-300) / err))
        for method, est in ests.items():
            m = separation_metrics(est, x, s)
            row[method] = {k: float(v) for k, v in m.items()}
        rows.append(row)
    return {"n": len(rows), "summary": summarise(rows), "rows": rows}


# the degradations `--guide sweep` scores, in the order of the report
SWEEP = (("exact oracle", "oracle"), ("blur 1", "oracle:blur=1"), ("noise 10 dB", "oracle:noise_db=10"),
         ("blur 1 + noise 10 dB", "oracle:blur=1,noise_db=10"), ("blur 2", "oracle:blur=2"),
         ("random grid", "oracle:random"))


def heldout_items(shared_dir: str | Path, n: int = 48, seconds: float = 5.0, seed: int = 2026) -> list[EvalItem]:
    """``n`` mixtures of the held-out sounds of the class split (:mod:`astsep.data.classsplit`), never
    seen in training, validation or model selection: either order, SNR −5 to +5 dB, seeded."""
    from .data.classsplit import ClassSplitMixtures, split_sounds

    ds = ClassSplitMixtures(split_sounds(shared_dir, "held_out"), n, seed, seconds, gain_db=(0.0, 0.0))
    items = []
    for i in range(n):
        e = ds[i]
        items.append(EvalItem(e["name"], e["mixture"], e["target"], e["caption"], e["target_label"],
                              e["interferer_label"]))
    return items


def guide_conditions(specs: list[str]) -> list[tuple[str, str]]:
    """``(name, spec)`` pairs of ``--guide`` values; ``sweep`` stands for :data:`SWEEP`."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        if spec == "sweep":
            out += list(SWEEP)
        else:
            out.append((next((n for n, s in SWEEP if s == spec), spec), spec))
    return list(dict.fromkeys(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m astsep.evaluate", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--mixtures", metavar="CSV",
                      help="'mixture,target[,caption]' or 'target,interferer[,snr_db][,caption]' CSV")
    what.add_argument("--heldout", action="store_true",
                      help="mixtures of the class split's held-out sounds (astsep/data/classsplit.py), made from "
                           "--shared-dir; never seen in refiner training")
    what.add_argument("--musdb", metavar="DIR", help="MUSDB18(-HQ) folder: score vocals/drums/bass/other stems")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the reports")
    p.add_argument("--shared-dir", default="../shared/data", metavar="DIR", help="--heldout: the shared recordings")
    p.add_argument("-n", "--num-mixtures", type=int, default=48, help="--heldout: how many mixtures (default 48)")
    p.add_argument("--seconds", type=float, default=5.0, help="--heldout: mixture length (default 5 s)")
    p.add_argument("--subset", choices=["test", "train", "both"], default="test", help="--musdb: which tracks")
    p.add_argument("--tracks", nargs="+", default=None, metavar="NAME", help="--musdb: only these track folders")
    p.add_argument("--stem-map", default=None, metavar="YAML",
                   help="--musdb: AudioSet classes per stem (default configs/musdb.yaml)")
    p.add_argument("--refiner", default=None, metavar="CKPT", help="trained refiner checkpoint (adds 'refined')")
    p.add_argument("--embedding-table", default=None, metavar="PT", help="caption embeddings for table-trained refiners")
    p.add_argument("--model", default=None,
                   help="AST for the baseline: Hub id, local folder, or 'tiny' (default: the refiner's guide with "
                        f"--refiner, else {DEFAULT_MODEL})")
    p.add_argument("--guide-model", dest="model", default=None, help=argparse.SUPPRESS)  # the former name
    p.add_argument("--separator-config", default=None, metavar="YAML",
                   help="separator and guide settings of the baseline (default configs/separator.yaml, as infer.py)")
    p.add_argument("--guide", nargs="+", default=["ast"], metavar="SPEC",
                   help="guide(s) of the baseline, each scored in turn: 'ast' (the AST, default), "
                        "'oracle[:blur=1,noise_db=10,gamma=2,gain=2,floor=0.2,random,seed=0]' (built from each row's "
                        "known target), or 'sweep': exact oracle, blur 1, noise 10 dB, blur 1 + noise 10 dB, blur 2, "
                        "random grid")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline (no AST needed)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="evaluate at most this much of each row (default 10.24) or track (default: all of it)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def _ast_guide(args, model: str, cfg, refiner, conditions: list):
    """The AST guide ``model`` when a condition or the refiner's baseline needs one, else None; an
    error loading it, or a refiner it does not fit, names ``--model``."""
    if not any(d is None for _, _, d in conditions) or (refiner is None and args.no_baseline):
        return None
    from .guide_loader import load_guide

    with naming_option("--model"):
        guide = load_guide(cfg, model, refiner.guide_seed if refiner is not None else 0)
        if refiner is not None:
            refiner.check_guide(guide)
    return guide


def main(argv: list[str] | None = None) -> int:
    """``python -m astsep.evaluate``: the mixtures, refiner and guide, every guide condition scored, the
    report. (Stays whole: steps in order inside the one ``try`` that turns an error into its line.)"""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.musdb:
        return main_musdb(args)
    if args.max_seconds is None:
        args.max_seconds = 10.24
    try:
        from .oracle import parse_guide_spec
        from .refiner import Refiner

        conditions = [(name, spec, parse_guide_spec(spec)) for name, spec in guide_conditions(args.guide)]
        if args.max_seconds > 10.24 or (args.heldout and args.seconds > 10.24):
            raise ConfigError("evaluate scores one 10.24 s window per row: --max-seconds / --seconds must be <= 10.24")
        default_config = DEFAULT_SEPARATOR_CONFIG if DEFAULT_SEPARATOR_CONFIG.is_file() else None
        config_path = args.separator_config or default_config
        cfg = load_config(config_path)
        cfg.guide.device = args.device
        if args.heldout:
            items = heldout_items(args.shared_dir, args.num_mixtures, args.seconds)
            what = f"held-out sounds of the class split, {args.seconds:g} s, SNR -5 to +5 dB"
        else:
            items = read_eval_csv(args.mixtures, args.max_seconds)
            what = str(args.mixtures)
        refiner = Refiner.load(args.refiner, table=args.embedding_table) if args.refiner else None
        table = refiner.table if refiner is not None else None
        if table is None and args.embedding_table:
            from .query import EmbeddingTable

            table = EmbeddingTable.load(args.embedding_table)
        model = args.model or ((refiner.guide_model if refiner is not None else None) or DEFAULT_MODEL)
        guide = _ast_guide(args, model, cfg, refiner, conditions)
        if refiner is not None:
            refiner.to(torch.device(args.device))
        results: dict = {"n": len(items), "mixtures": what, "conditions": {},
                         "estimate": "Baseline and refined: the first pass's source under an oracle guide (it names "
                                     "the target first); under the AST the source closest to the target. IRM: the "
                                     "ideal ratio mask on the same STFT."}
        if not args.no_baseline:
            results["baseline"] = {"guide": model if guide is not None else "oracle", "config": str(config_path or "defaults"),
                                   "settings": baseline_settings(cfg)}
        if refiner is not None:
            results["refiner"] = {"checkpoint": str(args.refiner), "guide_model": refiner.guide_model,
                                  "baseline": refiner.baseline,
                                  "baseline_differences": (settings_differences(refiner.baseline, cfg)
                                                           if refiner.baseline else None)}
        for name, spec, deg in conditions:
            log.info("scoring %d mixtures with guide %s", len(items), spec)
            res = evaluate(items, cfg, guide if deg is None else None, refiner, deg, table,
                           baseline=not args.no_baseline, progress=sys.stderr.isatty())
            results["conditions"][name] = {"spec": spec, **res}
            if not sys.stderr.isatty():
                sm = res["summary"]
                print(f"astsep.evaluate: {name}: " + ", ".join(
                    f"{m} SI-SDRi {sm[m]['si_sdri']['mean']:.2f}" for m in ("baseline", "refined", "oracle_irm") if m in sm),
                    file=sys.stderr, flush=True)
        title = "Separation quality" + (f" (guide: {conditions[0][1]})" if len(conditions) == 1 and conditions[0][2] is not None
                                        else "")
        md, _ = write_report(results, args.out, title)
    except AstsepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    sys.stdout.write(md.read_text())
    return 0


def main_musdb(args: argparse.Namespace) -> int:
    """``--musdb DIR``: separate every track, map sources to stems, score them with museval."""
    try:
        if args.refiner or args.no_baseline or args.guide != ["ast"] or args.embedding_table or args.heldout:
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
        from .guide_loader import load_guide
        from .guide import quiet_model_loading
        from .pipeline import Pipeline

        guide_model = args.model or DEFAULT_MODEL
        with quiet_model_loading(), naming_option("--model"):
            pipe = Pipeline(cfg, load_guide(cfg, guide_model))
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
