"""Fine-tuning at the test resolution: what changes, the activation cache, resuming."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import fp32, tiny_bundle, tiny_data  # noqa: F401

from fixres.errors import UsageError
from fixres.io.checkpoint import load_training_state, save_training_state
from fixres.method import loop
from fixres.method.finetuning import FinetuneInterrupted, default_lr, finetune
from fixres.method.streaming import evaluate_at
from fixres.models.parts import select_parts
from fixres.models.structure import find_parts
from fixres.runtime.dist import DistEnv
from fixres.runtime.engine import Precision

COMMON = dict(test_size=48, epochs=2, batch_size=4, workers=0, progress=False, seed=3,
              evaluate_before=False, evaluate_after=False)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_paper_learning_rate_scaling():
    assert default_lr(512) == pytest.approx(0.008)
    assert default_lr(64) == pytest.approx(0.001)


def test_frozen_bit_identical_and_bn_stats_only_where_asked(tmp_path):
    train, val = tiny_data(tmp_path / "d")
    bundle = tiny_bundle()
    model = bundle.model
    before = _state(model)
    res = finetune(model, train, val, bundle.data_config, parts="classifier,bn", out_dir=tmp_path / "o",
                   precision=fp32(), **COMMON)
    after = _state(model)
    adapted = ("fc.", "layer4.0.bn2.", "layer4.0.downsample.1.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "fine-tuning changed nothing"
    assert all(k.startswith(adapted) for k in changed), sorted(changed)
    for name in ("layer4.0.bn2", "layer4.0.downsample.1"):
        assert f"{name}.running_mean" in changed and f"{name}.weight" in changed
    assert "layer4.0.bn1.running_mean" not in changed and "bn1.running_var" not in changed
    assert res["cache"]["used"] and res["cache"]["cut"] == "layer4.0"
    assert len(res["log"]) == 2 and res["timing"]["ms_per_batch_forward"]["mean"] > 0
    assert not model.training and all(p.requires_grad for p in model.parameters())

    # bn-stats: statistics re-estimated, affine and classifier untouched
    model2 = tiny_bundle().model
    before = _state(model2)
    finetune(model2, train, val, bundle.data_config, parts="bn-stats", out_dir=tmp_path / "o2", precision=fp32(),
             **COMMON)
    after = _state(model2)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.{b}" for n in ("layer4.0.bn2", "layer4.0.downsample.1")
                       for b in ("running_mean", "running_var", "num_batches_tracked")}


def test_cached_and_uncached_give_the_same_weights(tmp_path):
    train, val = tiny_data(tmp_path / "d")
    states, results = [], []
    for cache in (True, False):
        bundle = tiny_bundle()
        results.append(finetune(bundle.model, train, val, bundle.data_config, parts="classifier,bn", cache=cache,
                                out_dir=tmp_path / f"o{cache}", precision=fp32(), **{**COMMON, "epochs": 3}))
        states.append(_state(bundle.model))
    assert results[0]["cache"]["used"] and not results[1]["cache"]["used"]
    for k in states[0]:
        assert torch.allclose(states[0][k].float(), states[1][k].float(), atol=1e-5), k
    assert [r["loss"] for r in results[0]["log"]] == pytest.approx([r["loss"] for r in results[1]["log"]], rel=1e-4)


def test_fp16_autocast_scales_the_loss_and_still_learns(tmp_path):
    """fp16 autocast (CUDA without bf16) fine-tunes through a GradScaler; on this CPU the same path runs."""
    from fixres.runtime.engine import Precision
    train, val = tiny_data(tmp_path / "d")
    bundle = tiny_bundle()
    before = _state(bundle.model)
    res = finetune(bundle.model, train, val, bundle.data_config, parts="classifier,bn", out_dir=tmp_path / "o",
                   precision=Precision(True, torch.float16, False), **{**COMMON, "epochs": 2})
    after = _state(bundle.model)
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("fc."))
    state = torch.load(tmp_path / "o" / "finetune_state.pt", weights_only=True)
    # GradScaler starts at 2**16 and only halves (on overflow) or doubles after 2000 clean steps: a power of two
    scale = state["scaler"]["scale"]
    assert 0 < scale <= 2.0 ** 16 and math.log2(scale) == int(math.log2(scale)), scale
    assert res["precision"] == "fp16 autocast"


def test_cache_on_disk_in_fp16_when_over_budget(tmp_path):
    train, val = tiny_data(tmp_path / "d")
    ref, disk = tiny_bundle(), tiny_bundle()
    finetune(ref.model, train, val, ref.data_config, out_dir=tmp_path / "a", precision=fp32(), **COMMON)
    res = finetune(disk.model, train, val, disk.data_config, out_dir=tmp_path / "b", precision=fp32(),
                   cache_budget_mb=0.001, **COMMON)
    assert res["cache"]["on_disk"] and not (tmp_path / "b" / "cache" / "prefix_cache.f16").exists()
    a, b = ref.model.state_dict(), disk.model.state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=2e-3), k


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    train, val = tiny_data(tmp_path / "d")
    kw = {**COMMON, "epochs": 3}
    full = tiny_bundle()
    finetune(full.model, train, val, full.data_config, out_dir=tmp_path / "full", precision=fp32(), **kw)
    part = tiny_bundle()
    # 18 images, batch 4 -> 5 batches per epoch: stop in the middle of epoch 2
    with pytest.raises(FinetuneInterrupted):
        finetune(part.model, train, val, part.data_config, out_dir=tmp_path / "part", precision=fp32(),
                 stop_after_batches=7, **kw)
    fresh = tiny_bundle()  # a new process: the weights come from the original checkpoint again
    res = finetune(fresh.model, train, val, fresh.data_config, out_dir=tmp_path / "part", precision=fp32(),
                   resume=True, **kw)
    assert res["resumed_from_epoch"] == 1
    a, b = full.model.state_dict(), fresh.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (tmp_path / "part" / "finetune_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    with pytest.raises(UsageError, match=r"other settings: test_size=48 \(now 64\)"):
        finetune(tiny_bundle().model, train, val, fresh.data_config, out_dir=tmp_path / "part",
                 precision=fp32(), resume=True, **{**kw, "test_size": 64})


def test_random_augmentation_uses_the_full_forward_and_reports_accuracy(tmp_path):
    train, val = tiny_data(tmp_path / "d")
    bundle = tiny_bundle()
    res = finetune(bundle.model, train, val, bundle.data_config, augment="test2", out_dir=tmp_path / "o",
                   precision=fp32(), **{**COMMON, "epochs": 1, "evaluate_before": True, "evaluate_after": True})
    assert not res["cache"]["used"] and "random" in res["cache"]["reason"]
    # before: the model as given; after: the model as returned, each measured as `fixres eval` would
    untouched = tiny_bundle().model
    kw = dict(test_size=48, batch_size=4, env=DistEnv(), precision=fp32(), workers=0, progress=False)
    assert res["before"] == evaluate_at(untouched, val, bundle.data_config, **kw)
    assert res["after"] == evaluate_at(bundle.model, val, bundle.data_config, **kw) and res["after"]["n"] == 9
    assert (tmp_path / "o" / "finetune.json").is_file()


def test_suffix_runner_matches_forward_for_torchvision_resnet():
    import torchvision

    from fixres.method.prefix import build_suffix
    model = torchvision.models.resnet18(num_classes=3).eval()
    parts = find_parts(model)
    sel = select_parts(model, parts, "classifier,bn")
    suffix, why = build_suffix(model, parts.chain, sel.first, torch.randn(2, 3, 64, 64))
    assert suffix is not None, why
    assert [n for n, _, _ in suffix.steps] == ["layer4.1", "avgpool", "fc"]  # torch.flatten handled


# --------------------------------------------------------------------------- modes, resume paths, timing


@pytest.mark.parametrize("cache", [True, False])
def test_epoch_eval_keeps_the_adapted_batch_norm_in_train_mode_every_epoch(tmp_path, cache):
    """Per-epoch evaluation puts the model in eval mode; the next epoch must re-estimate statistics again.

    18 images in batches of 4 -> 5 batches an epoch: 2 epochs count exactly 10 batches per adapted
    batch-norm (5 if an epoch ran with the batch-norm left in eval mode).
    """
    train, val = tiny_data(tmp_path / "d")
    bundle = tiny_bundle()
    adapted = ("layer4.0.bn2", "layer4.0.downsample.1")
    start = {n: int(bundle.model.get_submodule(n).num_batches_tracked) for n in adapted}
    res = finetune(bundle.model, train, val, bundle.data_config, parts="bn-stats", out_dir=tmp_path / "o",
                   precision=fp32(), epoch_eval=True, cache=cache, **COMMON)
    assert all("val_top1" in r for r in res["log"]) and res["cache"]["used"] is cache
    for n in adapted:
        assert int(bundle.model.get_submodule(n).num_batches_tracked) - start[n] == 10, n
    assert int(bundle.model.get_submodule("layer4.0.bn1").num_batches_tracked) == 0  # frozen: untouched


def test_fp16_loss_scale_is_restored_on_resume(tmp_path):
    """The GradScaler's scale continues from the state (a fresh scaler would restart at 65536)."""
    train, val = tiny_data(tmp_path / "d")
    fp16 = Precision(True, torch.float16, False)
    kw = dict(parts="classifier,bn", out_dir=tmp_path / "o", precision=fp16, **COMMON)
    with pytest.raises(FinetuneInterrupted):
        finetune(tiny_bundle().model, train, val, tiny_bundle().data_config, stop_after_batches=6, **kw)
    path = tmp_path / "o" / "finetune_state.pt"
    state = load_training_state(path)
    assert state["epoch"] == 1 and state["scaler"]["scale"] > 8.0
    state["scaler"] = {**state["scaler"], "scale": 8.0, "_growth_tracker": 3}
    save_training_state(state, path)
    finetune(tiny_bundle().model, train, val, tiny_bundle().data_config, resume=True, **kw)
    resumed = load_training_state(path)["scaler"]
    assert resumed["scale"] == 8.0 and resumed["_growth_tracker"] == 3 + 5  # 5 more steps without overflow


