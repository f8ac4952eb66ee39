"""The oracle guide and what the separator does with a perfect (or spoiled) grid, on real mixtures."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from astsep.config import AstsepConfig, STFTConfig
from astsep.errors import ConfigError
from astsep.features import istft, patch_energy, patch_operators, stft
from astsep.guidance import GuideOutput
from astsep.metrics import si_sdr
from astsep.oracle import Degradation, OracleGuide, parse_guide_spec
from astsep.separator import Separator

from conftest import clip

PAIRS = [("siren", "dog"), ("crying_baby", "rain"), ("door_wood_knock", "engine"), ("church_bells", "crow")]
LABELS = ["target", "interferer"]


def pair(a: str, b: str, seconds: float = 5.0):
    s, n = clip(a, seconds), clip(b, seconds)
    n = n * (s.pow(2).sum() / n.pow(2).sum()).sqrt()  # 0 dB
    return s + n, s, n


def oracle_for(a, b, degradation=None):
    x, s, n = pair(a, b)
    return x, s, OracleGuide(x, torch.stack([s, n]), [0, 1], LABELS, degradation)


def gain_db(estimate, mixture, target) -> float:
    return float(si_sdr(estimate, target) - si_sdr(mixture, target))


def test_oracle_grid_is_the_targets_share_of_every_patch(shared):
    x, s, guide = oracle_for("siren", "dog")
    out = guide(x.unsqueeze(0))
    st = STFTConfig()
    S, N = stft(s.unsqueeze(0), st).abs().pow(2), stft((x - s).unsqueeze(0), st).abs().pow(2)
    pf, pt, _, _ = patch_operators(S.shape[-2], S.shape[-1], out.tp_valid, st)
    es, en = patch_energy(S, pf, pt), patch_energy(N, pf, pt)
    torch.testing.assert_close(out.grid[:, :, : out.tp_valid], es / (es + en), atol=1e-5, rtol=0)
    assert out.grid.shape == (1, 12, 101) and out.tp_valid == 50 and out.calibrated
    assert bool((out.grid[:, :, out.tp_valid:] == 0).all())
    assert int(out.probs.argmax()) == 0  # the target is named first
    assert float(out.grid.std()) > 0.1  # a real map, not a constant


def test_oracle_names_the_interferer_once_the_target_is_taken(shared):
    """What is left after a pass is the mixture times a real mask; the oracle sees how much of each
    source that leaves and names the target while it still holds >= 10 % of the energy."""
    x, s, guide = oracle_for("siren", "dog")
    st = STFTConfig()
    X, S = stft(x.unsqueeze(0), st), stft(s.unsqueeze(0), st)
    target_bins = (S.abs().pow(2) > (X - S).abs().pow(2)).float()
    taken = istft((1 - target_bins) * X, st, x.numel())  # the target's bins removed
    assert int(guide(taken).probs.argmax()) == 1
    assert int(guide(istft(0.5 * X, st, x.numel())).probs.argmax()) == 0  # half of everything is still there


@pytest.mark.parametrize("a,b", PAIRS)
def test_perfect_guide_separates_pass_one(shared, a, b):
    """With a perfect grid the first pass extracts the target: ≥ 5 dB SI-SDRi on every one of these
    real 0 dB pairs, and better than the grid alone spread over bins (the prior) would do."""
    x, s, guide = oracle_for(a, b)
    out = Separator(AstsepConfig(), guide).separate_batch(x.unsqueeze(0), keep_traces=True)
    assert int(out.class_ids[0, 0]) == 0
    g_sep = gain_db(out.sources[0, 0], x, s)
    prior = out.traces[0].prior[0]
    st = AstsepConfig().stft
    g_prior = gain_db(istft(prior * stft(x.unsqueeze(0), st)[0], st, x.numel()), x, s)
    assert g_sep >= 5.0, f"{a}+{b}: {g_sep:.2f} dB"
    assert g_sep > g_prior, f"{a}+{b}: NMF + patch fit {g_sep:.2f} dB, prior alone {g_prior:.2f} dB"


def test_the_grid_drives_the_mask_a_random_grid_does_not_separate(shared):
    gains = {}
    for name, deg in (("oracle", None), ("random", Degradation(random=True))):
        vals = []
        for a, b in PAIRS:
            x, s, guide = oracle_for(a, b, deg)
            out = Separator(AstsepConfig(), guide).separate_batch(x.unsqueeze(0))
            vals.append(gain_db(out.sources[0, 0], x, s))
        gains[name] = sum(vals) / len(vals)
    assert gains["oracle"] > gains["random"] + 6.0, gains


class _Confident:
    """The oracle's answer with the class probabilities replaced (grid untouched)."""

    def __init__(self, guide: OracleGuide, confidence: float):
        self.inner, self.confidence = guide, confidence
        self.labels, self.layout, self.hidden_size = guide.labels, guide.layout, guide.hidden_size

    def __call__(self, x, rows=None, pass_index=0) -> GuideOutput:
        out = self.inner(x, rows)
        p = torch.tensor([self.confidence, 1 - self.confidence]).clamp_min(1e-6).log()
        return GuideOutput(p.expand(x.shape[0], -1).clone(), out.grid, out.embedding, out.tp_valid, out.calibrated)


