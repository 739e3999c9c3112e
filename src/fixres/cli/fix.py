"""``fixres fix``: the whole method: analyze, sweep, fix at every candidate size, choose, statistics, export, report."""

from __future__ import annotations

from fixres.cli.args import (
    add_dataset_size_args,
    add_model_args,
    add_runtime_args,
    image_size,
    int_list,
    positive_float,
    positive_int,
)
from fixres.config import DEFAULT_PARTS, FINETUNE_AUGMENTATIONS, ROBUSTNESS_IMAGES

DESCRIPTION = """\
The whole method on your model and data: analyze the apparent object sizes (recommended test size),
sweep the test sizes, fix at every candidate size (fine-tuning the classifier and the batch-norm
before pooling at that size, test-time augmentation, cached activations) and keep the one most
accurate on photos the model never saw (held-out training photos when fix trains the model; for a
model trained elsewhere, two-fold cross-selection on the validation photos, or --select-data), measure
the pooled-activation statistics before and after, export the fixed model and write an HTML report
with every candidate before and after the fix, its cost and its calibration.

With no arguments it runs on an embedded default: it generates a data set following the paper's
imaging model (section 3.1) into RUN_DIR/data, trains a small built-in CNN on it at 64 px with
RandomResizedCrop, then fixes it. Each step's result is written under the run folder (--out, default
runs/fix); rerunning the same command after a kill continues where it stopped, and a rerun with
other settings, another checkpoint file or changed photos recomputes exactly the steps that read
them (and says which)."""


def fraction(text: str) -> float:
    """A share strictly between 0 and 1."""
    import argparse
    value = positive_float(text)
    if not value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def _add_choice_args(p) -> None:
    """The flags of choosing what is served: candidates, the rule, which photos choose, budgets."""
    s = p.add_argument_group("choosing what is served after fixing")
    s.add_argument("--candidates", type=int_list, default=None, metavar="SIZES",
                   help="sizes to fix at and choose from (default: stride multiples from T/2 to 2T and the "
                        "neighbours of the unrounded recommendation)")
    s.add_argument("--select-budget", type=positive_float, default=60.0, metavar="MIN",
                   help="cap on the estimated time of the candidate fixes, printed up front; the sizes farthest "
                        "from the recommendation and T are dropped first (default 60 minutes)")
    s.add_argument("--choose", choices=("cheapest", "best"), default="cheapest",
                   help="cheapest (default): serve the cheapest candidate (every size fixed, and the model as trained "
                        "at every size) whose top-1 on the choosing photos is not below the best's beyond noise "
                        "(exact paired test, p >= 0.05): 'serve it as trained' is a valid answer; best: the most "
                        "accurate fixed size, whatever it costs")
    s.add_argument("--holdout", type=fraction, default=0.2, metavar="F",
                   help="share of each training class held out to choose the size when fix trains the model "
                        "(default 0.2)")
    s.add_argument("--select-data", default=None, metavar="DIR",
                   help="a labelled folder (DIR/CLASS/IMAGE, photos the model never saw, not val) that chooses the "
                        "size and the fine-tuning schedule (default for a given model: two-fold cross-selection on "
                        "the validation photos; for a model fix trains: the held-out training photos)")
    s.add_argument("--holdout-untouched", action="store_true",
                   help="the given model never trained on the held-out training photos: choose on them")
    s.add_argument("--max-test-size", type=image_size, default=None, metavar="S",
                   help="serve at most at this size: the choice among the candidates not above it")
    s.add_argument("--budget-ms", type=positive_float, default=None, metavar="X",
                   help="serve a candidate whose latency (ms per image, batch 1, measured here) is <= X")
    s.add_argument("--latency-on", choices=("torch", "onnxruntime"), default="torch",
                   help="the runtime the candidates' latency (--budget-ms, the frontier) is timed on: eager PyTorch "
                        "(default) or ONNX Runtime on this CPU, each size exported to ONNX (pip install "
                        "'fixres[onnxruntime]')")
    s.add_argument("--budget-gflops", type=positive_float, default=None, metavar="X",
                   help="serve a candidate needing <= X GFLOPs per image")
    s.add_argument("--temperature-scale", action="store_true",
                   help="fit a softmax temperature on the held-out images and fold it into the classifier")
    s.add_argument("--label-free", action="store_true",
                   help="no labels read: bn-recalibrate at the analysis' recommended size on the training images "
                        "(reported on val when val has labels)")


