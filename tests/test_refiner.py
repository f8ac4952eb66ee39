"""The FiLM U-Net refiner: shapes, size, conditioning, and masking back to samples."""

from __future__ import annotations

import pytest
import torch

from astsep.config import STFTConfig
from astsep.features import apply_mask, stft
from astsep.refiner import MaskRefiner, RefinerConfig, count_parameters
from conftest import clip

SMALL = RefinerConfig(n_masks=3, query_dim=16, channels=8, max_channels=16, depth=3, cond_dim=16)


def test_default_refiner_has_at_most_two_million_parameters():
    n = count_parameters(MaskRefiner(RefinerConfig()))
    assert 500_000 < n <= 2_000_000


@pytest.mark.parametrize("frames", [1, 37, 501])
def test_mask_has_the_mixture_shape_for_any_number_of_frames(frames):
    net = MaskRefiner(SMALL)
    g = torch.Generator().manual_seed(0)
    mag = torch.rand(2, 201, frames, generator=g)
    mask = net(mag, torch.rand(2, 3, 201, frames, generator=g), torch.randn(2, 16, generator=g))
    assert mask.shape == (2, 201, frames)
    assert bool((mask >= 0).all() and (mask <= 1).all())


def test_untrained_film_ignores_the_query_and_a_trained_one_does_not():
    torch.manual_seed(0)
    net = MaskRefiner(SMALL)
    mag, masks = torch.rand(1, 201, 20), torch.rand(1, 3, 201, 20)
    q1, q2 = torch.randn(1, 16), torch.randn(1, 16)
    torch.testing.assert_close(net(mag, masks, q1), net(mag, masks, q2))  # FiLM starts as identity
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(15):  # push q1 towards mask 1 and q2 towards mask 0
        loss = (1 - net(mag, masks, q1)).mean() + net(mag, masks, q2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (net(mag, masks, q1) - net(mag, masks, q2)).mean() > 0.2


def test_negative_query_and_flags_change_the_condition_unless_negatives_are_off():
    torch.manual_seed(0)
    net = MaskRefiner(SMALL)
    q, n = torch.randn(2, 16), torch.randn(2, 16)
    with_neg = net.condition(q, n)
    assert not torch.allclose(with_neg, net.condition(q))
    # a row flagged as having no negative is the same as no negative at all
    flagged = net.condition(q, n, has_negative=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(flagged[1], net.condition(q)[1])
    torch.testing.assert_close(flagged[0], with_neg[0])
    off = MaskRefiner(RefinerConfig(**{**SMALL.__dict__, "use_negative": False}))
    torch.testing.assert_close(off.condition(q, n), off.condition(q))


def test_wrong_shapes_are_refused_with_a_message():
    net = MaskRefiner(SMALL)
    with pytest.raises(ValueError, match="n_masks=3"):
        net(torch.rand(1, 201, 10), torch.rand(1, 2, 201, 10), torch.randn(1, 16))
    with pytest.raises(ValueError, match="query_dim=16"):
        net(torch.rand(1, 201, 10), torch.rand(1, 3, 201, 10), torch.randn(1, 8))


def test_unit_mask_gives_back_the_mixture_and_zero_mask_silence(shared):
    x = torch.stack([clip("dog", 1.0), clip("rain", 1.0)])
    spec = stft(x, STFTConfig())
    ones = torch.ones(spec.shape)
    torch.testing.assert_close(apply_mask(spec, ones, STFTConfig(), x.shape[-1]), x, atol=1e-5, rtol=0)
    assert apply_mask(spec, torch.zeros(spec.shape), STFTConfig(), x.shape[-1]).abs().max() == 0
    # K masks per item: each gives what its own mask would alone
    halves = torch.stack([ones * 0.5, ones], dim=1)
    both = apply_mask(spec, halves, STFTConfig(), x.shape[-1])
    assert both.shape == (2, 2, x.shape[-1])
    torch.testing.assert_close(both[:, 0], apply_mask(spec, ones * 0.5, STFTConfig(), x.shape[-1]))
    torch.testing.assert_close(both[:, 1], x, atol=1e-5, rtol=0)


BAND = RefinerConfig(n_masks=3, query_dim=16, cond_dim=16, own_mask=True, residual=True, refine_passes=1,
                     arch="bandsplit", core_channels=16, core_blocks=3, head_channels=4, time_stride=2)


@pytest.mark.parametrize("bins, frames", [(513, 126), (513, 1), (201, 37), (40, 5)])
def test_bandsplit_mask_has_the_mixture_shape_and_starts_as_the_baseline(bins, frames):
    """Any number of bins (a region may be empty or partly filled) and frames (odd, 1, with
    time_stride 2); untrained, it returns the refined pass's own baseline mask."""
    torch.manual_seed(0)
    net = MaskRefiner(BAND)
    mag, masks = torch.rand(2, bins, frames), torch.rand(2, 3, bins, frames).clamp(0.01, 0.99)
    idx = torch.tensor([0, 2])
    mask = net(mag, masks, torch.randn(2, 16), pass_index=idx)
    assert mask.shape == (2, bins, frames)
    torch.testing.assert_close(mask, masks[torch.arange(2), idx], atol=1e-5, rtol=0)
    # and it can learn: one step moves the mask away from the baseline (the last layer is no longer zero)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(2):
        loss = (1 - net(mag, masks, torch.randn(2, 16), pass_index=idx)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (net(mag, masks, torch.randn(2, 16), pass_index=idx) - masks[torch.arange(2), idx]).mean() > 1e-3


def test_bandsplit_dev_size_stays_small_and_needs_a_residual_own_mask():
    dev = RefinerConfig(n_masks=3, query_dim=32, cond_dim=32, own_mask=True, residual=True, arch="bandsplit",
                        time_stride=2)
    assert 100_000 < count_parameters(MaskRefiner(dev)) <= 3_000_000
    with pytest.raises(ValueError, match="residual"):
        MaskRefiner(RefinerConfig(n_masks=3, own_mask=True, arch="bandsplit"))
    with pytest.raises(ValueError, match="arch"):
        MaskRefiner(RefinerConfig(arch="transformer"))
    with pytest.raises(ValueError, match="band_width"):
        MaskRefiner(RefinerConfig(**{**BAND.__dict__, "band_width": (4, 8)}))


def test_the_dev_config_refiner_stays_small_and_starts_as_the_baseline():
    """configs/refiner_dev.yaml's refiner: at most a few M parameters (the CPU step budget), and an
    untrained one gives back the baseline's pass-1 mask."""
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "refiner_dev.yaml").read_text())
    net = MaskRefiner(RefinerConfig(**cfg["model"]["refiner"]))
    assert 50_000 < count_parameters(net) <= 3_000_000
    torch.manual_seed(0)
    masks = torch.rand(1, 3, 513, 63).clamp(0.01, 0.99)
    out = net(torch.rand(1, 513, 63), masks, torch.zeros(1, cfg["model"]["refiner"]["query_dim"]))
    torch.testing.assert_close(out, masks[:, 0], atol=1e-5, rtol=0)


CTX = RefinerConfig(n_masks=3, query_dim=16, channels=8, max_channels=16, depth=3, cond_dim=16, own_mask=True,
                    residual=True, context=True)


def test_context_channels_are_the_profiles_and_activities_of_the_pass_and_the_rest():
    from astsep.refiner.network import context_features

    g = torch.Generator().manual_seed(0)
    mag = torch.rand(1, 5, 8, generator=g) + 0.1
    own = torch.zeros(1, 5, 8)
    own[..., :3] = 1.0  # the pass holds frames 0-2 whole, the rest frames 3-7
    ctx = context_features(mag, own, 1e-5)
    assert ctx.shape == (1, 4, 5, 8)
    power = mag.square()
    torch.testing.assert_close(ctx[0, 0, :, 5], 0.5 * torch.log(power[0, :, :3].sum(-1) / (3 + 1e-3)))
    torch.testing.assert_close(ctx[0, 1, :, 0], 0.5 * torch.log(power[0, :, 3:].sum(-1) / (5 + 1e-3)))
    torch.testing.assert_close(ctx[0, 2, 2, :3], 0.5 * torch.log(power[0, :, :3].mean(0)))
    assert bool((ctx[0, 2, :, 3:] < -11).all())  # no pass energy there: the floor
    torch.testing.assert_close(ctx[0, 3, 4, 3:], 0.5 * torch.log(power[0, :, 3:].mean(0)))


def test_a_context_refiner_starts_as_the_baseline_and_its_inputs_ignore_the_level():
    net = MaskRefiner(CTX)
    g = torch.Generator().manual_seed(1)
    mag = torch.rand(2, 201, 40, generator=g) + 1e-3
    masks = torch.rand(2, 3, 201, 40, generator=g).clamp(0.01, 0.99)
    assert net.features(mag, masks).shape[1] == 2 + 3 + 4
    torch.testing.assert_close(net(mag, masks, torch.zeros(2, 16)), masks[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(net.features(10.0 * mag, masks), net.features(mag, masks), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="own_mask"):
        MaskRefiner(RefinerConfig(context=True))
