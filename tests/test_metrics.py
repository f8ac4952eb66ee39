"""Metrics and loss: pure batched functions, cross-checked against torchmetrics on real audio."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio, signal_noise_ratio

from astsep.metrics import SdrSiSdrLoss, best_source, compressed_spectral_loss, sdr, sdr_sisdr_loss, sdri, separation_metrics, si_sdr, si_sdri
from conftest import clip


@pytest.fixture(scope="module")
def signals(shared):
    s = torch.stack([clip("dog", 2.0), clip("rain", 2.0), clip("siren", 2.0)])  # (3, N) real references
    n = torch.stack([clip("crow", 2.0), clip("clapping", 2.0), clip("engine", 2.0)])
    g = torch.Generator().manual_seed(0)
    est = 0.8 * s + 0.3 * n + 0.01 * torch.randn(s.shape, generator=g)
    return s, n, est


def test_sdr_equals_torchmetrics_snr_without_zero_mean_on_batched_real_audio(signals):
    s, _, est = signals
    batched_est, batched_ref = est.view(3, 1, -1).expand(3, 2, -1), s.view(3, 1, -1).expand(3, 2, -1)
    got = sdr(batched_est, batched_ref)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, signal_noise_ratio(batched_est, batched_ref, zero_mean=False), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("zero_mean", [False, True])
def test_si_sdr_equals_torchmetrics(signals, zero_mean):
    s, _, est = signals
    torch.testing.assert_close(si_sdr(est, s, zero_mean=zero_mean),
                               scale_invariant_signal_distortion_ratio(est, s, zero_mean=zero_mean), rtol=1e-5, atol=1e-4)


def test_si_sdr_ignores_the_estimates_scale_and_sdr_does_not(signals):
    s, _, est = signals
    torch.testing.assert_close(si_sdr(0.1 * est, s), si_sdr(est, s), rtol=1e-4, atol=1e-3)
    assert bool(((sdr(0.1 * est, s) - sdr(est, s)).abs() > 1).all())


def test_improvements_are_relative_to_the_mixture(signals):
    s, n, est = signals
    x = s + n
    torch.testing.assert_close(sdri(x, x, s), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(si_sdri(est, x, s), si_sdr(est, s) - si_sdr(x, s))
    assert bool((si_sdri(s, x, s) > 40).all())  # the perfect estimate improves a lot
    m = separation_metrics(est, x, s)
    assert set(m) == {"sdr", "sdri", "si_sdr", "si_sdri"} and m["sdri"].shape == (3,)


def test_loss_is_the_weighted_negative_sdr_and_si_sdr_and_has_gradients(signals):
    s, _, est = signals
    est = est.clone().requires_grad_(True)
    loss = sdr_sisdr_loss(est, s, sdr_weight=0.3)
    expected = (-0.3 * sdr(est, s) - 0.7 * si_sdr(est, s)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert est.grad is not None and torch.isfinite(est.grad).all() and est.grad.abs().sum() > 0
    torch.testing.assert_close(sdr_sisdr_loss(est, s, sdr_weight=1.0), -sdr(est, s).mean())
    with pytest.raises(ValueError):
        sdr_sisdr_loss(est, s, sdr_weight=1.5)


def test_silence_and_perfect_estimates_stay_finite():
    z = torch.zeros(2, 1000)
    assert torch.isfinite(sdr(z, z)).all() and torch.isfinite(si_sdr(z, z)).all()
    x = torch.randn(2, 1000)
    assert torch.isfinite(si_sdr(x, x)).all() and bool((si_sdr(x, x) > 60).all())


def test_the_loss_module_is_the_loss_function(signals):
    s, _, est = signals
    torch.testing.assert_close(SdrSiSdrLoss(0.3)(est, s), sdr_sisdr_loss(est, s, sdr_weight=0.3))
    with pytest.raises(ValueError, match="sdr_weight"):
        SdrSiSdrLoss(-0.1)


def test_compressed_spectral_loss_is_zero_for_the_reference_grows_with_interference_and_ignores_level(signals):
    s, n, est = signals
    assert compressed_spectral_loss(s, s).abs().max() < 1e-5
    mild, strong = compressed_spectral_loss(s + 0.1 * n, s), compressed_spectral_loss(s + 0.5 * n, s)
    assert mild.shape == (3,) and bool((strong > mild).all()) and bool((mild > 0).all())
    # relative to the reference's compressed magnitudes: the level of the pair (over the training gains,
    # -6 to +6 dB) does not change it
    for g in (0.5, 2.0):
        torch.testing.assert_close(compressed_spectral_loss(g * est, g * s), compressed_spectral_loss(est, s),
                                   rtol=3e-2, atol=1e-3)  # within 3 %: ε counts in near-silent bins
    # batched over any leading shape, like the other metrics
    torch.testing.assert_close(compressed_spectral_loss(est.view(3, 1, -1), s.view(3, 1, -1))[:, 0],
                               compressed_spectral_loss(est, s))
    with pytest.raises(ValueError, match="power"):
        compressed_spectral_loss(est, s, power=0.0)


def test_compressed_spectral_loss_has_finite_gradients_even_from_silence(signals):
    s, _, _ = signals
    z = torch.zeros_like(s, requires_grad=True)
    value = compressed_spectral_loss(z, s).sum()
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()
    torch.testing.assert_close(compressed_spectral_loss(z.detach(), s), torch.ones(3), rtol=1e-3, atol=1e-3)


def test_the_loss_module_adds_the_weighted_spectral_term_only_when_asked(signals):
    s, _, est = signals
    torch.testing.assert_close(SdrSiSdrLoss(0.5, spectral_weight=0.0)(est, s), sdr_sisdr_loss(est, s))
    torch.testing.assert_close(SdrSiSdrLoss(0.5, spectral_weight=3.0)(est, s),
                               sdr_sisdr_loss(est, s) + 3.0 * compressed_spectral_loss(est, s).mean())
    with pytest.raises(ValueError, match="spectral_weight"):
        SdrSiSdrLoss(0.5, spectral_weight=-1.0)


def test_best_source_picks_the_kept_source_closest_to_the_target_else_the_mixture(signals):
    s, n, _ = signals
    x = s + n
    sources = torch.stack([n, 0.5 * s + 0.1 * n, s], dim=1)  # (3, K=3, N); source 2 is the target itself
    kept = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    est, idx = best_source(sources, kept, x, s)
    assert idx.tolist() == [2, 1, -1]
    torch.testing.assert_close(est[0], s[0])
    torch.testing.assert_close(est[1], sources[1, 1])
    torch.testing.assert_close(est[2], x[2])  # nothing kept: the unprocessed mixture
