"""Fine-tuning at the test resolution: what changes, the activation cache, resuming."""

from __future__ import annotations

import json

import pytest
import torch

from _helpers_b import fp32, tiny_bundle, tiny_data  # noqa: F401
from fixres.finetune import FinetuneInterrupted, default_lr, finetune
from fixres.structure import find_parts, select_parts

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
    from fixres.engine import Precision
    train, val = tiny_data(tmp_path / "d")
    bundle = tiny_bundle()
    before = _state(bundle.model)
    res = finetune(bundle.model, train, val, bundle.data_config, parts="classifier,bn", out_dir=tmp_path / "o",
                   precision=Precision(True, torch.float16, False), **{**COMMON, "epochs": 2})
    after = _state(bundle.model)
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("fc."))
    state = torch.load(tmp_path / "o" / "finetune_state.pt", weights_only=True)
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0
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
    with pytest.raises(Exception, match="other settings"):
        finetune(tiny_bundle().model, train, val, fresh.data_config, out_dir=tmp_path / "part",
                 precision=fp32(), resume=True, **{**kw, "test_size": 64})


def test_random_augmentation_uses_the_full_forward_and_reports_accuracy(tmp_path):
    train, val = tiny_data(tmp_path / "d")
    bundle = tiny_bundle()
    res = finetune(bundle.model, train, val, bundle.data_config, augment="test2", out_dir=tmp_path / "o",
                   precision=fp32(), **{**COMMON, "epochs": 1, "evaluate_before": True, "evaluate_after": True})
    assert not res["cache"]["used"] and "random" in res["cache"]["reason"]
    assert 0 <= res["before"]["top1"] <= 100 and res["after"]["n"] == 9
    assert (tmp_path / "o" / "finetune.json").is_file()


def test_suffix_runner_matches_forward_for_torchvision_resnet():
    import torchvision
    from fixres.finetune import build_suffix
    model = torchvision.models.resnet18(num_classes=3).eval()
    parts = find_parts(model)
    sel = select_parts(model, parts, "classifier,bn")
    suffix, why = build_suffix(model, parts.chain, sel.first, torch.randn(2, 3, 64, 64))
    assert suffix is not None, why
    assert [n for n, _, _ in suffix.steps] == ["layer4.1", "avgpool", "fc"]  # torch.flatten handled
