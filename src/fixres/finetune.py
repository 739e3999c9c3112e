"""FixRes fine-tuning at the test resolution (paper section 4.2, tables 6-8), fast and resumable.

After switching from train_size to test_size, only the last layers are adapted: the classifier and
the batch-norm before the global pooling (``--parts classifier,bn``), optionally the last stage, on
the training images pre-processed at test_size ("test DA" by default, as in the paper). Frozen
modules stay in eval mode; adapted batch-norms run in train mode, so their statistics are
re-estimated at the new resolution. Defaults follow the paper: SGD, momentum 0.9, weight decay
1e-4, learning rate 0.008 for a batch of 512 scaled linearly with the batch size, divided by 10
half-way (the paper fine-tunes 60 epochs with the decay at 30).

**Frozen-prefix cache.** With the deterministic test DA, everything before the first adapted module
computes the same activations every epoch. They are computed once (one decode per image), kept in
RAM (or on disk in fp16 beyond a memory budget), and each epoch only runs the model from the cut
point on. The cut is at a module boundary of the model's own sequential structure (the top-level
children in execution order, descending into ``nn.Sequential`` containers), so the "rest of the
model" is exactly the modules the forward runs after it; the suffix is checked against the full
forward on a sample before it is trusted, and the uncached path is used when it does not match.
Random augmentations (test2, train) always use the full forward.

Resumable: the adapted modules' weights and statistics, the optimizer and the epoch are saved
atomically after each epoch (``finetune_state.pt``); epoch e always visits the images in the same
order (seeded by seed and e), so an interrupted run resumed from its last state ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fixres import progress as prog
from fixres.atomic import append_jsonl, write_json, write_text
from fixres.checkpoint import load_training_state, save_training_state
from fixres.config import DEFAULT_PARTS, FINETUNE_AUGMENTATIONS, DataConfig, validate_size
from fixres.data import FolderIndex, ImageDataset, collate, default_workers
from fixres.dist import DistEnv, all_gather_objects, all_reduce_sum, barrier, shard_indices
from fixres.engine import Precision, SingleThreaded, autocast, inference_precision, precision_for, prepare, to_device
from fixres.errors import FixresError, UsageError
from fixres.hooks import hooked
from fixres.structure import Selection, find_parts, select_parts
from fixres.transforms import build_transform

#: The paper's fine-tuning rate (section 5): 0.008 for a batch of 512, scaled linearly.
PAPER_LR = 0.008
PAPER_BATCH = 512
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
#: Step decay: the rate is divided by LR_DECAY every ``epochs * DECAY_AT`` epochs (paper: 60 epochs, /10 at 30).
LR_DECAY = 0.1
DECAY_AT = 0.5
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 64
DEFAULT_CACHE_BUDGET_MB = 2048
#: Per-epoch seeds are seed * EPOCH_SEED_STRIDE + epoch: distinct for any run shorter than this many epochs.
EPOCH_SEED_STRIDE = 100_003
#: Seeds of ranks > 0 are offset by multiples of this, far from any seed a user would pick.
RANK_SEED_STRIDE = 1_000_003
STATE_NAME = "finetune_state.pt"
LOG_NAME = "finetune_log.jsonl"
RESULT_NAME = "finetune.json"
#: Relative tolerance when checking the suffix runner against the full forward (fp32).
SUFFIX_RTOL = 1e-4
SUFFIX_ATOL = 1e-4


class FinetuneInterrupted(FixresError):
    """Raised by the ``stop_after_batches`` test hook (simulates a kill mid-run)."""


def default_lr(batch_size: int) -> float:
    """The paper's 0.008 per 512 images, scaled linearly with the batch size."""
    return PAPER_LR * batch_size / PAPER_BATCH


def decay_step(epochs: int) -> int:
    return max(1, int(round(epochs * DECAY_AT)))



# --------------------------------------------------------------------------- running the model from a cut

class _StopForward(Exception):
    pass


@dataclass
class Suffix:
    """The model from a cut point on: ``steps`` run in order on the activation entering ``steps[0]``."""

    cut: str
    steps: list[tuple[str, nn.Module, int]]  # (name, module, input ndim in the full forward)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for _name, module, ndim in self.steps:
            if x.dim() != ndim:
                if ndim == 2 and x.dim() == 4 and x.shape[2] * x.shape[3] == 1:
                    x = x.flatten(1)  # the functional torch.flatten between pooling and classifier
                else:
                    raise FixresError(f"cannot run the model from {self.cut}: {_name} expects {ndim}-D input")
            x = module(x)
        return x


