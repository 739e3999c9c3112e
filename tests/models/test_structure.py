"""Structure finder: classifier, pooling, batch-norm before pooling, last stage, --parts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fixres.errors import FixresError, UsageError
from fixres.models.hooks import count_hooks
from fixres.models.parts import select_parts
from fixres.models.structure import find_classifier_name, find_parts


def test_tiny_resnet_parts(tiny_model):
    model = tiny_model.model
    p = find_parts(model)
    assert p.classifier == "fc" and p.pool == "global_pool"
    # the last block downsamples: both the residual branch's bn2 and the shortcut's BN feed the add + ReLU
    assert p.pre_pool_bns == ["layer4.0.bn2", "layer4.0.downsample.1"]
    assert p.last_stage == "layer4"
    assert p.chain[-2:] == ["global_pool", "fc"] and p.num_features == 128
    assert count_hooks(model) == 0


def test_timm_efficientnet_lite_and_torchvision_resnet():
    import timm
    import torchvision
    lite = find_parts(timm.create_model("tf_efficientnet_lite0", num_classes=5))
    assert (lite.classifier, lite.pool, lite.pre_pool_bns, lite.last_stage) == \
        ("classifier", "global_pool", ["bn2"], "blocks.6")
    tv = find_parts(torchvision.models.resnet18(num_classes=4))
    # residual add + ReLU after bn2: still "the BN before pooling"; earlier blocks' BNs are not
    assert (tv.classifier, tv.pool, tv.pre_pool_bns, tv.last_stage) == ("fc", "avgpool", ["layer4.1.bn2"], "layer4")


def test_convnext_norm_is_its_head_layernorm_and_bn_stats_is_refused():
    """ConvNeXt's norm nearest the pooled vector is head.norm (a LayerNorm2d after the pooling):
    'norm' (and its alias 'bn') trains its affine weights; 'bn-stats' has no running statistics to re-estimate."""
    import timm
    model = timm.create_model("convnext_atto", num_classes=3)
    p = find_parts(model)
    assert p.pre_pool_bns == [] and p.classifier == "head.fc" and p.norms == ["head.norm"]
    assert p.pre_logits_checked is True and p.pooling == "spatial average"
    for spec in ("classifier,norm", "classifier,bn"):
        sel = select_parts(model, p, spec)
        assert sel.trainable == ["head.fc", "head.norm"] and sel.stats == []
    with pytest.raises(FixresError, match="no batch-norm nearest the pooled vector.*LayerNorm2d"):
        select_parts(model, p, "bn-stats")
    sel = select_parts(model, p, "classifier")
    assert sel.trainable == ["head.fc"] and sel.stats == []


def test_select_parts_variants(tiny_model):
    model = tiny_model.model
    p = find_parts(model)
    sel = select_parts(model, p, "bn-stats")
    assert sel.trainable == [] and sel.stats == p.pre_pool_bns
    sel = select_parts(model, p, "classifier,bn,last-stage")
    assert sel.trainable == ["fc", "layer4"]  # the BNs are inside layer4
    assert set(sel.stats) == {"layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1"}
    sel = select_parts(model, p, ["layer3", "fc"])
    assert sel.trainable == ["layer3", "fc"] and "layer3.0.bn1" in sel.stats
    with pytest.raises(UsageError, match="unknown part 'layer9'"):
        select_parts(model, p, "layer9")
    with pytest.raises(UsageError):
        select_parts(model, p, " , ")


def test_model_without_pooling_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(FixresError, match="no global pooling"):
        find_parts(model)
    assert find_classifier_name(model) == "2"