def test_confidence_only_names_the_source_and_never_removes_frames(shared):
    x, s, guide = oracle_for("siren", "dog")
    masks = [Separator(AstsepConfig(), _Confident(guide, c)).separate_batch(x.unsqueeze(0)).masks[0, 0]
             for c in (0.51, 0.99)]
    torch.testing.assert_close(masks[0], masks[1])


def test_one_batch_of_oracle_mixtures_equals_one_at_a_time(shared):
    xs, srcs = [], []
    for a, b in PAIRS[:2]:
        x, s, n = pair(a, b)
        xs.append(x)
        srcs.append(torch.stack([s, n]))
    X, S = torch.stack(xs), torch.stack(srcs)
    both = Separator(AstsepConfig(), OracleGuide(X, S, [[0, 1], [0, 1]], LABELS)).separate_batch(X)
    for i in range(2):
        one = Separator(AstsepConfig(), OracleGuide(X[i], S[i], [0, 1], LABELS)).separate_batch(X[i:i + 1])
        torch.testing.assert_close(one.sources[0], both.sources[i], atol=1e-4, rtol=1e-3)


def test_degradations_do_what_they_say():
    g = torch.rand(2, 12, 50) * 0.6 + 0.2
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(Degradation().apply(g, gen()), g)
    blurred = Degradation(blur=1.0).apply(g, gen())
    assert float(blurred.std()) < 0.6 * float(g.std())  # smoother
    assert abs(float(blurred.mean()) - float(g.mean())) < 0.02  # same mass
    noisy = Degradation(noise_db=10.0).apply(g, gen())
    snr = 10 * torch.log10(g.pow(2).mean() / (noisy - g).pow(2).mean())
    assert 8.5 < float(snr) < 11.5
    torch.testing.assert_close(Degradation(gamma=2.0).apply(g, gen()), g ** 2)
    assert float(Degradation(floor=0.3).apply(g, gen()).min()) >= 0.3
    assert float(Degradation(gain=4.0).apply(g, gen()).max()) == 1.0
    r = Degradation(random=True).apply(g, gen())
    assert r.shape == g.shape and float((r - g).abs().mean()) > 0.1


def test_guide_specs_parse_and_bad_ones_are_refused():
    assert parse_guide_spec("ast") is None
    assert parse_guide_spec("oracle") == Degradation()
    d = parse_guide_spec("oracle:blur=1,noise_db=10,gamma=2,floor=0.2,random,seed=3")
    assert (d.blur, d.noise_db, d.gamma, d.floor, d.random, d.seed) == (1.0, 10.0, 2.0, 0.2, True, 3)
    for bad in ("oracle:blurr=1", "oracle:blur=x", "oracle:gamma=0", "astt", "oracle:floor=1"):
        with pytest.raises(ConfigError):
            parse_guide_spec(bad)


