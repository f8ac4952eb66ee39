"""Invariants of every pass of the deterministic separator, on real clips."""

from __future__ import annotations

import pytest
import torch

from astsep.config import AstsepConfig
from astsep.guide import ASTGuide
from astsep.separator import Separator
from astsep.testing import tiny_ast

from conftest import SEED_RECORDING, mixture
from astsep.audio import load_audio

MIXES = [("siren", "dog"), ("crying_baby", "rain"), ("door_wood_knock", "engine"), ("church_bells", "crow")]


@pytest.fixture(scope="module")
def sep():
    return Separator(AstsepConfig(), ASTGuide(tiny_ast(seed=0)))


@pytest.fixture(scope="module")
def batch(shared):
    x = torch.stack([mixture(*m, seconds=5.0) for m in MIXES])
    seed, _ = load_audio(SEED_RECORDING)
    return torch.cat([x, seed[: x.shape[1]].unsqueeze(0)])


@pytest.fixture(scope="module")
def result(sep, batch):
    return sep.separate_batch(batch, keep_traces=True)


def test_masks_are_in_unit_interval(result):
    assert result.masks.min() >= 0 and result.masks.max() <= 1
    for tr in result.traces:
        assert tr.mask.min() >= 0 and tr.mask.max() <= 1
    # effective masks relative to the mixture never claim more than the whole mixture in total
    assert float(result.masks.sum(dim=1).max()) <= 1 + 1e-5


def test_residual_energy_never_grows(result):
    for tr in result.traces:
        ran = tr.ran
        assert bool((tr.residual_energy[ran] <= tr.input_energy[ran] * (1 + 1e-6)).all())
    energies = torch.stack([tr.residual_energy for tr in result.traces])
    assert bool((energies[1:] <= energies[:-1] * (1 + 1e-6)).all())


def test_three_passes_cost_at_most_three_forwards_per_window(shared):
    guide = ASTGuide(tiny_ast(seed=0))
    x = mixture("siren", "dog").unsqueeze(0)
    Separator(AstsepConfig(), guide).separate_batch(x)
    assert guide.forwards <= 3


def test_should_stop_ends_the_passes_with_the_sources_found_so_far(sep, batch, result):
    """Asked before every pass after the first: True keeps pass 1's sources exactly and leaves the
    rest in the residual; a callback that never says stop changes nothing."""
    asked = []
    cut = sep.separate_batch(batch, should_stop=lambda: asked.append(1) or True)
    assert cut.cut and cut.passes_run == 1 and len(asked) == 1
    assert not bool(cut.kept[:, 1:].any())
    assert torch.equal(cut.kept[:, 0], result.kept[:, 0])
    assert torch.allclose(cut.sources[:, 0], result.sources[:, 0], atol=1e-6)
    assert torch.allclose(cut.residual, batch - cut.sources[:, 0], atol=1e-6)
    never = sep.separate_batch(batch, should_stop=lambda: False)
    assert not never.cut and never.passes_run == result.passes_run > 1
    assert torch.equal(never.sources, result.sources) and torch.equal(never.class_ids, result.class_ids)
    assert not result.cut


def test_batch_equals_one_window_at_a_time(sep, batch, result):
    for b in (0, 4):
        single = sep.separate_batch(batch[b:b + 1])
        torch.testing.assert_close(single.sources[0], result.sources[b], atol=1e-4, rtol=1e-3)
        assert single.class_ids[0].tolist() == result.class_ids[b].tolist()


def test_a_quiet_recording_is_separated_like_a_loud_one(sep, batch):
    """Thresholds compare energies in dB relative to the window, so a recording 40 dB quieter
    still yields real sources without any amplification (the reference amplified quiet inputs
    because its raw-energy sigmoids saturated). The AST itself is not gain-invariant, so only the
    outcome is compared, not every mask value."""
    loud = sep.separate_batch(batch[:2], keep_traces=True)
    quiet = sep.separate_batch(batch[:2] * 0.01, keep_traces=True)
    assert bool(loud.kept[:, 0].all()) and bool(quiet.kept[:, 0].all())
    for out in (loud, quiet):
        assert bool((out.traces[0].eratio > 0.01).all())
        assert float(out.masks[:, 0].mean()) > 0.01
    assert float(quiet.sources.abs().max()) < 0.01 * float(loud.sources.abs().max()) * 1.5  # not amplified


def test_min_eratio_stops_early_and_keeps_nothing_that_small(shared):
    cfg = AstsepConfig()
    cfg.separator.min_eratio = 0.99  # no pass can take 99 % of the energy
    guide = ASTGuide(tiny_ast(seed=0))
    out = Separator(cfg, guide).separate_batch(mixture("siren", "dog").unsqueeze(0))
    assert not bool(out.kept.any())
    assert guide.forwards == 1  # stopped after the first pass
    torch.testing.assert_close(out.residual[0], mixture("siren", "dog"))


def test_a_window_stops_once_what_is_left_is_below_the_residual_floor(shared):
    """``residual_floor_db`` is relative to the window's input energy (``silence_dbfs`` is absolute
    RMS and does not decide it): a floor just under the input stops after the first kept pass."""
    x = mixture("siren", "dog").unsqueeze(0)
    runs = {}
    for name, floor, silence in (("floor", -0.5, -80.0), ("silence only", -80.0, -1.0)):
        cfg = AstsepConfig()
        cfg.separator.residual_floor_db, cfg.separator.silence_dbfs = floor, silence
        guide = ASTGuide(tiny_ast(seed=0))
        out = Separator(cfg, guide).separate_batch(x * 10 ** (-20 / 20))  # -20 dB: RMS far above -80, under -1
        runs[name] = (guide.forwards, out)
    forwards, out = runs["floor"]
    assert forwards == 1 and bool(out.kept[0, 0]), forwards
    forwards, out = runs["silence only"]
    assert forwards == 0 and bool(out.silent[0])  # silence_dbfs only decides whether the input is silent


def test_silence_runs_no_forward_and_gives_no_source():
    guide = ASTGuide(tiny_ast(seed=0))
    out = Separator(AstsepConfig(), guide).separate_batch(torch.zeros(2, 16000))
    assert guide.forwards == 0 and not bool(out.kept.any()) and bool(out.silent.all())


def test_very_short_window_is_separated_without_error():
    guide = ASTGuide(tiny_ast(seed=0))
    x = torch.randn(1, 160) * 0.1  # 10 ms: 2 STFT frames, less than one AST patch
    out = Separator(AstsepConfig(), guide).separate_batch(x)
    # (sources + residual == x holds by construction: residual is x minus the sources)
    assert out.sources.shape[0] == 1 and out.sources.shape[-1] == 160 and bool(torch.isfinite(out.sources).all())


def test_later_passes_warm_start_and_every_pass_has_a_prior_from_its_own_grid(result):
    ran = [tr for tr in result.traces if bool(tr.ran.any())]
    assert len(ran) >= 2
    for tr in ran:
        rows = tr.ran
        assert bool((tr.prior[rows] >= 0).all()) and bool((tr.prior[rows] <= 1).all())
        # a contrasted attention grid is scaled so its 99th percentile reads as "all target"; a flat
        # one gives way to the dominant component group's shares, which lie in [0, 1]
        for i in rows.nonzero().squeeze(1).tolist():
            top = float(tr.shares[i].amax())
            if float(tr.contrast[i]) >= AstsepConfig().separator.grid_contrast_high:
                assert top == pytest.approx(1.0)
            else:
                assert 0 < top <= 1