def test_resume_refuses_other_pre_processing_and_world_size(tmp_path):
    """A state fine-tuned with other normalisation (or by another number of processes) is refused."""
    train, val = tiny_data(tmp_path / "d")
    bundle = tiny_bundle()
    kw = dict(out_dir=tmp_path / "o", precision=fp32(), **{**COMMON, "epochs": 1})
    finetune(bundle.model, train, val, bundle.data_config, **kw)
    other = bundle.data_config.with_overrides(mean=(0.5, 0.5, 0.5))
    with pytest.raises(UsageError, match=r"other settings: mean=\[0\.485, 0\.456, 0\.406\] \(now \[0\.5, 0\.5"):
        finetune(tiny_bundle().model, train, val, other, resume=True, **kw)
    with pytest.raises(UsageError, match=r"interpolation='bilinear' \(now 'bicubic'\)"):
        finetune(tiny_bundle().model, train, val, bundle.data_config.with_overrides(interpolation="bicubic"),
                 resume=True, **kw)
    path = tmp_path / "o" / "finetune_state.pt"
    state = load_training_state(path)
    state["config"]["world_size"] = 2
    save_training_state(state, path)
    with pytest.raises(UsageError, match=r"world_size=2 \(now 1\)"):
        finetune(tiny_bundle().model, train, val, bundle.data_config, resume=True, **kw)


