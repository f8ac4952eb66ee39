"""Refiner training data and its baseline: the class split never leaks, examples are seeded, the
baseline cache returns the same masks under the right key, and the query never carries the target."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import default_collate

from astsep.data.classsplit import HELD_OUT, ClassSplitDataModule, DegradationSampler, split_sounds
from astsep.errors import ConfigError
from astsep.lit import RefinerModule
from astsep.refiner.cache import BaselineCache, baseline_key
from conftest import ESC, clip

SHARED = ESC.parent

SMALL = dict(n_masks=3, query_dim=32, channels=4, max_channels=8, depth=2, cond_dim=8, use_negative=False,
             own_mask=True, residual=True, refine_passes=1)


def _held_out_keys() -> set[str]:
    return {k for keys in HELD_OUT.values() for k in keys}


def test_the_split_is_fixed_disjoint_and_covers_every_sound(shared):
    train, held = split_sounds(SHARED, "train"), split_sounds(SHARED, "held_out")
    assert {(s.group, s.key) for s in held} == {(g, k) for g, keys in HELD_OUT.items() for k in keys}
    assert not {s.path for s in train} & {s.path for s in held}
    assert len(train) + len(held) == 50 + 3 + 8
    assert sum(s.group == "esc50" for s in held) == 10 and sum(s.group == "speech" for s in held) == 1
    assert sum(s.group == "music" for s in held) == 2
    assert [s.key for s in split_sounds(SHARED, "train")] == [s.key for s in train]  # the same order every time


def test_held_out_sounds_never_appear_in_training_or_validation_mixtures(shared):
    dm = ClassSplitDataModule(shared_dir=str(SHARED), segment_seconds=0.5, train_examples=300, val_mixtures=100,
                              test_mixtures=40)
    dm.setup()
    held = _held_out_keys()
    train_paths = {s.path for s in dm.train_sounds}
    for ds in (dm.train_dataset(), dm.val_dataset()):
        assert all(s.path in train_paths for s in ds.sounds)
        for i in range(len(ds)):
            a, b = ds[i]["name"].split("_", 1)[1].rsplit("@", 1)[0].split("+")
            assert a not in held and b not in held, ds[i]["name"]
    # and the held-out test mixtures use nothing but held-out sounds
    test = dm.test_dataset()
    for i in range(len(test)):
        a, b = test[i]["name"].split("_", 1)[1].rsplit("@", 1)[0].split("+")
        assert a in held and b in held, test[i]["name"]


def test_every_example_is_seeded_by_its_index_with_its_own_degradation(shared):
    dm = ClassSplitDataModule(shared_dir=str(SHARED), segment_seconds=0.5, train_examples=64)
    ds, again = dm.train_dataset(), ClassSplitDataModule(shared_dir=str(SHARED), segment_seconds=0.5,
                                                         train_examples=64).train_dataset()
    a, b = ds[7], again[7]
    assert a["degradation"] == b["degradation"] and torch.equal(a["mixture"], b["mixture"])
    specs = [ds[i]["degradation"] for i in range(64)]
    assert len(set(specs)) == 64  # each its own seed
    assert any(s.startswith("oracle:seed=") for s in specs)  # some exact-oracle examples
    assert any("random" in s for s in specs) and any("blur=" in s for s in specs) and any("noise_db" in s for s in specs)
    snrs = [float(ds[i]["name"].rsplit("@", 1)[1][:-2]) for i in range(64)]
    assert min(snrs) >= -5 and max(snrs) <= 5 and min(snrs) < -2 and max(snrs) > 2
    with pytest.raises(ConfigError, match="data.degradation"):
        ClassSplitDataModule(shared_dir=str(SHARED), degradation={"blurr": [0, 1]})
    assert DegradationSampler().exact_prob > 0
    assert not any("embed" in s for s in specs)  # the oracle's embedding says nothing unless asked
    told = ClassSplitDataModule(shared_dir=str(SHARED), segment_seconds=0.5, train_examples=16,
                                degradation={"embed": "profile"}).train_dataset()
    assert all("embed=profile" in told[i]["degradation"] for i in range(16))


def _oracle_batch(n: int = 2, seconds: float = 1.0) -> dict:
    dm = ClassSplitDataModule(shared_dir=str(SHARED), segment_seconds=seconds, train_examples=8)
    ds = dm.train_dataset()
    return default_collate([ds[i] for i in range(n)])


def test_the_baseline_cache_returns_identical_masks_and_misses_on_another_seed_or_config(shared, tmp_path):
    batch = _oracle_batch()
    module = RefinerModule(refiner=SMALL, query_source="pass", baseline_cache_dir=str(tmp_path / "cache"))
    first = module.baseline_batch(batch, cache=True)
    assert (module.baseline_cache.hits, module.baseline_cache.misses) == (0, 2)
    second = module.baseline_batch(batch, cache=True)
    assert (module.baseline_cache.hits, module.baseline_cache.misses) == (2, 2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert first[0].shape[:2] == (2, 3) and bool(first[2][:, 0].all())  # the oracle names the target in pass 1
    # computing it again gives the same (up to the float16 the cache stores masks in)
    fresh = module.baseline_batch(batch, cache=False)
    assert (fresh[0] - first[0]).abs().max() < 1e-3 and torch.equal(fresh[2], first[2])
    # another degradation seed misses, and so does another separator config
    other_seed = dict(batch, degradation=[s.replace("seed=", "seed=1") for s in batch["degradation"]])
    module.baseline_batch(other_seed, cache=True)
    assert module.baseline_cache.misses == 4
    other_cfg = RefinerModule(refiner=SMALL, query_source="pass", baseline_cache_dir=str(tmp_path / "cache"),
                              separator_config={"separator": {"rounds": 2}})
    other_cfg.baseline_batch(batch, cache=True)
    assert (other_cfg.baseline_cache.hits, other_cfg.baseline_cache.misses) == (0, 2)
    # the disk copy serves a new module with the same settings
    reread = RefinerModule(refiner=SMALL, query_source="pass", baseline_cache_dir=str(tmp_path / "cache"))
    again = reread.baseline_batch(batch, cache=True)
    assert (reread.baseline_cache.hits, reread.baseline_cache.misses) == (2, 0)
    assert torch.equal(again[0], first[0])


def test_the_cache_key_covers_content_guide_settings_and_sources():
    x, s = torch.randn(100), torch.randn(2, 100)
    k = baseline_key(x, "oracle:blur=1,seed=3", {"a": 1}, s)
    assert k == baseline_key(x.clone(), "oracle:blur=1,seed=3", {"a": 1}, s.clone())
    assert k != baseline_key(x + 1e-3, "oracle:blur=1,seed=3", {"a": 1}, s)
    assert k != baseline_key(x, "oracle:blur=1,seed=4", {"a": 1}, s)
    assert k != baseline_key(x, "oracle:blur=1,seed=3", {"a": 2}, s)
    assert k != baseline_key(x, "oracle:blur=1,seed=3", {"a": 1}, s.flip(0))
    cache = BaselineCache(max_bytes=1)
    v = {"masks": torch.rand(3, 4, 5), "kept": torch.tensor([True, False, False]), "embeddings": torch.zeros(3, 2)}
    stored = cache.put(k, v)
    assert stored["masks"].dtype == torch.float16 and cache.get(k) is stored and len(cache) == 1


def test_the_query_is_the_guides_embedding_of_the_refined_pass_never_the_target(shared):
    """With ``query_source="pass"`` the query is what the separator returned for the refined pass
    (``BatchSeparation.embeddings``), as infer.py --refiner gives it; the clean target cannot enter it."""
    module = RefinerModule(refiner=dict(SMALL, query_dim=32), guide_model="tiny", query_source="pass",
                           example_every_n_val=0)
    x = torch.stack([clip("dog", 1.0) + clip("rain", 1.0), clip("siren", 1.0) + clip("crow", 1.0)])
    seen = []
    hook = module.refiner.cond.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].detach().clone()))
    try:
        out_a = module.common_step({"mixture": x, "target": torch.stack([clip("dog", 1.0), clip("siren", 1.0)])}, 0)
        noise = torch.randn(2, x.shape[-1], generator=torch.Generator().manual_seed(0)) * 0.1
        module.common_step({"mixture": x, "target": noise}, 0)
    finally:
        hook.remove()
    _, _, kept, emb = module.baseline_batch({"mixture": x})
    rows = torch.arange(2)
    q_a = seen[0][:, :32]  # [query·p, p, ...]: the query part of the condition input
    torch.testing.assert_close(q_a, emb[rows, out_a.pass_index])
    # a different target changes at most which pass is trained, never what a pass's query is
    for q in (seen[0][:, :32], seen[1][:, :32]):
        for r in range(2):
            assert any(torch.allclose(q[r], emb[r, k]) for k in range(emb.shape[1]))
    with pytest.raises(ConfigError, match="clean target"):
        RefinerModule(refiner=SMALL, query_source="target_audio")


def test_an_untrained_residual_refiner_returns_the_baseline_mask_of_its_pass():
    from astsep.refiner import MaskRefiner, RefinerConfig

    net = MaskRefiner(RefinerConfig(**SMALL))
    masks = torch.rand(2, 3, 65, 20).clamp(0.01, 0.99)
    q = torch.zeros(2, 32)
    for k in range(3):
        m = net(torch.rand(2, 65, 20), masks, q, pass_index=torch.tensor([k, k]))
        torch.testing.assert_close(m, masks[:, k], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="own_mask"):
        MaskRefiner(RefinerConfig(**dict(SMALL, own_mask=False)))
    assert dataclasses.asdict(RefinerConfig())["own_mask"] is False  # older checkpoints load as before


def test_synthetic_sources_are_seeded_varied_and_only_in_training_mixtures(shared):
    import numpy as np

    from astsep.data.synthetic import KINDS, synthetic_source

    draws = [synthetic_source(np.random.default_rng(k), 8000) for k in range(40)]
    assert {kind for kind, _ in draws} == set(KINDS)
    for kind, x in draws:
        assert x.shape == (8000,) and bool(torch.isfinite(x).all()) and abs(float(x.abs().max()) - 1.0) < 1e-6
    kind, again = synthetic_source(np.random.default_rng(3), 8000)
    assert kind == draws[3][0] and torch.equal(again, draws[3][1])
    dm = ClassSplitDataModule(shared_dir=str(SHARED), segment_seconds=0.5, train_examples=32, val_mixtures=32,
                              synthetic_prob=0.5)
    train, val = dm.train_dataset(), dm.val_dataset()
    names = [train[i]["name"] for i in range(32)]
    assert 4 <= sum("synthetic" in n for n in names) <= 28
    assert not any("synthetic" in val[i]["name"] for i in range(32))
    e = next(train[i] for i in range(32) if "synthetic" in train[i]["name"])
    torch.testing.assert_close(e["mixture"], e["target"] + e["interferer"])
    assert e["target_label"] != e["interferer_label"]
    with pytest.raises(ConfigError, match="synthetic_prob"):
        ClassSplitDataModule(shared_dir=str(SHARED), synthetic_prob=1.5).train_dataset()
