"""Label-free adaptation: bn-recalibrate, Frechet equalisation (appendix A.1), Gaussian matching (A.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fp32, tiny_bundle, tiny_data  # noqa: F401

from fixres.method.adaptation import (
    FRECHET_XI,
    Equalization,
    adapt,
    fit_frechet,
    install_equalization,
    remove_equalization,
)
from fixres.method.stats import iterate_views
from fixres.models.hooks import capture, count_hooks

KW = dict(workers=0, progress=False, batch_size=8)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _channel_moments(model, samples, cfg, size, name, where="output"):
    model.eval()
    with torch.no_grad(), capture(model, [name], where=where) as got:
        for views, _, _ in iterate_views(samples, cfg, [size], batch_size=8, workers=0, progress=False):
            model(views[0])
    t = torch.cat(got[name]).double()
    return t.mean(dim=(0, 2, 3)), t.std(dim=(0, 2, 3), unbiased=False), t


def test_bn_recalibrate_is_the_exact_average_and_changes_nothing_else(tmp_path):
    train, _ = tiny_data(tmp_path / "d")
    b = tiny_bundle()
    before = _state(b.model)
    # what the recalibrated statistics must be: the mean of the BN inputs at 64 px over all images
    _, _, inputs = _channel_moments(b.model, train, b.data_config, 64, "layer4.0.bn2", where="input")
    res = adapt(b.model, train, b.data_config, method="bn-recalibrate", test_size=64, precision=fp32(), **KW)
    after = _state(b.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.{s}" for n in ("layer4.0.bn2", "layer4.0.downsample.1")
                       for s in ("running_mean", "running_var", "num_batches_tracked")}
    # cumulative average of per-batch means (batches of 8, 8, 2 images)
    per_batch = [inputs[i:i + 8].mean(dim=(0, 2, 3)) for i in range(0, 18, 8)]
    expected = torch.stack(per_batch).mean(0)
    assert torch.allclose(b.model.layer4[0].bn2.running_mean.double(), expected, atol=1e-5)
    assert b.model.layer4[0].bn2.momentum == 0.1 and not b.model.training
    assert res["labels_used"] is False and res["images"] == 18


def test_frechet_fit_recovers_known_parameters_and_ignores_zeros():
    rng = np.random.default_rng(0)
    mu, sigma, xi = 0.8, 0.35, FRECHET_XI
    u = rng.uniform(size=20000)
    x = mu + sigma / xi * ((-np.log(u)) ** (-xi) - 1.0)  # inverse CDF of the Frechet law
    x = np.concatenate([x[x > 0], np.zeros(5000)])
    fit = fit_frechet(x)
    assert fit["mu"] == pytest.approx(mu, rel=0.03) and fit["sigma"] == pytest.approx(sigma, rel=0.03)
    assert fit["rms"] < 0.01


def test_frechet_fit_is_a_least_squares_optimum_on_data_that_is_not_frechet():
    """Pooled ReLU activations are not Frechet: the starting line is then not the fit, and the
    refinement must reach a point that no small move of (mu, sigma) improves."""
    from fixres.method.adaptation import frechet_cdf
    rng = np.random.default_rng(1)
    x = np.maximum(rng.normal(0.3, 1.0, size=(4000, 16)), 0).mean(1) ** 1.7  # skewed, not Frechet
    fit = fit_frechet(x)
    v = np.sort(x[x != 0])
    q = (np.arange(v.size) + 0.5) / v.size

    def cost(mu, sigma):
        r = frechet_cdf(v, mu, sigma, FRECHET_XI) - q
        return float(r @ r)

    best = cost(fit["mu"], fit["sigma"])
    y = (-np.log(q)) ** (-FRECHET_XI)  # the linearised start
    b, a = np.polyfit(v, y, 1)
    assert best < 0.9 * cost((1 - a) / b, FRECHET_XI / b), "the refinement did not improve on its start"
    for dmu, dsig in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        assert best <= cost(fit["mu"] + 1e-3 * dmu, fit["sigma"] * (1 + 1e-3 * dsig)) + 1e-12


def test_equalization_keeps_zeros_and_hook_is_removable(tiny_model):
    eq = Equalization(mu_ref=1.0, sigma_ref=2.0, mu_0=0.5, sigma_0=1.0, module="global_pool", where="output")
    t = torch.tensor([0.0, 0.5, 1.5])
    assert torch.equal(eq(t), torch.tensor([0.0, 1.0, 3.0]))
    model = tiny_model.model.eval()
    x = torch.randn(2, 3, 48, 48)
    ref = model(x)
    install_equalization(model, eq)
    assert not torch.allclose(model(x), ref) and count_hooks(model) == 1
    assert remove_equalization(model) and count_hooks(model) == 0
    assert torch.equal(model(x), ref)


def test_frechet_adapt_equalizes_the_fitted_parameters(tmp_path):
    train, _ = tiny_data(tmp_path / "d")
    b = tiny_bundle()
    res = adapt(b.model, train, b.data_config, method="frechet", train_size=32, test_size=64, precision=fp32(), **KW)
    # after the equalisation, the pooled values at 64 px fit the law fitted at 32 px
    pooled = res["_pooled"][64]
    eq = Equalization(**res["equalization"])
    mapped = eq(torch.from_numpy(pooled)).numpy()
    refit = fit_frechet(mapped)
    assert refit["mu"] == pytest.approx(res["fit_train_size"]["mu"], rel=1e-3)
    assert refit["sigma"] == pytest.approx(res["fit_train_size"]["sigma"], rel=1e-3)
    remove_equalization(b.model)


def test_gaussian_matches_pre_activation_moments_at_train_size(tmp_path):
    train, _ = tiny_data(tmp_path / "d")
    b = tiny_bundle()
    # the last activation reads the residual sum (bn2 + shortcut): its input is what is matched
    name = "layer4.0.act2"
    mu_t, sd_t, _ = _channel_moments(b.model, train, b.data_config, 32, name, where="input")
    mu_s, sd_s, _ = _channel_moments(b.model, train, b.data_config, 64, name, where="input")
    assert not torch.allclose(sd_t, sd_s, rtol=0.05)
    before = _state(b.model)
    res = adapt(b.model, train, b.data_config, method="gaussian", train_size=32, test_size=64, precision=fp32(), **KW)
    mu_a, sd_a, _ = _channel_moments(b.model, train, b.data_config, 64, name, where="input")
    assert torch.allclose(mu_a, mu_t, atol=1e-4) and torch.allclose(sd_a, sd_t, rtol=1e-3, atol=1e-5)
    changed = {k for k in before if not torch.equal(before[k], _state(b.model)[k])}
    assert changed <= {f"{n}.{p}" for n in res["batchnorms"] for p in ("weight", "bias")}


def test_unknown_method_is_a_usage_error(tiny_model):
    from fixres.errors import UsageError
    with pytest.raises(UsageError, match="unknown adaptation method"):
        adapt(tiny_model.model, [("x.jpg", 0)], tiny_model.data_config, method="magic", test_size=64)


def test_cli_adapt_reports_top1_nll_and_ece_before_and_after(tmp_path, capsys):
    """The before/after numbers are evaluate_at's on the same model, with NLL and ECE next to top-1."""
    import copy
    import json

    from fixres.cli.app import main
    from fixres.method.streaming import evaluate_at
    from fixres.models.loading import load_model
    from fixres.runtime.dist import DistEnv
    train, val = tiny_data(tmp_path / "d")
    argv = ["adapt", "--model", "fixres_tiny_resnet", "--random-init", "--num-classes", "3", "--train-size", "32",
            "--data", str(tmp_path / "d"), "--workers", "0", "--no-amp", "--method", "bn-recalibrate",
            "--test-size", "48", "--batch-size", "8", "--out", str(tmp_path / "ad")]
    torch.manual_seed(0)
    assert main(argv) == 0
    text = capsys.readouterr().out
    torch.manual_seed(0)
    b = load_model(model="fixres_tiny_resnet", num_classes=3, train_size=32)
    kw = dict(test_size=48, batch_size=8, env=DistEnv(), precision=fp32(), workers=0, progress=False)
    before = evaluate_at(copy.deepcopy(b.model), val, b.data_config, **kw)
    adapt(b.model, train, b.data_config, method="bn-recalibrate", test_size=48, precision=fp32(), **KW)
    after = evaluate_at(b.model, val, b.data_config, **kw)
    saved = json.loads((tmp_path / "ad" / "adapt.json").read_text())
    for key in ("top1", "top1_std", "nll", "ece", "n"):
        assert saved["before"][key] == pytest.approx(before[key], rel=1e-6), key
        assert saved["after"][key] == pytest.approx(after[key], rel=1e-6), key
    assert saved["before"]["nll"] == saved["before"]["loss"] and saved["before"]["nll"] != saved["after"]["nll"]
    assert (f"NLL {before['nll']:.4f} -> {after['nll']:.4f}, ECE (15 bins) {before['ece']:.2f}% -> "
            f"{after['ece']:.2f}%") in text
