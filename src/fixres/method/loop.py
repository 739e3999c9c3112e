"""One optimizer step and one epoch, shared by every training loop (``fixres.method.train``,
``fixres.method.finetuning``).

**A global step.** Each rank sums the loss of its own images and divides by the *global* image count
of the step (an all-reduce of the counts); the gradients are then summed over ranks, so every step
is the gradient of the global batch's mean loss however the images are spread over the ranks.
A rank whose batch is empty (every image unreadable, or the short end of an uneven shard) runs no
forward at all, so no batch-norm statistic moves on a blank input; it joins the gradient sum with
zeros and applies the same summed step as the others, so parameters and optimizer state stay equal
on every rank. When no rank has an image the step is skipped everywhere. Gradients are summed in
one flat buffer per dtype rather than by DDP's hooks, because DDP needs every rank to run a backward.

**Timing.** The device is synchronised before each clock read (CUDA runs kernels asynchronously;
unsynchronised numbers would measure kernel launches), for the paper's table-7 style ms per batch.

**Precision.** Autocast from ``fixres.runtime.engine``; fp16 autocast gets a GradScaler (bf16 needs none).

**Checkpoint.** ``LoopState`` is what a loop saves after each epoch and reads back to resume; the
key names on disk (``StateLayout``) are those each loop's file has always had. ``check_resume``
is the one rule both loops use to refuse continuing a run written with other settings.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from fixres.errors import UsageError
from fixres.io import schema
from fixres.io.checkpoint import load_training_state, save_training_state
from fixres.models.hooks import first_non_finite_output
from fixres.runtime import dist
from fixres.runtime.engine import Precision, autocast

STATE_VERSION = 1
MS_PER_S = 1000.0


# --------------------------------------------------------------------------- timing

def clock() -> float:
    return time.perf_counter()


def synchronize(device: torch.device) -> None:
    """Wait until the device has run the work queued so far (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device) -> float:
    """The clock, read after the device has finished its queued kernels."""
    synchronize(device)
    return clock()


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(statistics.fmean(values)), (float(statistics.pstdev(values)) if len(values) > 1 else 0.0)


# --------------------------------------------------------------------------- RNG (tensors only)

def rng_state() -> dict:
    """RNG states as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, random and numpy: random augmentations then replay exactly after a resume."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))


# --------------------------------------------------------------------------- collectives

def sum_gradients(params: Sequence[nn.Parameter], env: dist.DistEnv) -> None:
    """Sum the gradients over ranks, one flat all-reduce per dtype (a rank without images adds zeros)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in groups.values():
        flat = dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), env)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view(g.shape))
            offset += g.numel()


def broadcast_state(model: nn.Module, env: dist.DistEnv) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP did when it wrapped the model)."""
    if not env.distributed:
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            work = t.detach().contiguous()
            tdist.broadcast(work, src=0)
            t.copy_(work)


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def average_running_stats(modules: Iterable[nn.Module], weight: float, env: dist.DistEnv) -> None:
    """Each rank estimated running statistics on its own images: make them agree on every rank.

    A weighted mean over ranks, ``weight`` being the train-mode forwards this rank ran since the last
    call: a rank that ran none (all its images unreadable) keeps no say, as it saw nothing.
    """
    if not env.distributed:
        return
    total = float(dist.all_reduce_sum(torch.tensor([float(weight)], dtype=torch.float64), env)[0])
    if total <= 0:
        return
    with torch.no_grad():
        for m in modules:
            for buf in (getattr(m, "running_mean", None), getattr(m, "running_var", None)):
                if buf is not None:
                    summed = dist.all_reduce_sum(buf.double() * float(weight), env)
                    buf.copy_((summed / total).to(buf.dtype))


# --------------------------------------------------------------------------- one step

@dataclass
class StepResult:
    """This rank's share of one global step; the ms are None when it had no image."""

    loss_sum: float = 0.0
    hits: int = 0
    n: int = 0
    ms: tuple[float, float, float] | None = None


