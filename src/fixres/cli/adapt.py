"""``fixres adapt``: label-free adaptation to the test resolution (bn-recalibrate, frechet, gaussian)."""

from __future__ import annotations

from fixres.cli.args import add_model_args, add_runtime_args, add_stream_args, positive_int
from fixres.cli.finetune import add_data_args
from fixres.config import default_out

METHODS = ("bn-recalibrate", "frechet", "gaussian")
#: What a run writes to --out besides its export: all of one run's, or all as they were (``cli.app``).
RESULT_FILES = ("adapt.json",)
WRITES_EXPORT = True


def add_parser(sub, parents):
    p = sub.add_parser(
        "adapt", parents=parents, help="label-free adaptation (bn-recalibrate, frechet, gaussian)",
        description="Adapt a model to a larger test size without labels: bn-recalibrate re-estimates the "
                    "statistics of the batch-norm before pooling at the test size; frechet (appendix A.1) "
                    "equalises the pooled activations with a fitted Frechet law (xi = 0.3); gaussian (appendix "
                    "A.2) matches the per-channel mean and std before the last ReLU to those at the train size. "
                    "Uses the images of --data/train (labels are not read), reports top-1 on --data/val before "
                    f"and after, and exports the adapted model to --out (default {default_out('adapt')}; not for "
                    "frechet, "
                    "which is a hook).")
    p.add_argument("--method", choices=METHODS, required=True,
                   help="bn-recalibrate: re-estimate the batch-norm statistics at the test size; frechet: "
                        "equalise the pooled activations (appendix A.1); gaussian: match the pre-activation "
                        "mean and std to the train size's (appendix A.2)")
    add_data_args(p, test_size_help="the resolution to adapt to", streams=True)
    add_stream_args(p, epochs=False, stream_help="read the training shards front to back, no index of the photos "
                                                 "(implied by 'pipe:CMD'); --max-images then takes photos evenly "
                                                 "spread in the order read, after a pass counting them")
    p.add_argument("--max-images", type=positive_int, default=None,
                   help="use at most this many images for the statistics (default: all)")
    p.add_argument("--no-eval", action="store_true", help="do not measure top-1 before and after")
    add_model_args(p)
    add_runtime_args(p, batch_default=32)
    return p


def run(args):
    from pathlib import Path

    from fixres.cli.finetune import adaptation_from_args
    from fixres.io.atomic import write_json
    from fixres.method.adaptation import adapt
    from fixres.method.streaming import evaluate_at
    from fixres.models.card import CardFacts
    from fixres.models.export import export_model, remove_export
    from fixres.runtime.dist import refuse_distributed
    from fixres.runtime.progress import status
    refuse_distributed("fixres adapt")
    bundle, cfg, train, val, env, precision, test_size = adaptation_from_args(args)
    out = Path(args.out or default_out("adapt"))
    show = not args.quiet
    bs = args.batch_size or 32
    eval_kw = dict(test_size=test_size, batch_size=bs, env=env, precision=precision, workers=args.workers,
                   progress=show)
    do_eval = val is not None and not args.no_eval
    before = evaluate_at(bundle.model, val, cfg, **eval_kw) if do_eval else None
    res = adapt(bundle.model, train, cfg, method=args.method, train_size=cfg.train_size, test_size=test_size,
                batch_size=bs, env=env, precision=precision, workers=args.workers, max_images=args.max_images,
                progress=show)
    res.pop("_pooled", None)
    after = evaluate_at(bundle.model, val, cfg, **eval_kw) if do_eval else None
    result = {"command": "adapt", "model": bundle.name, **res, "before": before, "after": after}
    if args.method != "frechet":
        result["export"] = str(export_model(bundle.model, out, model_name=bundle.name, cfg=cfg, test_size=test_size,
                                            train_size=cfg.train_size, class_names=list(cfg.class_names),
                                            accuracy=after, extra={"adaptation": {"method": args.method}},
                                            card=CardFacts(data=str(val.root) if do_eval else None,
                                                           command=getattr(args, "_invocation", None))))
    else:  # frechet exports nothing: a model another method left here would not be what adapt.json describes
        result["removed"] = remove_export(out)
    write_json(out / "adapt.json", result)
    status(f"wrote {out / 'adapt.json'}", enabled=show and args.verbose)
    lines = [f"{bundle.name}: {args.method} from {cfg.train_size}px to {test_size}px on {res['images']} images "
             "(no labels)"]
    if before and after:
        from fixres.choosing.significance import binomial_se
        lines.append(f"  top-1 at {test_size}px: {before['top1']:.2f} ± {binomial_se(before['top1'], before['n']):.2f}%"
                     f" before -> {after['top1']:.2f} ± {binomial_se(after['top1'], after['n']):.2f}% after "
                     "(± binomial standard error)")
        lines.append(f"  calibration: NLL {before['nll']:.4f} -> {after['nll']:.4f}, ECE (15 bins) "
                     f"{before['ece']:.2f}% -> {after['ece']:.2f}%")
    if "export" in result:
        lines.append(f"  adapted model: {result['export']}")
    else:
        lines.append(f"  frechet is an equalisation after the pooling (a hook), not weights: its parameters are in "
                     f"{out / 'adapt.json'}, no model is exported (bn-recalibrate, gaussian and finetune export one)")
    return result, "\n".join(lines)
