"""Calibration: ECE, NLL, reliability bins, temperature scaling, and the eval rows that carry them."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fixres.errors import UsageError
from fixres.io.evaluation import FittedOn, PhotoArrays
from fixres.io.schema import dump
from fixres.method.calibration import ECE_BINS, apply_temperature, ece, fit_temperature, nll, reliability


def _calibrated(n: int = 20000, classes: int = 5, scale: float = 2.0, seed: int = 0):
    """Logits z and labels drawn from softmax(z): a model predicting z is perfectly calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g, dtype=torch.float64) * scale
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]
    return z, labels


def _conf_hit(logits, labels):
    p = torch.softmax(torch.as_tensor(logits).double(), 1)
    return p.max(1).values.numpy(), (p.argmax(1) == labels).numpy()


def test_ece_and_reliability_by_hand():
    conf = [0.9, 0.9, 0.6, 0.6, 0.05]
    hit = [1, 0, 1, 1, 0]
    # bins of width 1/15: 0.9 -> (0.867, 0.933], 0.6 -> (0.533, 0.6], 0.05 -> [0, 0.067]
    # |0.5 - 0.9| * 2/5 + |1 - 0.6| * 2/5 + |0 - 0.05| * 1/5
    assert ece(conf, hit) == pytest.approx(0.4 * 2 / 5 + 0.4 * 2 / 5 + 0.05 / 5)
    rel = reliability(conf, hit)
    assert len(rel["edges"]) == ECE_BINS + 1 and rel["edges"][0] == 0.0 and rel["edges"][-1] == 1.0
    assert sum(rel["count"]) == 5 and rel["count"][13] == 2 and rel["count"][8] == 2 and rel["count"][0] == 1
    assert rel["accuracy"][13] == 0.5 and rel["confidence"][8] == pytest.approx(0.6)
    assert rel["accuracy"][5] is None and rel["confidence"][5] is None
    # an edge value belongs to the bin it closes: (lo, hi]
    assert reliability([1 / 15], [1], bins=15)["count"][0] == 1
    assert reliability([1.0], [1], bins=15)["count"][-1] == 1
    assert ece([1.0, 1.0], [1, 1]) == 0.0 and math.isnan(ece([], []))
    with pytest.raises(UsageError):
        ece([1.2], [1])
    with pytest.raises(UsageError):
        ece([0.5, 0.5], [1])


def test_perfectly_calibrated_logits_have_ece_near_zero_and_temperature_one():
    z, labels = _calibrated()
    conf, hit = _conf_hit(z, labels)
    assert ece(conf, hit) < 0.01  # sampling noise only (20 000 images)
    assert fit_temperature(z, labels) == pytest.approx(1.0, abs=0.03)
    # NLL is the mean cross-entropy of the softmax
    logp = torch.log_softmax(z, 1)
    assert nll(z, labels) == pytest.approx(float(-logp.gather(1, labels[:, None]).mean()), rel=1e-12)


def test_over_confident_logits_get_temperature_above_one_and_scaling_keeps_top1():
    z, labels = _calibrated()
    over = 3.0 * z  # the same ranking, three times too sharp
    conf, hit = _conf_hit(over, labels)
    assert ece(conf, hit) > 0.1
    t = fit_temperature(over, labels)
    assert t == pytest.approx(3.0, rel=0.05)
    scaled = apply_temperature(over, t)
    assert torch.equal(scaled.argmax(1), over.argmax(1))  # top-1 cannot change
    assert nll(scaled, labels) < nll(over, labels) - 0.1
    conf_t, hit_t = _conf_hit(scaled, labels)
    assert np.array_equal(hit_t, hit) and ece(conf_t, hit_t) < 0.02
    # log-probabilities give the same temperature as the logits
    assert fit_temperature(torch.log_softmax(over, 1), labels) == pytest.approx(t, rel=1e-4)
    with pytest.raises(UsageError):
        apply_temperature(over, 0.0)


def test_under_confident_logits_get_temperature_below_one():
    z, labels = _calibrated(seed=1)
    assert fit_temperature(0.5 * z, labels) == pytest.approx(0.5, rel=0.05)