def add_parser(sub, parents):
    p = sub.add_parser("fix", parents=parents, help="the whole method: analyze, sweep, fine-tune, report",
                       description=DESCRIPTION)
    add_model_args(p, random_ok=True)  # fix trains from scratch when given no weights
    g = p.add_argument_group("data and sizes")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="ImageFolder with train/ and val/, a folder of train-*.tar and val-*.tar "
                        "shards, or hf:PATH (default: the embedded data set, generated)")
    g.add_argument("--train-size", type=image_size, default=None,
                   help="size the model was (or is to be) trained at (default: the model's own; 64 embedded)")
    g.add_argument("--test-sizes", type=int_list, default=None, metavar="SIZES",
                   help="sizes to sweep, e.g. 64,96,128 or 48:224:16 (default: about T/2 to 2T, the candidates' "
                        "range, in steps of the model's stride)")
    g.add_argument("--test-size", type=image_size, default=None,
                   help="fix at this size only (default: fix at every candidate size and serve the cheapest "
                        "candidate, fixed or as trained, not worse than the best on photos the model never saw; see "
                        "--choose and --select-data)")
    _add_choice_args(p)
    f = p.add_argument_group("fine-tuning (paper defaults: classifier + bn, test DA)")
    f.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help="what adapts: classifier, classifier,norm (default; 'bn' is the same), "
                        "classifier,norm,last-stage, bn-stats or module names")
    f.add_argument("--augment", choices=FINETUNE_AUGMENTATIONS, default="test",
                   help="fine-tuning augmentation (test = the test pre-processing, cached)")
    f.add_argument("--epochs", type=positive_int, default=10, help="fine-tuning epochs (default 10)")
    f.add_argument("--lr", type=positive_float, default=None,
                   help="fine-tuning learning rate (default: chosen on the held-out images from 1x and 10x the "
                        "paper's 0.008 x batch / 512, and 1x / 3x --epochs)")
    f.add_argument("--no-tune-schedule", action="store_true",
                   help="fine-tune with --lr (the paper's rate by default) and --epochs as given, no grid")
    r = p.add_argument_group("robustness (top-1 under corrupted photos, before and after the fix)")
    r.add_argument("--no-robustness", action="store_true",
                   help="skip the corruption table (Gaussian noise, blur, JPEG, contrast; 3 severities each)")
    r.add_argument("--robustness-images", type=positive_int, default=ROBUSTNESS_IMAGES, metavar="N",
                   help="validation photos evaluated under each corruption (a seeded class-stratified subset; "
                        f"default {ROBUSTNESS_IMAGES})")
    t = p.add_argument_group("training (embedded default, or a model without weights)")
    t.add_argument("--train-epochs", type=positive_int, default=30, help="training epochs (default 30)")
    t.add_argument("--train-augment", choices=("train", "control"), default="train",
                   help="how the model was (or is) trained, which the analysis of object sizes follows: train = "
                        "RandomResizedCrop; control = resize + fixed-size random crop (appendix D, ratio 1)")
    t.add_argument("--train-batch-size", type=positive_int, default=64, help="training batch (default 64)")
    t.add_argument("--train-lr", type=positive_float, default=None, help="(default 0.1 x batch / 256)")
    e = p.add_argument_group("embedded data set")
    add_dataset_size_args(e)
    p.add_argument("--restart", action="store_true", help="start the run folder over instead of resuming it")
    p.add_argument("--license", default="unknown", metavar="ID",
                   help="the weights' licence for the export's model card (README.md), e.g. apache-2.0 (default: "
                        "unknown)")
    add_runtime_args(p, batch_default=64)
    return p