def test_resume_into_a_model_it_does_not_fit_is_a_clear_error(tmp_path):
    from fixres.models.loading import load_model
    train, val = tiny_data(tmp_path / "d")
    bundle = tiny_bundle()
    kw = dict(out_dir=tmp_path / "o", precision=fp32(), **{**COMMON, "epochs": 1})
    finetune(bundle.model, train, val, bundle.data_config, **kw)
    five = load_model(model="fixres_tiny_resnet", num_classes=5, train_size=32).model
    with pytest.raises(UsageError, match=r"does not fit this model \(fc\.weight: \(3, 128\) vs \(5, 128\) here\)"):
        finetune(five, train, val, bundle.data_config, resume=True, **kw)


def test_resume_measures_before_on_the_untouched_model(tmp_path):
    """The first run saved no "before"; the resumed one measures it on the model as given,
    not on the model after the saved epoch's adaptation was loaded into it."""
    train, val = tiny_data(tmp_path / "d")
    kw = dict(out_dir=tmp_path / "o", precision=fp32(), **{**COMMON, "epochs": 3, "lr": 0.05})
    with pytest.raises(FinetuneInterrupted):
        finetune(tiny_bundle().model, train, val, tiny_bundle().data_config, stop_after_batches=7, **kw)
    assert load_training_state(tmp_path / "o" / "finetune_state.pt")["before"] is None
    ev = dict(test_size=48, batch_size=4, env=DistEnv(), precision=fp32(), workers=0, progress=False)
    untouched = evaluate_at(tiny_bundle().model, val, tiny_bundle().data_config, **ev)
    res = finetune(tiny_bundle().model, train, val, tiny_bundle().data_config, resume=True,
                   **{**kw, "evaluate_before": True})
    assert res["resumed_from_epoch"] == 1
    assert res["before"] == untouched
    # and the number differs from what the partly adapted model gives (so the check can fail)
    partly = tiny_bundle()
    loop.load_weights(partly.model, load_training_state(tmp_path / "o" / "finetune_state.pt")["adapted"], "s",
                      complete=False)
    assert evaluate_at(partly.model, val, partly.data_config, **ev)["loss"] != pytest.approx(untouched["loss"])