def plan_suffix(model: nn.Module, chain: Sequence[str], first_adapted: Sequence[str], *,
                ndims: dict[str, int]) -> Suffix | None:
    """Cut at the chain element containing the first adapted module (descending into plain Sequentials)."""
    def contains(name: str) -> bool:
        return any(a == name or a.startswith(name + ".") for a in first_adapted)

    steps: list[str] = []
    names = list(chain)
    while True:
        k = next((i for i, n in enumerate(names) if contains(n)), None)
        if k is None:
            return None
        head = names[k]
        module = model.get_submodule(head)
        rest = names[k + 1:]
        is_plain = isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
        if is_plain and head not in first_adapted and len(module) > 0:
            steps = rest + steps
            names = [f"{head}.{c}" for c, _ in module.named_children()]
            continue
        steps = [head] + rest + steps
        break
    if any(n not in ndims for n in steps):
        return None
    return Suffix(cut=steps[0], steps=[(n, model.get_submodule(n), ndims[n]) for n in steps])


def _capture_cut(model: nn.Module, suffix: Suffix, x: torch.Tensor) -> torch.Tensor:
    """Run the model's own forward up to the cut point and return the activation entering it."""
    box: list[torch.Tensor] = []

    def hook(mod, args):
        box.append(args[0])
        raise _StopForward

    with hooked([(suffix.steps[0][1], "pre", hook)]):
        try:
            model(x)
        except _StopForward:
            pass
    if not box:
        raise FixresError(f"the forward pass never reached {suffix.cut}")
    return box[0]


def _trace_ndims(model: nn.Module, size: int, device) -> dict[str, int]:
    from fixres.hooks import trace_calls
    x = torch.zeros(2, 3, size, size, device=device)
    with torch.no_grad(), trace_calls(model) as calls:
        model(x)
    return {c.name: len(c.in_shape) for c in calls if c.in_shape is not None}


def build_suffix(model: nn.Module, chain: Sequence[str], first_adapted: Sequence[str], sample: torch.Tensor
                 ) -> tuple[Suffix | None, str]:
    """A verified suffix runner, or (None, reason). ``sample``: a few real inputs at the test size (fp32)."""
    was = model.training
    model.eval()
    try:
        ndims = _trace_ndims(model, sample.shape[-1], sample.device)
        suffix = plan_suffix(model, chain, first_adapted, ndims=ndims)
        if suffix is None:
            return None, "no module boundary found before the adapted modules"
        with torch.no_grad():
            full = model(sample)
            try:
                part = suffix(_capture_cut(model, suffix, sample))
            except FixresError as exc:
                return None, str(exc)
        if part.shape != full.shape or not torch.allclose(part, full, rtol=SUFFIX_RTOL, atol=SUFFIX_ATOL):
            return None, f"running the model from {suffix.cut} does not reproduce its forward"
        return suffix, f"cut at {suffix.cut}"
    finally:
        model.train(was)


# --------------------------------------------------------------------------- the activation cache

