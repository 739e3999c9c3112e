"""Pooled-activation distances (KS between S and T) and models whose pooled features are
negative or that have no batch-norm before the pooling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import write_image_folder
from torch import nn

from fixres.data.folders import scan_folder
from fixres.errors import UsageError
from fixres.method.stats import activation_stats, ks_distance
from fixres.runtime.engine import Precision

FP32 = Precision(False, None, False)
KW = dict(workers=0, progress=False, batch_size=8, precision=FP32)


class _NoBN(nn.Module):
    """conv -> GroupNorm -> average pooling -> linear: no batch-norm, pooled features of both signs
    (the shape of a LayerNorm / token model's head, small enough for a unit test)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.GroupNorm(1, 6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(self.norm(self.conv(x))).flatten(1))


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_ks_distance_of_known_distributions():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, 40000)
    assert ks_distance(a, a) == 0.0
    assert ks_distance(a, a + 2.0) == 1.0  # disjoint supports
    assert ks_distance(a, rng.uniform(0.5, 1.5, 40000)) == pytest.approx(0.5, abs=0.015)
    # N(0, 1) vs N(1, 1): sup |Phi(x) - Phi(x - 1)| at x = 1/2, i.e. 2 Phi(1/2) - 1 = 0.383
    d = ks_distance(rng.normal(0, 1, 40000), rng.normal(1, 1, 40000))
    assert d == pytest.approx(2 * _normal_cdf(0.5) - 1, abs=0.015)
    # exact on small samples: {1, 2, 3} vs {2.5}: F_a(2) = 2/3, F_b(2) = 0
    assert ks_distance([1, 2, 3], [2.5]) == pytest.approx(2 / 3)
    assert ks_distance(np.ones((2, 3)), [1.0]) == 0.0  # all values, whatever the shape
    with pytest.raises(UsageError):
        ks_distance([], [1.0])


def test_activation_stats_report_ks_to_the_train_size(tmp_path, tiny_model):
    samples = scan_folder(write_image_folder(tmp_path / "d")).samples
    cfg = tiny_model.data_config  # train size 32, not among the sizes asked: measured for the reference
    res = activation_stats(tiny_model.model, samples, cfg, test_sizes=[16, 64], keep_pooled=True, **KW)
    pooled = res.pop("_pooled")
    assert sorted(pooled) == [16, 32, 64] and [r["test_size"] for r in res["sizes"]] == [16, 64]
    assert res["ks_reference"] == {"test_size": 32, "values": "this model's"}
    for r in res["sizes"]:
        assert r["ks_to_reference"] == ks_distance(pooled[r["test_size"]], pooled[32]) > 0
    # a given reference (e.g. another model's values at T) is used as it is
    again = activation_stats(tiny_model.model, samples, cfg, test_sizes=[32, 64], reference=pooled[64], **KW)
    assert [r["ks_to_reference"] for r in again["sizes"]] == [pytest.approx(res["sizes"][1]["ks_to_reference"]),
                                                               0.0]
    assert again["ks_reference"]["values"] == "given"


def test_negative_pooled_features_are_kept_and_said(tmp_path, tiny_model, monkeypatch):
    import fixres.report.plots
    from fixres.method.stats import collect_pooled
    from fixres.report.plots import plot_stats
    samples = scan_folder(write_image_folder(tmp_path / "d")).samples
    model, cfg = _NoBN(), tiny_model.data_config
    res = activation_stats(model, samples, cfg, test_sizes=[32, 48], **KW)
    pooled = collect_pooled(model, samples, cfg, test_sizes=[32, 48], **KW)[0]
    values = pooled[32]
    row = res["sizes"][0]
    assert row["frac_negative"] == pytest.approx(np.mean(values < 0)) and 0.2 < row["frac_negative"] < 0.8
    x, cdf = np.array(row["cdf_x"]), np.array(row["cdf"])
    # the axis starts at the smallest value of either size, not at 0: nothing is dropped
    assert x[0] == pytest.approx(min(v.min() for v in pooled.values()), abs=1e-6) and x[0] < 0
    assert cdf[0] == pytest.approx(np.mean(values <= x[0]))
    i = np.searchsorted(x, 0.0, side="right") - 1
    assert cdf[i] == pytest.approx(np.mean(values <= x[i]))
    titles = []
    monkeypatch.setattr(fixres.report.plots, "plot_activation_cdfs", lambda series, path, title: titles.append(title))
    plot_stats(res, tmp_path / "cdf.png")
    assert "negative" in titles[0] and f"{100 * max(r['frac_negative'] for r in res['sizes']):.1f}%" in titles[0]