def test_oracle_refuses_signals_it_does_not_know(shared):
    x, s, guide = oracle_for("siren", "dog")
    with pytest.raises(ConfigError, match="samples"):
        guide(x[:16000].unsqueeze(0))
    with pytest.raises(ConfigError, match="rows"):
        guide(x.unsqueeze(0), rows=torch.tensor([3]))


def test_patch_layout_puts_a_tone_in_the_right_frequency_patches():
    """A 1 kHz tone's energy lands in the AST frequency patches whose mel bands cover 1 kHz, and the
    upsampling weights are interpolation weights (each bin and frame sums to one)."""
    st = STFTConfig()
    t = torch.arange(32000) / 16000
    P = stft(torch.sin(2 * torch.pi * 1000 * t).unsqueeze(0), st).abs().pow(2)
    pf, pt, up_f, up_t = patch_operators(P.shape[-2], P.shape[-1], 20, st)
    e = patch_energy(P, pf, pt)[0].sum(dim=1)  # (12,) energy per frequency patch
    mel = lambda f: 1127 * torch.log1p(torch.tensor(f) / 700)  # noqa: E731
    band = float((mel(1000.0) - mel(20.0)) / ((mel(8000.0) - mel(20.0)) / 129) - 1)  # Kaldi band of 1 kHz
    holding = {i for i in range(12) if 10 * i <= band < 10 * i + 16}
    assert {int(i) for i in (e > 0.05 * e.max()).nonzero()} == holding
    torch.testing.assert_close(up_f.sum(dim=1), torch.ones(up_f.shape[0]))
    torch.testing.assert_close(up_t.sum(dim=1), torch.ones(up_t.shape[0]))
    assert set(pt.sum(dim=0).unique().tolist()) <= {0.0, 1.0, 2.0}  # patches overlap: a frame is in 1 or 2


def test_trust_follows_how_exact_the_grid_is(shared):
    """An exact grid agrees with the mixture's own structure and is trusted (the patch fit may move
    far); a blurred, noisy one is not (the fit stays near the mixture's structure)."""
    trust = {}
    for name, deg in (("oracle", None), ("spoiled", Degradation(blur=1.0, noise_db=10.0))):
        vals = []
        for a, b in PAIRS:
            x, s, guide = oracle_for(a, b, deg)
            out = Separator(AstsepConfig(), guide).separate_batch(x.unsqueeze(0), keep_traces=True)
            vals.append(float(out.traces[0].trust[0]))
        trust[name] = sum(vals) / len(vals)
    assert trust["oracle"] >= 0.6 and trust["spoiled"] <= 0.2, trust


class _Flat:
    """The oracle's answer with its grid replaced by a nearly flat, uncalibrated attention map (what an
    untrained AST gives: a coefficient of variation of about 0.02)."""

    def __init__(self, guide: OracleGuide):
        self.inner = guide
        self.labels, self.layout, self.hidden_size = guide.labels, guide.layout, guide.hidden_size

    def __call__(self, x, rows=None, pass_index=0) -> GuideOutput:
        out = self.inner(x, rows)
        gen = torch.Generator().manual_seed(0)
        flat = (1 + 0.02 * torch.randn(out.grid.shape, generator=gen)) * (out.grid.abs().sum(dim=1, keepdim=True) > 0)
        return GuideOutput(out.logits, flat, out.embedding, out.tp_valid, calibrated=False)


def test_a_flat_attention_map_does_not_take_everything(shared):
    """A map that says nothing about where is replaced by the dominant sound by the mixture's own
    structure: the pass takes part of the mixture, not (as a map read as 'target everywhere' would)
    nearly all of it."""
    x, s, guide = oracle_for("siren", "dog")
    out = Separator(AstsepConfig(), _Flat(guide)).separate_batch(x.unsqueeze(0), keep_traces=True)
    tr = out.traces[0]
    assert float(tr.contrast[0]) < 0.05
    assert 0.05 < float(tr.eratio[0]) < 0.8, float(tr.eratio[0])


