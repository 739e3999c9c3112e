"""Label-free adaptation to a new test resolution (paper section 4.2 and appendix A).

Three methods, none of which reads a label:

* ``bn-recalibrate``: re-estimate the running statistics of the batch-norm(s) before the global
  pooling on images pre-processed at test_size (cumulative average over all images, ``momentum=None``).
  Only those statistics change; affine parameters and every other module are untouched.
* ``frechet`` (appendix A.1): the non-zero pooled activations are modelled by a Frechet distribution
  P(x) = exp(-(1 + xi (x - mu) / sigma)^(-1/xi)) with xi = 0.3, fitted by least squares to the
  empirical CDF at train_size (mu_ref, sigma_ref) and at test_size (mu_0, sigma_0). After the pooling,
  non-zero values are mapped x -> mu_ref + (x - mu_0) sigma_ref / sigma_0 (zeros stay zero). This is a
  hook (the map is not linear in the zeros), so it is not part of the weights; ``remove_equalization``
  takes it out.
* ``gaussian`` (appendix A.2): the per-channel mean and std of the activations before the last ReLU
  at test_size are matched to those at train_size by a per-channel affine map before the activation,
  stored in the weights (exportable). Where the last norm feeds the activation directly (EfficientNet's
  BatchNormAct, DenseNet) that tensor is the norm's output and its weight and bias change. Where a
  shortcut joins before the activation (a ResNet block: ``bn3 + shortcut``) it is the sum, found by
  tracing (``fixres.models.residual``): the sum is read at the activation's input and the map is written
  into every branch of it (the batch-norms ending them, and through an identity shortcut the previous
  block's sum, its next convolution compensated).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from fixres.config import DEFAULT_STATS_BATCH_SIZE, DataConfig, validate_size
from fixres.errors import FixresError, UsageError
from fixres.method.stats import collect_pooled, forward_views, pooled_point
from fixres.models.hooks import drop_kept_hook, keep_hook, kept_hook
from fixres.models.loading import fit_input_size
from fixres.models.residual import LastSum, apply_affine, find_last_sum
from fixres.models.structure import ModelParts, find_parts
from fixres.runtime.dist import DistEnv
from fixres.runtime.engine import Precision, precision_for, prepare

METHODS = ("bn-recalibrate", "frechet", "gaussian")
#: Appendix A.1: the Frechet shape parameter is kept constant at 0.3.
FRECHET_XI = 0.3
#: Least-squares fit on at most this many points of the empirical CDF (evenly spaced quantiles).
FIT_POINTS = 20_000
FIT_ITERATIONS = 100
#: stop when a Levenberg-Marquardt step lowers the squared CDF error by less than this fraction
FIT_TOLERANCE = 1e-10
#: A channel whose std is below this is left as it is by the Gaussian matching (no information).
MIN_STD = 1e-6
#: Why the Frechet equalisation cannot be exported (said by every exporter that meets it).
EQUALIZATION_NOT_IN_WEIGHTS = ("the Frechet equalisation is a hook after the pooling, not part of the weights, so it "
                               "cannot be exported; export a fine-tuned, bn-recalibrate or gaussian model instead")


# --------------------------------------------------------------------------- Frechet

def frechet_cdf(x: np.ndarray, mu: float, sigma: float, xi: float = FRECHET_XI) -> np.ndarray:
    z = np.clip(1.0 + xi / sigma * (np.asarray(x, dtype=np.float64) - mu), 1e-12, None)
    return np.exp(-z ** (-1.0 / xi))


def check_non_negative(values: np.ndarray) -> None:
    """The Frechet law models pooled activations after a ReLU (>= 0, zeros as outliers): refuse anything else."""
    v = np.asarray(values, dtype=np.float64)
    if v.size and not np.all(v >= 0):  # also refuses NaN
        frac = float(np.mean(~(v >= 0)))
        raise UsageError(f"frechet models non-negative pooled activations (after a ReLU), but {100 * frac:.1f}% of "
                         f"this model's pooled features are negative or not finite (min {np.nanmin(v):.3g}); "
                         "a model that pools LayerNorm'd tokens has no such law: fine-tune instead (fixres finetune)")


def fit_frechet(values: np.ndarray, xi: float = FRECHET_XI, points: int = FIT_POINTS) -> dict:
    """Least-squares fit of (mu, sigma) to the empirical CDF of the non-zero ``values`` (zeros are outliers).

    Starts from the exact linearisation (-log F)^(-xi) = 1 + xi (x - mu) / sigma, then refines by
    Levenberg-Marquardt on the CDF residuals. Returns mu, sigma, xi, rms residual, non-zero count.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    check_non_negative(v)
    v = v[v != 0]
    if v.size < 10:
        raise FixresError(f"too few non-zero pooled activations to fit a Frechet law ({v.size})")
    q = (np.arange(v.size) + 0.5) / v.size
    if v.size > points:
        pick = np.linspace(0, v.size - 1, points).round().astype(int)
        v, q = v[pick], q[pick]
    y = (-np.log(q)) ** (-xi)
    b, a = np.polyfit(v, y, 1)
    b = max(b, 1e-9)
    theta = np.array([(1.0 - a) / b, xi / b])  # mu, sigma

    def residual(t):
        return frechet_cdf(v, t[0], max(t[1], 1e-9), xi) - q

    lam = 1e-3
    r = residual(theta)
    cost = float(r @ r)
    for _ in range(FIT_ITERATIONS):
        eps = 1e-6 * np.maximum(1.0, np.abs(theta))
        jac = np.stack([(residual(theta + np.eye(2)[k] * eps[k]) - r) / eps[k] for k in range(2)], axis=1)
        g = jac.T @ r
        h = jac.T @ jac
        step = np.linalg.solve(h + lam * np.diag(np.diag(h) + 1e-12), -g)
        cand = theta + step
        cand[1] = max(cand[1], 1e-9)
        rc = residual(cand)
        cc = float(rc @ rc)
        if cc < cost:
            improvement = cost - cc  # measured before the update: the stopping test needs the old cost
            theta, r, cost, lam = cand, rc, cc, lam / 3
            if improvement < FIT_TOLERANCE * max(cost, FIT_TOLERANCE) or np.linalg.norm(step) < 1e-10:
                break
        else:
            lam *= 5
            if lam > 1e8:
                break
    return {"mu": float(theta[0]), "sigma": float(theta[1]), "xi": xi,
            "rms": float(np.sqrt(cost / v.size)), "nonzero": int(np.count_nonzero(values))}


