"""``python -m astsep.evaluate``: both CSV layouts, the four methods, Markdown + JSON reports."""

from __future__ import annotations

import csv
import json

import pytest
import soundfile as sf
import torch

from astsep.evaluate import main, oracle_irm, read_eval_csv
from astsep.config import STFTConfig
from astsep.lit import RefinerModule
from astsep.metrics import si_sdr
from conftest import ESC, clip, fit_and_save


def _flac(name: str) -> str:
    return str(next(ESC.glob(f"{name}__*.flac")))


@pytest.fixture
def pair_csv(tmp_path, shared):
    p = tmp_path / "pairs.csv"
    with open(p, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["target", "interferer", "snr_db", "caption"])
        w.writerow([_flac("dog"), _flac("rain"), "0", "the sound of dog"])
        w.writerow([_flac("siren"), _flac("crow"), "5", "the sound of siren"])
    return p


def test_pair_layout_mixes_at_the_given_snr(pair_csv):
    items = read_eval_csv(pair_csv, max_seconds=2.0)
    assert len(items) == 2 and items[0].mixture.shape == (32000,)
    snr = 10 * torch.log10(items[1].target.pow(2).sum() / (items[1].mixture - items[1].target).pow(2).sum())
    assert abs(float(snr) - 5.0) < 1e-3


def test_oracle_irm_is_far_better_than_the_mixture(pair_csv):
    it = read_eval_csv(pair_csv, max_seconds=2.0)[0]
    x, s = it.mixture[None], it.target[None]
    assert float(si_sdr(oracle_irm(x, s, STFTConfig()), s) - si_sdr(x, s)) > 6


def test_report_has_mean_and_median_of_every_metric_for_all_methods(tmp_path, pair_csv):
    # a two-step refiner checkpoint, saved as train.py does
    module = RefinerModule(refiner=dict(n_masks=3, query_dim=32, channels=4, max_channels=8, depth=2, cond_dim=8),
                           guide_model="tiny", query_source="target_audio", example_every_n_val=0)
    s, n = clip("dog", 1.0), clip("rain", 1.0)
    fit_and_save(module, [{"mixture": s + n, "target": s}, {"mixture": s + n, "target": n}], tmp_path / "r.ckpt",
                 steps=2)

    out = tmp_path / "report"
    assert main(["--mixtures", str(pair_csv), "--out", str(out), "--refiner", str(tmp_path / "r.ckpt"),
                 "--max-seconds", "2"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["n"] == 2 and set(rep["summary"]) == {"mixture", "baseline", "refined", "oracle_irm"}
    for method, vals in rep["summary"].items():
        assert set(vals) == {"sdr", "sdri", "si_sdr", "si_sdri"} and set(vals["sdri"]) == {"mean", "median"}
    assert abs(rep["summary"]["mixture"]["sdri"]["mean"]) < 1e-6
    assert rep["summary"]["oracle_irm"]["si_sdri"]["mean"] > 6
    md = (out / "report.md").read_text()
    assert "| refined |" in md and "| oracle_irm |" in md


def test_mixture_layout_without_refiner_scores_mixture_baseline_and_oracle(tmp_path, shared, capsys):
    s, n = clip("dog", 2.0), clip("rain", 2.0)
    sf.write(tmp_path / "mix.wav", (s + n).numpy(), 16000, subtype="FLOAT")
    sf.write(tmp_path / "dog.wav", s.numpy(), 16000, subtype="FLOAT")
    (tmp_path / "list.csv").write_text("mixture,target\nmix.wav,dog.wav\n")  # paths relative to the CSV
    assert main(["--mixtures", str(tmp_path / "list.csv"), "--out", str(tmp_path / "r"), "--guide-model", "tiny"]) == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(rep["summary"]) == {"mixture", "baseline", "oracle_irm"}
    assert abs(rep["rows"][0]["mixture"]["si_sdr"] - float(si_sdr((s + n)[None], s[None]))) < 1e-3
    assert "| baseline |" in capsys.readouterr().out


def test_bad_csv_is_one_clear_error_and_a_nonzero_exit(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert main(["--mixtures", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "r"), "--no-baseline"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs columns" in err[0]


def test_oracle_guide_baseline_separates_and_a_spoiled_one_less(tmp_path, pair_csv, capsys):
    """``--guide oracle`` scores the separator under a perfect grid; the report says which guide."""
    reports = {}
    for spec in ("oracle", "oracle:random"):
        out = tmp_path / spec.replace(":", "_")
        assert main(["--mixtures", str(pair_csv), "--out", str(out), "--guide", spec, "--max-seconds", "5"]) == 0
        rep = json.loads((out / "report.json").read_text())
        assert rep["guide"] == spec and set(rep["summary"]) == {"mixture", "baseline", "oracle_irm"}
        assert f"guide: {spec}" in (out / "report.md").read_text()
        reports[spec] = rep["summary"]["baseline"]["si_sdri"]["mean"]
    assert reports["oracle"] > 6.0
    assert reports["oracle"] > reports["oracle:random"] + 3.0


def test_bad_guide_spec_is_one_line_and_exit_2(tmp_path, pair_csv, capsys):
    assert main(["--mixtures", str(pair_csv), "--out", str(tmp_path / "r"), "--guide", "oracle:blurr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown oracle degradation 'blurr'") and "\n" not in err
    assert not (tmp_path / "r").exists()


def _one_row_csv(tmp_path):
    p = tmp_path / "one.csv"
    p.write_text(f"target,interferer\n{_flac('dog')},{_flac('rain')}\n")
    return p


def test_the_baseline_is_the_same_with_and_without_a_refiner_and_the_report_names_its_settings(tmp_path, shared):
    # a refiner trained on another baseline (trimmed padding, padding dropped) than the evaluation's
    module = RefinerModule(refiner=dict(n_masks=3, query_dim=32, channels=4, max_channels=8, depth=2, cond_dim=8),
                           guide_model="tiny", query_source="target_audio", trim_padding=True, pad_merge=0,
                           example_every_n_val=0)
    s, n = clip("dog", 1.0), clip("rain", 1.0)
    fit_and_save(module, [{"mixture": s + n, "target": s}], tmp_path / "r.ckpt")

    csv_path, reports = _one_row_csv(tmp_path), {}
    for name, extra in (("plain", []), ("refined", ["--refiner", str(tmp_path / "r.ckpt")])):
        assert main(["--mixtures", str(csv_path), "--out", str(tmp_path / name), "--guide-model", "tiny",
                     "--max-seconds", "2", *extra]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    plain, refined = reports["plain"], reports["refined"]
    assert plain["rows"][0]["baseline"] == refined["rows"][0]["baseline"]
    assert plain["baseline"] == refined["baseline"]
    assert plain["baseline"]["settings"]["guide"]["trim_padding"] is False  # infer.py's default
    assert "guide.trim_padding" in " ".join(refined["refiner"]["baseline_differences"])
    md = (tmp_path / "refined" / "report.md").read_text()
    assert "trim_padding False" in md and "differs in: guide.trim_padding" in md


def test_default_hub_guide_offline_is_one_line_naming_the_option_and_exit_3(tmp_path, capsys, shared, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: the published AST is not here
    assert main(["--mixtures", str(_one_row_csv(tmp_path)), "--out", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: cannot load AST model") and "--guide-model" in err, err
    assert not (tmp_path / "r").exists()
