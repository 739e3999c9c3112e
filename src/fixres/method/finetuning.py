"""FixRes fine-tuning at the test resolution (paper section 4.2, tables 6-8), fast and resumable.

After switching from train_size to test_size, only the last layers are adapted: the classifier and
the batch-norm before the global pooling (``--parts classifier,bn``), optionally the last stage, on
the training images pre-processed at test_size ("test DA" by default, as in the paper). Frozen
modules stay in eval mode; adapted batch-norms run in train mode, so their statistics are
re-estimated at the new resolution. Defaults follow the paper: SGD, momentum 0.9, weight decay
1e-4, learning rate 0.008 for a batch of 512 scaled linearly with the batch size, divided by 10
half-way (the paper fine-tunes 60 epochs with the decay at 30): ``fixres.method.tunerecipe``.

**Frozen-prefix cache.** With the deterministic test DA, everything before the first adapted module
computes the same activations every epoch: they are computed once (``fixres.method.tunecache``) and each epoch
only runs the model from the cut on (``fixres.method.prefix``). Random augmentations (test2, train) always use
the full forward.

The step (loss over the global image count, summed gradients under torchrun, a rank without images
contributing nothing, device-synchronised timing, autocast + scaler) is ``fixres.method.loop``'s, shared
with ``fixres.method.train``.

Resumable: the adapted modules' weights and statistics, the optimizer, the loss scaler and the epoch
are saved atomically after each epoch (``finetune_state.pt``, a ``loop.LoopState``); epoch e always
visits the images in the same order (seeded by seed and e), so an interrupted run resumed from its
last state ends with the same weights as an uninterrupted one. A state written with other settings
(pre-processing, test size, parts, augmentation, schedule, world size ...) is refused.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fixres.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CACHE_BUDGET_MB,
    DEFAULT_FINETUNE_EPOCHS,
    DEFAULT_PARTS,
    DataConfig,
)
from fixres.data.folders import FolderIndex
from fixres.data.loaders import default_workers, make_loader
from fixres.data.streams import ShardStream
from fixres.data.transforms import build_transform
from fixres.errors import FixresError, UsageError
from fixres.io.atomic import append_jsonl, write_json, write_text
from fixres.method import loop
from fixres.method.loop import seed_everything
from fixres.method.prefix import PrefixCache, Suffix, cached_top1, image_loader
from fixres.method.shardepochs import DEFAULT_SHUFFLE_BUFFER, count_stream, training_order
from fixres.method.streaming import evaluate_at
from fixres.method.tunecache import build_cache
from fixres.method.tunerecipe import (
    EPOCH_SEED_STRIDE,
    LR_DECAY,
    MOMENTUM,
    PAPER_BATCH,
    PAPER_LR,
    RANK_SEED_STRIDE,
    WEIGHT_DECAY,
    _adapted_state,
    _check_arguments,
    _epoch_batches,
    _set_modes,
    decay_step,
)
from fixres.models.parts import AdaptedParts, select_parts
from fixres.models.structure import find_parts
from fixres.runtime import progress as prog
from fixres.runtime.dist import DistEnv, all_gather_objects, barrier, shard_indices
from fixres.runtime.engine import Precision, precision_for, prepare, to_device

STATE_NAME = "finetune_state.pt"
LOG_NAME = "finetune_log.jsonl"
RESULT_NAME = "finetune.json"
STATE_LAYOUT = loop.StateLayout(weights="adapted", settings="config")


class FinetuneInterrupted(FixresError):
    """Raised by the ``stop_after_batches`` test hook (simulates a kill mid-run)."""


def default_lr(batch_size: int) -> float:
    """The paper's 0.008 per 512 images, scaled linearly with the batch size."""
    return PAPER_LR * batch_size / PAPER_BATCH


# --------------------------------------------------------------------------- fine-tuning

def _samples(samples) -> list | ShardStream:
    if isinstance(samples, ShardStream):
        return samples
    if isinstance(samples, FolderIndex):
        return list(samples.samples)
    return list(samples) if samples is not None else []


