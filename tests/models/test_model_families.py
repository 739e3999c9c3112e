"""FixRes for every timm family -- parts found by structure in CNNs, vision transformers,
ConvNeXt and Swin; input sizes through timm's own mechanisms; ViT exports that reload at their size.

Tiny configurations, random initialisation, no downloads."""

from __future__ import annotations

import json

import pytest
import torch

from fixres.errors import FixresError
from fixres.models.loading import create_model, export_model_kwargs, fit_input_size, load_model, network_stride
from fixres.models.parts import select_parts
from fixres.models.structure import find_parts


def _timm(name, **kw):
    import timm
    torch.manual_seed(0)
    return timm.create_model(name, **{"num_classes": 5, **kw})


#: (model, timm keywords for a tiny configuration, classifier, norm(s), kind, pooling, last stage)
FAMILIES = [
    ("vit_tiny_patch16_224", dict(depth=2, embed_dim=32, num_heads=2, dynamic_img_size=True),
     "head", ["norm"], "layernorm", "class token", "blocks.1"),
    ("vit_tiny_patch16_224", dict(depth=2, embed_dim=32, num_heads=2, global_pool="avg", fc_norm=True,
                                  dynamic_img_size=True),
     "head", ["fc_norm"], "layernorm", "token average", "blocks.1"),
    ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
     "head.fc", ["head.norm"], "layernorm2d", "spatial average", "stages.3.blocks"),
    ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 2, 2),
                                          dynamic_img_size=True),
     "head.fc", ["norm"], "layernorm", "spatial average (functional)", "layers.3.blocks"),
    ("resnet18", dict(layers=(1, 1, 1, 1)),
     "fc", ["layer4.0.bn2", "layer4.0.downsample.1"], "batchnorm2d", "spatial average", "layer4"),
    ("mambaout_femto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 48)),  # pooled, then an MLP head with norms
     "head.fc", ["head.pre_logits.norm"], "layernorm", "spatial average (functional)", "stages.3.blocks"),
    ("tf_efficientnet_lite0", {},
     "classifier", ["bn2"], "batchnormact2d", "spatial average", "blocks.6"),
]


@pytest.mark.parametrize("name,kw,classifier,norms,kind,pooling,last", FAMILIES,
                         ids=[f"{f[0]}-{f[5]}" for f in FAMILIES])
def test_parts_finder_names_the_expected_modules(name, kw, classifier, norms, kind, pooling, last):
    model = _timm(name, **kw)
    p = find_parts(model)
    assert (p.classifier, p.norms, p.pooling, p.last_stage) == (classifier, norms, pooling, last)
    assert p.norm_kinds == [kind] * len(norms)
    assert p.pre_logits_checked is True  # the classifier's input is timm's forward_head(pre_logits=True)
    sel = select_parts(model, p, "classifier,norm")
    assert sel.trainable == [classifier, *norms]
    assert sel.stats == (norms if kind.startswith("batchnorm") else [])  # BN: statistics re-estimated too


