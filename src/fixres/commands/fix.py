"""``fixres fix``: the whole method: analyse, sweep, fine-tune at the chosen size, statistics, export, report."""

from __future__ import annotations

from fixres.commands._args import (add_dataset_size_args, add_model_args, add_runtime_args, int_list, positive_float,
                                  positive_int)
from fixres.config import DEFAULT_PARTS, FINETUNE_AUGMENTATIONS

DESCRIPTION = """\
The whole method on your model and data: analyse the apparent object sizes (recommended test size),
sweep the test sizes, choose the size on a held-out part of the training images, fine-tune the classifier and the batch-norm before pooling at the chosen size
(test-time augmentation, cached activations), measure the pooled-activation statistics before and
after, export the fixed model and write an HTML report.

With no arguments it runs on an embedded default: it generates a data set following the paper's
imaging model (section 3.1) into RUN_DIR/data, trains a small built-in CNN on it at 64 px with
RandomResizedCrop, then fixes it. Each step's result is written under the run folder (--out, default
runs/fix); rerunning the same command after a kill continues where it stopped, and a rerun with
other settings, another checkpoint file or changed photos recomputes exactly the steps that read
them (and says which)."""


def add_parser(sub, parents):
    p = sub.add_parser("fix", parents=parents, help="the whole method: analyse, sweep, fine-tune, report",
                       description=DESCRIPTION)
    add_model_args(p, random_ok=True, pretrained=False)  # fix trains from scratch when given no weights
    g = p.add_argument_group("data and sizes")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="ImageFolder with train/ and val/ (default: the embedded data set, generated)")
    g.add_argument("--train-size", type=positive_int, default=None,
                   help="size the model was (or is to be) trained at (default: the model's own; 64 embedded)")
    g.add_argument("--test-sizes", type=int_list, default=None, metavar="SIZES",
                   help="sizes to sweep, e.g. 64,96,128 or 48:224:16 (default: about T/2 to 3T in steps of 16)")
    g.add_argument("--test-size", type=positive_int, default=None,
                   help="fix at this size (default: chosen on a held-out part of the training images, never on "
                        "the validation images reported: the larger of the recommended and the best untuned size)")
    f = p.add_argument_group("fine-tuning (paper defaults: classifier + bn, test DA)")
    f.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help="what adapts: classifier, classifier,norm (default; 'bn' is the same), "
                        "classifier,norm,last-stage, bn-stats or module names")
    f.add_argument("--augment", choices=FINETUNE_AUGMENTATIONS, default="test",
                   help="fine-tuning augmentation (test = the test pre-processing, cached)")
    f.add_argument("--epochs", type=positive_int, default=10, help="fine-tuning epochs (default 10)")
    f.add_argument("--lr", type=positive_float, default=None,
                   help="fine-tuning learning rate (default 0.008 x batch / 512, as the paper)")
    t = p.add_argument_group("training (embedded default, or a model without weights)")
    t.add_argument("--train-epochs", type=positive_int, default=30, help="training epochs (default 30)")
    t.add_argument("--train-augment", choices=("train", "control"), default="train",
                   help="train = RandomResizedCrop; control = resize + fixed-size random crop (appendix D)")
    t.add_argument("--train-batch-size", type=positive_int, default=64, help="training batch (default 64)")
    t.add_argument("--train-lr", type=positive_float, default=None, help="(default 0.1 x batch / 256)")
    e = p.add_argument_group("embedded data set")
    add_dataset_size_args(e)
    p.add_argument("--restart", action="store_true", help="start the run folder over instead of resuming it")
    add_runtime_args(p, batch_default=64)
    return p


def config_from_args(args):
    from fixres.pipeline import DEFAULT_BATCH, DEFAULT_OUT, FixConfig
    return FixConfig(
        model=args.model, checkpoint=args.checkpoint, weights=args.weights, num_classes=args.num_classes,
        class_map=args.class_map, data=args.data, out=args.out or str(DEFAULT_OUT), train_size=args.train_size,
        test_sizes=args.test_sizes, test_size=args.test_size, parts=args.parts, augment=args.augment,
        finetune_epochs=args.epochs, train_epochs=args.train_epochs, train_augment=args.train_augment,
        train_batch_size=args.train_batch_size, train_lr=args.train_lr, batch_size=args.batch_size or DEFAULT_BATCH,
        lr=args.lr, crop_ratio=args.crop_ratio, interpolation=args.interpolation, mean=args.mean, std=args.std,
        device=args.device, amp=not args.no_amp, workers=args.workers, seed=args.seed, classes=args.classes,
        train_per_class=args.train_per_class, val_per_class=args.val_per_class, restart=args.restart,
        progress=not args.quiet)


def _pm(top1, std) -> str:
    return "n/a" if top1 is None else f"{top1:.1f}%" + ("" if std is None else f" ± {std:.1f}")


def run(args):
    from fixres.dist import refuse_distributed
    from fixres.pipeline import run_fix
    from fixres.progress import format_duration
    refuse_distributed("fixres fix (run its steps, e.g. fixres train / finetune, under torchrun instead)")
    result = run_fix(config_from_args(args))
    h = result["headline"]
    lines = [
        f"fixres fix: {h['model']} trained at {h['train_size']}px, fixed at {h['test_size']}px "
        f"({result['choice'].get('reason', '')}, chosen on {result['choice'].get('chosen_on', 'n/a')}); "
        f"{h['n_val']} validation images, ± = fold std",
        f"  top-1 at the train size {h['train_size']}px:        {_pm(h['top1_at_train_size'], h['top1_at_train_size_std'])}",
        f"  best untuned test size {h['best_untuned_test_size']}px:         "
        f"{_pm(h['top1_best_untuned'], h['top1_best_untuned_std'])}",
        f"  untuned at {h['test_size']}px:                     "
        f"{_pm(h['top1_untuned_at_test_size'], h['top1_untuned_at_test_size_std'])}",
        f"  after the fix at {h['test_size']}px:               {_pm(h['top1_fixed'], h['top1_fixed_std'])}",
        f"  time: {format_duration(h['seconds_total'])} in the steps ({format_duration(result['seconds'])} in this call)",
        f"  fixed model: {result['export']}/model.safetensors",
        f"report: {result['report']}",
    ]
    for step, why in (result.get("recomputed") or {}).items():
        lines.append(f"  recomputed {step}: " + ("changed " if " " not in why[0] else "") + ", ".join(why))
    return result, "\n".join(lines)
