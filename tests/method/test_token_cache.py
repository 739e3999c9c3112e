"""The frozen-prefix activation cache for token models: ViT pools inside timm's forward_head, so
the cut is in forward_features (``norm``, a last block) or at its output, and the suffix ends with forward_head.
Cached and uncached fine-tuning must give the same adapted weights."""

from __future__ import annotations

import pytest
import torch
from helpers import fp32, tiny_data  # noqa: F401

from fixres.method.finetuning import finetune
from fixres.models.loading import load_model
from fixres.models.structure import find_parts

COMMON = dict(test_size=48, epochs=2, batch_size=4, workers=0, progress=False, seed=3,
              evaluate_before=False, evaluate_after=False, augment="test")


def _bundle(name: str):
    torch.manual_seed(0)
    return load_model(model=name, num_classes=3, train_size=32)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run_both(tmp_path, name: str, parts: str):
    train, val = tiny_data(tmp_path / "d")
    before = _state(_bundle(name).model)
    states, results = [], []
    for cache in (True, False):
        bundle = _bundle(name)
        results.append(finetune(bundle.model, train, val, bundle.data_config, parts=parts, cache=cache,
                                out_dir=tmp_path / f"o{cache}", precision=fp32(), **COMMON))
        states.append(_state(bundle.model))
    return before, states, results


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("name,parts,cut,adapted", [
    ("fixres_tiny_vit", "classifier,norm", "norm", ("head.", "norm.")),
    ("fixres_tiny_vit", "classifier,last-stage", "blocks.3", ("head.", "blocks.3.")),
    ("fixres_tiny_vit", "classifier", "head", ("head.",)),  # the pooled vector enters the head module
    ("fixres_tiny_convnext", "classifier,norm", "head", ("head.fc.", "head.norm.")),
])
def test_token_model_fine_tunes_cached_with_the_same_weights_as_uncached(tmp_path, name, parts, cut, adapted):
    before, (cached, uncached), (res_c, res_u) = _run_both(tmp_path, name, parts)
    assert res_c["cache"]["used"], res_c["cache"]
    assert res_c["cache"]["cut"] == cut
    assert not res_u["cache"]["used"]
    assert all(r["cached"] for r in res_c["log"]) and not any(r["cached"] for r in res_u["log"])
    changed = _changed(before, cached)
    assert changed and all(k.startswith(adapted) for k in changed), sorted(changed)
    assert _changed(before, uncached) == changed
    for k in cached:
        assert torch.allclose(cached[k].float(), uncached[k].float(), atol=1e-5), k
    assert [r["loss"] for r in res_c["log"]] == pytest.approx([r["loss"] for r in res_u["log"]], rel=1e-4)


def test_a_head_that_does_not_reproduce_the_forward_falls_back_uncached(tmp_path, monkeypatch):
    """The features/head split is verified against the full forward like any cut: a model whose forward does
    more than forward_head(forward_features(x)) runs uncached."""
    bundle = _bundle("fixres_tiny_vit")
    plain = type(bundle.model).forward
    monkeypatch.setattr(bundle.model, "forward", lambda x: 2.0 * plain(bundle.model, x))
    train, val = tiny_data(tmp_path / "d")
    res = finetune(bundle.model, train, val, bundle.data_config, parts="classifier,norm", out_dir=tmp_path / "o",
                   precision=fp32(), **{**COMMON, "epochs": 1})
    assert not res["cache"]["used"]
    assert "expects 2-D input" in res["cache"]["reason"] or "does not reproduce" in res["cache"]["reason"]


def test_head_plan_cuts_at_forward_features_output_when_only_the_head_is_adapted():
    """LeViT's case (its adapted heads run in forward_head only), on the tiny ViT: the cached activation is
    forward_features' output and the suffix is forward_head alone; it reproduces the full forward."""
    from fixres.method.prefix import _check_suffix, _features_modules, _trace_ndims, plan_head_suffix
    model = _bundle("fixres_tiny_vit").model.eval()
    chain = find_parts(model).chain
    x = torch.randn(2, 3, 48, 48)
    in_features = _features_modules(model, chain, x)
    assert {"patch_embed", "blocks", "norm"} <= in_features and "head" not in in_features
    suffix = plan_head_suffix(model, chain, ["head"], ndims=_trace_ndims(model, 48, "cpu"), in_features=in_features)
    assert suffix.from_features and suffix.steps == []
    with torch.no_grad():
        assert _check_suffix(model, suffix, x, model(x)) is None
        model.head.bias.add_(1.0)  # the head is run by the suffix: changing it changes the suffix's output
        assert torch.allclose(suffix(model.forward_features(x)), model(x))
