"""``fixres sweep``: accuracy across test sizes (and crop ratios) in one pass over the data.

Each image is decoded once and shown to the network at every size (section 3.3 / figure 5). Writes
sweep.json, sweep.csv and accuracy_vs_test_size.png (error bars: binomial standard error) that marks
the train size and the test size ``fixres analyze`` recommends for it.
"""

from __future__ import annotations

from fixres.cli.args import add_model_args, add_runtime_args, float_list, int_list
from fixres.cli.eval import add_eval_args
from fixres.config import DEFAULT_SWEEP_SIZES, default_out

#: What a run writes to --out: all of one run's, or, when it fails, all as they were (``cli.app``).
RESULT_FILES = ("sweep.json", "sweep.csv", "per_class.csv")


def add_parser(sub, parents):
    p = sub.add_parser("sweep", parents=parents, help="accuracy across test sizes (one pass over the data)",
                       description="Accuracy at many test sizes in ONE pass over the data (each image decoded "
                                   "once), ± the binomial standard error (the leave-one-fold-out std of section "
                                   "5 is kept in sweep.json), multi-resolution ensembles and "
                                   "10-crop testing. Writes sweep.json, sweep.csv and accuracy_vs_test_size.png "
                                   f"to --out (default {default_out('sweep')}).")
    sizes = ",".join(map(str, DEFAULT_SWEEP_SIZES))
    p.add_argument("--test-sizes", type=int_list, default=list(DEFAULT_SWEEP_SIZES), metavar="S1,S2,...",
                   help=f"test sizes, e.g. 128,160,192 or 128:384:32 (default {sizes})")
    p.add_argument("--crop-ratios", type=float_list, default=None, metavar="R1,R2",
                   help="crop ratios to sweep too (default: --crop-ratio, else the model's)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    add_eval_args(p)
    add_model_args(p)
    add_runtime_args(p, batch_default=64)
    return p


def run(args):
    from pathlib import Path

    from fixres.choosing.best import best_row
    from fixres.cli.eval import config_from_args, format_table, run_evaluation, write_results
    from fixres.method.analysis import recommend_test_size
    from fixres.runtime import dist

    crop_ratios = args.crop_ratios or ([args.crop_ratio] if args.crop_ratio else None)
    cfg = config_from_args(args, test_sizes=args.test_sizes, crop_ratios=crop_ratios)
    try:
        result, env = run_evaluation(cfg, label="sweep")
        if not env.is_main:
            return None
        train_size = result["train_size"]
        ratio = result["rows"][0]["crop_ratio"]
        rec = recommend_test_size(train_size=train_size, crop_ratio=ratio, stride=result["data_config"]["stride"])
        best = best_row(result["rows"], train_size=train_size)
        result["recommended_test_size"] = rec["test_size"]
        result["recommended_test_size_exact"] = rec["test_size_exact"]
        result["best"] = {"test_size": best["test_size"], "crop_ratio": best["crop_ratio"], "top1": best["top1"],
                          "top1_se": best["top1_se"], "top1_std": best["top1_std"]}
        out = Path(args.out or default_out("sweep"))
        if not args.no_plot:
            from fixres.report.plots import plot_accuracy_vs_size
            series: dict = {}
            for r in result["rows"]:
                series.setdefault(f"crop ratio {r['crop_ratio']:g}" + (", 10-crop" if r["ten_crop"] else ""),
                                  []).append(r)
            png = plot_accuracy_vs_size(
                series, out / "accuracy_vs_test_size.png", ensembles=result["ensembles"],
                marks=[(train_size, "train size"), (rec["test_size"], "recommended test size")],
                title=f"{result['model']}: top-1 vs test size ({result['n_images']} images)")
            result["plot"] = str(png)
        files = write_results(result, out, "sweep")
        if "plot" in result:
            files["png"] = result["plot"]
        result["files"] = files
        text = "\n".join([
            format_table(result),
            f"train size {train_size}: recommended test size {rec['test_size']} (analysis, crop ratio {ratio:g}); "
            f"best measured {best['test_size']} at {best['top1']:.2f}% ± {best['top1_se']:.2f} (SE)",
            f"results: {files['json']}" + (f", plot: {files['png']}" if "png" in files else ""),
        ])
        result.pop("per_class", None)  # one number per class and size: in the files, not on stdout
        return result, text
    finally:
        dist.shutdown()