def test_finetune_timings_read_the_clock_after_synchronising_the_device(tmp_path, monkeypatch):
    """Forward/backward ms come from a clock read after the device synchronised."""
    train, val = tiny_data(tmp_path / "d")
    events: list[str] = []
    ticks = iter(range(10_000))
    monkeypatch.setattr(loop, "synchronize", lambda device: events.append(f"sync {device.type}"))
    monkeypatch.setattr(loop, "clock", lambda: (events.append("clock"), float(next(ticks)))[1])
    bundle = tiny_bundle()
    res = finetune(bundle.model, train, val, bundle.data_config, out_dir=tmp_path / "o", precision=fp32(),
                   **{**COMMON, "epochs": 1})
    reads = [i for i, e in enumerate(events) if e == "clock"]
    assert len(reads) == 4 * 5  # 4 reads per step, 5 steps
    assert all(events[i - 1] == "sync cpu" for i in reads)
    assert res["timing"]["ms_per_batch_forward"] == {"mean": 1000.0, "std": 0.0}
    assert res["timing"]["ms_per_batch_backward"] == {"mean": 1000.0, "std": 0.0}


@pytest.mark.parametrize("budget_mb", [None, 0.001])  # the handed-over cache in memory, and in fp16 on disk
def test_a_cache_handed_to_the_next_fine_tuning_gives_its_weights(tmp_path, budget_mb):
    from fixres.method.cutcache import FitCaches
    train, val = tiny_data(tmp_path / "d")
    shared = FitCaches(budget_bytes=1 << 30)
    kw = dict(precision=fp32(), **COMMON, **({"cache_budget_mb": budget_mb} if budget_mb else {}))
    first = tiny_bundle()
    finetune(first.model, train, val, first.data_config, out_dir=tmp_path / "a", shared=shared, **kw)
    states = []
    for folder, given in (("b", shared), ("c", None)):  # the same fine-tuning, handed the cache and filling its own
        bundle = tiny_bundle()
        finetune(bundle.model, train, val, bundle.data_config, out_dir=tmp_path / folder, shared=given,
                 **{**kw, "lr": 0.05})
        states.append(_state(bundle.model))
    assert shared.reused == 1 and len(shared.entries) == 1
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = tiny_bundle()
    with torch.no_grad():
        other.model.conv1.weight.mul_(1.5)  # another model before the cut: its activations differ
    finetune(other.model, train, val, other.data_config, out_dir=tmp_path / "d2", shared=shared, **kw)
    assert shared.reused == 1 and len(shared.entries) == (2 if budget_mb is None else 1)  # one on disk at a time
    shared.close()
    assert not list(tmp_path.rglob("prefix_cache.f16"))


def test_handed_over_caches_keep_one_on_disk_and_memory_within_budget():
    from fixres.method.cutcache import FitCaches

    class Cache:
        def __init__(self, on_disk, size=10):
            self.on_disk, self.bytes, self.closed = on_disk, size, False

        def close(self):
            self.closed = True

    class Tune:  # what FitCaches keys on: one distinct key per call
        def __init__(self, k):
            self.k = k
    shared = FitCaches(budget_bytes=25)
    shared._key = lambda tune: tune.k
    made = [Cache(False), Cache(True), Cache(False), Cache(True), Cache(False)]
    for k, cache in enumerate(made):
        shared.keep(Tune(k), cache, [])
    assert [c.closed for c in made] == [True, True, False, False, False]