@dataclass
class Equalization:
    """x -> mu_ref + (x - mu_0) * sigma_ref / sigma_0 for non-zero x, after the pooling."""

    mu_ref: float
    sigma_ref: float
    mu_0: float
    sigma_0: float
    module: str
    where: str  # "output" of the pooling, or "input" of the classifier

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        scale = self.sigma_ref / self.sigma_0
        return torch.where(t != 0, self.mu_ref + (t - self.mu_0) * scale, t)

    def to_dict(self) -> dict:
        return asdict(self)


def install_equalization(model: nn.Module, eq: Equalization) -> None:
    """Insert ``eq`` after the pooling (a hook kept on the model until ``remove_equalization``)."""
    target = model.get_submodule(eq.module)
    if eq.where == "output":
        keep_hook(model, target, "forward", lambda mod, args, out: eq(out), payload=eq,
                  not_in_weights=EQUALIZATION_NOT_IN_WEIGHTS)
    else:
        keep_hook(model, target, "pre", lambda mod, args: (eq(args[0]),) + tuple(args[1:]), payload=eq,
                  not_in_weights=EQUALIZATION_NOT_IN_WEIGHTS)


def remove_equalization(model: nn.Module) -> bool:
    return equalization_of(model) is not None and drop_kept_hook(model)