def test_eval_rows_carry_nll_and_ece_of_their_own_predictions(image_folder, tiny_model):
    from fixres.data.folders import scan_folder
    from fixres.method.evaluate import evaluate
    from fixres.runtime.engine import Precision
    with torch.no_grad():  # a spread-out head, so confidences differ between images and sizes
        tiny_model.model.fc.weight.mul_(20.0)
    res = evaluate(tiny_model.model, scan_folder(image_folder), tiny_model.data_config, test_sizes=[32, 48],
                   ensembles=[(32, 48)], workers=0, progress=False, precision=Precision(False, None, False),
                   keep_log_probs=True, batch_size=5)
    labels = torch.from_numpy(res.arrays.labels)
    for row, (key, lp) in zip(res.rows + res.ensembles, res.arrays.log_probs.items(), strict=True):
        lp = torch.from_numpy(lp)
        conf, hit = lp.max(1).values.exp().numpy(), (lp.argmax(1) == labels).numpy()
        assert row.label == key
        assert row.nll == row.loss == pytest.approx(nll(lp, labels), rel=1e-6)
        assert row.ece == pytest.approx(100 * ece(conf, hit), rel=1e-9)
        assert dump(res.reliability[key]) == reliability(conf, hit)
        assert sum(res.reliability[key].count) == row.n == 12


def test_temperature_scale_fits_on_held_out_and_keeps_top1(tmp_path, tiny_model):
    from helpers import write_image_folder

    from fixres.data.folders import scan_folder
    from fixres.method.evaluate import evaluate, temperature_scale
    from fixres.runtime.engine import Precision
    with torch.no_grad():  # far too sharp a head: the fitted temperature must soften it
        tiny_model.model.fc.weight.mul_(200.0)
    kw = dict(test_sizes=[32, 48], ensembles=[(32, 48)], workers=0, progress=False, batch_size=6,
              precision=Precision(False, None, False), keep_log_probs=True)
    held = evaluate(tiny_model.model, scan_folder(write_image_folder(tmp_path / "h", seed=5)), tiny_model.data_config,
                    **kw)
    res = evaluate(tiny_model.model, scan_folder(write_image_folder(tmp_path / "v", seed=6)), tiny_model.data_config,
                   **kw)
    scaled = temperature_scale(res, held)
    labels = torch.from_numpy(res.arrays.labels)
    for row, old, key in zip(scaled.rows + scaled.ensembles, res.rows + res.ensembles, res.arrays.log_probs):
        t = fit_temperature(torch.from_numpy(held.arrays.log_probs[key]), torch.from_numpy(held.arrays.labels))
        assert row.temperature == t and t > 1
        assert row.nll_scaled == pytest.approx(nll(torch.from_numpy(res.arrays.log_probs[key]).double() / t, labels))
        assert replace(row, temperature=None, nll_scaled=None, ece_scaled=None) == old  # every measured number kept
    assert scaled.temperature_fitted_on == FittedOn(n_images=12)
    with pytest.raises(UsageError, match="keep_log_probs"):
        temperature_scale(replace(res, arrays=PhotoArrays()), held)


def test_cli_sweep_calibrate_on_held_out_folder(tmp_path, capsys):
    import json

    from helpers import write_image_folder

    from fixres.cli.app import main
    from fixres.data.folders import scan_folder
    from fixres.method.evaluate import evaluate, temperature_scale
    from fixres.models.loading import load_model
    val, held = write_image_folder(tmp_path / "v", seed=6), write_image_folder(tmp_path / "h", seed=5)
    torch.manual_seed(0)
    assert main(["sweep", "--data", str(val), "--calibrate-on", str(held), "--model", "fixres_tiny_resnet",
                 "--random-init", "--num-classes", "3", "--train-size", "32", "--test-sizes", "32,48", "--no-plot",
                 "--workers", "0", "--no-amp", "--out", str(tmp_path / "s")]) == 0
    text = capsys.readouterr().out
    saved = json.loads((tmp_path / "s" / "sweep.json").read_text())
    torch.manual_seed(0)
    b = load_model(model="fixres_tiny_resnet", num_classes=3, train_size=32)
    kw = dict(test_sizes=[32, 48], workers=0, progress=False, keep_log_probs=True)
    ref = temperature_scale(evaluate(b.model, scan_folder(val), b.data_config, **kw),
                            evaluate(b.model, scan_folder(held), b.data_config, **kw))
    for got, want in zip(saved["rows"], ref.to_json()["rows"], strict=True):
        assert got["temperature"] == pytest.approx(want["temperature"], rel=1e-6)
        assert (got["nll_scaled"], got["ece_scaled"]) == pytest.approx((want["nll_scaled"], want["ece_scaled"]),
                                                                       rel=1e-2)
    assert "_log_probs" not in saved and saved["temperature_fitted_on"]["n_images"] == 12
    assert "NLL@T" in text and f"{saved['rows'][0]['temperature']:.2f}" in text
