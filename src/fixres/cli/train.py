"""``fixres train``: train at a (low) resolution, from scratch or by transfer (paper sections 5, 5.3).

Runs alone or under ``torchrun --nproc_per_node=K`` (DDP; ``--batch-size`` is the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from fixres.cli.args import (
    add_model_args,
    add_runtime_args,
    add_stream_args,
    image_size,
    int_list,
    model_spec,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    stream_wanted,
)
from fixres.config import DEFAULT_TRAIN_BATCH_SIZE, DEFAULT_TRAIN_EPOCHS, default_out

#: A run's export is all of one run's, or, when the run fails, as it was (``cli.app``).
WRITES_EXPORT = True


def _smoothing(text: str) -> float:
    import argparse
    v = nonneg_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"label smoothing must be in [0, 1), got {v}")
    return v


def add_parser(sub, parents):
    p = sub.add_parser(
        "train", parents=parents, help="train at a (low) resolution, from scratch or transfer",
        description="Train a classifier at --train-size with the paper's protocol (SGD, lr 0.1 x B/256, "
                    "momentum 0.9, weight decay 1e-4, /10 every 30 epochs, RandomResizedCrop + flip, repeated "
                    "augmentation x3 with epochs of 2N samples as the official code). With --checkpoint/--weights "
                    "of another class count, a new head is made and the whole network trains (transfer, section "
                    "5.3). Validates each epoch at the train size and at the recommended test size. Under "
                    "torchrun it runs data-parallel; --resume continues an interrupted run exactly.")
    add_model_args(p, random_ok=True)  # train builds random weights on purpose; --pretrained: transfer
    add_runtime_args(p, batch_default=DEFAULT_TRAIN_BATCH_SIZE, batch_note=": the global batch under torchrun")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="ImageFolder root (ROOT/train and ROOT/val when present), a folder of "
                        "train-*.tar and val-*.tar shards, or hf:PATH; with --stream, shards or 'pipe:CMD'")
    add_stream_args(p, stream_help="read WebDataset shards front to back, no index of the photos (implied by "
                                   "'pipe:CMD', e.g. 'pipe:aws s3 cp s3://B/train-{000..127}.tar -'): each epoch the "
                                   "shards in a seeded order, split by shard over processes, through a shuffle "
                                   "buffer; needs --num-classes or --class-map")
    p.add_argument("--train-size", type=image_size, required=True, help="training resolution T (pixels)")
    p.add_argument("--epochs", type=positive_int, default=DEFAULT_TRAIN_EPOCHS,
                   help=f"epochs (default {DEFAULT_TRAIN_EPOCHS}; the paper trains ImageNet for 120)")
    p.add_argument("--lr", type=positive_float, default=None, help="base learning rate (default 0.1 x B / 256)")
    p.add_argument("--schedule", choices=("step", "cosine"), default="step",
                   help="step: /10 every --step-epochs (paper); cosine: half-cosine to 0")
    p.add_argument("--step-epochs", type=positive_int, default=30, help="epochs between /10 steps (default 30)")
    p.add_argument("--warmup-epochs", type=nonneg_float, default=0.0, help="linear warm-up length (epochs)")
    p.add_argument("--label-smoothing", type=_smoothing, default=0.0, help="in [0, 1) (default 0, the paper)")
    p.add_argument("--momentum", type=nonneg_float, default=0.9, help="SGD momentum (default 0.9, the paper)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd (default, the paper) or adamw (as ViTs and ConvNeXts are trained; default lr "
                        "5e-4 x B / 512, DeiT's; give --weight-decay, e.g. 0.05)")
    p.add_argument("--weight-decay", type=nonneg_float, default=1e-4, help="(default 1e-4, the paper)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="repeated augmentation: copies of each image per epoch (1 = off; paper: 3)")
    p.add_argument("--epoch-length-factor", type=positive_float, default=None, metavar="F",
                   help="samples drawn per epoch / training images (default: 2 with repeated augmentation, "
                        "as the official code's RASampler(len_factor=2.0) and the paper's schedule; 1 with "
                        "--repeats 1). 1 makes an epoch one pass of N samples (N/repeats distinct images)")
    p.add_argument("--color-jitter", action="store_true", help="add ColorJitter(0.3, 0.3, 0.3) (paper's train DA)")
    p.add_argument("--augment", choices=("train", "control", "test", "test2"), default="train",
                   help="train: RandomResizedCrop + flip; control: appendix D resize + fixed-size random crop")
    p.add_argument("--val-sizes", type=int_list, default=None,
                   help="validation sizes (default: the train size and the recommended test size)")
    p.add_argument("--max-steps", type=nonneg_int, default=None, help=argparse_suppress())
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    return p


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


@dataclass(frozen=True)
class TrainRunConfig:
    """``fixres train`` arguments, typed (built at the CLI edge)."""

    model: str | None
    checkpoint: str | None
    weights: str | None
    num_classes: int | None
    class_map: str | None
    data: str
    out: str
    train_size: int
    epochs: int
    batch_size: int
    lr: float | None
    schedule: str
    step_epochs: int
    warmup_epochs: float
    label_smoothing: float
    momentum: float
    weight_decay: float
    repeats: int
    color_jitter: bool
    augment: str
    val_sizes: list[int] | None
    resume: bool
    device: str
    workers: int | None
    amp: bool
    seed: int
    max_steps: int | None
    progress: bool
    overrides: dict
    epoch_length_factor: float | None = None  # None: the paper's (2 with repeated augmentation)
    stream: bool = False  # shards read front to back, not indexed (--stream, or a pipe: value)
    val_data: str | None = None  # with stream: the validation shards
    train_count: int | None = None  # with stream: the photos the training shards hold (no counting pass)
    shuffle_buffer: int | None = None  # with stream: photos each process mixes (None: the default)
    optimizer: str = "sgd"
    #: the command line, for the model card beside the export
    command: str | None = None
    #: fixres.models.loading.ModelSpec from the model flags (--ema, --strict, --pretrained ...); None: built from
    #: model/checkpoint/weights alone
    spec: object = None

    @classmethod
    def from_args(cls, args) -> "TrainRunConfig":
        return cls(model=args.model, checkpoint=args.checkpoint, weights=args.weights, num_classes=args.num_classes,
                   class_map=args.class_map, data=args.data, out=args.out or default_out("train"),
                   train_size=args.train_size, epochs=args.epochs,
                   batch_size=args.batch_size or DEFAULT_TRAIN_BATCH_SIZE,
                   lr=args.lr, schedule=args.schedule, step_epochs=args.step_epochs,
                   warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, momentum=args.momentum,
                   weight_decay=args.weight_decay, repeats=args.repeats,
                   epoch_length_factor=args.epoch_length_factor, color_jitter=args.color_jitter,
                   augment=args.augment, val_sizes=args.val_sizes, resume=args.resume, device=args.device,
                   workers=args.workers, amp=not args.no_amp, seed=args.seed, max_steps=args.max_steps,
                   progress=not args.quiet,
                   overrides={"crop_ratio": args.crop_ratio, "interpolation": args.interpolation,
                              "mean": args.mean, "std": args.std},
                   spec=model_spec(args), optimizer=args.optimizer, command=getattr(args, "_invocation", None),
                   stream=stream_wanted(args),
                   val_data=args.val_data, train_count=args.train_count, shuffle_buffer=args.shuffle_buffer)


def run(args):
    from fixres.runtime import dist
    cfg = TrainRunConfig.from_args(args)
    env = dist.init(cfg.device)
    try:
        result = run_training(cfg, env)
    finally:
        dist.shutdown()
    if not env.is_main:
        return None  # one report per run, from rank 0
    return result, summary_text(result)


def run_training(rc: TrainRunConfig, env) -> dict:
    import torch

    from fixres.errors import UsageError
    from fixres.method.train import train
    from fixres.models.loading import num_outputs, replace_classifier
    from fixres.runtime import engine
    from fixres.runtime.progress import status

    show = rc.progress and env.is_main
    train_index, val_index = _splits(rc, show)
    num_classes = rc.num_classes or train_index.num_classes

    # The new head's initial weights come from the seed: every rank and every resume builds the same model.
    torch.manual_seed(rc.seed)
    bundle, source = _load(rc, num_classes)
    transfer = source is not None
    if num_outputs(bundle.model) != num_classes:
        # Transfer (section 5.3): a new head for the new classes; the whole network trains.
        if not transfer:
            raise UsageError(f"the model has {num_outputs(bundle.model)} outputs, the data {num_classes} classes")
        replace_classifier(bundle.model, num_classes)
        bundle.meta["new_head"] = num_classes
    data_cfg = bundle.data_config.with_overrides(**rc.overrides).with_overrides(
        train_size=rc.train_size, num_classes=num_classes, class_names=tuple(train_index.classes))
    precision = engine.precision_for(env.device, amp=rc.amp)
    status(f"training {bundle.name} ({'transfer from ' + source if transfer else 'from scratch'}"
           f"{', new head' if 'new_head' in bundle.meta else ''}) on "
           f"{f'{len(train_index.shards)} streamed shard(s)' if rc.stream else f'{len(train_index)} images'} of "
           f"{num_classes} classes at {rc.train_size}px, {env.world_size} process(es) on {env.device}, "
           f"{precision.describe()}", enabled=show)
    result = train(bundle.model, train_index if rc.stream else train_index.samples,
                   val_index if rc.stream else val_index.samples, data_cfg, train_size=rc.train_size,
                   epochs=rc.epochs, batch_size=rc.batch_size, lr=rc.lr, out_dir=rc.out, resume=rc.resume,
                   repeats=rc.repeats, augment=rc.augment, color_jitter=rc.color_jitter, schedule=rc.schedule,
                   warmup_epochs=rc.warmup_epochs, label_smoothing=rc.label_smoothing, val_sizes=rc.val_sizes,
                   env=env, precision=precision, seed=rc.seed, workers=rc.workers, progress=rc.progress,
                   step_epochs=rc.step_epochs, momentum=rc.momentum, weight_decay=rc.weight_decay,
                   model_name=bundle.name, max_steps=rc.max_steps, epoch_length_factor=rc.epoch_length_factor,
                   optimizer=rc.optimizer, **({"shuffle_buffer": rc.shuffle_buffer} if rc.shuffle_buffer else {}))
    if result.get("model_path"):  # written by rank 0 alone; the card says what only this command knows
        from fixres.models.card import CardFacts
        from fixres.models.export import write_card
        write_card(rc.out, data_cfg, CardFacts(data=str(val_index.root if val_index else train_index.root),
                                               command=rc.command))
    result.update({"model": bundle.name, "source": bundle.source, "transfer": transfer,
                   "new_head": bundle.new_head, "num_classes": num_classes,
                   "classes": list(train_index.classes), "train_dir": str(train_index.root),
                   "val_dir": str(val_index.root) if val_index else None,
                   "device": str(env.device)})
    return result


def _splits(rc: TrainRunConfig, show: bool):
    """(training photos, validation photos): indexed, val mapped onto train's classes by name; or streamed."""
    from fixres.data.folders import missing_classes_warning, read_class_map
    from fixres.method.inputs import index_train_val
    from fixres.runtime.progress import status
    class_map = read_class_map(rc.class_map) if rc.class_map else None
    if rc.stream:
        return _streams(rc, class_map)
    splits = index_train_val(rc.data, class_map=class_map, num_classes=rc.num_classes, warn=show)
    if splits.one_folder:
        status(f"warning: {rc.data} has no val/ folder: validation uses the training images", enabled=show)
    if missing_classes_warning(splits.val):
        status(f"warning: {missing_classes_warning(splits.val)}", enabled=show)
    return splits.train, splits.val