def config_from_args(args):
    from fixres.config import DEFAULT_BATCH_SIZE, default_out
    from fixres.job.context import FixConfig
    return FixConfig(
        model=args.model, checkpoint=args.checkpoint, weights=args.weights, pretrained=args.pretrained,
        num_classes=args.num_classes, class_map=args.class_map, data=args.data, out=args.out or default_out("fix"),
        train_size=args.train_size, test_sizes=args.test_sizes, test_size=args.test_size, parts=args.parts,
        augment=args.augment, finetune_epochs=args.epochs, train_epochs=args.train_epochs,
        train_augment=args.train_augment, train_batch_size=args.train_batch_size, train_lr=args.train_lr,
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        lr=args.lr, crop_ratio=args.crop_ratio, interpolation=args.interpolation, mean=args.mean, std=args.std,
        device=args.device, amp=not args.no_amp, workers=args.workers, seed=args.seed, classes=args.classes,
        train_per_class=args.train_per_class, val_per_class=args.val_per_class, restart=args.restart,
        progress=not args.quiet, candidates=args.candidates, select_budget_min=args.select_budget,
        holdout_fraction=args.holdout, select_data=args.select_data, choose=args.choose,
        holdout_untouched=args.holdout_untouched,
        max_test_size=args.max_test_size, budget_ms=args.budget_ms, latency_on=args.latency_on,
        budget_gflops=args.budget_gflops, temperature_scale=args.temperature_scale, label_free=args.label_free,
        tune_schedule=not args.no_tune_schedule, robustness=not args.no_robustness,
        robustness_images=args.robustness_images, command=getattr(args, "_invocation", None), license=args.license)


def _pm(top1, std) -> str:
    return "n/a" if top1 is None else f"{top1:.1f}%" + ("" if std is None else f" ± {std:.1f}")


def _noise_line(h, choice) -> str:
    """The binomial standard error of what is served, and the exact paired tests against the untuned model on
    the same photos (at the same sizes, and at the train size)."""
    from fixres.choosing.significance import ALPHA, binomial_se
    n, served = h.n_val, h.top1_served
    if not n or served is None:
        return "  noise: n/a"
    line = f"  noise: binomial SE {binomial_se(served, n):.1f} points on {n} images"
    tests = choice.cross or choice.paired_val
    same = "at the same cross-selected sizes" if choice.cross else f"at {h.test_size}px"
    for paired, other, where in (
            (tests and tests.paired_vs_untuned, tests and tests.untuned_top1, f"untuned {same}"),
            (tests and tests.paired_vs_train_size, tests and tests.train_size_top1, f"untuned at {h.train_size}px")):
        if paired and paired.p is not None and other is not None:
            verdict = "beyond noise" if paired.p < ALPHA else "within noise"
            line += (f"; served vs {where}: {served - other:+.1f} points (paired p {paired.p:.3g}: {verdict})")
    return line


def _served_line(h) -> str:
    """The unbiased figure of what is served (cross-selected, or on validation photos that did not choose)."""
    value = _pm(h.top1_served, h.top1_served_se)
    if h.headline_rule:
        return f"  served, cross-selected:               {value}"
    if h.served_kind == "untuned":
        return f"  served as trained at {h.test_size}px:           {value}"
    return f"  after the fix at {h.test_size}px:               {value}"


def _rule_lines(choice, h) -> list[str]:
    """Which photos chose the size, and under cross-selection the pooled headline and the training-photo check."""
    lines = [f"  rule: {choice.rule_text}"] if choice.rule_text else []
    cross, seen = choice.cross, choice.seen_check
    if cross:
        line = (f"  cross-selected (half A chose {cross.half_a or cross.size_half_a}, half B "
                f"{cross.half_b or cross.size_half_b}; each half scored by the other's choice): "
                f"{_pm(cross.top1, cross.top1_se)} on {cross.n} photos")
        if cross.paired_vs_untuned and cross.paired_vs_untuned.p is not None:
            line += (f"; untuned at the same sizes {_pm(cross.untuned_top1, None)} "
                     f"(paired p {cross.paired_vs_untuned.p:.3g})")
        lines.append(line)
        if h.top1_fixed_all_val is not None:
            lines.append(f"  on all validation photos at the exported {h.test_size}px: "
                         f"{_pm(h.top1_fixed_all_val, None)} (the size was chosen on them: optimistic)")
    if seen and seen.seen_top1_at_train_size is not None:
        lines.append(f"  for comparison: {seen.n} training photos (the model may have trained on them) score "
                     f"{_pm(seen.seen_top1_at_train_size, None)} at {h.train_size}px against "
                     f"{_pm(seen.val_top1_at_train_size, None)} on val; choosing on them would pick "
                     f"{seen.size_chosen_on_seen}px")
    return lines


