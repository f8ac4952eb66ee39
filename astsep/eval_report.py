"""The report of :mod:`astsep.evaluate`: ``report.md`` (a table per guide condition, mean ± std of
SI-SDR improvement per method) and ``report.json`` (every value)."""

from __future__ import annotations

import json
from pathlib import Path

from .audio import write_bytes_atomic
from .metrics import METRICS

METHODS = ("mixture", "baseline", "refined", "oracle_irm")


def _table(summary: dict) -> list[str]:
    lines = ["| method | SDR | SDRi | SI-SDR | SI-SDRi |", "| --- | ---: | ---: | ---: | ---: |"]
    for method in METHODS:
        vals = summary.get(method)
        if vals:
            cells = [f"{vals[m]['mean']:.2f} ({vals[m]['median']:.2f})" for m in METRICS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict, title: str = "Separation quality") -> str:
    """The report: one table per guide condition, and with several a side-by-side SI-SDRi table."""
    conds = results["conditions"]
    lines = [f"# {title}", "", f"{results['n']} mixtures ({results['mixtures']}). Values in dB; mean (median). "
             f"{results['estimate']}", ""]
    if len(conds) > 1 or any("refined" in c["summary"] for c in conds.values()):
        lines += ["| guide | baseline SI-SDRi | refined SI-SDRi | IRM SI-SDRi | refined better | written files add up |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, c in conds.items():
            sm = c["summary"]

            def cell(method: str) -> str:
                v = sm.get(method, {}).get("si_sdri")
                return f"{v['mean']:.2f} ({v['median']:.2f})" if v else "–"
            better = f"{100 * sm['improved']:.0f} %" if "improved" in sm else "–"
            adds = f"≥ {sm['adds_up_db_min']:.0f} dB" if "adds_up_db_min" in sm else "–"
            lines.append(f"| {name} (`{c['spec']}`) | {cell('baseline')} | {cell('refined')} | {cell('oracle_irm')} | "
                         f"{better} | {adds} |")
        lines.append("")
    for name, c in conds.items():
        lines += [f"## {name} (`{c['spec']}`)", ""] + _table(c["summary"]) + [""]
    base = results.get("baseline")
    if base:
        lines.append(f"Baseline: guide `{base['guide']}`; separator and STFT settings from {base['config']} "
                     "(every value in report.json).")
    ref = results.get("refiner")
    if ref:
        diff = ref["baseline_differences"]
        lines.append(f"Refiner `{ref['checkpoint']}` (loaded and run as `infer.py --refiner` does), trained on a baseline" + (
            " it does not record." if diff is None else
            f" that differs in: {'; '.join(diff)}." if diff else " with the same settings."))
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path, title: str = "Separation quality") -> tuple[Path, Path]:
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    write_bytes_atomic(md, markdown(results, title).encode())
    write_bytes_atomic(js, json.dumps(results, indent=2).encode())
    return md, js
