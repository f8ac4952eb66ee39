"""``python -m astsep.evaluate``: both CSV layouts, held-out class-split mixtures under a sweep of oracle
degradations, the four methods, Markdown + JSON reports, and the refiner run as ``infer.py`` runs it."""

from __future__ import annotations

import csv
import json

import pytest
import soundfile as sf
import torch

from astsep.config import STFTConfig, load_config
from astsep.evaluate import (DEFAULT_SEPARATOR_CONFIG, build_parser, guide_conditions, main, oracle_irm, read_eval_csv,
                             separate_item)
from astsep.guide_loader import build_guide
from astsep.lit import RefinerModule
from astsep.metrics import si_sdr
from astsep.refiner import Refiner
from conftest import ESC, clip, fit_and_save, mixture


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


def _small_refiner_ckpt(path, **kw):
    """A two-step refiner checkpoint on shared clips, saved as train.py does (tiny AST, pass queries)."""
    module = RefinerModule(refiner=dict(n_masks=3, query_dim=32, channels=4, max_channels=8, depth=2, cond_dim=8,
                                        use_negative=False), guide_model="tiny", query_source="pass",
                           example_every_n_val=0, **kw)
    s, n = clip("dog", 1.0), clip("rain", 1.0)
    fit_and_save(module, [{"mixture": s + n, "target": s}, {"mixture": s + n, "target": n}], path, steps=2)
    return path


def test_report_has_mean_and_median_of_every_metric_for_all_methods(tmp_path, pair_csv):
    ckpt = _small_refiner_ckpt(tmp_path / "r.ckpt")
    out = tmp_path / "report"
    assert main(["--mixtures", str(pair_csv), "--out", str(out), "--refiner", str(ckpt), "--model", "tiny",
                 "--max-seconds", "2"]) == 0
    rep = json.loads((out / "report.json").read_text())
    summary = rep["conditions"]["ast"]["summary"]
    assert rep["n"] == 2 and {"mixture", "baseline", "refined", "oracle_irm"} <= set(summary)
    for method in ("mixture", "baseline", "refined", "oracle_irm"):
        vals = summary[method]
        assert set(vals) == {"sdr", "sdri", "si_sdr", "si_sdri"} and set(vals["sdri"]) == {"mean", "median"}
    assert abs(summary["mixture"]["sdri"]["mean"]) < 1e-6
    assert summary["oracle_irm"]["si_sdri"]["mean"] > 6
    assert 0.0 <= summary["improved"] <= 1.0 and summary["adds_up_db_min"] >= 60  # written files add up
    md = (out / "report.md").read_text()
    assert "| refined |" in md and "| oracle_irm |" in md and "refined better" in md


def test_mixture_layout_without_refiner_scores_mixture_baseline_and_oracle(tmp_path, shared, capsys):
    s, n = clip("dog", 2.0), clip("rain", 2.0)
    sf.write(tmp_path / "mix.wav", (s + n).numpy(), 16000, subtype="FLOAT")
    sf.write(tmp_path / "dog.wav", s.numpy(), 16000, subtype="FLOAT")
    (tmp_path / "list.csv").write_text("mixture,target\nmix.wav,dog.wav\n")  # paths relative to the CSV
    assert main(["--mixtures", str(tmp_path / "list.csv"), "--out", str(tmp_path / "r"), "--model", "tiny"]) == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    cond = rep["conditions"]["ast"]
    assert set(cond["summary"]) == {"mixture", "baseline", "oracle_irm"}
    assert abs(cond["rows"][0]["mixture"]["si_sdr"] - float(si_sdr((s + n)[None], s[None]))) < 1e-3
    assert "| baseline |" in capsys.readouterr().out


def test_guide_model_is_now_model_and_the_old_name_still_parses():
    assert build_parser().parse_args(["--heldout", "--out", "o", "--model", "tiny"]).model == "tiny"
    assert build_parser().parse_args(["--heldout", "--out", "o", "--guide-model", "tiny"]).model == "tiny"
    assert "--guide-model" not in build_parser().format_help()


