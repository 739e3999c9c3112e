"""Training at a (low) resolution: the paper's protocol (section 5), from scratch or by transfer (5.3).

``train`` runs SGD (lr 0.1 x B/256, momentum 0.9, weight decay 1e-4, /10 every 30 epochs; cosine and
linear warm-up as options, label smoothing as an option) on RandomResizedCrop inputs of side
``train_size`` ("train DA"; ``augment="control"`` is appendix D's resize + fixed-size random crop),
with repeated augmentation (``fixres.sampler``). Each epoch it validates at ``train_size`` and at the
test size that ``analysis.recommend_test_size`` gives for it, so the train-test discrepancy is seen
while training.

Transfer (section 5.3) needs nothing special: pass a model with pretrained weights whose head was
replaced for the new classes; every parameter trains (no layer is frozen), at ``train_size``, and
``fixres finetune`` later fixes it at the higher test size.

Engine: one process, or torchrun DDP (gloo on CPU, nccl on CUDA; ``fixres.dist``). ``batch_size`` is
the *global* batch (the paper's B), split evenly over ranks. Autocast and channels_last come from
``fixres.engine``. After every epoch an atomic ``train_state.pt`` holds model, optimizer, scheduler,
epoch, RNG states and the log; the sampler, loader and augmentation RNGs are reseeded from
(seed, epoch, rank) at every epoch start, so a run killed and resumed with ``resume=True`` ends with
exactly the weights of an uninterrupted one (on CPU). ``log.jsonl`` gets one line per epoch,
including measured milliseconds per batch of forward and of backward (table 7).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fixres import analysis
from fixres.atomic import append_jsonl, write_text
from fixres.checkpoint import load_training_state, save_training_state
from fixres.config import DataConfig
from fixres.data import ImageDataset, make_loader
from fixres.errors import FixresError, UsageError
from fixres.sampler import DEFAULT_REPEATS, RepeatedAugSampler, epoch_seed

#: Section 5: lr = BASE_LR x B / LR_BATCH_REFERENCE ("as in [15]", Goyal et al.).
BASE_LR = 0.1
LR_BATCH_REFERENCE = 256
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
#: Step schedule: the learning rate is divided by STEP_GAMMA^-1 every STEP_EPOCHS epochs.
STEP_EPOCHS = 30
STEP_GAMMA = 0.1
SCHEDULES = ("step", "cosine")
TRAIN_AUGMENTS = ("train", "control", "test", "test2")
STATE_NAME = "train_state.pt"
LOG_NAME = "log.jsonl"
STATE_VERSION = 1
#: Hyper-parameters a resumed run must share with the saved state (else it would not continue the same run).
RESUME_KEYS = ("train_size", "batch_size", "repeats", "augment", "color_jitter", "schedule", "warmup_epochs",
               "step_epochs", "label_smoothing", "seed", "lr")


def default_lr(batch_size: int) -> float:
    """The paper's learning rate for a global batch of ``batch_size``: 0.1 x B / 256."""
    return BASE_LR * batch_size / LR_BATCH_REFERENCE


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, schedule: str = "step", warmup_epochs: float = 0,
              step_epochs: int = STEP_EPOCHS) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based), updated every step.

    Warm-up: linear from 1/warmup_steps to 1 over ``warmup_epochs``. "step": x0.1 every ``step_epochs``
    epochs. "cosine": half a cosine from 1 to 0 over the epochs after warm-up.
    """
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "step":
        return STEP_GAMMA ** ((step // steps_per_epoch) // step_epochs)
    total = max(1, epochs * steps_per_epoch - warmup_steps)
    t = min(1.0, (step - warmup_steps) / total)
    return 0.5 * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------- RNG state (tensors only)

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
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))


# --------------------------------------------------------------------------- validation

def _validate(model: nn.Module, samples, cfg: DataConfig, *, sizes: Sequence[int], batch_size: int, env,
              precision, workers: int, progress: bool) -> dict:
    """Top-1 (percent) at each size, via ``fixres.evaluate`` (one decode per image for all sizes), at the
    inference precision, so the numbers are those ``fixres eval`` gives for the saved model."""
    from fixres.engine import inference_precision
    from fixres.evaluate import evaluate
    was_training = model.training
    model.eval()
    try:
        res = evaluate(model, samples, cfg, test_sizes=list(sizes), crop_ratios=[cfg.crop_ratio],
                       batch_size=batch_size, env=env, precision=inference_precision(env.device, precision.amp),
                       workers=workers, progress=progress,
                       num_classes=cfg.num_classes, per_class=False)
    finally:
        model.train(was_training)
    top1 = {int(r["test_size"]): float(r["top1"]) for r in res["rows"]}
    loss = {int(r["test_size"]): (None if r.get("loss") is None else float(r["loss"])) for r in res["rows"]}
    return {"top1": top1, "loss": loss, "n": int(res.get("n_images", 0)), "skipped": res.get("skipped", [])}


# --------------------------------------------------------------------------- output


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _cpu_state_dict(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in _unwrap(model).state_dict().items()}


def write_final_model(model: nn.Module, out_dir: Path, *, model_name: str, cfg: DataConfig, train_size: int,
                      test_size: int, accuracy: dict | None) -> tuple[Path, Path]:
    """out_dir/model.safetensors + fixres.json (``fixres.export``: one format for the project), so
    ``fixres eval --checkpoint`` needs no other flag."""
    from fixres.export import META_NAME, export_model
    path = Path(export_model(_unwrap(model), out_dir, model_name=model_name, cfg=cfg, test_size=test_size,
                             train_size=train_size, class_names=list(cfg.class_names or []) or None,
                             accuracy=accuracy))
    return path, path.with_name(META_NAME)


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(statistics.fmean(values)), (float(statistics.pstdev(values)) if len(values) > 1 else 0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- training

def train(model: nn.Module, train_samples, val_samples, cfg: DataConfig, *, train_size: int, epochs: int,
          batch_size: int, lr: float | None = None, out_dir, resume: bool = False, repeats: int = DEFAULT_REPEATS,
          augment: str = "train", color_jitter: bool = False, schedule: str = "step", warmup_epochs: float = 0,
          label_smoothing: float = 0.0, val_sizes: Sequence[int] | None = None, env=None, precision=None,
          seed: int = 0, workers: int | None = None, progress: bool = True, step_epochs: int = STEP_EPOCHS,
          momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY, model_name: str | None = None,
          max_steps: int | None = None, val_batch_size: int | None = None) -> dict:
    """Train ``model`` at ``train_size`` for ``epochs``; return the per-epoch log and timings.

    ``batch_size`` is global (split over ranks); ``lr`` defaults to 0.1 x batch_size / 256.
    ``val_sizes`` defaults to [train_size, recommended test size]. ``max_steps`` stops after that many
    optimizer steps (for tests and timing; no final model is written then).
    Leaves the trained weights in ``model``; writes ``out_dir``/{train_state.pt, log.jsonl,
    model.safetensors, fixres.json}.
    """
    from fixres import dist, engine
    from fixres.progress import bar, status
    from fixres.transforms import build_transform

    env = env or dist.DistEnv()
    precision = precision or engine.precision_for(env.device, amp=True)
    out_dir = Path(out_dir)
    if augment not in TRAIN_AUGMENTS:
        raise UsageError(f"unknown training augmentation {augment!r}; choose one of {', '.join(TRAIN_AUGMENTS)}")
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if epochs <= 0:
        raise UsageError(f"epochs must be positive, got {epochs}")
    if batch_size % env.world_size:
        raise UsageError(f"--batch-size {batch_size} (global) must be a multiple of the {env.world_size} processes")
    if not 0.0 <= label_smoothing < 1.0:
        raise UsageError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    if (out_dir / STATE_NAME).exists() and not resume:
        raise UsageError(f"{out_dir / STATE_NAME} exists: pass --resume to continue that run, or choose another --out")
    train_samples, val_samples = list(train_samples), list(val_samples or [])
    local_batch = batch_size // env.world_size
    lr = default_lr(batch_size) if lr is None else float(lr)
    test_size = analysis.recommend_test_size(train_size=train_size, crop_ratio=cfg.crop_ratio,
                                             stride=cfg.stride)["test_size"]
    val_sizes = sorted(set(val_sizes or [train_size, test_size]))
    workers = 0 if workers is None and env.distributed and env.device.type == "cpu" else workers
    if workers is None:
        from fixres.data import default_workers
        workers = default_workers(env.world_size)
    hparams = {"train_size": train_size, "batch_size": batch_size, "repeats": repeats, "augment": augment,
               "color_jitter": color_jitter, "schedule": schedule, "warmup_epochs": warmup_epochs,
               "step_epochs": step_epochs, "label_smoothing": label_smoothing, "seed": seed, "lr": lr,
               "epochs": epochs, "momentum": momentum, "weight_decay": weight_decay,
               "world_size": env.world_size, "backend": env.backend, "precision": precision.describe(), "test_size": test_size,
               "val_sizes": val_sizes, "n_train": len(train_samples), "n_val": len(val_samples)}

    transform = build_transform(augment, size=train_size, cfg=cfg, color_jitter=color_jitter)
    if workers == 0:
        transform = engine.SingleThreaded(transform)
    dataset = ImageDataset(train_samples, transform)
    sampler = RepeatedAugSampler(len(dataset), repeats=repeats, rank=env.rank, world_size=env.world_size, seed=seed)
    # Full batches only: equal per-rank batches keep DDP's gradient average equal to the global mean,
    # and a size-1 batch would break BatchNorm. Tiny data sets keep their one partial batch.
    drop_last = len(sampler) >= local_batch
    steps_per_epoch = len(sampler) // local_batch if drop_last else 1

    model = engine.prepare(model, env.device, precision)
    net = model
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, steps_per_epoch=steps_per_epoch, epochs=epochs, schedule=schedule, warmup_epochs=warmup_epochs,
        step_epochs=step_epochs))
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision.amp and precision.dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    state_path, log_path = out_dir / STATE_NAME, out_dir / LOG_NAME
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    start_epoch, resumed_from = 0, None
    if resume and state_path.exists():
        state = load_training_state(state_path)
        saved = state.get("hparams", {})
        bad = [k for k in RESUME_KEYS if k in saved and saved[k] != hparams[k]]
        if schedule == "cosine" and saved.get("epochs", epochs) != epochs:
            bad.append("epochs")  # the cosine's length; a step schedule may be extended
        if bad:
            raise UsageError(f"cannot resume {state_path}: it was trained with other "
                             + ", ".join(f"{k}={saved[k]!r}" for k in bad) + " (use the same flags, or another --out)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch = resumed_from = int(state["epoch"])
        log = list(state.get("log", []))
        if env.is_main:
            # The checkpoint is the truth: drop log lines of an epoch that never reached its checkpoint.
            write_text(log_path, "".join(json.dumps(r) + "\n" for r in log))
        status(f"resuming {out_dir} after epoch {start_epoch}/{epochs}", enabled=progress and env.is_main)
    elif env.is_main and log_path.exists():
        log_path.unlink()
    dist.barrier(env)

    wall0 = time.perf_counter()
    skipped: dict[str, str] = {}
    step = start_epoch * steps_per_epoch
    stopped_early = False
    model.train()
    for epoch in range(start_epoch, epochs):
        # Everything random in this epoch follows from (seed, epoch, rank): resume == uninterrupted.
        seed_everything(epoch_seed(seed, epoch, env.rank))
        sampler.set_epoch(epoch)
        gen = torch.Generator()
        gen.manual_seed(epoch_seed(seed, epoch, env.rank))
        loader = make_loader(dataset, batch_size=local_batch, sampler=sampler, workers=workers, generator=gen,
                             drop_last=drop_last, pin_memory=env.device.type == "cuda")
        fwd_ms, bwd_ms, opt_ms = [], [], []
        loss_sum = torch.zeros((), dtype=torch.float64)
        counts = torch.zeros(2, dtype=torch.int64)  # correct, seen
        t_epoch = time.perf_counter()
        pbar = bar(steps_per_epoch * batch_size, f"epoch {epoch + 1}/{epochs} @{train_size}px",
                   enabled=progress and env.is_main)
        for batch in loader:
            for s in batch.skipped:
                skipped[s.path] = s.reason
            if batch.inputs is None and not env.distributed:
                continue  # every image of this batch was unreadable (counted in `skipped`)
            if batch.inputs is None:
                # Under DDP every rank must take part in each all-reduce: a zero-weight step on a blank input.
                x = torch.zeros(1, 3, train_size, train_size)
                y = torch.zeros(1, dtype=torch.long)
                weight = 0.0
            else:
                x, y, weight = batch.inputs, batch.labels, 1.0
            x = engine.to_device(x, env.device, precision)
            y = y.to(env.device, non_blocking=True)
            _sync(env.device)
            t0 = time.perf_counter()
            with engine.autocast(env.device, precision):
                logits = net(x)
                loss = criterion(logits.float(), y) * weight
            _sync(env.device)
            t1 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            _sync(env.device)
            t2 = time.perf_counter()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            _sync(env.device)
            t3 = time.perf_counter()
            fwd_ms.append((t1 - t0) * 1e3)
            bwd_ms.append((t2 - t1) * 1e3)
            opt_ms.append((t3 - t2) * 1e3)
            if weight:
                with torch.no_grad():
                    loss_sum += float(loss.detach()) * len(y)
                    counts += torch.tensor([int((logits.argmax(1) == y).sum()), len(y)])
            step += 1
            pbar.update(len(y) * env.world_size)
            pbar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{scheduler.get_last_lr()[0]:.4g}")
            if max_steps is not None and step >= max_steps:
                stopped_early = True
                break
        pbar.close()
        epoch_s = time.perf_counter() - t_epoch
        totals = dist.all_reduce_sum(torch.cat([counts.double(), loss_sum.view(1)]), env)
        seen = int(totals[1])
        record = {
            "epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
            "train_loss": float(totals[2] / seen) if seen else None,
            "train_top1": 100.0 * float(totals[0]) / seen if seen else None,
            "images": seen, "seconds": epoch_s, "images_per_s": seen / epoch_s if epoch_s > 0 else None,
        }
        for name, values in (("forward_ms", fwd_ms), ("backward_ms", bwd_ms), ("optimizer_ms", opt_ms)):
            record[name], record[name + "_std"] = _stats(values)
        record["local_batch"] = local_batch
        if val_samples and not stopped_early:
            val = _validate(model, val_samples, cfg, sizes=val_sizes, batch_size=val_batch_size or 2 * local_batch,
                            env=env, precision=precision, workers=workers, progress=False)
            record["val_top1"] = {str(k): v for k, v in val["top1"].items()}
            record["val_top1_train_size"] = val["top1"].get(train_size)
            record["val_top1_test_size"] = val["top1"].get(test_size)
            record["val_n"] = val["n"]
            for item in val["skipped"]:
                skipped[item["path"]] = item["reason"]
        model.train()
        if stopped_early:
            log.append(record)
            break
        log.append(record)
        if env.is_main:
            state = {"version": STATE_VERSION, "epoch": epoch + 1, "model": _cpu_state_dict(model),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng": rng_state(), "log": log, "hparams": hparams}
            save_training_state(state, state_path)
            append_jsonl(log_path, record)
            status(_epoch_line(record, train_size, test_size), enabled=progress)
        dist.barrier(env)

    wall_s = time.perf_counter() - wall0
    all_skipped: dict[str, str] = {}
    for part in dist.all_gather_objects(skipped, env):
        all_skipped.update(part)
    last = log[-1] if log else {}
    result = {
        "out_dir": str(out_dir), "epochs": log, "hparams": hparams, "train_size": train_size,
        "test_size": test_size, "resumed_from": resumed_from, "wall_s": wall_s,
        "final": {k: last.get(k) for k in ("epoch", "val_top1", "val_top1_train_size", "val_top1_test_size",
                                           "train_top1", "train_loss")},
        "forward_ms": _stats([r["forward_ms"] for r in log if r.get("forward_ms") is not None])[0],
        "backward_ms": _stats([r["backward_ms"] for r in log if r.get("backward_ms") is not None])[0],
        "images_per_s": last.get("images_per_s"),
        "skipped": [{"path": p, "reason": r} for p, r in sorted(all_skipped.items())],
        "stopped_early": stopped_early,
    }
    if not stopped_early and env.is_main:
        acc = None
        if last.get("val_top1"):
            acc = {"top1": last["val_top1"], "train_size": train_size, "test_size": test_size,
                   "n": last.get("val_n")}
        name = model_name or _guess_name(model)
        path, meta = write_final_model(model, out_dir, model_name=name, cfg=cfg, train_size=train_size,
                                       test_size=test_size, accuracy=acc)
        result["model_path"], result["meta_path"] = str(path), str(meta)
    dist.barrier(env)
    return result


def _guess_name(model: nn.Module) -> str:
    cfg = getattr(_unwrap(model), "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise FixresError("train(): pass model_name= (the model's timm/torchvision name) for the export metadata")
    return name


def _epoch_line(r: dict, train_size: int, test_size: int) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.1f}%"
    loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
    return (f"epoch {r['epoch']}: loss {loss}, train top-1 {pct(r['train_top1'])}, "
            f"val top-1 {pct(r.get('val_top1_train_size'))} @{train_size}px, "
            f"{pct(r.get('val_top1_test_size'))} @{test_size}px, "
            f"{r['images_per_s'] or 0:.1f} img/s, fwd {r['forward_ms'] or 0:.1f} ms + bwd {r['backward_ms'] or 0:.1f} ms "
            "per batch")