def test_transformer_norm_is_affine_only_and_bn_stats_is_refused():
    model = _timm("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2)
    p = find_parts(model)
    assert select_parts(model, p, "bn").trainable == ["norm"]  # 'bn' is the old name of 'norm'
    with pytest.raises(FixresError, match="no batch-norm nearest the pooled vector.*LayerNorm"):
        select_parts(model, p, "bn-stats")


def test_conv2d_classifier_head_is_found():
    """SqueezeNet classifies with a 1x1 Conv2d before its pooling: it is the classifier, and a
    model with no norm at all adapts the classifier under the default parts (with a note), not an error."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=4)
    p = find_parts(model)
    assert p.classifier == "classifier.1" and p.num_features == 512 and p.norms == []
    assert "after the classifier" in p.pooling
    sel = select_parts(model, p, "classifier,norm")
    assert sel.trainable == ["classifier.1"] and sel.notes and "adapts nothing" in sel.notes[0]
    with pytest.raises(FixresError, match="no norm feeds the pooled vector"):
        select_parts(model, p, "norm")


def test_nasnet_and_inception_last_stage_is_the_last_cell():
    model = _timm("inception_v3")
    p = find_parts(model)
    assert p.last_stage == "Mixed_7c" and p.classifier == "fc"
    assert set(p.norms) == {"Mixed_7c.branch1x1.bn", "Mixed_7c.branch_pool.bn"}


def test_position_embedding_resampling_keeps_outputs_identical_at_the_native_size():
    """A ViT built with dynamic_img_size (fixres's default for the families that have it) computes exactly
    what the fixed-size ViT computes at its native size; at another size it equals a fixed-size ViT whose
    position embedding timm resampled (resample_abs_pos_embed), as a checkpoint filter would."""
    from timm.layers import resample_abs_pos_embed
    kw = dict(depth=2, embed_dim=32, num_heads=2, img_size=64, patch_size=8)
    fixed = _timm("vit_tiny_patch16_224", **kw).eval()
    dynamic = _timm("vit_tiny_patch16_224", dynamic_img_size=True, **kw).eval()
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(dynamic(x), fixed(x))
    big = _timm("vit_tiny_patch16_224", **{**kw, "img_size": 96}).eval()
    sd = dict(fixed.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=(12, 12), num_prefix_tokens=1)
    big.load_state_dict(sd)
    x96 = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(dynamic(x96), big(x96), atol=1e-5)
        assert not torch.allclose(dynamic(x96), fixed.forward_head(fixed.forward_features(x)), atol=1e-3)


def test_timm_transformers_are_built_for_any_size_and_stride_is_the_patch():
    vit, _ = create_model("vit_tiny_patch16_224", num_classes=3)
    swin, _ = create_model("swin_tiny_patch4_window7_224", num_classes=3)
    assert vit.dynamic_img_size and network_stride(vit) == 16 and network_stride(swin) == 32
    with torch.no_grad():
        assert vit.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 3)
        assert swin.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 3)  # masks and padding follow the size
    assert fit_input_size(vit, 96) == {} and export_model_kwargs(vit) == {}


def test_fixed_size_model_follows_the_size_or_says_which_it_accepts():
    import torchvision
    beit = _timm("beit_base_patch16_224", depth=1, embed_dim=32, num_heads=2)
    assert fit_input_size(beit, 160) == {"img_size": [160, 160]}
    assert export_model_kwargs(beit) == {"img_size": [160, 160]}
    with torch.no_grad():
        assert beit.eval()(torch.randn(1, 3, 160, 160)).shape == (1, 5)
    tv_vit = torchvision.models.vit_b_16(num_classes=3)
    with pytest.raises(FixresError, match=r"VisionTransformer runs only at 224x224 px.*use test size 224"):
        fit_input_size(tv_vit, 288)
    assert fit_input_size(tv_vit, 224) == {}


def test_vit_exported_at_s_reloads_and_evaluates_at_s_with_no_flags(tmp_path, capsys, image_folder):
    from fixres.cli.app import main
    from fixres.method.evaluate import evaluate
    from fixres.models.export import export_model
    from fixres.runtime.engine import precision_for
    torch.manual_seed(0)
    bundle = load_model(model="fixres_tiny_vit", num_classes=3, train_size=64)
    assert network_stride(bundle.model) == 8 and find_parts(bundle.model).norms == ["norm"]
    path = export_model(bundle.model, tmp_path / "exp", model_name=bundle.name, cfg=bundle.data_config, test_size=96,
                        train_size=64, class_names=["class_0", "class_1", "class_2"])
    assert main(["eval", "--checkpoint", str(path), "--data", str(image_folder), "--workers", "0", "--no-amp",
                 "--out", str(tmp_path / "ev"), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["test_size"] for r in result["rows"]] == [96] and result["train_size"] == 64
    from fixres.data.folders import scan_folder
    direct = evaluate(bundle.model, scan_folder(image_folder, class_map=["class_0", "class_1", "class_2"]),
                      bundle.data_config, test_sizes=[96], workers=0, progress=False,
                      precision=precision_for(torch.device("cpu"), amp=False))  # as --no-amp
    assert result["rows"][0]["top1"] == pytest.approx(direct.rows[0].top1)
    assert result["rows"][0]["loss"] == pytest.approx(direct.rows[0].loss, rel=1e-4)


def test_builtin_convnext_finetunes_its_head_norm(tmp_path, split_folder):
    """The default parts on a LayerNorm model train the classifier and the LayerNorm's affine weights."""
    from fixres.method.finetuning import finetune
    from fixres.method.inputs import load_for_adaptation
    from fixres.models.loading import ModelSpec
    inputs = load_for_adaptation(ModelSpec(model="fixres_tiny_convnext", num_classes=3, train_size=32),
                                 split_folder, test_size=64)
    before = {k: v.clone() for k, v in inputs.bundle.model.state_dict().items()}
    res = finetune(inputs.bundle.model, inputs.train, inputs.val, inputs.cfg, test_size=64, epochs=1, batch_size=6,
                   out_dir=tmp_path / "ft", workers=0, progress=False, evaluate_before=False, evaluate_after=False)
    assert res["trainable"] == ["head.fc", "head.norm"]
    after = inputs.bundle.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.fc.weight", "head.fc.bias", "head.norm.weight", "head.norm.bias"}


def test_levit_classifier_is_the_linear_after_its_head_batchnorm():
    """LeViT's heads are NormLinear (BatchNorm1d then Linear), two of them (distillation): the classifier is
    each Linear, the norm nearest the pooled vector each head's batch-norm (affine + statistics)."""
    model = _timm("levit_128s")
    p = find_parts(model)
    assert (p.classifier, p.extra_classifiers, p.norms) == ("head.linear", ["head_dist.linear"],
                                                            ["head.bn", "head_dist.bn"])
    assert p.pooling == "token average" and p.pre_logits_checked is True
    sel = select_parts(model, p, "classifier,norm")
    assert sel.trainable == ["head.linear", "head_dist.linear", "head.bn", "head_dist.bn"]
    assert sel.stats == ["head.bn", "head_dist.bn"]


def test_cait_position_embedding_follows_the_size_and_its_export_reloads_there(tmp_path):
    """A ViT-like without set_input_size (CaiT): its absolute position embedding is resampled to the new grid
    by timm's resample_abs_pos_embed; fixres.json records img_size and the export reloads at that size."""
    from timm.layers import resample_abs_pos_embed

    from fixres.config import DataConfig
    from fixres.models.export import export_model
    tiny = dict(depth=1, depth_token_only=1, embed_dim=32, num_heads=2)
    model = _timm("cait_xxs24_224", **tiny).eval()
    original = model.pos_embed.detach().clone()
    assert fit_input_size(model, 224) == {}  # its own size: nothing changes
    kwargs = fit_input_size(model, 256)
    assert kwargs == {"img_size": [256, 256]} == export_model_kwargs(model)
    assert torch.equal(model.pos_embed, resample_abs_pos_embed(original, new_size=[16, 16], num_prefix_tokens=0))
    path = export_model(model, tmp_path / "exp", model_name="cait_xxs24_224", cfg=DataConfig(), test_size=256,
                        train_size=224, extra={"model_kwargs": {**tiny, **kwargs}})  # tiny: a test-only shape
    with pytest.raises(RuntimeError, match="pos_embed"):  # the 224 model cannot hold the 256 embedding
        _timm("cait_xxs24_224", **tiny).load_state_dict(model.state_dict())
    back = load_model(checkpoint=str(path))
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back.model.eval()(x), model(x))


def test_export_records_the_input_size_a_loader_must_set(tmp_path):
    """fixres.json says what to pass to timm.create_model to rebuild a fixed-size model moved to S."""
    from fixres.config import DataConfig
    from fixres.models.export import export_model
    beit = _timm("beit_base_patch16_224", depth=1, embed_dim=32, num_heads=2)
    fit_input_size(beit, 160)
    export_model(beit, tmp_path / "exp", model_name="beit_base_patch16_224", cfg=DataConfig(), test_size=160,
                 train_size=224)
    meta = json.loads((tmp_path / "exp" / "fixres.json").read_text())
    assert meta["model_kwargs"] == {"img_size": [160, 160]} and meta["test_size"] == 160
    vit = load_model(model="fixres_tiny_vit", num_classes=3).model  # any size: nothing to record
    export_model(vit, tmp_path / "vit", model_name="fixres_tiny_vit", cfg=DataConfig(), test_size=96, train_size=64)
    assert "model_kwargs" not in json.loads((tmp_path / "vit" / "fixres.json").read_text())


def test_adaptation_inputs_move_a_fixed_size_model_to_the_test_size(split_folder):
    """finetune/adapt start from load_for_adaptation: a torchvision ViT (fixed at 224, no way to change) is
    refused at 288 with a one-line error naming the size it accepts; at 224 it loads."""
    from fixres.method.inputs import load_for_adaptation
    from fixres.models.loading import ModelSpec
    spec = ModelSpec(model="torchvision:vit_b_16", num_classes=3)
    with pytest.raises(FixresError, match="runs only at 224x224 px"):
        load_for_adaptation(spec, split_folder, test_size=288)


def test_eval_and_sweep_of_a_fixed_size_model_at_other_sizes(tmp_path, capsys, image_folder):
    """A CaiT export made at 224 evaluates at 256 (position embedding resampled) and sweeps 224,256 in one pass."""
    from fixres.cli.app import main
    from fixres.config import DataConfig
    from fixres.models.export import export_model
    model = _timm("cait_xxs24_224", depth=1, depth_token_only=1, embed_dim=32, num_heads=2, num_classes=3)
    path = export_model(model, tmp_path / "exp", model_name="cait_xxs24_224", cfg=DataConfig(), test_size=224,
                        train_size=224, extra={"model_kwargs": dict(depth=1, depth_token_only=1, embed_dim=32,
                                                                    num_heads=2)})
    common = ["--checkpoint", str(path), "--data", str(image_folder), "--workers", "0", "--no-amp", "-q", "--json"]
    assert main(["eval", *common, "--test-size", "256", "--out", str(tmp_path / "e")]) == 0
    assert [r["test_size"] for r in json.loads(capsys.readouterr().out)["rows"]] == [256]
    assert main(["sweep", *common, "--test-sizes", "224,256", "--no-plot", "--out", str(tmp_path / "s")]) == 0
    assert [r["test_size"] for r in json.loads(capsys.readouterr().out)["rows"]] == [224, 256]