def _robustness_lines(table) -> list[str]:
    """The paired verdicts of the corruption table (``fixres.io.documents.RobustnessTable``), when the step ran."""
    from fixres.report.robustness import verdicts
    return ["  under corruptions: " + line for line in verdicts(table)] if table else []


#: The terminal's candidate table: (column of ``fixres.report.choice.candidate_rows``, title, width).
TERMINAL_COLUMNS = (("size", "size", 12), ("val_before", "val before", 11), ("val_after", "val after", 10),
                    ("held_out", "{held} after", 19), ("ms", "ms/img", 8), ("gflops", "GFLOPs", 7))


def _candidate_lines(selected, chosen: int) -> list[str]:
    """The model's own table 5 (right): val top-1 before and after the fix at every candidate size (the rows the
    report's table shows)."""
    from fixres.report.choice import OVERLAP_NOTE, candidate_rows, latency_runtime
    table = selected.table if selected is not None else None
    if not table:
        return []
    held = "train photos" if table.n_seen else "held-out"
    rows = candidate_rows(table, chosen)
    runtime = latency_runtime(table)
    columns = TERMINAL_COLUMNS + ((("ms_torch", "ms torch", 8),) if runtime else ())
    lines = ["  " + " ".join(f"{title.format(held=held):>{w}}" for _, title, w in columns)]
    lines += ["  " + " ".join(f"{row[key]:>{w}}" for key, _, w in columns) for row in rows]
    if runtime:
        lines.append(f"  (ms/img: timed in {runtime} on this CPU; ms torch: eager PyTorch)")
    if any(c.ms_overlaps for c in table.candidates):
        lines.append(f"  ({OVERLAP_NOTE})")
    if table.dropped:
        lines.append(f"  (not fixed, over the time budget: {', '.join(map(str, table.dropped))}px)")
    return lines


def run(args):
    from fixres.job.pipeline import run_fix
    from fixres.runtime.dist import refuse_distributed
    from fixres.runtime.progress import format_duration
    refuse_distributed("fixres fix (run its steps, e.g. fixres train / finetune, under torchrun instead)")
    result = run_fix(config_from_args(args))
    h, choice = result.headline, result.choice
    untuned = h.served_kind == "untuned"
    lines = [
        f"fixres fix: {h.model} trained at {h.train_size}px, served at {h.test_size}px "
        f"({'as trained' if untuned else 'fixed'}); {h.n_val} validation images, ± = binomial standard error",
        *([f"  served: {choice.served}"] if choice.served else []),
        f"  chosen: {choice.chosen_on}",
        *_rule_lines(choice, h),
        *([f"  {choice.why_not_recommended}"] if choice.why_not_recommended else []),
        f"  top-1 at the train size {h.train_size}px:        {_pm(h.top1_at_train_size, h.top1_at_train_size_se)}",
        f"  best untuned test size {h.best_untuned_test_size}px:         "
        f"{_pm(h.top1_best_untuned, h.top1_best_untuned_se)} (the best of {h.n_swept_sizes} sizes "
        "on these photos: optimistic)",
        f"  untuned at {h.test_size}px:                     "
        f"{_pm(h.top1_untuned_at_test_size, h.top1_untuned_at_test_size_se)}",
        _served_line(h),
        _noise_line(h, choice),
        *_candidate_lines(result.results.select, int(h.test_size or 0)),
        *_robustness_lines(result.results.robustness),
        f"  time: {format_duration(h.seconds_total)} in the steps ({format_duration(result.seconds)} in this call)",
        f"  fixed model: {result.export}/model.safetensors",
        f"report: {result.report}",
    ]
    for step, why in result.recomputed.items():
        lines.append(f"  recomputed {step}: " + ("changed " if " " not in why[0] else "") + ", ".join(why))
    return result, "\n".join(lines)