@dataclass
class EpochTotals:
    loss_sum: float = 0.0
    hits: int = 0
    seen: int = 0
    steps: int = 0
    forwards: int = 0
    stopped: bool = False
    forward_ms: list[float] = field(default_factory=list)
    backward_ms: list[float] = field(default_factory=list)
    optimizer_ms: list[float] = field(default_factory=list)

    def add(self, r: StepResult) -> None:
        self.steps += 1
        self.loss_sum, self.hits, self.seen = self.loss_sum + r.loss_sum, self.hits + r.hits, self.seen + r.n
        if r.ms is not None:
            self.forwards += 1
            for values, ms in zip((self.forward_ms, self.backward_ms, self.optimizer_ms), r.ms):
                values.append(ms)

    def global_sums(self, env: dist.DistEnv) -> tuple[float, int, int]:
        """(summed loss, hits, images) over all ranks."""
        t = dist.all_reduce_sum(torch.tensor([self.loss_sum, self.hits, self.seen], dtype=torch.float64), env)
        return float(t[0]), int(t[1]), int(t[2])


class Stepper:
    """One global optimizer step; ``optimizer=None`` only runs the forward (batch-norm statistics).

    ``min_images``: a local batch with fewer images contributes nothing (batch-norm in train mode
    cannot normalise a single image).
    """

    def __init__(self, *, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer | None,
                 env: dist.DistEnv, precision: Precision, label_smoothing: float = 0.0, min_images: int = 1) -> None:
        self.params, self.optimizer, self.env, self.precision = list(params), optimizer, env, precision
        self.min_images = min_images
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=optimizer is not None and precision.amp
                                           and precision.dtype == torch.float16)
        self.loss_fn = nn.CrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)

    def __call__(self, run: Callable, x: torch.Tensor | None, y: torch.Tensor | None) -> StepResult:
        n_local = 0 if y is None or y.numel() < self.min_images else int(y.numel())
        n_global = dist.all_reduce_sum_int(n_local, self.env) if self.env.distributed else n_local
        if n_global == 0:
            return StepResult()
        device = self.env.device
        t0 = timed(device)
        loss = logits = None
        if n_local:
            with torch.set_grad_enabled(self.optimizer is not None), autocast(device, self.precision):
                logits = run(x)
                loss = self.loss_fn(logits.float(), y) / n_global
        t1 = timed(device)
        if self.optimizer is not None:
            self._backward(loss)
        t2 = timed(device)
        if self.optimizer is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        t3 = timed(device)
        if not n_local:
            return StepResult()
        hits = int((logits.detach().argmax(1) == y).sum())
        ms = ((t1 - t0) * MS_PER_S, (t2 - t1) * MS_PER_S, (t3 - t2) * MS_PER_S)
        return StepResult(float(loss.detach()) * n_global, hits, n_local, ms)

    def _backward(self, loss: torch.Tensor | None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            self.scaler.scale(loss).backward()
        elif self.scaler.is_enabled():
            self.scaler.scale(torch.zeros((), device=self.env.device))  # sets up the scale on a rank without images
        if self.env.distributed:  # summed while still scaled: an overflow on any rank skips the step everywhere
            sum_gradients(self.params, self.env)


def run_epoch(step: Stepper, run: Callable, batches: Iterable, *, pad_to: int = 0,
              on_step: Callable[[StepResult, EpochTotals], bool] | None = None) -> EpochTotals:
    """``step`` over ``batches`` ((x, y), or (None, None) for a batch without images).

    ``on_step`` runs after every batch (scheduler, progress, stop hooks) and stops the epoch by
    returning True. Under torchrun, empty steps follow until ``pad_to`` steps ran, so that every rank
    takes part in every collective.
    """
    totals = EpochTotals()
    for x, y in batches:
        result = step(run, x, y)
        totals.add(result)
        if on_step is not None and on_step(result, totals):
            totals.stopped = True
            return totals
    while step.env.distributed and totals.steps < pad_to:
        totals.add(step(run, None, None))
    return totals


# --------------------------------------------------------------------------- divergence


def diverged(loss: float | None, model: nn.Module | None) -> str | None:
    """What is not finite after a step or an epoch: the loss, or (``model`` given) the first weight or statistic
    in the model's order; None when everything is. Every rank gets the same answer (weights are equal, the loss
    all-reduced)."""
    if loss is not None and not np.isfinite(loss):
        return f"the loss is {loss}"
    floats = [(k, t) for k, t in (model.state_dict() if model is not None else {}).items() if t.is_floating_point()]
    # One reduction and one device sync for the whole model; names are looked up only when something is wrong.
    if not floats or bool(torch.stack([torch.isfinite(t).all() for _, t in floats]).all()):
        return None
    name = next(k for k, t in floats if not bool(torch.isfinite(t).all()))
    return f"the weights turned non-finite ({name} first)"


def stop_if_diverged(loss: float | None, model: nn.Module | None, *, epoch: int, lr: float,
                     what: str = "training") -> None:
    """One line naming the epoch and the learning rate when the run went non-finite: a model of NaNs must not
    be saved, exported or evaluated as if it were a result."""
    cause = diverged(loss, model)
    if cause is not None:
        raise UsageError(f"{what} diverged in epoch {epoch + 1} at learning rate {lr:g}: {cause}; nothing of this "
                         "epoch was saved: try a smaller --lr")


#: The probe that checks a model's outputs after an epoch: a few seeded random images at the loop's size.
PROBE_IMAGES = 2
PROBE_SEED = 0


def stop_if_outputs_diverged(model: nn.Module, size: int, *, epoch: int, lr: float, what: str = "training") -> None:
    """One line when the model's outputs are not finite on a seeded probe batch: a step at an absurd learning
    rate can leave every weight finite yet around 1e29, so that the loss of the step was finite and the next
    forward overflows; such a model must not be saved or exported either. Every rank gets the same answer."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.randn(PROBE_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(PROBE_SEED)).to(device)
    was_training = model.training
    model.eval()
    try:
        layer = first_non_finite_output(model, x)
    finally:
        model.train(was_training)
    if layer is not None:
        raise UsageError(f"{what} diverged in epoch {epoch + 1} at learning rate {lr:g}: the model's outputs are not "
                         f"finite ({layer} first); nothing of this epoch was saved: try a smaller --lr")


# --------------------------------------------------------------------------- checkpoint state

@dataclass(frozen=True)
class StateLayout:
    """Key names of a loop's state file (those each loop's files have always used)."""

    weights: str
    settings: str


@dataclass
class LoopState:
    """What a loop saves after each epoch, and reads back to resume."""

    epoch: int
    weights: dict[str, torch.Tensor]
    settings: dict
    log: list[dict] = field(default_factory=list)
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None
    rng: dict | None = None
    before: dict | None = None

    def save(self, path: Path, layout: StateLayout) -> None:
        save_training_state({"version": STATE_VERSION, "epoch": self.epoch, layout.weights: self.weights,
                             layout.settings: self.settings, "log": self.log, "optimizer": self.optimizer,
                             "scheduler": self.scheduler, "scaler": self.scaler, "rng": self.rng,
                             "before": self.before}, path)

    @classmethod
    def load(cls, path: Path, layout: StateLayout) -> "LoopState":
        raw = load_training_state(path)
        try:
            saved = schema.parse(SavedFields, raw)
        except schema.SchemaError as exc:
            raise UsageError(f"cannot resume from {path}: not a training state ({exc})") from None
        return cls(epoch=saved.epoch, weights=raw[layout.weights], settings=dict(raw.get(layout.settings) or {}),
                   log=saved.log, optimizer=saved.optimizer, scheduler=saved.scheduler, scaler=saved.scaler,
                   rng=saved.rng, before=saved.before)


@dataclass
class SavedFields:
    """A state file's fields under the names every loop's file shares (the weights and the settings are under
    the names of the loop's ``StateLayout``). Each part a loop saves is a dict or None: a part of another type
    reads as None, as a part never saved."""

    epoch: int
    log: list[dict] = field(default_factory=list)
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None
    rng: dict | None = None
    before: dict | None = None


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def check_resume(saved: dict, current: dict, keys: Iterable[str], path: Path) -> None:
    """Refuse to continue a run whose state was written with other ``keys`` (one line naming each)."""
    diff = [k for k in keys if k in saved and k in current and _plain(saved[k]) != _plain(current[k])]
    if diff:
        what = ", ".join(f"{k}={saved[k]!r} (now {current[k]!r})" for k in diff)
        raise UsageError(f"cannot resume {path}: it was written with other settings: {what}; "
                         "use the same flags, or another --out")


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: Path, *, complete: bool) -> None:
    """Copy a saved state into ``model``; a state that does not fit is a one-line error naming the tensor.

    ``complete``: the state must hold every tensor of the model (a whole-model checkpoint).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(weights)) if complete else []
    for k, v in weights.items():
        if k not in own or own[k].shape != v.shape:
            shape = "not in this model" if k not in own else f"{tuple(v.shape)} vs {tuple(own[k].shape)} here"
            raise UsageError(f"cannot resume {path}: it does not fit this model ({k}: {shape}); "
                             "use the model it was written for, or another --out")
    if missing:
        raise UsageError(f"cannot resume {path}: it does not fit this model ({missing[0]} missing); "
                         "use the model it was written for, or another --out")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v)