@pytest.mark.parametrize("method, why", [("bn-recalibrate", "running statistics"), ("gaussian", "mean and std")])
def test_batch_norm_methods_say_why_they_need_one(tmp_path, tiny_model, method, why):
    from fixres.method.adaptation import adapt
    samples = scan_folder(write_image_folder(tmp_path / "d")).samples
    with pytest.raises(UsageError) as e:
        adapt(_NoBN(), samples, tiny_model.data_config, method=method, test_size=48, **KW)
    msg = str(e.value)
    assert "\n" not in msg and f"{method} needs a batch-norm before the global pooling" in msg
    assert why in msg and "GroupNorm" in msg


def test_frechet_refuses_features_that_are_not_non_negative(tmp_path, tiny_model):
    from fixres.method.adaptation import adapt, fit_frechet
    samples = scan_folder(write_image_folder(tmp_path / "d")).samples
    with pytest.raises(UsageError, match=r"frechet models non-negative pooled activations.*% of"):
        adapt(_NoBN(), samples, tiny_model.data_config, method="frechet", test_size=48, **KW)
    with pytest.raises(UsageError, match="non-negative"):
        fit_frechet(np.r_[np.linspace(0.1, 2, 50), -0.01])
    with pytest.raises(UsageError, match="non-negative"):
        fit_frechet(np.r_[np.linspace(0.1, 2, 50), np.nan])


def test_stats_table_shows_negatives_and_ks():
    from fixres.cli.stats import _table
    row = dict(test_size=64, frac_zero=0.0, frac_above_2=0.01, frac_negative=0.4, mean=0.1, ks_to_reference=0.25)
    lines = _table({"sizes": [row]}, {"sizes": [{**row, "ks_to_reference": 0.125}]}, 32)
    assert "< 0 %" in lines[0] and "KS to 32" in lines[0]
    assert lines[1].split()[3] == "40.00" and lines[1].split()[5] == "0.250" and lines[1].split()[-1] == "0.125"
    assert any("negative values" in line for line in lines)
    plain = _table({"sizes": [{**row, "frac_negative": 0.0}]}, None, 32)
    assert "< 0 %" not in plain[0] and len(plain) == 2


def test_cli_stats_compare_measures_ks_to_the_original_model_at_t(tmp_path, capsys):
    """``stats --compare`` gives the KS of the second model at every size to the FIRST model at T: compared
    with itself, the numbers are the first model's own (0 at T)."""
    import json

    from fixres.cli.app import main
    from fixres.io.checkpoint import save_safetensors
    from fixres.models.loading import load_model
    data = write_image_folder(tmp_path / "d")
    torch.manual_seed(0)
    ck = save_safetensors(load_model(model="fixres_tiny_resnet", num_classes=3).model.state_dict(),
                          tmp_path / "tiny.safetensors")
    assert main(["stats", "--model", "fixres_tiny_resnet", "--checkpoint", str(ck), "--num-classes", "3",
                 "--train-size", "32", "--data", str(data), "--sizes", "16,32,64", "--compare", str(ck),
                 "--workers", "0", "--no-amp", "--out", str(tmp_path / "st"), "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    ks_before = [r["ks_to_reference"] for r in out["before"]["sizes"]]
    assert ks_before[1] == 0.0 and ks_before[0] > 0 and ks_before[2] > 0
    assert [r["ks_to_reference"] for r in out["after"]["sizes"]] == ks_before
    assert out["after"]["ks_reference"] == {"test_size": 32, "values": "given"}
    saved = json.loads((tmp_path / "st" / "stats.json").read_text())
    assert "_pooled" not in saved["before"] and saved["before"]["sizes"][0]["ks_to_reference"] == ks_before[0]


def test_fixed_input_size_model_stats_at_every_size(tmp_path, tiny_model):
    """A timm ViT built for 32 px only: its pooled vector at 48 px is measured on a copy moved there by timm's
    set_input_size (the caller's model unchanged), and equals that of a copy moved by hand."""
    import copy

    import timm

    from fixres.method.stats import collect_pooled
    from fixres.models.loading import fit_input_size
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                            num_classes=3)
    pos_embed = vit.pos_embed.detach().clone()
    samples = scan_folder(write_image_folder(tmp_path / "d")).samples
    cfg = tiny_model.data_config
    res = activation_stats(vit, samples, cfg, test_sizes=[32, 48], keep_pooled=True, **KW)
    moved = copy.deepcopy(vit)
    fit_input_size(moved, 48)
    alone = collect_pooled(moved, samples, cfg, test_sizes=[48], **KW)[0][48]
    assert np.allclose(res["_pooled"][48], alone, atol=1e-6) and not np.allclose(res["_pooled"][48].mean(0),
                                                                                 res["_pooled"][32].mean(0))
    assert res["sizes"][0]["frac_negative"] > 0  # a LayerNorm'd token: pooled features of both signs
    assert torch.equal(vit.pos_embed, pos_embed)