def _streams(rc: TrainRunConfig, class_map):
    """(training shards, validation shards or None) to stream, their classes from the class map or
    ``--num-classes``."""
    from fixres.errors import UsageError
    from fixres.method.inputs import StreamRequest
    if class_map is None and rc.num_classes is None:
        raise UsageError("streamed training reads no class list: give --num-classes N (.cls holding numbers) or "
                         "--class-map FILE")
    return StreamRequest(val_data=rc.val_data, train_count=rc.train_count).open(
        rc.data, classes=class_map, num_classes=rc.num_classes or 0)


def _load(rc: TrainRunConfig, num_classes: int):
    """The model the flags name, through ``ModelSpec.load`` (so --ema/--strict/--pretrained apply); a checkpoint
    keeps its own head (a new one is made for other classes), other sources are built for ``num_classes``.
    Returns (bundle, where its weights came from: checkpoint, weights or pretrained; None for random ones)."""
    from dataclasses import replace

    from fixres.errors import UsageError
    from fixres.models.loading import ModelSpec
    spec = rc.spec or ModelSpec(model=rc.model, checkpoint=rc.checkpoint, weights=rc.weights)
    if not (spec.model or spec.checkpoint or spec.weights):
        raise UsageError("no model given: pass --model NAME (from scratch), or --checkpoint/--weights (transfer)")
    spec = replace(spec, num_classes=None if spec.checkpoint else num_classes, train_size=rc.train_size,
                   random_init=True)
    return spec.load(), spec.checkpoint or spec.weights or (f"{spec.model} (pretrained)" if spec.pretrained else None)