class PrefixCache:
    """Activations entering the cut point, one row per image (in RAM, or an fp16 memmap on disk)."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, *, budget_bytes: int,
                 folder: Path | None) -> None:
        self.n = n
        self.shape = shape
        self.dtype = dtype
        self.valid = torch.zeros(n, dtype=torch.bool)
        self.labels = torch.full((n,), -1, dtype=torch.long)
        per = int(np.prod(shape))
        self.bytes = n * per * torch.tensor([], dtype=dtype).element_size()
        self.on_disk = self.bytes > budget_bytes and folder is not None
        if self.on_disk:
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / "prefix_cache.f16"
            self.store = np.lib.format.open_memmap(str(self.path), mode="w+", dtype=np.float16, shape=(n, *shape))
            self.bytes = n * per * 2
        else:
            self.path = None
            self.store = torch.empty((n, *shape), dtype=dtype)

    def put(self, idx: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> None:
        x = x.detach().to("cpu")
        if self.on_disk:
            self.store[idx.numpy()] = x.float().numpy().astype(np.float16)
        else:
            self.store[idx] = x.to(self.dtype)
        self.valid[idx] = True
        self.labels[idx] = labels

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on_disk:
            x = torch.from_numpy(np.ascontiguousarray(self.store[np.sort(idx.numpy())]))
            order = torch.argsort(torch.argsort(idx))
            x = x[order].to(self.dtype)
        else:
            x = self.store[idx]
        return x, self.labels[idx]

    def close(self) -> None:
        if self.on_disk:
            del self.store
            if self.path is not None and self.path.exists():
                self.path.unlink()


def _loader(samples, transform, batches: list[list[int]], workers: int) -> DataLoader:
    ds = ImageDataset(samples, SingleThreaded(transform) if workers == 0 else transform)
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate, persistent_workers=False)


def _fill_cache(model, suffix, samples, transform, *, batch_size, workers, device, precision, budget_bytes,
                folder, progress, desc) -> tuple[PrefixCache | None, list[dict]]:
    n = len(samples)
    batches = [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
    cache = None
    skipped: list[dict] = []
    bar = prog.bar(n, desc, enabled=progress)
    try:
        with torch.no_grad():
            for batch in _loader(samples, transform, batches, workers):
                skipped.extend(s.to_dict() for s in batch.skipped)
                bar.update(len(batch) + len(batch.skipped))
                if batch.inputs is None:
                    continue
                x = to_device(batch.inputs, device, precision)
                with autocast(device, precision):
                    a = _capture_cut(model, suffix, x)
                if cache is None:
                    cache = PrefixCache(n, tuple(a.shape[1:]), a.dtype, budget_bytes=budget_bytes, folder=folder)
                cache.put(batch.indices, a, batch.labels)
    finally:
        bar.close()
    return cache, skipped


# --------------------------------------------------------------------------- evaluation

def evaluate_at(model: nn.Module, samples, cfg: DataConfig, *, test_size: int, batch_size: int,
                env: DistEnv, precision: Precision, workers: int | None, progress: bool) -> dict:
    """top-1 (and fold std) of ``model`` at ``test_size`` with the test pre-processing (fixres.evaluate).

    Measured at the inference precision, so the number is the one ``fixres eval`` gives for the export.
    """
    from fixres.evaluate import evaluate
    res = evaluate(model, samples, cfg, test_sizes=[test_size], crop_ratios=[cfg.crop_ratio],
                   batch_size=batch_size, env=env, precision=inference_precision(env.device, precision.amp),
                   workers=workers, progress=progress, per_class=False)
    row = res["rows"][0]
    return {"test_size": test_size, "top1": row["top1"], "top1_std": row["top1_std"], "top5": row.get("top5"),
            "loss": row.get("loss"), "n": row["n"], "skipped": len(res.get("skipped", []))}


def _cached_top1(suffix: Suffix, cache: PrefixCache, *, batch_size: int, device, precision) -> float:
    hits = total = 0
    rows = torch.nonzero(cache.valid).flatten()
    with torch.no_grad():
        for i in range(0, rows.numel(), batch_size):
            idx = rows[i:i + batch_size]
            x, y = cache.get(idx)
            with autocast(device, precision):
                logits = suffix(x.to(device))
            hits += int((logits.float().argmax(1).cpu() == y).sum())
            total += idx.numel()
    return 100.0 * hits / max(1, total)


# --------------------------------------------------------------------------- fine-tuning

def _set_modes(model: nn.Module, sel: Selection) -> None:
    """Frozen modules in eval mode (and no gradient); adapted batch-norms in train mode."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for name in sel.trainable:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    for name in sel.stats:
        model.get_submodule(name).train()


def _adapted_state(model: nn.Module, sel: Selection) -> dict[str, torch.Tensor]:
    """State (parameters and buffers) of every adapted module: all that fine-tuning changes."""
    sd = model.state_dict()
    prefixes = tuple(n + "." for n in set(sel.trainable) | set(sel.stats))
    return {k: v.detach().cpu().clone() for k, v in sd.items() if k.startswith(prefixes)}


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Epoch ``epoch``'s batches: a permutation fixed by (seed, epoch); no batch of one image (batch-norm)."""
    g = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def _seed_epoch(seed: int, epoch: int) -> None:
    # random augmentations draw from the global generators: fix them per epoch so a resume replays them
    s = seed * EPOCH_SEED_STRIDE + epoch
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % (2 ** 32))