def test_evaluate_scores_what_infer_py_writes_with_the_same_refiner(tmp_path, shared, tiny_model_dir):
    """evaluate loads the refiner with ``Refiner.load`` and runs it through infer.py's pipeline: on the same
    mixture the refined sources it scores add up to exactly what ``infer.py --refiner`` writes."""
    from infer_runner import infer

    ckpt = _small_refiner_ckpt(tmp_path / "r.ckpt")
    x = mixture("dog", "rain", seconds=2.0)
    sf.write(tmp_path / "mix.wav", x.numpy(), 16000, subtype="FLOAT")
    proc = infer("-i", str(tmp_path / "mix.wav"), "-o", str(tmp_path / "out"), "-m", str(tiny_model_dir),
                 "--refiner", str(ckpt), "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = {p.stem: torch.from_numpy(sf.read(p, dtype="float32")[0]) for p in (tmp_path / "out").rglob("*.wav")}
    residual = [k for k in written if "residual" in k]
    assert len(residual) == 1 and len(written) >= 2, sorted(written)

    cfg = load_config(DEFAULT_SEPARATOR_CONFIG)
    cfg.guide.device = "cpu"
    res = separate_item(x, cfg, build_guide(str(tiny_model_dir), cfg.guide), Refiner.load(ckpt))
    refined = res.traces[0][2]["sources"]  # (K, N): the per-pass refined sources evaluate scores
    sources = sum(v for k, v in written.items() if k not in residual)
    torch.testing.assert_close(sources, refined.sum(dim=0), atol=1e-5, rtol=0)
    torch.testing.assert_close(written[residual[0]], res.residual, atol=1e-5, rtol=0)
    # and not by accident: the refiner changed the baseline's sources
    base = separate_item(x, cfg, build_guide(str(tiny_model_dir), cfg.guide))
    assert (base.traces[0][2]["sources"] - refined).abs().max() > 1e-4


def test_the_refine_path_of_training_and_of_inference_is_one_function(tmp_path, shared):
    """RefinerModule.forward (training) and Refiner.masks (infer.py, evaluate) give the same mask."""
    ckpt = _small_refiner_ckpt(tmp_path / "r.ckpt")
    module = RefinerModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    ref = Refiner.load(ckpt)
    x = mixture("dog", "rain", seconds=1.0)[None]
    masks = torch.rand(1, 3, 513, 63, generator=torch.Generator().manual_seed(0))
    q = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        est, m_train = module(x, masks, q, pass_index=torch.tensor([1]))
    m_inf, _ = ref.masks(x, masks, q[:, None], None, module.cfg.stft, pass_index=torch.tensor([1]))
    torch.testing.assert_close(m_inf[:, 0], m_train)
    assert est.shape == x.shape


def test_heldout_sweep_reports_every_degradation_side_by_side(tmp_path, shared):
    ckpt = _small_refiner_ckpt(tmp_path / "r.ckpt")
    out = tmp_path / "sweep"
    assert main(["--heldout", "-n", "2", "--seconds", "2", "--guide", "oracle", "oracle:random", "--refiner", str(ckpt),
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["conditions"]) == ["exact oracle", "random grid"]
    for c in rep["conditions"].values():
        assert {"baseline", "refined", "oracle_irm", "improved", "adds_up_db_min"} <= set(c["summary"])
        assert c["summary"]["adds_up_db_min"] >= 60
    assert rep["conditions"]["exact oracle"]["summary"]["baseline"]["si_sdri"]["mean"] > \
        rep["conditions"]["random grid"]["summary"]["baseline"]["si_sdri"]["mean"]
    md = (out / "report.md").read_text()
    assert "| exact oracle (`oracle`) |" in md and "| random grid (`oracle:random`) |" in md
    assert [name for name, _ in guide_conditions(["sweep"])] == ["exact oracle", "blur 1", "noise 10 dB",
                                                                 "blur 1 + noise 10 dB", "blur 2", "random grid"]


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
        (cond,) = rep["conditions"].values()
        assert cond["spec"] == spec and set(cond["summary"]) == {"mixture", "baseline", "oracle_irm"}
        assert f"guide: {spec}" in (out / "report.md").read_text()
        reports[spec] = cond["summary"]["baseline"]["si_sdri"]["mean"]
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
    ckpt = _small_refiner_ckpt(tmp_path / "r.ckpt", separator_config={"guide": {"trim_padding": True, "pad_merge": 0}})
    csv_path, reports = _one_row_csv(tmp_path), {}
    for name, extra in (("plain", []), ("refined", ["--refiner", str(ckpt)])):
        assert main(["--mixtures", str(csv_path), "--out", str(tmp_path / name), "--model", "tiny",
                     "--max-seconds", "2", *extra]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    plain, refined = reports["plain"], reports["refined"]
    # the refined run's own baseline (rebuilt from its per-pass masks) is the plain run's, to float rounding
    p_row, r_row = plain["conditions"]["ast"]["rows"][0]["baseline"], refined["conditions"]["ast"]["rows"][0]["baseline"]
    assert all(abs(p_row[k] - r_row[k]) < 1e-3 for k in p_row), (p_row, r_row)
    assert plain["baseline"] == refined["baseline"]
    assert plain["baseline"]["settings"]["guide"]["trim_padding"] is False  # infer.py's default
    assert "guide.trim_padding" in " ".join(refined["refiner"]["baseline_differences"])
    md = (tmp_path / "refined" / "report.md").read_text()
    assert "differs in: guide.trim_padding" in md


def test_default_hub_guide_offline_is_one_line_naming_the_option_and_exit_3(tmp_path, capsys, shared, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: the published AST is not here
    assert main(["--mixtures", str(_one_row_csv(tmp_path)), "--out", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --model: cannot load AST model"), err
    assert not (tmp_path / "r").exists()