def equalization_of(model: nn.Module) -> Equalization | None:
    kept = kept_hook(model)
    return kept.payload if kept is not None and isinstance(kept.payload, Equalization) else None


# --------------------------------------------------------------------------- helpers

#: Why each batch-norm method needs a batch-norm before the pooling (said in its error).
_BN_NEED = {
    "bn-recalibrate": "it re-estimates the running statistics of the batch-norm before the global pooling "
                      "at the test size",
    "gaussian": "it matches the per-channel mean and std before the last activation by changing the affine "
                "weights of the batch-norm(s) that feed it",
}


def _need_bns(parts: ModelParts, method: str) -> list[str]:
    if not parts.pre_pool_bns:
        last = (f"; its last norm is {', '.join(parts.other_pre_pool_norms)}, which keeps no running statistics"
                if parts.other_pre_pool_norms else "")
        raise UsageError(f"{method} needs a batch-norm before the global pooling ({_BN_NEED[method]}), and "
                         f"{parts.model_type or 'this model'} has no batch-norm before the global pooling{last}; "
                         "fine-tune the classifier instead (fixres finetune)")
    return list(parts.pre_pool_bns)


def _bn_output_moments(bn: nn.Module, mean_in: torch.Tensor, std_in: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of an eval-mode batch-norm's affine output, from those of its input.

    In eval mode the batch-norm is y = a x + c per channel (a = w / sqrt(var + eps), c = b - a mean),
    so the moments before the activation follow exactly from the input's, whatever the module fuses
    after the normalisation (timm's BatchNormAct2d applies its activation inside the same module).
    """
    a = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    c = bn.bias.double() - a * bn.running_mean.double()
    return a * mean_in + c, a.abs() * std_in


class _ChannelMoments:
    def __init__(self) -> None:
        self.n = 0
        self.s = None
        self.ss = None

    def add(self, t: torch.Tensor) -> None:
        t = t.double()
        dims = [0] + list(range(2, t.dim()))
        count = t.numel() // t.shape[1]
        s, ss = t.sum(dim=dims), (t * t).sum(dim=dims)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += count

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        var = (self.ss / self.n - mean * mean).clamp_min(0)
        return mean, var.sqrt()


# --------------------------------------------------------------------------- adapt

def _bn_recalibrate(model: nn.Module, parts: ModelParts, samples, cfg: DataConfig, *, test_size: int,
                    env: DistEnv, precision: Precision, common: dict) -> dict:
    bns = _need_bns(parts, "bn-recalibrate")
    # the statistics are re-estimated in ``model`` itself: a fixed-input-size model moves to test_size first
    fit_input_size(model, test_size)
    modules = [model.get_submodule(n) for n in bns]
    saved = [m.momentum for m in modules]
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in zip(bns, modules)}
    model.eval()
    for m in modules:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally (PyTorch's rule)
        m.train()
    try:
        n_images, skipped = forward_views(model, samples, cfg, [test_size], env=env, precision=precision,
                                          min_batch=2, copies=False, desc="re-estimating BN stats", **common)
    finally:
        for m, mom in zip(modules, saved):
            m.momentum = mom
        model.eval()
    if n_images == 0:
        raise UsageError("bn-recalibrate: no batch of at least two readable images")
    change = {n: {"mean_shift": float((m.running_mean - before[n][0]).abs().mean()),
                  "var_ratio": float((m.running_var / before[n][1].clamp_min(1e-12)).mean())}
              for n, m in zip(bns, modules)}
    return {"batchnorms": bns, "images": n_images, "change": change, "skipped": skipped}


def _frechet(model: nn.Module, parts: ModelParts, samples, cfg: DataConfig, *, train_size: int, test_size: int,
             xi: float, env: DistEnv, precision: Precision, common: dict) -> dict:
    name, where = pooled_point(parts)
    pooled, skipped = collect_pooled(model, samples, cfg, test_sizes=sorted({train_size, test_size}),
                                     env=env, precision=precision, parts=parts, **common)
    ref = fit_frechet(pooled[train_size], xi)
    new = fit_frechet(pooled[test_size], xi)
    eq = Equalization(mu_ref=ref["mu"], sigma_ref=ref["sigma"], mu_0=new["mu"], sigma_0=new["sigma"],
                      module=name, where=where)
    install_equalization(model, eq)
    return {"fit_train_size": ref, "fit_test_size": new, "equalization": eq.to_dict(),
            "images": int(pooled[test_size].shape[0]), "skipped": skipped, "_pooled": pooled}


def _pre_activation_moments(model: nn.Module, bns: list[str], samples, cfg: DataConfig, sizes: list[int], *,
                            env: DistEnv, precision: Precision, common: dict) -> tuple[dict, int, list]:
    """Per (batch-norm, size): the channel moments of the batch-norm's input, in one pass over the images."""
    moments = {(n, s): _ChannelMoments() for n in bns for s in sizes}

    def sink(size, name, t):
        moments[(name, size)].add(t.float())

    model.eval()
    images, skipped = forward_views(model, samples, cfg, sizes, env=env, precision=precision,
                                    hooks=(bns, "input", sink), desc="pre-activation statistics", **common)
    if images == 0:
        raise UsageError("gaussian: no readable image")
    return moments, images, skipped


def _match(mu_t: torch.Tensor, sd_t: torch.Tensor, mu_s: torch.Tensor, sd_s: torch.Tensor):
    """The per-channel (ratio, shift, ok) of the affine map taking the moments at S to those at T."""
    ok = (sd_s > MIN_STD) & (sd_t > MIN_STD)
    ratio = torch.where(ok, sd_t / sd_s.clamp_min(MIN_STD), torch.ones_like(sd_s))
    return ratio, torch.where(ok, mu_t - mu_s * ratio, torch.zeros_like(mu_s)), ok


def _gaussian_on_sum(model: nn.Module, last: LastSum, samples, cfg: DataConfig, *, train_size: int,
                     test_size: int, env: DistEnv, precision: Precision, common: dict) -> dict:
    """A.2 where a shortcut joins before the last activation: the sum that activation reads is matched."""
    sizes = sorted({train_size, test_size})
    moments = {s: _ChannelMoments() for s in sizes}
    seen = [0]

    def sink(size, _name, t):
        # the activation may run several times per forward pass (torchvision's relu): only the sum's call
        if seen[0] % last.calls_per_forward == last.occurrence:
            moments[size].add(t.float())
        seen[0] += 1

    model.eval()
    images, skipped = forward_views(model, samples, cfg, sizes, env=env, precision=precision,
                                    hooks=([last.consumer], "input", sink), desc="pre-activation statistics",
                                    **common)
    if images == 0:
        raise UsageError("gaussian: no readable image")
    (mu_t, sd_t), (mu_s, sd_s) = moments[train_size].mean_std(), moments[test_size].mean_std()
    ratio, shift, ok = _match(mu_t, sd_t, mu_s, sd_s)
    apply_affine(model, last, ratio, shift)
    change = {"std_ratio_mean": float(ratio.mean()), "mean_train_size": float(mu_t.mean()),
              "mean_test_size": float(mu_s.mean()), "std_train_size": float(sd_t.mean()),
              "std_test_size": float(sd_s.mean()), "channels_left": int((~ok).sum())}
    return {"batchnorms": last.scale_bns, "measured_at": {last.consumer: "input of the last activation (the "
                                                          "residual sum)"},
            "residual_sum": last.to_dict(), "images": images, "change": {"sum": change}, "skipped": skipped}


def _gaussian(model: nn.Module, parts: ModelParts, samples, cfg: DataConfig, *, train_size: int, test_size: int,
              env: DistEnv, precision: Precision, common: dict) -> dict:
    bns = _need_bns(parts, "gaussian")
    for n in bns:
        if model.get_submodule(n).weight is None or getattr(model.get_submodule(n), "running_var", None) is None:
            raise FixresError(f"gaussian: batch-norm {n} has no affine parameters or running statistics to adjust")
    # What the last activation reads: the sum where a shortcut joins after the norm (ResNet), else the norm's output
    last = find_last_sum(model, pooled_point(parts))
    if last is not None:
        return _gaussian_on_sum(model, last, samples, cfg, train_size=train_size, test_size=test_size, env=env,
                                precision=precision, common=common)
    # the batch-norms' inputs are read; their outputs before the activation follow exactly (_bn_output_moments)
    moments, images, skipped = _pre_activation_moments(model, bns, samples, cfg, sorted({train_size, test_size}),
                                                       env=env, precision=precision, common=common)
    changes = {}
    with torch.no_grad():
        for n in bns:
            bn = model.get_submodule(n)
            mu_t, sd_t = _bn_output_moments(bn, *moments[(n, train_size)].mean_std())
            mu_s, sd_s = _bn_output_moments(bn, *moments[(n, test_size)].mean_std())
            ratio, shift, ok = _match(mu_t, sd_t, mu_s, sd_s)
            w, b = bn.weight, bn.bias
            w.copy_((w.double() * ratio).to(w.dtype))
            b.copy_((b.double() * ratio + shift).to(b.dtype))
            changes[n] = {"std_ratio_mean": float(ratio.mean()), "mean_train_size": float(mu_t.mean()),
                          "mean_test_size": float(mu_s.mean()), "std_train_size": float(sd_t.mean()),
                          "std_test_size": float(sd_s.mean()), "channels_left": int((~ok).sum())}
    return {"batchnorms": bns,
            "measured_at": {n: f"input of {n}, mapped through its affine normalisation" for n in bns},
            "images": images, "change": changes, "skipped": skipped}


def adapt(model: nn.Module, samples, cfg: DataConfig, *, method: str, train_size: int | None = None,
          test_size: int, batch_size: int = DEFAULT_STATS_BATCH_SIZE, env: DistEnv | None = None,
          precision: Precision | None = None, workers: int | None = None, max_images: int | None = None,
          progress: bool = True, xi: float = FRECHET_XI) -> dict:
    """Adapt ``model`` (in place) from ``train_size`` to ``test_size`` on unlabeled ``samples``.

    ``method``: bn-recalibrate, frechet or gaussian (see the module doc). Labels are never read.
    Returns what was measured and changed (JSON-ready, except frechet's ``_pooled`` values: pop it).
    bn-recalibrate and gaussian need a batch-norm before the pooling, frechet non-negative pooled
    features: a model without them gets a one-line ``UsageError`` saying why.
    """
    if method not in METHODS:
        raise UsageError(f"unknown adaptation method {method!r}; choose one of {', '.join(METHODS)}")
    train_size = validate_size(int(train_size or cfg.train_size), "train_size")
    validate_size(test_size, "test_size")
    env = env or DistEnv()
    precision = precision or precision_for(env.device)
    model = prepare(model, env.device, precision)
    remove_equalization(model)
    parts = find_parts(model)
    common = dict(batch_size=batch_size, workers=workers, max_images=max_images, progress=progress)
    run = dict(env=env, precision=precision, common=common)
    if method == "bn-recalibrate":
        res = _bn_recalibrate(model, parts, samples, cfg, test_size=test_size, **run)
    elif method == "frechet":
        res = _frechet(model, parts, samples, cfg, train_size=train_size, test_size=test_size, xi=xi, **run)
    else:
        res = _gaussian(model, parts, samples, cfg, train_size=train_size, test_size=test_size, **run)
    return {"method": method, "train_size": train_size, "test_size": test_size, "labels_used": False, **res}


__all__ = ["adapt", "check_non_negative", "fit_frechet", "frechet_cdf", "Equalization", "install_equalization",
           "remove_equalization",
           "equalization_of", "METHODS"]
