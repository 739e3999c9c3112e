"""What folding batch norms into convolutions (``fixres.models.fold``) does to predictions and speed.

EfficientNet-Lite0 on ImageNet photos, the same input tensors for every variant: fp32 unfolded (the
reference), bf16 autocast + channels_last unfolded (what timm's validate runs) and bf16 autocast +
channels_last folded (what ``fixres eval`` runs). Per test size: top-1 of each, the photos whose
prediction differs from the reference, the paired difference with its sd, and forward images/s of
the two bf16 variants measured side by side (alternating, median of repeats).

    .venv/bin/python benchmarks/fold_agreement.py [--images N] [--sizes 128 224 288]

Internal: fixres.models.fold - what this measures is the batch-norm folding itself, which the public API only
ever applies inside ``fixres.sweep``. Its inputs are the tensors fixres eval feeds the model (fixres's loader
with its test pre-processing: reduced JPEG decode, fused normalisation, from benchmarks/_common.py), which no
public function returns; the same tensors go to every variant.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _common import (
    REPO,
    SHARED,
    ImageDataset,
    geometry_for,
    photos_and_weights,
    split_index,
    spread_sample,
    test_transform,
    write_json,
)

from fixres.models.fold import fold_batchnorms

BATCH = 50
REPEATS = 3


def predict(model, xs, *, bf16: bool):
    """(predictions, seconds) of ``model`` on the stacked inputs ``xs``."""
    import torch
    preds, t = [], time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for k in range(0, len(xs), BATCH):
            x = xs[k:k + BATCH]
            if bf16:
                x = x.contiguous(memory_format=torch.channels_last)
            preds.append(model(x).argmax(1))
    return torch.cat(preds), time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224, 288])
    ap.add_argument("--data", default=str(SHARED / "imagenet-sample"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fold_agreement.json"))
    args = ap.parse_args(argv)
    found = photos_and_weights(args.data, "efficientnet-lite0")
    if found is None:
        return 0
    bundle, data = found
    import torch

    model, cfg = bundle.model.eval(), bundle.data_config
    samples = spread_sample(split_index(data, "val").samples, args.images)
    labels = torch.tensor([y for _, y in samples])
    folded, n_folded = fold_batchnorms(model, args.sizes[0])
    fast = {"unfolded": model.to(memory_format=torch.channels_last),
            "folded": folded.to(memory_format=torch.channels_last)}
    print(f"{bundle.name}: {n_folded} batch norms folded; {len(samples)} photos, {torch.get_num_threads()} threads",
          flush=True)
    rows = []
    for size in args.sizes:
        ds = ImageDataset(samples, test_transform(geometry_for(size, cfg, cfg.crop_ratio), cfg))
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        ref, _ = predict(model.to(memory_format=torch.contiguous_format), xs, bf16=False)
        speed: dict[str, list[float]] = {"unfolded": [], "folded": []}
        preds = {}
        for r in range(REPEATS):
            for name in (("unfolded", "folded") if r % 2 == 0 else ("folded", "unfolded")):
                preds[name], seconds = predict(fast[name], xs, bf16=True)
                speed[name].append(len(xs) / seconds)
        row = {"test_size": size, "n": len(xs), "fp32_top1": float((ref == labels).float().mean() * 100)}
        for name, p in preds.items():
            right, ref_right = p == labels, ref == labels
            a_only, b_only = int((right & ~ref_right).sum()), int((~right & ref_right).sum())
            row[name] = {"top1": float(right.float().mean() * 100), "changed_vs_fp32": int((p != ref).sum()),
                         "right_only_here": a_only, "right_only_fp32": b_only,
                         "paired_sd_pt": 100.0 * (a_only + b_only) ** 0.5 / len(xs),
                         "images_per_s": statistics.median(speed[name]), "runs": speed[name]}
        ratios = [f / u for f, u in zip(speed["folded"], speed["unfolded"])]
        row["speedup_median"], row["speedup_min"], row["speedup_max"] = (statistics.median(ratios), min(ratios),
                                                                          max(ratios))
        rows.append(row)
        u, f = row["unfolded"], row["folded"]
        print(f"{size}: top-1 fp32 {row['fp32_top1']:.1f} | bf16 unfolded {u['top1']:.1f} ({u['changed_vs_fp32']} "
              f"predictions differ from fp32) | bf16 folded {f['top1']:.1f} ({f['changed_vs_fp32']} differ) | "
              f"forward folded/unfolded {row['speedup_median']:.2f}x ({row['speedup_min']:.2f}-"
              f"{row['speedup_max']:.2f})", flush=True)
    write_json(Path(args.out), {"model": bundle.name, "n_folded": n_folded, "threads": torch.get_num_threads(),
                                "rows": rows, "command": "benchmarks/fold_agreement.py"})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
