"""``fixres finetune``: FixRes fine-tuning at the test resolution (section 4.2), with its CLI helpers.

``adaptation_from_args`` (the CLI edge of ``fixres.method.inputs.load_for_adaptation``: model + train/val
indexes + data config) is shared with ``fixres adapt``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fixres.cli.args import (
    add_model_args,
    add_runtime_args,
    add_stream_args,
    image_size,
    positive_float,
    positive_int,
    stream_wanted,
)
from fixres.config import DEFAULT_PARTS, FINETUNE_AUGMENTATIONS, default_out

#: What a run writes to --out besides its export: all of one run's, or all as they were (``cli.app``).
RESULT_FILES = ("finetune.json",)
WRITES_EXPORT = True
PAPER_EPOCHS = 60


def add_data_args(p, *, test_size_help: str, streams: bool = False) -> None:
    p.add_argument("--data", required=True, metavar="DIR",
                   help="ImageFolder root holding train/ and val/ (or one ImageFolder used for both);"
                        " a folder of train-*.tar and val-*.tar shards; or hf:PATH, a Hugging Face "
                        "dataset on disk" + ("; with --stream, shards or 'pipe:CMD'" if streams else ""))
    p.add_argument("--test-size", type=image_size, default=None,
                   help=test_size_help + " (default: the size fixres recommends for the train size, "
                        "`fixres analyze`)")
    p.add_argument("--train-size", type=image_size, default=None,
                   help="the size the model was trained at (default: from its data config)")


def add_parser(sub, parents):
    p = sub.add_parser(
        "finetune", parents=parents, help="FixRes fine-tuning at the test resolution",
        description="Fine-tune the last layers of a classifier at the test resolution (paper section 4.2): "
                    "the classifier and the norm nearest the pooled vector by default (a CNN's batch-norm "
                    "before the global pooling). Defaults follow "
                    "the paper: SGD with momentum 0.9, weight decay 1e-4, learning rate 0.008 for a batch of "
                    f"512 scaled linearly with --batch-size, {PAPER_EPOCHS} epochs with the rate divided by 10 "
                    "half-way, and the test-time augmentation (test DA). With test DA the frozen part of the "
                    "network runs once (activation cache); --resume continues an interrupted run. Writes "
                    "finetune.json, finetune_log.jsonl, finetune_state.pt and the fixed model "
                    f"(model.safetensors + fixres.json) to --out (default {default_out('finetune')}).")
    add_data_args(p, test_size_help="the resolution to fix the model for", streams=True)
    add_stream_args(p, stream_help="read the training shards front to back, no index of the photos (implied by "
                                   "'pipe:CMD'): once into the activation cache with test DA (the same batches as "
                                   "the shards indexed), else each epoch as train --stream reads them")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help="what adapts: classifier, norm (the norm nearest the pooled vector: a batch-norm's affine "
                        "+ statistics, a LayerNorm/GroupNorm/RMSNorm's affine; 'bn' is the same), bn-stats "
                        "(statistics only), last-stage (transformers: the last block), or module names; "
                        "comma-separated (default classifier,norm: the paper's classifier,bn, section 4.2). "
                        "Note: the official FixRes code "
                        "trains only fc and re-estimates the statistics of the last batch-norm (layer4[2].bn3) "
                        "with its affine frozen, i.e. --parts classifier,bn-stats")
    p.add_argument("--augment", choices=FINETUNE_AUGMENTATIONS, default="test",
                   help="fine-tuning augmentation: test DA (default, the paper's), test DA2, or train DA")
    p.add_argument("--epochs", type=positive_int, default=PAPER_EPOCHS, help=f"default {PAPER_EPOCHS} (paper)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default 0.008 * batch size / 512, the paper's)")
    p.add_argument("--no-cache", action="store_true", help="run the full forward every epoch (no activation cache)")
    p.add_argument("--cache-budget-mb", type=positive_float, default=2048,
                   help="activation cache in RAM up to this size, else on disk in fp16 (default 2048)")
    p.add_argument("--resume", action="store_true", help="continue from --out/finetune_state.pt")
    p.add_argument("--epoch-eval", action="store_true", help="validation top-1 after every epoch")
    p.add_argument("--no-export", action="store_true", help="do not write model.safetensors + fixres.json")
    p.add_argument("--onnx", action="store_true", help="also export model.onnx at the test size (needs onnx)")
    add_model_args(p)
    add_runtime_args(p, batch_default=64, batch_note=": the global batch under torchrun")
    return p


@dataclass(frozen=True)
class FinetuneConfig:
    data: str
    test_size: int | None
    train_size: int | None
    parts: str
    augment: str
    epochs: int
    lr: float | None
    batch_size: int
    cache: bool
    cache_budget_mb: float
    resume: bool
    epoch_eval: bool
    export: bool
    onnx: bool
    out: str
    device: str
    workers: int | None
    amp: bool
    seed: int
    quiet: bool
    stream: bool = False  # training shards read front to back (--stream, or a pipe: value)
    shuffle_buffer: int | None = None  # with stream, no cache: photos each process mixes (None: the default)


def adaptation_from_args(args, *, need_train: bool = True):
    """CLI edge of ``fixres.method.inputs.load_for_adaptation``: (bundle, data config, train index or None,
    val index or None, env, precision, test size), with the distributed env and precision set up here."""
    from fixres.cli.args import model_spec, warn_stride
    from fixres.data.folders import read_class_map
    from fixres.method.inputs import load_for_adaptation
    from fixres.runtime import dist
    from fixres.runtime.engine import precision_for
    from fixres.runtime.progress import status

    spec = model_spec(args)
    stream = _stream_request(args)
    env = dist.init(args.device)
    inputs = load_for_adaptation(spec, args.data, class_map=read_class_map(args.class_map) if args.class_map else None,
                                 overrides=dict(interpolation=args.interpolation, mean=args.mean, std=args.std,
                                                crop_ratio=args.crop_ratio),
                                 test_size=args.test_size, need_train=need_train, stream=stream)
    for line in inputs.warnings:
        status(f"warning: {line}", enabled=env.is_main and not args.quiet)
    warn_stride(inputs.test_size, inputs.cfg.stride, "test size", quiet=args.quiet or not env.is_main)
    precision = precision_for(env.device, not args.no_amp)
    return inputs.bundle, inputs.cfg, inputs.train, inputs.val, env, precision, inputs.test_size


def _stream_request(args):
    """The ``StreamRequest`` of a command taking --stream (implied by a ``pipe:`` value), else None."""
    from fixres.method.inputs import StreamRequest
    if not stream_wanted(args):
        return None
    return StreamRequest(val_data=args.val_data, train_count=getattr(args, "train_count", None))


def run(args):
    from pathlib import Path

    from fixres.config import DEFAULT_BATCH_SIZE
    from fixres.data.streams import ShardStream
    from fixres.method.finetuning import finetune
    from fixres.models.card import CardFacts
    from fixres.models.export import export_model
    from fixres.runtime import dist
    from fixres.runtime.progress import status

    bundle, cfg, train, val, env, precision, test_size = adaptation_from_args(args)
    fc = FinetuneConfig(data=args.data, test_size=test_size, train_size=cfg.train_size, parts=args.parts,
                        augment=args.augment, epochs=args.epochs, lr=args.lr,
                        batch_size=args.batch_size or DEFAULT_BATCH_SIZE, cache=not args.no_cache,
                        cache_budget_mb=args.cache_budget_mb, resume=args.resume, epoch_eval=args.epoch_eval,
                        export=not args.no_export, onnx=args.onnx, out=args.out or default_out("finetune"),
                        device=args.device,
                        workers=args.workers, amp=not args.no_amp, seed=args.seed, quiet=args.quiet,
                        stream=isinstance(train, ShardStream), shuffle_buffer=args.shuffle_buffer)
    show = not fc.quiet and env.is_main
    status(f"fixres finetune: {bundle.name} from {cfg.train_size}px to {test_size}px, parts {fc.parts}, "
           f"{fc.augment} DA, {fc.epochs} epochs, "
           f"{f'{len(train.shards)} training shards, streamed' if fc.stream else f'{len(train)} training images'}, "
           f"{precision.describe()}", enabled=show)
    if val is None or (val.shards == train.shards if fc.stream else val.root == train.root):
        status("warning: no separate val/ folder: accuracy is measured on the training images", enabled=show)
    try:
        result = finetune(bundle.model, train, val if val is not None else train, cfg, test_size=test_size,
                          parts=fc.parts, augment=fc.augment, epochs=fc.epochs, lr=fc.lr, batch_size=fc.batch_size,
                          cache=fc.cache, out_dir=fc.out, resume=fc.resume, env=env, precision=precision,
                          seed=fc.seed, workers=fc.workers, progress=show, epoch_eval=fc.epoch_eval,
                          cache_budget_mb=fc.cache_budget_mb,
                          **({"shuffle_buffer": fc.shuffle_buffer} if fc.shuffle_buffer else {}))
    finally:
        dist.shutdown()
    if not env.is_main:  # under torchrun, rank 0 exports and reports
        return None
    data = fc.data if fc.stream else str(Path(fc.data))  # a pipe: command is not a path
    result = {"command": "finetune", "model": bundle.name, "data": data, **result}
    if fc.export:
        path = export_model(bundle.model, fc.out, model_name=bundle.name, cfg=cfg, test_size=test_size,
                            train_size=cfg.train_size, class_names=list(cfg.class_names), accuracy=result["after"],
                            extra={"adaptation": {"method": "finetune", "parts": result["parts"],
                                                  "augment": fc.augment, "epochs": fc.epochs}}, onnx=fc.onnx,
                            card=CardFacts(data=data, command=getattr(args, "_invocation", None)))
        result["export"] = str(path)
    return result, _summary(result, bundle.name, fc)


def _summary(result: dict, name: str, fc: FinetuneConfig) -> str:
    """The lines ``fixres finetune`` prints: what was fine-tuned, top-1 before and after, the time."""
    b, a, size = result["before"], result["after"], result["test_size"]
    t = result["timing"]
    lines = [f"{name}: fine-tuned {', '.join(result['trainable']) or '(statistics only)'} at {size}px "
             f"({fc.epochs} epochs, {fc.augment} DA, "
             f"cache: {'yes, ' + result['cache'].get('cut', '') if result['cache']['used'] else 'no'})"]
    if b and a:
        from fixres.choosing.significance import binomial_se
        lines.append(f"  top-1 at {size}px: {b['top1']:.2f} ± {binomial_se(b['top1'], b['n']):.2f}% before -> "
                     f"{a['top1']:.2f} ± {binomial_se(a['top1'], a['n']):.2f}% after (± binomial standard error)")
    fwd, bwd = t["ms_per_batch_forward"], t["ms_per_batch_backward"]
    if fwd:
        lines.append(f"  {fwd['mean']:.1f} ms/batch forward, {bwd['mean']:.1f} ms/batch backward; "
                     f"fine-tuning {t['finetune_s']:.1f} s, total {t['wall_s']:.1f} s")
    if "export" in result:
        lines.append(f"  fixed model: {result['export']} (fixres eval --checkpoint {result['export']} --data ...)")
    return "\n".join(lines)