def test_guidance_prior_keeps_a_contrasted_map_and_replaces_a_flat_one():
    from astsep.masking import guidance_prior

    sc = AstsepConfig().separator
    gen = torch.Generator().manual_seed(1)
    E = torch.rand(1, 12, 50, generator=gen) ** 4 + 1e-6
    up_f, up_t = torch.eye(12), torch.eye(50)
    peaky = torch.rand(1, 12, 50, generator=gen) ** 3
    fallback = (E / E.max()).sqrt()
    g, _, c = guidance_prior(peaky, False, fallback, up_f, up_t, sc)
    assert float(c) > sc.grid_contrast_high
    torch.testing.assert_close(g, (peaky / torch.quantile(peaky.flatten(), sc.grid_quantile)).clamp(0, 1))
    flat = 1 + 0.01 * torch.rand(1, 12, 50, generator=gen)
    g, _, c = guidance_prior(flat, False, fallback, up_f, up_t, sc)
    assert float(c) < sc.grid_contrast_low
    torch.testing.assert_close(g, fallback)
    g, _, c = guidance_prior(peaky, True, fallback, up_f, up_t, sc)  # a calibrated grid is kept as it is
    torch.testing.assert_close(g, peaky)


def test_the_blind_split_groups_components_that_move_together():
    """``dominant_group``: components whose activations rise and fall together are one sound; the
    group of the most energetic component is returned, whatever the components' order."""
    from astsep.masking import dominant_group

    gen = torch.Generator().manual_seed(3)
    T = 200
    on_a = (torch.arange(T) // 25 % 2 == 0).float()  # sound A: on/off every 0.25 s
    on_b = (torch.sin(torch.arange(T) / 7.0) > 0.3).float()  # sound B: its own rhythm
    rows = []
    for k in range(8):
        pattern = on_a if k % 2 == 0 else on_b
        level = 3.0 if k == 4 else 1.0  # component 4 (sound A) is the loudest
        rows.append(level * (pattern + 0.05) * (0.8 + 0.4 * torch.rand(T, generator=gen)))
    H = torch.stack(rows).unsqueeze(0)  # (1, 8, T)
    W = torch.rand(1, 64, 8, generator=gen)
    W = W / W.sum(dim=1, keepdim=True)
    a = dominant_group(W, H, tau=0.5, eps=1e-10)
    assert a[0].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    perm = torch.randperm(8, generator=gen)
    a = dominant_group(W[:, :, perm], H[:, perm], tau=0.5, eps=1e-10)
    assert a[0].tolist() == [1 - (int(p) % 2) for p in perm]


def test_per_source_nmf_refines_only_trusted_windows_and_helps_an_exact_grid(shared):
    """``source_nmf_rounds`` > 0 (the default): windows whose grid is trusted get one NMF per side of
    the mask; with an exact grid that separates better on average, and an untrusted window's mask is
    untouched."""
    on, off = AstsepConfig(), AstsepConfig()
    assert on.separator.source_nmf_rounds > 0
    off.separator.source_nmf_rounds = 0
    gains = {"off": [], "on": []}
    for a, b in PAIRS:
        x, s, guide = oracle_for(a, b)
        for name, cfg in (("off", off), ("on", on)):
            out = Separator(cfg, guide).separate_batch(x.unsqueeze(0))
            gains[name].append(gain_db(out.sources[0, 0], x, s))
    assert sum(gains["on"]) > sum(gains["off"]), gains
    spoiled = Degradation(blur=1.0, noise_db=5.0)  # a fresh guide for each run: the same noise draws
    x, s, guide = oracle_for("siren", "dog", spoiled)
    off_out = Separator(off, guide).separate_batch(x.unsqueeze(0), keep_traces=True)
    x, s, guide = oracle_for("siren", "dog", spoiled)
    on_out = Separator(on, guide).separate_batch(x.unsqueeze(0), keep_traces=True)
    assert float(off_out.traces[0].trust[0]) < on.separator.source_nmf_min_trust
    torch.testing.assert_close(on_out.traces[0].mask, off_out.traces[0].mask)


def test_sharpening_pushes_the_mask_towards_zero_and_one_and_keeps_its_side():
    from astsep.masking import sharpen

    m = torch.tensor([[[0.02, 0.3, 0.5, 0.7, 0.98]]])
    torch.testing.assert_close(sharpen(m, 1.0), m)
    out = sharpen(m, torch.tensor(1.5).view(1, 1, 1))
    assert bool(((out - 0.5).abs() >= (m - 0.5).abs() - 1e-6).all()), out  # further from 1/2 ...
    assert bool((torch.sign(out - 0.5) == torch.sign(m - 0.5)).all()), out  # ... on the same side
    torch.testing.assert_close(out[0, 0, 2], torch.tensor(0.5))


def test_the_steps_that_trust_the_grid_do_not_act_on_the_flat_map_fallback(shared):
    """A grid that is the structure fallback of a flat attention map (``own`` = 0) is neither
    sharpened nor refined by the per-side NMF: the mask is the one those two steps turned off would
    give. The guide's own exact grid (``own`` = 1) is changed by them."""
    from astsep.features import patch_operators
    from astsep.masking import guidance_prior, guided_mask, nmf, nmf_init

    x, s, guide = oracle_for("siren", "dog")
    cfg = AstsepConfig()
    sc, st = cfg.separator, cfg.stft
    X = stft(x.unsqueeze(0), st)
    P = X.abs().pow(2)
    out = guide(x.unsqueeze(0))
    tp = int(out.tp_valid)
    pool_f, pool_t, up_f, up_t = patch_operators(P.shape[1], P.shape[2], tp, st, guide.layout, P.device)
    W, H = nmf(P, *nmf_init(1, P.shape[1], P.shape[2], P.mean(dim=(1, 2)), sc, P.device), sc.nmf_iterations, sc.eps)
    g, prior, _ = guidance_prior(out.grid[:, :, :tp], True, None, up_f, up_t, sc)
    plain = dataclasses.replace(sc, mask_sharpness=1.0, source_nmf_rounds=0)
    base = guided_mask(P, g, prior, W, H, pool_f, pool_t, plain)
    fallback = guided_mask(P, g, prior, W, H, pool_f, pool_t, sc, own=torch.zeros(1))
    own = guided_mask(P, g, prior, W, H, pool_f, pool_t, sc, own=torch.ones(1))
    assert float(own.trust[0]) >= sc.source_nmf_min_trust  # an exact grid is trusted
    torch.testing.assert_close(fallback.mask, base.mask)
    assert float((own.mask - base.mask).abs().max()) > 0.05


def test_a_profile_embedding_describes_the_named_source_and_zeros_say_nothing(shared):
    """``embed=profile`` (a query that knows the sound, for diagnosis): the oracle's embedding of the
    mixture is the target's spectral profile, and once the target is taken, the interferer's."""
    from astsep.oracle import spectral_profile

    spec = parse_guide_spec("oracle:blur=1,embed=profile")
    assert spec.embed == "profile" and Degradation.parse(spec.describe()) == spec
    assert parse_guide_spec("oracle").embed == "zeros"
    with pytest.raises(ConfigError, match="embed"):
        parse_guide_spec("oracle:embed=clap")
    x, s, guide = oracle_for("siren", "dog", spec)
    st = STFTConfig()
    S, N = stft(s.unsqueeze(0), st).abs().pow(2), stft((x - s).unsqueeze(0), st).abs().pow(2)
    emb = guide(x.unsqueeze(0)).embedding
    assert emb.shape == (1, 768)
    torch.testing.assert_close(emb, spectral_profile(S, 768), atol=1e-4, rtol=0)
    assert float(torch.nn.functional.cosine_similarity(emb, spectral_profile(N, 768))) < 0.9
    X = stft(x.unsqueeze(0), st)
    taken = istft((S < N).float() * X, st, x.numel())  # the target's bins removed
    after = guide(taken).embedding
    assert float(torch.nn.functional.cosine_similarity(after, spectral_profile(N, 768))) > 0.9
    assert bool((OracleGuide(x, torch.stack([s, x - s]), [0, 1], LABELS)(x.unsqueeze(0)).embedding == 0).all())
