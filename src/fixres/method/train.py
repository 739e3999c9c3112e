"""Training at a (low) resolution: the paper's protocol (section 5), from scratch or by transfer (5.3).

``train`` runs SGD (lr 0.1 x B/256, momentum 0.9, weight decay 1e-4, /10 every 30 epochs; cosine and
linear warm-up as options, label smoothing as an option; ``optimizer="adamw"`` for the recipes vision
transformers and ConvNeXts are trained with; ``fixres.method.trainrecipe``) on RandomResizedCrop inputs of side
``train_size`` ("train DA"; ``augment="control"`` is appendix D's resize + fixed-size random crop),
with repeated augmentation (``fixres.method.sampler``; streamed shards in ``fixres.method.shardepochs``'
order). As in the official code (``RASampler(len_factor=2.0)``),
an epoch with repeated augmentation draws about 2N samples (``epoch_length_factor``, default
``PAPER_LEN_FACTOR`` when ``repeats > 1``, else 1), so the 30-epoch decay step keeps the paper's
schedule. Each epoch it validates at ``train_size`` and at the test size that
``analysis.recommend_test_size`` gives for it, so the train-test discrepancy is seen while training.

Transfer (section 5.3) needs nothing special: pass a model with pretrained weights whose head was
replaced for the new classes; every parameter trains (no layer is frozen), at ``train_size``, and
``fixres finetune`` later fixes it at the higher test size.

Engine: one process, or torchrun (gloo on CPU, nccl on CUDA; ``fixres.runtime.dist``). ``batch_size`` is
the *global* batch (the paper's B), split evenly over ranks. The step itself (loss over the global
image count, summed gradients, a rank without readable images contributing nothing, synchronised
timing, autocast + scaler) is ``fixres.method.loop``'s, shared with fine-tuning; batch-norm statistics are
averaged over ranks after each epoch. After every epoch an atomic ``train_state.pt`` holds model,
optimizer, scheduler, epoch, RNG states and the log; the sampler and the model's RNGs are reseeded from (seed, epoch,
rank) at every epoch start and each sample's augmentation from (seed, epoch, position)
(``sampler.SeededSamples``), so a run killed and resumed with ``resume=True`` ends with exactly the
weights of an uninterrupted one (on CPU), and the worker count changes nothing. ``log.jsonl`` gets
one line per epoch, including measured milliseconds per batch of forward and of backward (table 7).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from fixres.config import DEFAULT_REPEATS, DataConfig
from fixres.data.loaders import default_workers, make_loader
from fixres.data.streams import ShardStream
from fixres.data.transforms import build_transform
from fixres.errors import FixresError, UsageError
from fixres.io import schema
from fixres.io.atomic import append_jsonl, write_text
from fixres.method import analysis, loop
from fixres.method.evaluate import evaluate
from fixres.method.loop import LoopState, StateLayout, rng_state, seed_everything, set_rng_state  # noqa: F401 (API)
from fixres.method.sampler import SeededSamples, epoch_seed
from fixres.method.shardepochs import DEFAULT_SHUFFLE_BUFFER, count_stream, training_order
from fixres.method.streaming import evaluate_stream
from fixres.method.trainlog import EpochRecord, epoch_line
from fixres.method.trainrecipe import (
    MOMENTUM,
    OPTIMIZERS,
    STEP_EPOCHS,
    WEIGHT_DECAY,
    check_arguments,
    default_epoch_length_factor,
    default_lr,
    lr_factor,
    make_optimizer,
)
from fixres.models.export import META_NAME, export_model
from fixres.models.timmcfg import model_pretrained_view
from fixres.runtime import dist, engine
from fixres.runtime.progress import bar, status

STATE_NAME = "train_state.pt"
LOG_NAME = "log.jsonl"
STATE_LAYOUT = StateLayout(weights="model", settings="hparams")
#: Settings a resumed run must share with the saved state (else it would not continue the same run);
#: a state written before a key existed is not checked on it.
RESUME_KEYS = ("train_size", "batch_size", "repeats", "augment", "color_jitter", "schedule", "warmup_epochs",
               "step_epochs", "label_smoothing", "seed", "lr", "epoch_length_factor", "world_size",
               "mean", "std", "interpolation", "crop_ratio", "stream", "shuffle_buffer")


# --------------------------------------------------------------------------- validation

def _validate(model: nn.Module, samples, cfg: DataConfig, *, sizes: Sequence[int], batch_size: int, env,
              precision, workers: int, progress: bool) -> dict:
    """Top-1 (percent) at each size, via ``fixres.method.evaluate`` (one decode per image for all sizes), at the
    inference precision, so the numbers are those ``fixres eval`` gives for the saved model."""
    was_training = model.training
    model.eval()
    try:
        res = (evaluate_stream if isinstance(samples, ShardStream) else evaluate)(
            model, samples, cfg, test_sizes=list(sizes), crop_ratios=[cfg.crop_ratio],
                       batch_size=batch_size, env=env, precision=engine.inference_precision(env.device, precision.amp),
                       workers=workers, progress=progress,
                       num_classes=cfg.num_classes, per_class=False)
    finally:
        model.train(was_training)
    return {"top1": {r.test_size: r.top1 for r in res.rows}, "loss": {r.test_size: r.loss for r in res.rows},
            "n": res.n_images, "skipped": [schema.dump(s) for s in res.skipped]}


# --------------------------------------------------------------------------- output

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _cpu_state_dict(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in _unwrap(model).state_dict().items()}


def write_final_model(model: nn.Module, out_dir: Path, *, model_name: str, cfg: DataConfig, train_size: int,
                      test_size: int, accuracy: dict | None) -> tuple[Path, Path]:
    """out_dir/model.safetensors + fixres.json (``fixres.models.export``: one format for the project), so
    ``fixres eval --checkpoint`` needs no other flag."""
    path = Path(export_model(_unwrap(model), out_dir, model_name=model_name, cfg=cfg, test_size=test_size,
                             train_size=train_size, class_names=list(cfg.class_names or []) or None,
                             accuracy=accuracy))
    return path, path.with_name(META_NAME)


@dataclass
class _Run:
    """One training run while it runs: what every epoch needs."""

    model: nn.Module
    env: dist.DistEnv
    precision: engine.Precision
    cfg: DataConfig
    hparams: dict
    out_dir: Path
    dataset: SeededSamples
    sampler: Sampler  # sampler.RepeatedAugSampler, or shardepochs.ShardEpochs for streamed shards
    local_batch: int
    drop_last: bool
    steps_per_epoch: int
    workers: int
    stepper: loop.Stepper
    scheduler: torch.optim.lr_scheduler.LambdaLR
    progress: bool
    max_steps: int | None
    val_samples: list
    val_batch_size: int
    log: list[EpochRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    step: int = 0
    stopped_early: bool = False
    loader: DataLoader | None = None


def train(model: nn.Module, train_samples, val_samples, cfg: DataConfig, *, train_size: int, epochs: int,
          batch_size: int, lr: float | None = None, out_dir, resume: bool = False, repeats: int = DEFAULT_REPEATS,
          augment: str = "train", color_jitter: bool = False, schedule: str = "step", warmup_epochs: float = 0,
          label_smoothing: float = 0.0, val_sizes: Sequence[int] | None = None, env=None, precision=None,
          seed: int = 0, workers: int | None = None, progress: bool = True, step_epochs: int = STEP_EPOCHS,
          momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY, model_name: str | None = None,
          max_steps: int | None = None, val_batch_size: int | None = None,
          epoch_length_factor: float | None = None, optimizer: str = "sgd",
          shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> dict:
    """Train ``model`` at ``train_size`` for ``epochs``; return the per-epoch log and timings.

    ``optimizer``: "sgd" (the paper; ``momentum``) or "adamw" (``momentum`` unused).

    ``batch_size`` is global (split over ranks); ``lr`` defaults to 0.1 x batch_size / 256.
    ``val_sizes`` defaults to [train_size, recommended test size]. ``epoch_length_factor``: samples
    drawn per epoch / images (default: 2 with repeated augmentation, as the paper; else 1).
    ``max_steps`` stops after that many optimizer steps (for tests and timing; no final model is
    written then). Leaves the trained weights in ``model``; writes ``out_dir``/{train_state.pt,
    log.jsonl, model.safetensors, fixres.json}.
    """
    env = env or dist.DistEnv()
    precision = precision or engine.precision_for(env.device, amp=True)
    out_dir = Path(out_dir)
    check_arguments(augment=augment, schedule=schedule, epochs=epochs, batch_size=batch_size,
                    world_size=env.world_size, label_smoothing=label_smoothing,
                    epoch_length_factor=epoch_length_factor, state_path=out_dir / STATE_NAME, resume=resume)
    train_samples, val_samples, photos = _photos(train_samples, val_samples, env, shuffle_buffer, progress=progress)
    test_size = analysis.recommend_test_size(train_size=train_size, crop_ratio=cfg.crop_ratio,
                                             stride=cfg.stride)["test_size"]
    if workers is None:  # in-process loading under a CPU torchrun: the ranks already use the cores
        workers = 0 if env.distributed and env.device.type == "cpu" else default_workers(env.world_size)
    factor = default_epoch_length_factor(repeats) if epoch_length_factor is None else float(epoch_length_factor)
    hparams = {"train_size": train_size, "batch_size": batch_size, "repeats": repeats, "augment": augment,
               "color_jitter": color_jitter, "schedule": schedule, "warmup_epochs": warmup_epochs,
               "step_epochs": step_epochs, "label_smoothing": label_smoothing, "seed": seed,
               "lr": default_lr(batch_size, optimizer) if lr is None else float(lr), "epochs": epochs,
               "momentum": momentum,
               "weight_decay": weight_decay, "world_size": env.world_size, "backend": env.backend,
               "precision": precision.describe(), "test_size": test_size,
               "val_sizes": sorted(set(val_sizes or [train_size, test_size])), "epoch_length_factor": factor,
               **photos, "mean": list(cfg.mean),
               "std": list(cfg.std), "interpolation": cfg.interpolation, "crop_ratio": cfg.crop_ratio}
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if optimizer != "sgd":  # only when not the default: states written before the option still resume
        hparams["optimizer"] = optimizer
    run = _setup(model, train_samples, val_samples, cfg, hparams, env=env, precision=precision, out_dir=out_dir,
                 workers=workers, progress=progress, max_steps=max_steps, val_batch_size=val_batch_size,
                 optimizer_name=optimizer)
    resumed_from = _resume(run, resume)
    status(epoch_description(hparams["n_train"], run), enabled=run.progress)
    wall0 = time.perf_counter()
    for epoch in range(resumed_from or 0, epochs):
        if _train_epoch(run, epoch):
            break
    run.loader = None  # its workers end with it
    return _finish(run, resumed_from=resumed_from, wall_s=time.perf_counter() - wall0, model_name=model_name)


def _photos(train_samples, val_samples, env: dist.DistEnv, shuffle_buffer: int, *,
            progress: bool) -> tuple[object, object, dict]:
    """(training photos, validation photos, their settings): ``ShardStream``s kept as they are (the training one
    counted), anything else as a list."""
    streamed = isinstance(train_samples, ShardStream)
    train_samples = train_samples if streamed else list(train_samples)
    val_samples = val_samples if isinstance(val_samples, ShardStream) else list(val_samples or [])
    settings = {"n_train": count_stream(train_samples, env, progress=progress) if streamed else len(train_samples),
                "n_val": None if isinstance(val_samples, ShardStream) else len(val_samples),
                "stream": streamed}  # streamed shards are read in another order than the same photos indexed
    if streamed:
        settings["shuffle_buffer"] = int(shuffle_buffer)
    return train_samples, val_samples, settings


def _setup(model: nn.Module, train_samples: list, val_samples: list, cfg: DataConfig, hp: dict, *,
           env: dist.DistEnv, precision: engine.Precision, out_dir: Path, workers: int, progress: bool,
           max_steps: int | None, val_batch_size: int | None, optimizer_name: str) -> _Run:
    transform = build_transform(hp["augment"], size=hp["train_size"], cfg=cfg, color_jitter=hp["color_jitter"])
    # Each sample's augmentation is drawn from (seed, epoch, position): the same whatever the worker count.
    dataset, sampler = training_order(train_samples, hp["n_train"], engine.SingleThreaded(transform)
                                      if workers == 0 else transform, hp, env)
    local_batch = hp["batch_size"] // env.world_size
    # Full batches only: every rank takes the same number of steps, and a size-1 batch would break
    # BatchNorm. Tiny data sets keep their one partial batch.
    drop_last = len(sampler) >= local_batch
    steps_per_epoch = len(sampler) // local_batch if drop_last else 1
    model = engine.prepare(model, env.device, precision)
    loop.broadcast_state(model, env)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(optimizer_name, params, lr=hp["lr"], momentum=hp["momentum"],
                               weight_decay=hp["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, steps_per_epoch=steps_per_epoch, epochs=hp["epochs"], schedule=hp["schedule"],
        warmup_epochs=hp["warmup_epochs"], step_epochs=hp["step_epochs"]))
    stepper = loop.Stepper(params=params, optimizer=optimizer, env=env, precision=precision,
                           label_smoothing=hp["label_smoothing"], min_images=2 if loop.batch_norms(model) else 1)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    return _Run(model=model, env=env, precision=precision, cfg=cfg, hparams=hp, out_dir=out_dir, dataset=dataset,
                sampler=sampler, local_batch=local_batch, drop_last=drop_last, steps_per_epoch=steps_per_epoch,
                workers=workers, stepper=stepper, scheduler=scheduler, progress=progress and env.is_main,
                max_steps=max_steps, val_samples=val_samples, val_batch_size=val_batch_size or 2 * local_batch)


def _resume(run: _Run, resume: bool) -> int | None:
    """Continue from the saved state (the epoch it ended), or start afresh (None)."""
    path, log_path = run.out_dir / STATE_NAME, run.out_dir / LOG_NAME
    if not (resume and path.exists()):
        if run.env.is_main and log_path.exists():
            log_path.unlink()
        dist.barrier(run.env)
        return None
    state = LoopState.load(path, STATE_LAYOUT)
    # A cosine's length is part of the run; a step schedule may be extended.
    keys = RESUME_KEYS + (("epochs",) if run.hparams["schedule"] == "cosine" else ())
    loop.check_resume(state.settings, run.hparams, keys, path)
    loop.load_weights(run.model, state.weights, path, complete=True)
    run.stepper.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    if state.scaler:
        run.stepper.scaler.load_state_dict(state.scaler)
    if state.rng:
        set_rng_state(state.rng)
    run.log, run.step = [schema.parse(EpochRecord, r) for r in state.log], state.epoch * run.steps_per_epoch
    if run.env.is_main:
        # The checkpoint is the truth: drop log lines of an epoch that never reached its checkpoint.
        write_text(log_path, "".join(json.dumps(r.to_dict()) + "\n" for r in run.log))
    status(f"resuming {run.out_dir} after epoch {state.epoch}/{run.hparams['epochs']}", enabled=run.progress)
    dist.barrier(run.env)
    return state.epoch


def _device_batches(loader, run: _Run):
    """(x, y) on the device per batch; (None, None) when every image of it was unreadable."""
    for batch in loader:
        for s in batch.skipped:
            run.skipped[s.path] = s.reason
        if batch.inputs is None:
            yield None, None
        else:
            yield (engine.to_device(batch.inputs, run.env.device, run.precision),
                   batch.labels.to(run.env.device, non_blocking=True))


def _train_epoch(run: _Run, epoch: int) -> bool:
    """One epoch: train, validate, save the state. True when ``max_steps`` stopped the run."""
    env, hp = run.env, run.hparams
    # Everything random in this epoch follows from (seed, epoch, rank): resume == uninterrupted.
    seed_everything(epoch_seed(hp["seed"], epoch, env.rank))
    run.sampler.set_epoch(epoch)
    if run.loader is None:  # one loader for the run: the sampler's keys carry the epoch to its workers
        run.loader = make_loader(run.dataset, batch_size=run.local_batch, sampler=run.sampler, workers=run.workers,
                                 generator=torch.Generator().manual_seed(epoch_seed(hp["seed"], epoch, env.rank)),
                                 drop_last=run.drop_last, pin_memory=env.device.type == "cuda", persistent=True)
    pbar = bar(run.steps_per_epoch * hp["batch_size"], f"epoch {epoch + 1}/{hp['epochs']} @{hp['train_size']}px",
               enabled=run.progress)

    def after_step(result: loop.StepResult, _totals) -> bool:
        if not env.distributed and result.n:  # stop at the first NaN (ranks check together at the epoch's end)
            loop.stop_if_diverged(result.loss_sum, None, epoch=epoch, lr=hp["lr"])
        run.scheduler.step()  # the schedule follows the position in the epoch, readable images or not
        run.step += 1
        pbar.update(run.local_batch * env.world_size)
        if result.n:
            pbar.set_postfix(loss=f"{result.loss_sum / result.n:.3f}", lr=f"{run.scheduler.get_last_lr()[0]:.4g}")
        return run.max_steps is not None and run.step >= run.max_steps

    run.model.train()
    t0 = time.perf_counter()
    try:
        totals = loop.run_epoch(run.stepper, run.model, _device_batches(run.loader, run), pad_to=run.steps_per_epoch,
                                on_step=after_step)
    finally:
        pbar.close()
    loop.average_running_stats(loop.batch_norms(run.model), totals.forwards, env)
    run.skipped.update(getattr(run.sampler, "left_out", {}))  # streamed samples without an image or a class
    record = _epoch_record(run, epoch, totals, time.perf_counter() - t0)
    loop.stop_if_diverged(record.train_loss, run.model, epoch=epoch, lr=hp["lr"])
    loop.stop_if_outputs_diverged(run.model, hp["train_size"], epoch=epoch, lr=hp["lr"])
    run.stopped_early = totals.stopped
    if not totals.stopped:
        _validate_into(run, record)
    run.log.append(record)
    if not totals.stopped:
        _save_epoch(run, epoch, record)
    return totals.stopped


def _epoch_record(run: _Run, epoch: int, totals: loop.EpochTotals, seconds: float) -> EpochRecord:
    loss_sum, hits, seen = totals.global_sums(run.env)
    (fwd, fwd_std), (bwd, bwd_std), (opt, opt_std) = map(
        loop.mean_std, (totals.forward_ms, totals.backward_ms, totals.optimizer_ms))
    return EpochRecord(
        epoch=epoch + 1, step=run.step, lr=run.scheduler.get_last_lr()[0],
        train_loss=loss_sum / seen if seen else None, train_top1=100.0 * hits / seen if seen else None,
        images=seen, seconds=seconds, images_per_s=seen / seconds if seconds > 0 else None,
        forward_ms=fwd, forward_ms_std=fwd_std, backward_ms=bwd, backward_ms_std=bwd_std, optimizer_ms=opt,
        optimizer_ms_std=opt_std, local_batch=run.local_batch)


def _validate_into(run: _Run, record: EpochRecord) -> None:
    if not run.val_samples:
        return
    hp = run.hparams
    val = _validate(run.model, run.val_samples, run.cfg, sizes=hp["val_sizes"], batch_size=run.val_batch_size,
                    env=run.env, precision=run.precision, workers=run.workers, progress=False)
    record.val_top1 = {str(k): v for k, v in val["top1"].items()}
    record.val_top1_train_size = val["top1"].get(hp["train_size"])
    record.val_top1_test_size = val["top1"].get(hp["test_size"])
    record.val_n = val["n"]
    for item in val["skipped"]:
        run.skipped[item["path"]] = item["reason"]


def _save_epoch(run: _Run, epoch: int, record: EpochRecord) -> None:
    if run.env.is_main:
        opt = run.stepper.optimizer
        LoopState(epoch=epoch + 1, weights=_cpu_state_dict(run.model), settings=run.hparams,
                  log=[r.to_dict() for r in run.log],
                  optimizer=opt.state_dict(), scheduler=run.scheduler.state_dict(),
                  scaler=run.stepper.scaler.state_dict(), rng=rng_state()).save(run.out_dir / STATE_NAME,
                                                                                 STATE_LAYOUT)
        append_jsonl(run.out_dir / LOG_NAME, record.to_dict())
        status(epoch_line(record, run.hparams["train_size"], run.hparams["test_size"]), enabled=run.progress)
    dist.barrier(run.env)


def _finish(run: _Run, *, resumed_from: int | None, wall_s: float, model_name: str | None) -> dict:
    all_skipped: dict[str, str] = {}
    for part in dist.all_gather_objects(run.skipped, run.env):
        all_skipped.update(part)
    log, hp = run.log, run.hparams
    last = log[-1] if log else None
    train_size, test_size = hp["train_size"], hp["test_size"]
    result = {
        "out_dir": str(run.out_dir), "epochs": [r.to_dict() for r in log], "hparams": hp, "train_size": train_size,
        "test_size": test_size, "resumed_from": resumed_from, "wall_s": wall_s,
        "final": {k: getattr(last, k) if last else None
                  for k in ("epoch", "val_top1", "val_top1_train_size", "val_top1_test_size", "train_top1",
                            "train_loss")},
        "forward_ms": loop.mean_std([r.forward_ms for r in log if r.forward_ms is not None])[0],
        "backward_ms": loop.mean_std([r.backward_ms for r in log if r.backward_ms is not None])[0],
        "images_per_s": last.images_per_s if last else None,
        "skipped": [{"path": p, "reason": r} for p, r in sorted(all_skipped.items())],
        "stopped_early": run.stopped_early,
    }
    if not run.stopped_early and run.env.is_main:
        acc = None
        if last and last.val_top1:
            acc = {"top1": last.val_top1, "train_size": train_size, "test_size": test_size, "n": last.val_n}
        path, meta = write_final_model(run.model, run.out_dir, model_name=model_name or _guess_name(run.model),
                                       cfg=run.cfg, train_size=train_size, test_size=test_size, accuracy=acc)
        result["model_path"], result["meta_path"] = str(path), str(meta)
    dist.barrier(run.env)
    return result

def _guess_name(model: nn.Module) -> str:
    name = model_pretrained_view(_unwrap(model)).architecture
    if not name:
        raise FixresError("train(): pass model_name= (the model's timm/torchvision name) for the export metadata")
    return name


def epoch_description(n_images: int, run: "_Run") -> str:
    """What one epoch is, in images: repeated augmentation and the epoch length factor change it, and
    only full batches run, so the progress bar's total is not the number of training photos."""
    hp, world = run.hparams, run.env.world_size
    drawn = len(run.sampler) * world
    used = run.steps_per_epoch * hp["batch_size"] if run.drop_last else drawn
    parts = [f"an epoch is {used} samples: {hp['epoch_length_factor']:g} x {n_images} training photos"]
    if hp["repeats"] > 1:
        parts.append(f"each drawn photo in {hp['repeats']} augmented copies (repeated augmentation), "
                     f"so about {min(n_images, drawn // hp['repeats'])} distinct photos")
    if used < drawn:
        parts.append(f"{drawn - used} left over after the last full batch of {hp['batch_size']} are not used")
    return "; ".join(parts)
