"""Calibration of a classifier's confidence: NLL, expected calibration error, reliability, temperature.

A larger test size makes the logits larger, so the network grows over-confident while top-1 may
still rise (the pooled activations spread out, section 3.2). Accuracy alone does not show it; the
negative log-likelihood (mean cross-entropy) and the expected calibration error (ECE) do:

* ECE (Guo et al., 2017): the images are put into ``bins`` equal-width bins of their top-1 confidence
  (the largest softmax probability); ECE = sum over bins of (bin count / n) * |accuracy - mean
  confidence|. 0 for a perfectly calibrated model. Here as a fraction in [0, 1].
* ``reliability``: the per-bin numbers behind the ECE, the data of a reliability diagram.
* Temperature scaling: one scalar T > 0 dividing the logits, fitted by minimising the NLL on held-out
  labelled images (LBFGS on log T, so T stays positive). Dividing by T keeps the order of the
  logits, so top-1 does not change; only the confidence does.

Pure functions on numpy arrays and torch tensors (evaluation, ``fixres.method.evaluate``, calls them), and
``temperature_scale_model``: a model's classifier divided by the temperature fitted on labelled photos.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fixres.data.loaders import ImageDataset, make_loader
from fixres.data.transforms import build_transform
from fixres.errors import UsageError
from fixres.models.structure import find_classifier_name

#: The usual number of equal-width confidence bins for the ECE (Guo et al., 2017).
ECE_BINS = 15
#: LBFGS iterations for the temperature fit (one scalar: it converges in a few).
TEMPERATURE_ITERATIONS = 100
#: The fit works on log T; this keeps T within [1e-2, 1e2] (a wider range means the logits carry no signal).
LOG_T_LIMIT = math.log(100.0)


def _pair(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=np.float64).ravel()
    if conf.size != hit.size:
        raise UsageError(f"confidence and correct differ in length ({conf.size} vs {hit.size})")
    if conf.size and (np.nanmin(conf) < 0 or np.nanmax(conf) > 1):
        raise UsageError("confidence must be probabilities in [0, 1]")
    return conf, hit


def reliability(confidence, correct, bins: int = ECE_BINS) -> dict:
    """Reliability-diagram data: per equal-width confidence bin, its mean confidence, accuracy and count.

    ``edges`` has ``bins + 1`` values from 0 to 1; a bin is (lo, hi], the first [0, hi]. Empty bins
    have ``None`` confidence and accuracy. A non-finite confidence (a NaN logit row) counts in no bin.
    """
    if bins < 1:
        raise UsageError(f"bins must be at least 1, got {bins}")
    conf, hit = _pair(confidence, correct)
    ok = np.isfinite(conf)
    conf, hit = conf[ok], hit[ok]
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    hit_sum = np.bincount(which, weights=hit, minlength=bins)
    return {"edges": edges.tolist(),
            "confidence": [None if c == 0 else float(s / c) for s, c in zip(conf_sum, count)],
            "accuracy": [None if c == 0 else float(s / c) for s, c in zip(hit_sum, count)],
            "count": count.astype(int).tolist()}


def ece(confidence, correct, bins: int = ECE_BINS) -> float:
    """Expected calibration error (fraction in [0, 1]) over ``bins`` equal-width bins of top-1 confidence."""
    rel = reliability(confidence, correct, bins)
    n = sum(rel["count"])
    if n == 0:
        return float("nan")
    return float(sum(c * abs(a - p) for c, a, p in zip(rel["count"], rel["accuracy"], rel["confidence"]) if c)
                 / n)


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Negative log-likelihood of the labels under softmax(logits): the mean cross-entropy, in nats."""
    logits = torch.as_tensor(logits).double()
    labels = torch.as_tensor(labels).long()
    return float(torch.nn.functional.cross_entropy(logits, labels))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T``: same top-1 (the order is kept for T > 0), softer (T > 1) or sharper (T < 1) softmax."""
    if not temperature > 0:
        raise UsageError(f"the temperature must be positive, got {temperature}")
    return torch.as_tensor(logits) / float(temperature)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *,
                    iterations: int = TEMPERATURE_ITERATIONS) -> float:
    """T minimising the NLL of ``softmax(logits / T)`` on held-out (logits, labels): LBFGS on log T.

    Fit it on images the reported numbers do not use (a held-out split), then ``apply_temperature``.
    Log-probabilities work as well as logits (softmax ignores the per-row constant).
    """
    logits = torch.as_tensor(logits).detach().double()
    labels = torch.as_tensor(labels).long()
    if logits.dim() != 2 or logits.shape[0] != labels.numel() or labels.numel() == 0:
        raise UsageError("fit_temperature needs logits (images, classes) and one label per image")
    keep = torch.isfinite(logits).all(1)
    logits, labels = logits[keep], labels[keep]
    if labels.numel() == 0:
        raise UsageError("fit_temperature: no image with finite logits")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        t = log_t.clamp(-LOG_T_LIMIT, LOG_T_LIMIT).exp()
        loss = torch.nn.functional.cross_entropy(logits / t, labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().clamp(-LOG_T_LIMIT, LOG_T_LIMIT).exp())


__all__ = ["ECE_BINS", "apply_temperature", "ece", "fit_temperature", "nll", "reliability"]


def predict(model: nn.Module, samples, cfg, size: int, *, batch_size: int, workers: int | None,
            device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of ``model`` at ``size`` on ``samples`` (test pre-processing, fp32, skipped files left
    out): for temperature fitting and paired per-image comparisons."""
    loader = make_loader(ImageDataset(samples, build_transform("test", size=size, cfg=cfg)), batch_size=batch_size,
                         workers=workers)
    out, labels = [], []
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            if batch.inputs is not None:
                out.append(model(batch.inputs.to(device)).float().cpu())
                labels.append(batch.labels)
    return torch.cat(out), torch.cat(labels)


def scale_layer(layer, factor: float) -> None:
    """Multiply a linear layer's weight and bias by ``factor`` (logits scale by it exactly)."""
    with torch.no_grad():
        layer.weight.mul_(factor)
        if getattr(layer, "bias", None) is not None:
            layer.bias.mul_(factor)


def temperature_scale_model(model: nn.Module, samples, cfg, size: int, *, batch_size: int, workers: int | None,
                            device) -> float:
    """Fit T on the logits of ``samples`` at ``size``, then divide the classifier by T (same top-1, calibrated
    softmax); returns T."""
    logits, labels = predict(model, samples, cfg, size, batch_size=batch_size, workers=workers, device=device)
    t = float(fit_temperature(logits, labels))
    scale_layer(model.get_submodule(find_classifier_name(model)), 1.0 / t)
    return t