def finetune(model: nn.Module, train_samples, val_samples, cfg: DataConfig, *, test_size: int,
             parts: str | Sequence[str] = DEFAULT_PARTS, augment: str = "test", epochs: int = DEFAULT_EPOCHS,
             lr: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE, cache: bool = True,
             out_dir: str | Path, resume: bool = False, env: DistEnv | None = None,
             precision: Precision | None = None, seed: int = 0, workers: int | None = None,
             progress: bool = True, evaluate_before: bool = True, evaluate_after: bool = True,
             epoch_eval: bool = False, cache_budget_mb: float = DEFAULT_CACHE_BUDGET_MB,
             stop_after_batches: int | None = None) -> dict:
    """Fine-tune the ``parts`` of ``model`` at ``test_size`` on ``train_samples``; evaluate on ``val_samples``.

    Leaves the adapted weights in ``model`` (eval mode). Writes ``out_dir/finetune_state.pt`` after
    every epoch (``resume=True`` continues from it), ``out_dir/finetune_log.jsonl`` (one line per
    epoch) and ``out_dir/finetune.json`` (the result). ``stop_after_batches`` raises
    ``FinetuneInterrupted`` after that many batches of this call (to test resuming).

    Returns before/after accuracy at test_size (top-1 with fold std), the per-epoch log, timing (ms
    per batch forward and backward, wall seconds) and whether the activation cache was used.
    """
    t_start = time.perf_counter()
    validate_size(test_size, "test_size")
    if augment not in FINETUNE_AUGMENTATIONS:
        raise UsageError(f"unknown fine-tuning augmentation {augment!r}; choose one of "
                         f"{', '.join(FINETUNE_AUGMENTATIONS)}")
    if epochs < 0:
        raise UsageError(f"epochs must be >= 0, got {epochs}")
    if batch_size <= 0:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    env = env or DistEnv()
    if env.distributed and batch_size % env.world_size:
        raise UsageError(f"the batch size ({batch_size}) is global: make it a multiple of the "
                         f"{env.world_size} processes")
    device = env.device
    precision = precision or precision_for(device)
    workers = default_workers() if workers is None else workers
    lr = default_lr(batch_size) if lr is None else float(lr)
    if not lr > 0:
        raise UsageError(f"learning rate must be > 0, got {lr}")
    if isinstance(train_samples, FolderIndex):
        train_samples = train_samples.samples
    if isinstance(val_samples, FolderIndex):
        val_samples = val_samples.samples
    train_samples = list(train_samples)
    val_samples = list(val_samples) if val_samples is not None else []
    if not train_samples:
        raise UsageError("no training images to fine-tune on")
    # Under torchrun each rank owns a fixed shard of the training images (so it caches only those) and
    # contributes batch_size / world_size images to every global batch; gradients are summed across ranks.
    n_train_total, full_train = len(train_samples), train_samples
    local_batch = batch_size // env.world_size if env.distributed else batch_size
    if env.distributed:
        train_samples = [train_samples[i] for i in shard_indices(n_train_total, env.rank, env.world_size)]
    steps_per_epoch = math.ceil(math.ceil(n_train_total / env.world_size) / local_batch)
    main = env.is_main
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, log_path = out_dir / STATE_NAME, out_dir / LOG_NAME

    model = prepare(model, device, precision)
    grad_flags = [p.requires_grad for p in model.parameters()]
    structure = find_parts(model)
    sel = select_parts(model, structure, parts)
    config = {"test_size": test_size, "parts": sel.parts, "augment": augment, "epochs": epochs, "lr": lr,
              "batch_size": batch_size, "seed": seed, "n_train": n_train_total,
              **({"world_size": env.world_size} if env.distributed else {})}
    progress = progress and main
    status = lambda msg: prog.status(msg, enabled=progress)  # noqa: E731

    # ---- resume
    start_epoch, log, before, opt_state, sched_state, scaler_state = 0, [], None, None, None, None
    if resume and state_path.exists():
        state = load_training_state(state_path)
        saved = state.get("config", {})
        diff = [k for k in config if k in saved and saved[k] != config[k]]
        if diff:
            raise UsageError(f"--resume: {state_path} was written with other settings "
                             f"({', '.join(f'{k}={saved[k]!r}' for k in diff)}); use another --out or drop --resume")
        own = model.state_dict()
        for k, v in state["adapted"].items():
            if k not in own or own[k].shape != v.shape:
                raise UsageError(f"--resume: {state_path} does not fit this model ({k})")
            own[k].copy_(v)
        start_epoch, log, before = int(state["epoch"]), list(state.get("log", [])), state.get("before")
        opt_state, sched_state = state.get("optimizer"), state.get("scheduler")
        scaler_state = state.get("scaler")
        status(f"resuming from {state_path} after epoch {start_epoch}/{epochs}")
        # the log file keeps exactly the finished epochs (an interrupted epoch is redone)
        if main:
            write_text(log_path, "".join(json.dumps(r) + "\n" for r in log))
    elif resume:
        status(f"nothing to resume in {out_dir}: starting from scratch")
    if main and start_epoch == 0 and log_path.exists():
        log_path.unlink()
    barrier(env)

    eval_kw = dict(test_size=test_size, batch_size=batch_size, env=env, precision=precision, workers=workers,
                   progress=progress)
    if before is None and evaluate_before and val_samples:
        before = evaluate_at(model, val_samples, cfg, **eval_kw)
        status(f"before fine-tuning: top-1 {before['top1']:.2f}% at {test_size}px")

    _set_modes(model, sel)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY) if params else None
    scheduler = (torch.optim.lr_scheduler.StepLR(optimizer, step_size=decay_step(epochs), gamma=LR_DECAY)
                 if optimizer else None)
    if optimizer is not None and opt_state is not None:
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(sched_state)
    loss_fn = nn.CrossEntropyLoss()
    # fp16 autocast (CUDA without bf16) needs loss scaling, or small gradients underflow to zero
    scaler = torch.amp.GradScaler(device.type, enabled=precision.amp and precision.dtype == torch.float16
                                  and optimizer is not None)
    if scaler_state:
        scaler.load_state_dict(scaler_state)
    transform = build_transform(augment, size=test_size, cfg=cfg)

    # ---- the frozen-prefix cache
    cache_info: dict = {"used": False, "reason": ""}
    suffix = train_cache = val_cache = None
    skipped: list[dict] = []
    t_cache = 0.0
    if epochs - start_epoch > 0:
        if not cache:
            cache_info["reason"] = "disabled"
        elif augment != "test":
            cache_info["reason"] = f"augmentation {augment!r} is random: full forward each epoch"
        else:
            t0 = time.perf_counter()
            sample = _first_inputs(full_train, transform, device)  # the same on every rank
            if sample is None:
                cache_info["reason"] = "no readable sample image"
            else:
                model.eval()
                suffix, why = build_suffix(model, structure.chain, sel.first, sample)
                _set_modes(model, sel)
                cache_info["reason"] = why
            if suffix is not None:
                model.eval()  # the prefix is frozen: eval mode throughout while filling
                budget = int(cache_budget_mb * 2 ** 20)
                train_cache, skipped = _fill_cache(model, suffix, train_samples, transform, batch_size=batch_size,
                                                   workers=workers, device=device, precision=precision,
                                                   budget_bytes=budget, folder=out_dir / _cache_folder("cache", env),
                                                   progress=progress,
                                                   desc=f"caching activations at {suffix.cut}")
                if epoch_eval and val_samples and not env.distributed:
                    val_cache, _ = _fill_cache(model, suffix, val_samples,
                                               build_transform("test", size=test_size, cfg=cfg),
                                               batch_size=batch_size, workers=workers, device=device,
                                               precision=precision, budget_bytes=budget,
                                               folder=out_dir / "cache_val", progress=progress,
                                               desc="caching validation activations")
                _set_modes(model, sel)
                if env.distributed and int(all_reduce_sum(torch.tensor([int(train_cache is None)]), env)):
                    if train_cache is not None:  # all ranks must take the same path
                        train_cache.close()
                        train_cache = None
                if train_cache is None:
                    suffix = None
                    cache_info["reason"] = "no readable training image"
                else:
                    cache_info.update(used=True, cut=suffix.cut, bytes=train_cache.bytes,
                                      on_disk=train_cache.on_disk, shape=list(train_cache.shape))
            t_cache = time.perf_counter() - t0
            cache_info["build_s"] = round(t_cache, 3)
            status(f"activation cache: {'used, ' if suffix is not None else 'not used: '}{cache_info['reason']}")

    # ---- epochs
    fwd_ms: list[float] = []
    bwd_ms: list[float] = []
    n_batches_run = 0
    t_epochs = time.perf_counter()
    needs_bn_batch = bool(sel.stats)
    sum_loss = nn.CrossEntropyLoss(reduction="sum")

    def step(run, x, y) -> tuple[float, float, int]:
        """One global step; (summed loss, hits, images) of this rank. Every rank calls it equally often."""
        nonlocal n_batches_run
        n_local = 0 if y is None else int(y.numel())
        n_global = n_local
        if env.distributed:
            n_global = int(all_reduce_sum(torch.tensor([n_local]), env))
            if n_global == 0:
                return 0.0, 0.0, 0
        t0 = time.perf_counter()
        loss = logits = None
        if n_local:
            with torch.set_grad_enabled(optimizer is not None), autocast(device, precision):
                logits = run(x)
                # distributed: each rank's summed loss over the global count, so that the summed gradients
                # are the gradient of the global batch's mean loss
                loss = (loss_fn(logits.float(), y) if not env.distributed
                        else sum_loss(logits.float(), y) / n_global)
        t1 = time.perf_counter()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                scaler.scale(loss).backward()
            if env.distributed:  # summed while still scaled: an overflow on any rank skips the step everywhere
                _sum_gradients(params, env)
            scaler.step(optimizer)
            scaler.update()
        t2 = time.perf_counter()
        n_batches_run += 1
        if stop_after_batches is not None and n_batches_run >= stop_after_batches:
            raise FinetuneInterrupted(f"stopped after {n_batches_run} batches (test hook)")
        if not n_local:
            return 0.0, 0.0, 0
        fwd_ms.append(1000 * (t1 - t0))
        bwd_ms.append(1000 * (t2 - t1))
        summed = float(loss.detach()) * (n_global if env.distributed else n_local)
        return summed, float((logits.detach().argmax(1) == y).sum()), n_local

    try:
        for epoch in range(start_epoch, epochs):
            _set_modes(model, sel)
            rank_seed = seed + RANK_SEED_STRIDE * env.rank  # rank 0 = the single-process run
            _seed_epoch(rank_seed, epoch)
            batches = _epoch_batches(len(train_samples), local_batch, rank_seed, epoch)
            t_ep = time.perf_counter()
            total_loss = hits = seen = 0.0
            steps = 0
            bar = prog.bar(sum(len(b) for b in batches), f"fine-tune epoch {epoch + 1}/{epochs}", enabled=progress)
            run = suffix if suffix is not None else model
            if suffix is not None:
                source = ((torch.tensor(b),) for b in batches)
            else:
                source = _loader(train_samples, transform, batches, workers)
            try:
                for item in source:
                    x = y = None
                    if suffix is not None:
                        idx = item[0]
                        idx = idx[train_cache.valid[idx]]
                        bar.update(len(item[0]))
                        if idx.numel():
                            x, y = train_cache.get(idx)
                            x, y = x.to(device), y.to(device)
                    else:
                        if epoch == start_epoch:
                            skipped.extend(s.to_dict() for s in item.skipped)
                        bar.update(len(item) + len(item.skipped))
                        if item.inputs is not None:
                            x, y = to_device(item.inputs, device, precision), item.labels.to(device)
                    if y is not None and needs_bn_batch and y.numel() < 2:
                        x = y = None  # batch-norm in train mode needs two images
                    steps += 1
                    if y is None and not env.distributed:
                        continue
                    b_loss, b_hits, b_n = step(run, x, y)
                    total_loss, hits, seen = total_loss + b_loss, hits + b_hits, seen + b_n
                # distributed: shards differ by at most one image; every rank takes the same number of steps
                for _ in range(steps_per_epoch - steps if env.distributed else 0):
                    step(run, None, None)
            finally:
                bar.close()
            if scheduler is not None:
                scheduler.step()
            if env.distributed:
                total_loss, hits, seen = all_reduce_sum(torch.tensor([total_loss, hits, seen],
                                                                     dtype=torch.float64), env).tolist()
                _average_bn_statistics(model, sel, env)
            record = {"epoch": epoch + 1, "loss": total_loss / max(1, seen), "train_top1": 100 * hits / max(1, seen),
                      "lr": lr * LR_DECAY ** (epoch // decay_step(epochs)), "images": int(seen),
                      "seconds": round(time.perf_counter() - t_ep, 3), "cached": suffix is not None}
            if epoch_eval and val_samples:
                model.eval()
                if val_cache is not None:
                    record["val_top1"] = _cached_top1(suffix, val_cache, batch_size=batch_size, device=device,
                                                      precision=precision)
                else:
                    record["val_top1"] = evaluate_at(model, val_samples, cfg, **{**eval_kw, "progress": False})["top1"]
            log.append(record)
            if main:
                append_jsonl(log_path, record)
                save_training_state({"epoch": epoch + 1, "config": config, "adapted": _adapted_state(model, sel),
                                     "optimizer": optimizer.state_dict() if optimizer else None,
                                     "scheduler": scheduler.state_dict() if scheduler else None,
                                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                                     "log": log, "before": before}, state_path)
            barrier(env)
            status(f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}, train top-1 {record['train_top1']:.1f}%"
                   + (f", val top-1 {record['val_top1']:.2f}%" if "val_top1" in record else ""))
    finally:
        for c in (train_cache, val_cache):
            if c is not None:
                c.close()
        # also after an interruption: the caller gets the model back as it gave it, in eval mode
        model.eval()
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
    t_epochs = time.perf_counter() - t_epochs
    if env.distributed:
        skipped = [s for part in all_gather_objects(skipped, env) for s in part]

    after = None
    if evaluate_after and val_samples:
        after = evaluate_at(model, val_samples, cfg, **eval_kw)
        status(f"after fine-tuning: top-1 {after['top1']:.2f}% at {test_size}px")

    def stat(v):
        return {"mean": float(np.mean(v)), "std": float(np.std(v))} if v else None

    result = {
        "test_size": test_size, "train_size": cfg.train_size, "crop_ratio": cfg.crop_ratio,
        "parts": sel.parts, "trainable": sel.trainable, "stats_modules": sel.stats,
        "structure": structure.to_dict(), "augment": augment, "epochs": epochs, "resumed_from_epoch": start_epoch,
        "lr": lr, "batch_size": batch_size, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
        "decay_every": decay_step(epochs), "seed": seed, "precision": precision.describe(),
        "before": before, "after": after, "log": log, "cache": cache_info,
        "timing": {"ms_per_batch_forward": stat(fwd_ms), "ms_per_batch_backward": stat(bwd_ms),
                   "batches": n_batches_run, "cache_build_s": round(t_cache, 3),
                   "epochs_s": round(t_epochs, 3), "finetune_s": round(t_cache + t_epochs, 3),
                   "wall_s": round(time.perf_counter() - t_start, 3)},
        "skipped": skipped, "state_path": str(state_path), "log_path": str(log_path),
        "trainable_parameters": sum(p.numel() for n in sel.trainable for p in model.get_submodule(n).parameters()),
    }
    if main:
        write_json(out_dir / RESULT_NAME, result)
    return result


def _cache_folder(name: str, env: DistEnv) -> str:
    return f"{name}_rank{env.rank}" if env.distributed else name


def _sum_gradients(params: Sequence[nn.Parameter], env: DistEnv) -> None:
    """Sum the gradients over ranks (a rank without images this step contributes zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(all_reduce_sum(p.grad, env))


def _average_bn_statistics(model: nn.Module, sel: Selection, env: DistEnv) -> None:
    """Each rank estimated the running statistics on its own images: average them so all ranks agree."""
    for name in sel.stats:
        m = model.get_submodule(name)
        for buf in (getattr(m, "running_mean", None), getattr(m, "running_var", None)):
            if buf is not None:
                buf.copy_(all_reduce_sum(buf, env) / env.world_size)


def _first_inputs(samples, transform, device, count: int = 2) -> torch.Tensor | None:
    """A few decoded inputs for checking the suffix runner (fp32)."""
    from fixres.images import BadImage, load_rgb
    xs = []
    for path, _ in samples:
        try:
            xs.append(transform(load_rgb(path)))
        except BadImage:
            continue
        if len(xs) == count:
            break
    return torch.stack(xs).to(device) if xs else None