@dataclass
class _Tune:
    """One fine-tuning run while it runs: what every epoch needs."""

    model: nn.Module
    env: DistEnv
    precision: Precision
    cfg: DataConfig
    sel: AdaptedParts
    chain: list[str]
    settings: dict
    out_dir: Path
    full_train: list | ShardStream
    train_samples: list | ShardStream  # this rank's part of the indexed photos, or the streamed shards
    val_samples: list | ShardStream
    local_batch: int
    steps_per_epoch: int
    workers: int
    progress: bool
    epoch_eval: bool
    stop_after_batches: int | None
    transform: object = None
    structure_dict: dict = field(default_factory=dict)
    stepper: loop.Stepper | None = None
    scheduler: torch.optim.lr_scheduler.StepLR | None = None
    start_epoch: int = 0
    log: list[dict] = field(default_factory=list)
    before: dict | None = None
    suffix: Suffix | None = None
    train_cache: PrefixCache | None = None
    val_cache: PrefixCache | None = None
    cache_info: dict = field(default_factory=lambda: {"used": False, "reason": ""})
    shared: object = None  # method.cutcache.FitCaches
    skipped: list[dict] = field(default_factory=list)
    t_cache: float = 0.0
    t_epochs: float = 0.0
    times: loop.EpochTotals = field(default_factory=loop.EpochTotals)
    batches_run: int = 0
    rows: torch.Tensor | None = None  # streamed shards' cache rows in the indexed order (tunecache), -1: unreadable
    reader: tuple | None = None  # streamed shards without the cache: (dataset, sampler) of every epoch

    @property
    def streamed(self) -> bool:
        return isinstance(self.train_samples, ShardStream)

    @property
    def n_local(self) -> int:
        """The photos this rank's epochs draw their batches from."""
        return len(self.rows) if self.rows is not None else len(self.train_samples)

    @property
    def state_path(self) -> Path:
        return self.out_dir / STATE_NAME

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_NAME

    def status(self, msg: str) -> None:
        prog.status(msg, enabled=self.progress)

    def eval_kw(self, progress: bool | None = None) -> dict:
        return dict(test_size=self.settings["test_size"], batch_size=self.settings["batch_size"], env=self.env,
                    precision=self.precision, workers=self.workers,
                    progress=self.progress if progress is None else progress)


