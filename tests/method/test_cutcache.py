"""Scoring from the activations at the cut equals scoring with the full model, and is refused when they no longer
stand for its forward (another model before the cut, other photos, another decode, a size not recorded)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fixres.data.folders import scan_folder
from fixres.method.cutcache import CutCache
from fixres.method.evaluate import evaluate
from fixres.runtime.dist import DistEnv
from fixres.runtime.engine import Precision

FP32 = Precision(False, None, False)
SIZES = [32, 48]
KW = dict(batch_size=5, workers=0, progress=False, precision=FP32)


def _varied(bundle):
    """The tiny model with its norms' statistics spread out, so the photos' predictions differ."""
    torch.manual_seed(3)
    with torch.no_grad():
        for m in bundle.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        bundle.model.fc.weight.mul_(10.0)
    return bundle.model.eval()


def _fixed(model, cache: CutCache):
    """A "candidate": the model with only the modules after the cut changed."""
    fixed = copy.deepcopy(model)
    torch.manual_seed(5)
    with torch.no_grad():
        for name in cache.after:
            for p in fixed.get_submodule(name).parameters():
                p.add_(0.3 * torch.randn_like(p))
    return fixed


def _recorded(model, index, cfg, tmp_path, *, budget_mb=64.0):
    cache = CutCache.for_model(model, "classifier,norm", folder=tmp_path / "cut", budget_mb=budget_mb)
    before = cache.evaluate(model, "val", index, cfg, test_sizes=SIZES, env=DistEnv(), **KW)
    return cache, before


@pytest.mark.parametrize("budget_mb", [64.0, 0.0])
def test_suffix_scoring_equals_the_full_model(image_folder, tiny_model, tmp_path, budget_mb):
    model, cfg, index = _varied(tiny_model), tiny_model.data_config, scan_folder(image_folder)
    cache, before = _recorded(model, index, cfg, tmp_path, budget_mb=budget_mb)
    assert cache.cut is not None and cache.after, cache.reason
    full_before = evaluate(model, index, cfg, test_sizes=SIZES, crop_ratios=[cfg.crop_ratio], **KW)
    assert [r.correct for r in before.rows] == [r.correct for r in full_before.rows]  # recording changes nothing
    fixed = _fixed(model, cache)
    for size in SIZES:
        got = cache.score(fixed, "val", index, cfg, size, env=DistEnv(), keep_outcomes=True, **KW)
        want = evaluate(fixed, index, cfg, test_sizes=[size], per_class=False, keep_outcomes=True, **KW)
        assert got is not None
        (g,), (w,) = got.rows, want.rows
        assert (g.test_size, g.n, g.correct, g.correct5) == (w.test_size, w.n, w.correct, w.correct5)
        assert np.array_equal(got.arrays.idx, want.arrays.idx)
        assert np.array_equal(got.hits_at(g), want.hits_at(w))
        # fp32 in memory: float rounding only; fp16 on disk: within its precision
        tol = 1e-5 if budget_mb else 2e-2
        assert g.loss == pytest.approx(w.loss, rel=tol) and g.top1_std == pytest.approx(w.top1_std)
        assert got.n_images == want.n_images and got.n_samples == want.n_samples
    assert cache.entries[("val", 48)].store.on_disk == (budget_mb == 0.0)
    assert cache.replayed == len(SIZES)


def test_scoring_is_refused_when_the_activations_no_longer_stand_for_the_model(image_folder, tiny_model, tmp_path):
    model, cfg, index = _varied(tiny_model), tiny_model.data_config, scan_folder(image_folder)
    cache, _ = _recorded(model, index, cfg, tmp_path)
    env = DistEnv()
    assert cache.score(model, "val", index, cfg, 48, env=env, **KW) is not None
    assert cache.score(model, "val", index, cfg, 64, env=env, **KW) is None  # a size not recorded
    assert cache.score(model, "holdout", index, cfg, 48, env=env, **KW) is None  # photos not recorded
    fewer = index.samples[:-1]
    assert cache.score(model, "val", fewer, cfg, 48, env=env, **KW) is None  # other photos
    assert cache.score(model, "val", index, cfg, 48, env=env, reduced_decode=False, **KW) is None  # other decode
    other = copy.deepcopy(model)
    with torch.no_grad():  # a weight before the cut changed: the activations are another model's
        next(p for n, p in other.named_parameters() if not any(n.startswith(a + ".") for a in cache.after)).add_(0.1)
    assert cache.score(other, "val", index, cfg, 48, env=env, **KW) is None
    recrop = type(cfg)(**{**cfg.__dict__, "crop_ratio": 1.0})
    assert cache.score(model, "val", index, recrop, 48, env=env, **KW) is None  # another crop


def test_corruption_table_shares_one_prefix_pass_and_gives_the_same_table(image_folder, tiny_model, tmp_path):
    from fixres.data.corruptions import CORRUPTIONS
    from fixres.method.robustness import corruption_table
    model, cfg, index = _varied(tiny_model), tiny_model.data_config, scan_folder(image_folder)
    cache = CutCache.for_model(model, "classifier,norm", folder=tmp_path / "cut", budget_mb=64.0)
    cache.evaluate(model, "val", index, cfg, test_sizes=[32], env=DistEnv(), **KW)  # finds the cut
    fixed = _fixed(model, cache)
    columns = {"fixed at 48px": (fixed, 48), "untuned at 32px": (model, 32), "untuned at 48px": (model, 48)}
    kw = dict(corruptions=CORRUPTIONS[:2], severities=[1, 3], batch_size=5, workers=0, progress=False,
              precision=FP32)
    plain = corruption_table(columns, index, cfg, **kw)
    replayed_before = cache.replayed
    shared = corruption_table(columns, index, cfg, cut_cache=cache, **kw)
    assert cache.replayed - replayed_before == 1 + 2 * 2  # the fixed column, clean and each corruption x severity
    assert [k for k in cache.entries if k[0] != "val"] == []  # each condition's activations dropped after it
    assert shared["rows"] == plain["rows"] and shared["paired"] == plain["paired"]


def test_a_cached_step_costs_a_share_of_a_forward(image_folder, tiny_model):
    from fixres.data.transforms import geometry_for, test_transform
    from fixres.method.prefix import cached_step_share, first_inputs
    model, cfg = _varied(tiny_model), tiny_model.data_config
    cache = CutCache.for_model(model, "classifier,norm", folder=image_folder / "cut", budget_mb=1.0)
    batch = first_inputs(scan_folder(image_folder).samples, test_transform(geometry_for(32, cfg, cfg.crop_ratio), cfg),
                         "cpu", count=8)
    share = cached_step_share(model, cache.chain, cache.first, batch)
    assert share is not None and 0.0 < share < 1.0  # the norm and the classifier: a fraction of the whole network
    assert all(not p.grad_fn and p.grad is None for p in model.parameters())  # the model is left as it was
    assert cached_step_share(model, cache.chain, ["no_such_module"], batch) is None


def test_pooled_values_replayed_from_the_cut_equal_a_hooked_forward(image_folder, tiny_model, tmp_path):
    from fixres.method import stats
    from fixres.models.structure import find_parts
    model, cfg, index = _varied(tiny_model), tiny_model.data_config, scan_folder(image_folder)
    cache, _ = _recorded(model, index, cfg, tmp_path)
    fixed = _fixed(model, cache)
    point = stats.pooled_point(find_parts(fixed))
    rows = stats.spread_rows(len(index.samples), 7)
    kw = dict(env=DistEnv(), precision=FP32, batch_size=5)
    got = cache.pooled(fixed, "val", index, cfg, SIZES, rows=rows, point=point, **kw)
    want, skipped = stats.collect_pooled(fixed, index, cfg, test_sizes=SIZES, batch_size=5, precision=FP32, workers=0,
                                         max_images=7, progress=False)
    assert got is not None and len(rows) == 7
    for size in SIZES:
        assert got[0][size].shape == want[size].shape
        assert np.allclose(got[0][size], want[size], atol=1e-5)
    assert got[1] == skipped
    # the statistics read them as they read a forward's
    a = stats.activation_stats(fixed, index, cfg, test_sizes=SIZES, pooled=got, reference_size=SIZES[0])
    b = stats.activation_stats(fixed, index, cfg, test_sizes=SIZES, max_images=7, workers=0, precision=FP32,
                               progress=False, reference_size=SIZES[0])
    assert [r["frac_zero"] for r in a["sizes"]] == pytest.approx([r["frac_zero"] for r in b["sizes"]])
    assert a["n_images"] == b["n_images"] == 7
    assert cache.pooled(fixed, "val", index, cfg, [64], rows=rows, point=point, **kw) is None  # not recorded
    other = copy.deepcopy(model)
    with torch.no_grad():  # a weight before the cut changed
        next(p for n, p in other.named_parameters() if not any(n.startswith(a + ".") for a in cache.after)).add_(0.1)
    assert cache.pooled(other, "val", index, cfg, SIZES, rows=rows, point=point, **kw) is None