def summary_text(r: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.1f}%"
    f = r["final"]  # train() writes every key of "final", None where unknown
    h = r["hparams"]
    lines = [f"trained {r['model']} at {r['train_size']}px for {f['epoch']} epoch(s) "
             f"({'transfer' if r['transfer'] else 'from scratch'}; batch {h['batch_size']}, lr {h['lr']:.4g}, "
             f"{h['schedule']} schedule, repeats {h['repeats']}, epoch {h['epoch_length_factor']:g}N samples, "
             f"{h['precision']}) in {r['wall_s']:.0f} s"
             + (f" (resumed after epoch {r['resumed_from']})" if r["resumed_from"] else "")]
    if f["val_top1"]:
        lines.append(f"  val top-1: {pct(f['val_top1_train_size'])} at the train size {r['train_size']}px, "
                     f"{pct(f['val_top1_test_size'])} at the recommended test size {r['test_size']}px")
        others = {k: v for k, v in f["val_top1"].items() if int(k) not in (r["train_size"], r["test_size"])}
        if others:
            lines.append("  also: " + ", ".join(f"{pct(v)} at {k}px" for k, v in others.items()))
    if r["forward_ms"] is not None:
        lines.append(f"  per batch of {h['batch_size'] // h['world_size']}: forward {r['forward_ms']:.1f} ms, "
                     f"backward {r['backward_ms']:.1f} ms; {r['images_per_s'] or 0:.1f} images/s")
    if r["skipped"]:
        lines.append(f"  skipped {len(r['skipped'])} unreadable image(s), e.g. {r['skipped'][0]['path']}")
    if "model_path" in r:  # written with "meta_path" when the run exported its model (not when stopped early)
        lines.append(f"  weights: {r['model_path']} (+ {r['meta_path']}); log: {r['out_dir']}/log.jsonl")
        lines.append(f"  next: fixres fix --checkpoint {r['model_path']} --data DATA --train-size {r['train_size']} "
                     "(chooses the test size after fixing and writes a report; or fixres finetune for one size)")
    return "\n".join(lines)