def finetune(model: nn.Module, train_samples, val_samples, cfg: DataConfig, *, test_size: int,
             parts: str | Sequence[str] = DEFAULT_PARTS, augment: str = "test", epochs: int = DEFAULT_FINETUNE_EPOCHS,
             lr: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE, cache: bool = True,
             out_dir: str | Path, resume: bool = False, env: DistEnv | None = None,
             precision: Precision | None = None, seed: int = 0, workers: int | None = None,
             progress: bool = True, evaluate_before: bool = True, evaluate_after: bool = True,
             epoch_eval: bool = False, cache_budget_mb: float = DEFAULT_CACHE_BUDGET_MB,
             stop_after_batches: int | None = None, shared=None,
             shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> dict:
    """Fine-tune the ``parts`` of ``model`` at ``test_size`` on ``train_samples``; evaluate on ``val_samples``.

    Leaves the adapted weights in ``model`` (eval mode). Writes ``out_dir/finetune_state.pt`` after
    every epoch (``resume=True`` continues from it, and refuses a state written with other settings),
    ``out_dir/finetune_log.jsonl`` (one line per epoch) and ``out_dir/finetune.json`` (the result).
    ``stop_after_batches`` raises ``FinetuneInterrupted`` after that many batches of this call (to
    test resuming). ``shared`` (a ``method.cutcache.FitCaches``) hands over the frozen-prefix cache of an earlier
    fine-tuning of the same photos, size and weights before the cut, and keeps this one's for later ones.
    ``train_samples`` / ``val_samples`` may be ``ShardStream``s, read front to back (``method.tunecache``; without
    the cache each epoch as ``train --stream`` reads, through a shuffle buffer of ``shuffle_buffer`` photos).

    Returns before/after accuracy at test_size (top-1 with fold std), the per-epoch log, timing (ms
    per batch forward and backward, wall seconds) and whether the activation cache was used.
    """
    t_start = time.perf_counter()
    env = env or DistEnv()
    lr = default_lr(batch_size) if lr is None else float(lr)
    _check_arguments(test_size=test_size, augment=augment, epochs=epochs, batch_size=batch_size, lr=lr, env=env)
    t = _setup(model, _samples(train_samples), _samples(val_samples), cfg, parts=parts, env=env,
               precision=precision or precision_for(env.device), out_dir=Path(out_dir),
               workers=default_workers() if workers is None else workers, progress=progress and env.is_main,
               epoch_eval=epoch_eval, stop_after_batches=stop_after_batches,
               settings={"test_size": test_size, "augment": augment, "epochs": epochs, "lr": lr,
                         "batch_size": batch_size, "seed": seed, "shuffle_buffer": shuffle_buffer})
    t.shared = shared
    grad_flags = [p.requires_grad for p in t.model.parameters()]
    state = _resume(t, resume, evaluate_before=evaluate_before)
    _make_optimizer(t, state)
    t0 = time.perf_counter()
    try:
        if epochs > t.start_epoch:
            build_cache(t, enabled=cache, budget_mb=cache_budget_mb)
        for epoch in range(t.start_epoch, epochs):
            _tune_epoch(t, epoch)
    finally:
        _release(t, grad_flags)
    t.t_epochs = time.perf_counter() - t0 - t.t_cache
    if env.distributed:
        t.skipped = [s for part in all_gather_objects(t.skipped, env) for s in part]
    after = None
    if evaluate_after and t.val_samples:
        after = evaluate_at(t.model, t.val_samples, cfg, **t.eval_kw())
        t.status(f"after fine-tuning: top-1 {after['top1']:.2f}% at {test_size}px")
    result = _result(t, after, t_start=t_start)
    if env.is_main:
        write_json(t.out_dir / RESULT_NAME, result)
    return result


def _release(t: _Tune, grad_flags: list[bool]) -> None:
    """Close the caches no later fine-tuning takes over, and hand the model back as it was given, in eval mode
    (also after an interruption)."""
    for c in (t.train_cache, t.val_cache):
        if c is not None and not (t.shared is not None and t.shared.holds(c)):
            c.close()
    t.model.eval()
    for p, flag in zip(t.model.parameters(), grad_flags):
        p.requires_grad_(flag)


def _setup(model: nn.Module, train_samples, val_samples, cfg: DataConfig, *, parts, env: DistEnv,
           precision: Precision, out_dir: Path, workers: int, progress: bool, epoch_eval: bool,
           stop_after_batches: int | None, settings: dict) -> _Tune:
    streamed = isinstance(train_samples, ShardStream)
    if streamed and len(train_samples.shards) < env.world_size:
        raise UsageError(f"{train_samples.spec}: {len(train_samples.shards)} shard(s) for {env.world_size} processes; "
                         "streamed fine-tuning reads whole shards, at least one per process")
    n_total = count_stream(train_samples, env, progress=progress) if streamed else len(train_samples)
    if not n_total:
        raise UsageError("no training images to fine-tune on")
    # Under torchrun each rank owns a fixed shard of the training images (so it caches only those) and
    # contributes batch_size / world_size images to every global batch; gradients are summed across ranks.
    # Streamed shards are read whole by one rank each (method.tunecache, method.shardepochs).
    local_batch = settings["batch_size"] // env.world_size if env.distributed else settings["batch_size"]
    shard = ([train_samples[i] for i in shard_indices(n_total, env.rank, env.world_size)]
             if env.distributed and not streamed else train_samples)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = prepare(model, env.device, precision)
    structure = find_parts(model)
    sel = select_parts(model, structure, parts)
    # Everything that changes what a resumed run would compute: a state written otherwise is refused.
    settings = {**settings, "parts": sel.parts, "n_train": n_total, "stream": streamed, "world_size": env.world_size,
                "mean": list(cfg.mean), "std": list(cfg.std), "interpolation": cfg.interpolation,
                "crop_ratio": cfg.crop_ratio}
    return _Tune(model=model, env=env, precision=precision, cfg=cfg, sel=sel, chain=list(structure.chain),
                 settings=settings, out_dir=out_dir, full_train=train_samples, train_samples=shard,
                 val_samples=val_samples, local_batch=local_batch,
                 steps_per_epoch=math.ceil(math.ceil(n_total / env.world_size) / local_batch), workers=workers,
                 progress=progress, epoch_eval=epoch_eval, stop_after_batches=stop_after_batches,
                 transform=build_transform(settings["augment"], size=settings["test_size"], cfg=cfg),
                 structure_dict=structure.to_dict())


def _resume(t: _Tune, resume: bool, *, evaluate_before: bool) -> loop.LoopState | None:
    """Read the saved state (checked against this run's settings); measure "before" if still unknown."""
    state = None
    if resume and t.state_path.exists():
        state = loop.LoopState.load(t.state_path, STATE_LAYOUT)
        loop.check_resume(state.settings, t.settings, t.settings.keys(), t.state_path)
    elif resume:
        t.status(f"nothing to resume in {t.out_dir}: starting from scratch")
    t.before = state.before if state is not None else None
    if t.before is None and evaluate_before and t.val_samples:
        # on the model as given, before any saved adaptation is copied into it
        t.before = evaluate_at(t.model, t.val_samples, t.cfg, **t.eval_kw())
        t.status(f"before fine-tuning: top-1 {t.before['top1']:.2f}% at {t.settings['test_size']}px")
    if state is not None:
        loop.load_weights(t.model, state.weights, t.state_path, complete=False)
        t.start_epoch, t.log = state.epoch, list(state.log)
        t.status(f"resuming from {t.state_path} after epoch {t.start_epoch}/{t.settings['epochs']}")
        if t.env.is_main:  # the log file keeps exactly the finished epochs (an interrupted epoch is redone)
            write_text(t.log_path, "".join(json.dumps(r) + "\n" for r in t.log))
    elif t.env.is_main and t.log_path.exists():
        t.log_path.unlink()
    barrier(t.env)
    return state


def _make_optimizer(t: _Tune, state: loop.LoopState | None) -> None:
    _set_modes(t.model, t.sel)
    params = [p for p in t.model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(params, lr=t.settings["lr"], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
                 if params else None)
    if optimizer is not None:
        t.scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=decay_step(t.settings["epochs"]),
                                                      gamma=LR_DECAY)
    t.stepper = loop.Stepper(params=params, optimizer=optimizer, env=t.env, precision=t.precision,
                             min_images=2 if t.sel.stats else 1)
    if state is None:
        return
    if optimizer is not None and state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
        t.scheduler.load_state_dict(state.scheduler)
    if state.scaler and t.stepper.scaler.is_enabled():
        t.stepper.scaler.load_state_dict(state.scaler)


def _batches(t: _Tune, batches: list[list[int]], epoch: int, pbar):
    """(x, y) on the device per batch, from the cache or the images; (None, None) for a batch without images."""
    device = t.env.device
    if t.suffix is not None:
        for b in batches:
            pbar.update(len(b))
            idx = torch.tensor(b)
            if t.rows is not None:
                idx = t.rows[idx]
                idx = idx[idx >= 0]
            idx = idx[t.train_cache.valid[idx]]
            if not idx.numel():
                yield None, None
                continue
            x, y = t.train_cache.get(idx)
            yield x.to(device), y.to(device)
        return
    for item in (_streamed_loader(t, epoch) if t.streamed else
                 image_loader(t.train_samples, t.transform, batches, t.workers)):
        if epoch == t.start_epoch:
            t.skipped.extend(s.to_dict() for s in item.skipped)
        pbar.update(len(item) + len(item.skipped))
        if item.inputs is None:
            yield None, None
        else:
            yield to_device(item.inputs, device, t.precision), item.labels.to(device)


def _streamed_loader(t: _Tune, epoch: int):
    """Epoch ``epoch`` of the streamed shards read again (no cache): ``train --stream``'s order, one copy each."""
    s = t.settings
    if t.reader is None:
        hp = {"repeats": 1, "seed": s["seed"], "epoch_length_factor": 1.0, "shuffle_buffer": s["shuffle_buffer"]}
        t.reader = training_order(t.train_samples, s["n_train"], t.transform, hp, t.env)
    dataset, sampler = t.reader
    sampler.set_epoch(epoch)
    yield from make_loader(dataset, batch_size=t.local_batch, sampler=sampler, workers=t.workers)
    if epoch == t.start_epoch:
        t.skipped.extend({"path": ref, "reason": why} for ref, why in sampler.left_out.items())


def _tune_epoch(t: _Tune, epoch: int) -> None:
    s, env = t.settings, t.env
    _set_modes(t.model, t.sel)
    rank_seed = s["seed"] + RANK_SEED_STRIDE * env.rank  # rank 0 = the single-process run
    # random augmentations draw from the global generators: fix them per epoch so a resume replays them
    seed_everything(rank_seed * EPOCH_SEED_STRIDE + epoch)
    batches = _epoch_batches(t.n_local, t.local_batch, rank_seed, epoch) if not t.streamed or t.suffix else []
    t_ep = time.perf_counter()

    def after_step(_result, _totals) -> bool:
        t.batches_run += 1
        if t.stop_after_batches is not None and t.batches_run >= t.stop_after_batches:
            raise FinetuneInterrupted(f"stopped after {t.batches_run} batches (test hook)")
        return False

    photos = sum(len(b) for b in batches) if batches else math.ceil(s["n_train"] / env.world_size)
    pbar = prog.bar(photos, f"fine-tune epoch {epoch + 1}/{s['epochs']}", enabled=t.progress)
    try:
        totals = loop.run_epoch(t.stepper, t.suffix if t.suffix is not None else t.model,
                                _batches(t, batches, epoch, pbar), pad_to=t.steps_per_epoch, on_step=after_step)
    finally:
        pbar.close()
    if t.scheduler is not None:
        t.scheduler.step()
    loop.average_running_stats([t.model.get_submodule(n) for n in t.sel.stats], totals.forwards, env)
    for name in ("forward_ms", "backward_ms", "optimizer_ms"):
        getattr(t.times, name).extend(getattr(totals, name))
    loss_sum, hits, seen = totals.global_sums(env)
    loop.stop_if_diverged(loss_sum / seen if seen else None, t.model, epoch=epoch, lr=s["lr"], what="fine-tuning")
    loop.stop_if_outputs_diverged(t.model, s["test_size"], epoch=epoch, lr=s["lr"], what="fine-tuning")
    record = {"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "train_top1": 100 * hits / max(1, seen),
              "lr": s["lr"] * LR_DECAY ** (epoch // decay_step(s["epochs"])), "images": int(seen),
              "seconds": round(time.perf_counter() - t_ep, 3), "cached": t.suffix is not None}
    if t.epoch_eval and t.val_samples:
        record["val_top1"] = _epoch_top1(t)
    t.log.append(record)
    _save_epoch(t, epoch, record)
    t.status(f"epoch {epoch + 1}/{s['epochs']}: loss {record['loss']:.4f}, train top-1 {record['train_top1']:.1f}%"
             + (f", val top-1 {record['val_top1']:.2f}%" if "val_top1" in record else ""))


def _epoch_top1(t: _Tune) -> float:
    t.model.eval()
    if t.val_cache is not None:
        return cached_top1(t.suffix, t.val_cache, batch_size=t.settings["batch_size"], device=t.env.device,
                            precision=t.precision)
    return evaluate_at(t.model, t.val_samples, t.cfg, **t.eval_kw(progress=False))["top1"]


def _save_epoch(t: _Tune, epoch: int, record: dict) -> None:
    if t.env.is_main:
        append_jsonl(t.log_path, record)
        opt, scaler = t.stepper.optimizer, t.stepper.scaler
        loop.LoopState(epoch=epoch + 1, weights=_adapted_state(t.model, t.sel), settings=t.settings, log=t.log,
                       optimizer=opt.state_dict() if opt is not None else None,
                       scheduler=t.scheduler.state_dict() if t.scheduler is not None else None,
                       scaler=scaler.state_dict() if scaler.is_enabled() else None,
                       before=t.before).save(t.state_path, STATE_LAYOUT)
    barrier(t.env)


def _result(t: _Tune, after: dict | None, *, t_start: float) -> dict:
    def stat(v):
        return {"mean": float(np.mean(v)), "std": float(np.std(v))} if v else None

    s, sel = t.settings, t.sel
    wall = time.perf_counter() - t_start
    return {
        "test_size": s["test_size"], "train_size": t.cfg.train_size, "crop_ratio": t.cfg.crop_ratio,
        "parts": sel.parts, "trainable": sel.trainable, "stats_modules": sel.stats,
        "structure": t.structure_dict, "augment": s["augment"], "epochs": s["epochs"],
        "resumed_from_epoch": t.start_epoch, "lr": s["lr"], "batch_size": s["batch_size"], "momentum": MOMENTUM,
        "weight_decay": WEIGHT_DECAY, "decay_every": decay_step(s["epochs"]), "seed": s["seed"],
        "precision": t.precision.describe(), "before": t.before, "after": after, "log": t.log, "cache": t.cache_info,
        "timing": {"ms_per_batch_forward": stat(t.times.forward_ms), "ms_per_batch_backward": stat(t.times.backward_ms),
                   "ms_per_batch_optimizer": stat(t.times.optimizer_ms), "batches": t.batches_run,
                   "cache_build_s": round(t.t_cache, 3), "epochs_s": round(t.t_epochs, 3),
                   "finetune_s": round(t.t_cache + t.t_epochs, 3), "wall_s": round(wall, 3)},
        "skipped": t.skipped, "state_path": str(t.state_path), "log_path": str(t.log_path),
        "trainable_parameters": sum(p.numel() for n in sel.trainable for p in t.model.get_submodule(n).parameters()),
    }
