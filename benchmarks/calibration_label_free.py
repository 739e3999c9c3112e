"""Label-free bn-recalibrate on real ImageNet photos: top-1, NLL and ECE before and after.

The registry EfficientNet-Lite0 (trained at 224) is adapted without labels to each test size S by
re-estimating the batch-norm before its global pooling at S (``fixres.adapt``, bn-recalibrate) on
one half of ../shared/data/imagenet-sample (images 0, 2, 4, ...) and evaluated on the other half
(1, 3, 5, ...), then the other way round; so every photo is scored once by a model that did not see
it, and the pooled numbers cover all photos. "Before" is the untouched model on the same photos.

Per size: top-1 with its binomial standard error, the paired change (photos the adaptation fixed
and broke, on the same photos), NLL (mean cross-entropy) and ECE (15 equal-width bins of top-1 confidence, the
definition of ``fixres eval``'s ECE column).
One photo is 0.1 point of top-1 on 1,000 photos; these are probably ImageNet training photos, so
absolute figures are high, the comparison before / after is what matters.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration_label_free.py [--sizes 128,160,288,320]
        [--images N] [--out benchmarks/results]

Internal: fixres.method.evaluate - every photo's log-probabilities (``keep_log_probs``), pooled over the two
halves before NLL and ECE are computed; ``fixres.sweep`` returns each size's totals only. The adaptation goes
through the public ``fixres.adapt``; the fp32 precision and, for --ks, the pooled activations come from
benchmarks/_common.py.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from _common import REPO, activation_stats, int_list, precision_for, shared_folder, split_index, write_json

from fixres.method.evaluate import evaluate

DEFAULT_SIZES = "128,160,288,320"
WEIGHTS = "efficientnet-lite0"
#: Equal-width bins of top-1 confidence for the ECE (``fixres eval``'s).
ECE_BINS = 15


def _pooled(outcomes: list[tuple[list[int], object]], n: int, key: str):
    """Per-photo (log-probs, labels) put back in data-set order from evaluations of index subsets."""
    import numpy as np
    logp, labels = None, np.zeros(n, np.int64)
    for idx, res in outcomes:
        lp = res.arrays.log_probs[key]
        logp = np.zeros((n, lp.shape[1]), np.float32) if logp is None else logp
        logp[idx] = lp
        labels[idx] = res.arrays.labels
    return logp, labels


def sign_test_p(fixed: int, broken: int) -> float:
    """Exact two-sided sign test (McNemar) on the photos the change fixed vs broke: p of a split this uneven."""
    n, k = fixed + broken, min(fixed, broken)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def nll(logp, labels) -> float:
    """Negative log-likelihood of the labels: the mean cross-entropy, in nats (in float64)."""
    import torch
    return float(torch.nn.functional.cross_entropy(torch.from_numpy(logp).double(), torch.from_numpy(labels).long()))


def ece(confidence, hit, bins: int = ECE_BINS) -> float:
    """Expected calibration error (a fraction): over ``bins`` equal-width bins of top-1 confidence, (lo, hi] (the
    first [0, hi]), the count-weighted mean of |accuracy - mean confidence|; non-finite confidences count in none."""
    import numpy as np
    conf, hit = np.asarray(confidence, np.float64).ravel(), np.asarray(hit, np.float64).ravel()
    ok = np.isfinite(conf)
    conf, hit = conf[ok], hit[ok]
    if not conf.size:
        return float("nan")
    which = np.clip(np.searchsorted(np.linspace(0.0, 1.0, bins + 1), conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    hit_sum = np.bincount(which, weights=hit, minlength=bins)
    return float(sum(c * abs(h / c - s / c) for c, s, h in zip(count, conf_sum, hit_sum) if c) / conf.size)


def _metrics(logp, labels) -> dict:
    import numpy as np
    hit = logp.argmax(1) == labels
    p = hit.mean()
    return {"top1": 100 * float(p), "se": 100 * math.sqrt(p * (1 - p) / hit.size), "nll": nll(logp, labels),
            "ece": 100 * ece(np.exp(logp.max(1)), hit), "confidence": 100 * float(np.exp(logp.max(1)).mean()),
            "hit": hit}


def recalibrated(bundle, samples, size: int, kw: dict):
    """A copy of the model with its batch-norm recalibrated at ``size`` on ``samples`` (no labels read), fp32."""
    import fixres
    copy_ = bundle.copy()
    fixres.adapt(copy_, samples, size, method="bn-recalibrate", device="cpu", amp=False, batch_size=kw["batch_size"],
                 workers=kw["workers"], progress=False)
    return copy_.model


def ks_rows(bundle, samples, halves, sizes, kw) -> list[dict]:
    """KS distance of the pooled activations at S to the ORIGINAL model's at T (224), before and after
    recalibrating on the other half: does the label-free fix bring them back toward T (figure 4)?"""
    # the pooled activations themselves (``keep_pooled``) and their KS distance to the model's at the train size
    # (``reference``)
    cfg, train = bundle.data_config, bundle.data_config.train_size
    cal, ev = [samples[i] for i in halves[0]], [samples[i] for i in halves[1]]
    before = activation_stats(bundle.model, ev, cfg, test_sizes=sizes, keep_pooled=True, **kw)
    reference = before.pop("_pooled")[train]
    rows = []
    for size, row in zip(sizes, before["sizes"]):
        model = recalibrated(bundle, cal, size, kw)
        after = activation_stats(model, ev, cfg, test_sizes=[size], reference=reference, **kw)["sizes"][0]
        rows.append({"test_size": size, "ks_before": row["ks_to_reference"], "ks_after": after["ks_to_reference"],
                     "frac_zero_before": row["frac_zero"], "frac_zero_after": after["frac_zero"],
                     "mean_before": row["mean"], "mean_after": after["mean"]})
        print(f"{size:>4}px  KS to {train}px {row['ks_to_reference']:.3f} -> {after['ks_to_reference']:.3f}  "
              f"mean pooled {row['mean']:.3f} -> {after['mean']:.3f} (at {train}px: "
              f"{float(reference.mean()):.3f})", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES)
    ap.add_argument("--images", type=int, default=None, help="use N photos evenly spread over the classes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--ks", action="store_true",
                    help="instead: KS distance of the pooled activations at S to those at 224, before/after")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    data = shared_folder("imagenet-sample")
    if data is None:
        return 0
    import numpy as np
    import torch

    import fixres

    sizes = int_list(args.sizes)
    if args.ks:
        sizes = sorted(set(sizes) | {224})  # the reference size is measured in the same pass
    samples = split_index(data, "val").samples
    if args.images and args.images < len(samples):
        samples = [samples[i] for i in np.linspace(0, len(samples) - 1, args.images).round().astype(int)]
    n = len(samples)
    halves = [list(range(0, n, 2)), list(range(1, n, 2))]
    bundle = fixres.load(WEIGHTS)
    cfg = bundle.data_config
    # The protocol is fp32 throughout: evaluate and activation_stats take the precision itself (plain fp32, the
    # same as the API's amp=False)
    fp32 = precision_for(torch.device("cpu"), amp=False)
    kw = dict(batch_size=args.batch_size, workers=args.workers, precision=fp32, progress=False)
    t0 = time.perf_counter()
    if args.ks:
        rows = ks_rows(bundle, samples, halves, sizes, kw)
        out = Path(args.out) / "calibration_label_free_ks.json"
        write_json(out, {"weights": WEIGHTS, "n_images": n, "rows": rows, "seconds": time.perf_counter() - t0,
                         "protocol": "recalibrate on photos 0,2,4,..., measure on 1,3,5,...; KS to the original "
                                     "model's pooled values at its train size on the same photos"})
        print(f"results: {out}")
        return 0
    # every photo's log-probabilities (``keep_log_probs``), pooled over the two halves before NLL and ECE
    before = evaluate(bundle.model, samples, cfg, test_sizes=sizes, keep_log_probs=True, per_class=False, **kw)
    rows = []
    for size in sizes:
        key = f"{size}@{cfg.crop_ratio:g}"
        after = []
        for cal, ev in (halves, halves[::-1]):
            model = recalibrated(bundle, [samples[i] for i in cal], size, kw)
            res = evaluate(model, [samples[i] for i in ev], cfg, test_sizes=[size], keep_log_probs=True,
                           per_class=False, **kw)
            after.append((ev, res))
        b = _metrics(*_pooled([(list(range(n)), before)], n, key))
        a = _metrics(*_pooled(after, n, key))
        fixed, broken = int((a["hit"] & ~b["hit"]).sum()), int((b["hit"] & ~a["hit"]).sum())
        rows.append({"test_size": size, "before": {k: v for k, v in b.items() if k != "hit"},
                     "after": {k: v for k, v in a.items() if k != "hit"}, "fixed": fixed, "broken": broken,
                     "sign_test_p": sign_test_p(fixed, broken)})
        print(f"{size:>4}px  top-1 {b['top1']:5.1f} -> {a['top1']:5.1f} (SE {b['se']:.1f}; +{fixed} -{broken} photos, "
              f"p {sign_test_p(fixed, broken):.2f})"
              f"  NLL {b['nll']:.3f} -> {a['nll']:.3f}  ECE {b['ece']:4.1f} -> {a['ece']:4.1f} %"
              f"  mean confidence {b['confidence']:4.1f} -> {a['confidence']:4.1f} %", flush=True)
    result = {"weights": WEIGHTS, "train_size": cfg.train_size, "n_images": n, "method": "bn-recalibrate",
              "protocol": "calibrate on one half (no labels), evaluate on the other, and swapped",
              "rows": rows, "seconds": time.perf_counter() - t0}
    out = Path(args.out) / "calibration_label_free.json"
    write_json(out, result)
    print(f"{n} photos, {result['seconds']:.0f} s; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
