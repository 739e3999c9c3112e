"""``fixres stats``: CDF of the activations after global pooling at several test sizes (figures 3 and 4)."""

from __future__ import annotations

from fixres.cli.args import (
    add_model_args,
    add_runtime_args,
    image_size,
    int_list,
    model_spec,
    positive_int,
    stream_wanted,
)
from fixres.config import default_out


def add_parser(sub, parents):
    p = sub.add_parser(
        "stats", parents=parents, help="pooled-activation statistics at several test sizes (figures 3, 4)",
        description="Measure the activations after the global pooling at several test sizes: their CDF, the "
                    "fraction of zeros and the fraction above 2 (section 3.2). With --compare, the same for a "
                    "second (adapted) checkpoint, drawn dashed (figure 4). Writes stats.json and "
                    f"activation_cdf.png to --out (default {default_out('stats')}).")
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder tree (its val/ when "
                   "present), WebDataset shards, hf:PATH, or with --stream shards or 'pipe:CMD'")
    p.add_argument("--sizes", type=int_list, default=None,
                   help="test sizes, e.g. 64,128,224,448 (default: train size x 0.5, 1, 1.5, 2)")
    p.add_argument("--train-size", type=image_size, default=None,
                   help="the size the model was trained at (default: from its data config)")
    p.add_argument("--compare", default=None, metavar="CHECKPOINT",
                   help="an adapted checkpoint (fixres export) to measure on the same axis")
    p.add_argument("--max-images", type=positive_int, default=None, help="use at most this many images")
    p.add_argument("--stream", action="store_true",
                   help="read the shards front to back, no index of the photos (implied by 'pipe:CMD'); "
                        "--max-images then takes photos evenly spread in the order read, after a pass counting them")
    add_model_args(p)
    add_runtime_args(p, batch_default=32)
    return p


def run(args):
    from pathlib import Path

    from fixres.data.folders import read_class_map
    from fixres.data.streams import open_stream
    from fixres.io.atomic import write_json
    from fixres.method.inputs import index_split
    from fixres.method.stats import activation_stats
    from fixres.models.loading import num_outputs
    from fixres.report.plots import plot_stats
    from fixres.runtime import dist
    from fixres.runtime.engine import precision_for

    dist.refuse_distributed("fixres stats")
    env = dist.init(args.device)
    bundle = model_spec(args).load()
    cfg = bundle.data_config.with_overrides(interpolation=args.interpolation, mean=args.mean, std=args.std,
                                            crop_ratio=args.crop_ratio)
    class_map = read_class_map(args.class_map) if args.class_map else None  # labels are not used: only validated
    if stream_wanted(args):
        index = open_stream(args.data, classes=class_map, num_classes=num_outputs(bundle.model))
    else:
        index = index_split(args.data, "val", class_map=class_map)
    t = cfg.train_size
    sizes = args.sizes or sorted({max(16, t // 2), t, (3 * t) // 2, 2 * t})
    precision = precision_for(env.device, not args.no_amp)
    kw = dict(test_sizes=sizes, batch_size=args.batch_size or 32, env=env, precision=precision,
              workers=args.workers, max_images=args.max_images, progress=not args.quiet)
    before = activation_stats(bundle.model, index, cfg, keep_pooled=True, **kw)
    reference = before.pop("_pooled")[t]  # what the classifier was trained on: the model's own values at T
    after = None
    if args.compare:
        from dataclasses import replace
        # the same model flags (--ema, --strict, --num-classes, ...), the adapted weights
        other = replace(model_spec(args), checkpoint=args.compare, weights=None, pretrained=False).load()
        # KS of the adapted model at each size to the ORIGINAL model at T: does the fix move toward it (fig. 4)?
        after = activation_stats(other.model, index, cfg, grid=before["sizes"][0]["cdf_x"], reference=reference,
                                 **kw)
    out = Path(args.out or default_out("stats"))
    png = plot_stats(before, out / "activation_cdf.png", compare=after,
                     title=f"{bundle.name}, trained at {t}px: pooled activations")
    result = {"command": "stats", "model": bundle.name, "train_size": t, "sizes": sizes, "before": before,
              "after": after, "plot": str(png)}
    write_json(out / "stats.json", result)
    lines = [f"{bundle.name} (train {t}px), pooled activations on {before['n_images']} images "
             f"({before['pooled_from']}):"] + _table(before, after, t)
    lines.append(f"  plot: {png}")
    return result, "\n".join(lines)


def _table(before: dict, after: dict | None, train_size: int) -> list[str]:
    """Zeros, > 2, negatives (when any), mean and the KS distance to the pooled values at T, per size."""
    negative = any(r["frac_negative"] > 0 for r in before["sizes"] + (after["sizes"] if after else []))
    neg_head = f" {'< 0 %':>7}" if negative else ""
    lines = [f"  {'test_size':>9} {'zeros %':>8} {'> 2 %':>7}{neg_head} {'mean':>7} {f'KS to {train_size}':>9}"
             + ("   adapted: zeros %  > 2 %  KS to " + str(train_size) if after else "")]
    for i, r in enumerate(before["sizes"]):
        neg = f" {100 * r['frac_negative']:>7.2f}" if negative else ""
        line = (f"  {r['test_size']:>9} {100 * r['frac_zero']:>8.2f} {100 * r['frac_above_2']:>7.2f}{neg} "
                f"{r['mean']:>7.3f} {r['ks_to_reference']:>9.3f}")
        if after:
            a = after["sizes"][i]
            line += f"   {100 * a['frac_zero']:>16.2f} {100 * a['frac_above_2']:>6.2f} {a['ks_to_reference']:>8.3f}"
        lines.append(line)
    if negative:
        lines.append("  the pooled features take negative values (no ReLU before the pooling, e.g. LayerNorm'd "
                     "tokens): the CDFs include them, and 'zeros %' is not a sparsity here")
    if after:
        lines.append(f"  KS: Kolmogorov-Smirnov distance to the original model's pooled values at {train_size}px "
                     "(0 = same distribution)")
    return lines
