"""Table 7 analogue: what "train at a low size T, fix at S" costs and gains against "train at S".

For every pair T:S it really trains one model at T and one at S (``fixres.method.train.train``, same data,
epochs and seed), fine-tunes the T model at S (``fixres.method.finetuning.finetune``: classifier + batch-norm,
test DA, as in the paper), and reports side by side, measured in this one run:

  * ms per training batch, forward and backward (mean over the epochs after the first), at T and at S;
  * ms per fine-tuning batch at S, forward and backward;
  * the measured wall seconds of each run, and the cost of the paper's protocol (120 training
    epochs + 60 fine-tuning epochs over the same data) extrapolated from the per-batch times;
  * validation top-1: T model at T, T model at S (no fix), T model fixed at S, S model at S.

The paper's table 7 measured on one V100 (batch 32 for training, 64 for fine-tuning); here the
device is whatever runs this script (CPU or CUDA), so read the ratios, not the absolute numbers.

Usage:
  python benchmarks/cost_table.py --quick        # tiny generated data, 2 epochs: ~30 s, a smoke-size table
  python benchmarks/cost_table.py                # synthetic 10 x 80 images, T:S = 64:96, 20 + 3 epochs: ~10 min
  python benchmarks/cost_table.py --data DIR --model fixres_small_resnet --pairs 64:96,96:128 --epochs 8
With no --data, the embedded synthetic data set (``fixres.data.synth``) is generated under --out.

Internal: fixres.method.train - what this costs out is training itself (ms per batch at T and at S, the
paper's protocol); the public API has no training function. Evaluation goes through the public API
(``fixres.load``, ``fixres.sweep``); fine-tuning with the frozen-prefix cache on or off (``--ft-cache``;
fixres.finetune always caches), the embedded data set, and the device and training precision both use come
from benchmarks/_common.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import DistEnv, finetune, make_dataset, precision_for, resolve_device, split_index

from fixres.method.train import train

PAPER_TRAIN_EPOCHS = 120
PAPER_FINETUNE_EPOCHS = 60


def parse_pairs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        t, _, s = item.partition(":")
        pairs.append((int(t), int(s)))
    return pairs


def _ms(stat) -> tuple[float | None, float | None]:
    if stat is None:
        return None, None
    if isinstance(stat, dict):
        return stat.get("mean"), stat.get("std")
    return float(stat), None


def _train_run(model_name, train_s, val_s, classes, *, size, val_sizes, args, env, precision, out):
    import torch

    import fixres
    torch.manual_seed(args.seed)
    bundle = fixres.load(model_name, num_classes=len(classes), train_size=size, random_init=True)
    cfg = bundle.data_config.with_overrides(num_classes=len(classes), class_names=tuple(classes))
    t0 = time.perf_counter()
    res = train(bundle.model, train_s, val_s, cfg, train_size=size, epochs=args.epochs, batch_size=args.batch_size,
                out_dir=out, repeats=args.repeats, schedule="cosine", warmup_epochs=min(1, args.epochs - 1),
                val_sizes=sorted(set(val_sizes)), env=env, precision=precision, seed=args.seed, workers=args.workers,
                progress=not args.quiet, model_name=model_name, lr=args.lr)
    wall = time.perf_counter() - t0
    # The first epoch pays one-off costs (kernel selection, allocator warm-up): time the steady state.
    log = res["epochs"][1:] if len(res["epochs"]) > 1 else res["epochs"]
    fwd = [r["forward_ms"] for r in log if r.get("forward_ms") is not None]
    bwd = [r["backward_ms"] for r in log if r.get("backward_ms") is not None]
    steps = sum(r["images"] for r in log) / max(1, len(log)) / (args.batch_size)
    # the final model's top-1 with the leave-one-fold-out std, measured as `fixres eval` does
    ev = fixres.sweep(bundle.model, val_s, sorted(set(val_sizes)), data_config=cfg, device=str(env.device),
                      workers=args.workers).to_json()
    return {"model": bundle.model, "cfg": cfg, "result": res, "wall_s": wall,
            "forward_ms": sum(fwd) / len(fwd), "forward_ms_std": log[-1].get("forward_ms_std"),
            "backward_ms": sum(bwd) / len(bwd), "backward_ms_std": log[-1].get("backward_ms_std"),
            "steps_per_epoch": steps, "val_top1": {int(r["test_size"]): r["top1"] for r in ev["rows"]},
            "val_top1_std": {int(r["test_size"]): r["top1_std"] for r in ev["rows"]}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, tiny data, 2 epochs: a smoke-size table")
    p.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: synthetic)")
    p.add_argument("--model", default="fixres_tiny_resnet")
    p.add_argument("--pairs", type=parse_pairs, default=None, help="T:S pairs (default 64:96; quick 32:48)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 20; quick 2)")
    p.add_argument("--ft-epochs", type=int, default=None, help="fine-tuning epochs (default 3; quick 1)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (paper table 7: 32)")
    p.add_argument("--ft-batch-size", type=int, default=64, help="fine-tuning batch (paper table 7: 64)")
    p.add_argument("--ft-cache", action="store_true",
                   help="let fine-tuning cache the frozen trunk's activations (faster than the paper's method)")
    p.add_argument("--repeats", type=int, default=1,
                   help="repeated augmentation (paper: 3; 1 learns faster in the few epochs run here)")
    p.add_argument("--lr", type=float, default=0.2, help="from-scratch learning rate on the synthetic data")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--out", default="runs/bench_cost_table")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.pairs = args.pairs or ([(32, 48)] if args.quick else [(64, 96)])
    args.epochs = args.epochs or (2 if args.quick else 20)
    args.ft_epochs = args.ft_epochs or (1 if args.quick else 3)
    if args.quick:
        args.batch_size, args.ft_batch_size = min(args.batch_size, 16), min(args.ft_batch_size, 32)

    import torch

    out = Path(args.out)
    if args.data:
        root = Path(args.data)
    else:
        root = out / "data"
        kw = dict(classes=4, train_per_class=24, val_per_class=12) if args.quick else \
            dict(classes=10, train_per_class=80, val_per_class=30)
        make_dataset(root, progress=not args.quiet, overwrite=True, **kw)  # our own folder under --out
    tr = split_index(root, "train")
    va = split_index(root, "val", classes=tr.classes)
    env = DistEnv(device=resolve_device("auto"))
    precision = precision_for(env.device, amp=not args.no_amp)

    import shutil
    for old in list(out.glob("train_*")) + list(out.glob("fix_*")):
        shutil.rmtree(old)  # each run of the benchmark measures afresh
    sizes = sorted({s for pair in args.pairs for s in pair})
    val_for = {t: sorted({t} | {s for tt, s in args.pairs if tt == t}) for t in sizes}
    runs = {}
    for size in sizes:
        runs[size] = _train_run(args.model, tr.samples, va.samples, tr.classes, size=size, val_sizes=val_for[size],
                                args=args, env=env, precision=precision, out=out / f"train_{size}")

    rows = []
    for t, s in args.pairs:
        rt, rs = runs[t], runs[s]
        ft = finetune(rt["model"], tr.samples, va.samples, rt["cfg"], test_size=s, epochs=args.ft_epochs,
                      batch_size=args.ft_batch_size, cache=args.ft_cache, out_dir=out / f"fix_{t}_{s}", env=env,
                      precision=precision, seed=args.seed, workers=args.workers, progress=not args.quiet)
        ft_fwd, ft_fwd_sd = _ms(ft["timing"]["ms_per_batch_forward"]) if ft else (None, None)
        ft_bwd, ft_bwd_sd = _ms(ft["timing"]["ms_per_batch_backward"]) if ft else (None, None)
        n_train = len(tr.samples)
        train_batch_cost = lambda r: (r["forward_ms"] + r["backward_ms"]) / 1e3  # noqa: E731 - seconds per batch
        paper_train = lambda r: PAPER_TRAIN_EPOCHS * n_train / args.batch_size * train_batch_cost(r)  # noqa: E731
        paper_ft = (PAPER_FINETUNE_EPOCHS * n_train / args.ft_batch_size * (ft_fwd + ft_bwd) / 1e3) if ft else None
        rows.append({
            "train_size": t, "test_size": s,
            "train_ms": {t: [rt["forward_ms"], rt["backward_ms"]], s: [rs["forward_ms"], rs["backward_ms"]]},
            "finetune_ms": [ft_fwd, ft_bwd], "finetune_ms_std": [ft_fwd_sd, ft_bwd_sd],
            "finetune_cache_used": bool(ft and ft.get("cache", {}).get("used")),
            "wall_s": {"train_T": rt["wall_s"], "train_S": rs["wall_s"],
                       "finetune_S": ft["timing"]["wall_s"] if ft else None},
            "paper_protocol_s": {"train_T_fix_S": paper_train(rt) + (paper_ft or 0.0), "train_S": paper_train(rs),
                                 "train_T": paper_train(rt)},
            "top1": {"T@T": rt["val_top1"].get(t), "T@S": rt["val_top1"].get(s),
                     "T+fix@S": ft["after"]["top1"] if ft and ft.get("after") else None,
                     "S@S": rs["val_top1"].get(s)},
            "top1_std": {"T@T": rt["val_top1_std"].get(t), "T@S": rt["val_top1_std"].get(s),
                         "T+fix@S": ft["after"]["top1_std"] if ft and ft.get("after") else None,
                         "S@S": rs["val_top1_std"].get(s)},
        })

    result = {"model": args.model, "data": str(root), "n_train": len(tr.samples), "n_val": len(va.samples),
              "epochs": args.epochs, "ft_epochs": args.ft_epochs, "batch_size": args.batch_size,
              "ft_batch_size": args.ft_batch_size, "device": str(env.device), "precision": precision.describe(),
              "torch_threads": torch.get_num_threads(), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost_table.json").write_text(json.dumps(result, indent=2))
    print(render(result))
    return 0


def render(r: dict) -> str:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    def acc_pm(row, key):
        v, sd = row["top1"][key], (row.get("top1_std") or {}).get(key)
        return "-" if v is None else f"{v:.1f}" + ("" if sd is None else f" ± {sd:.1f}")
    lines = [f"cost table (paper table 7 analogue): {r['model']} on {r['n_train']} train / {r['n_val']} val images, "
             f"{r['device']} {r['precision']}, {r['torch_threads']} thread(s); training batch {r['batch_size']}, "
             f"fine-tuning batch {r['ft_batch_size']}; {r['epochs']} train + {r['ft_epochs']} fine-tune epochs run",
             f"{'train':>5} {'test':>5} | {'train ms/batch fwd':>18} {'bwd':>7} | "
             f"{'fix ms/batch fwd':>16} {'bwd':>7} | "
             f"{'wall s':>7} | {'120+60 ep. s':>12} | {'top-1 %':>11}"]
    for row in r["rows"]:
        t, s = row["train_size"], row["test_size"]
        tt, ts = row["train_ms"][t], row["train_ms"][s]
        w, pp = row["wall_s"], row["paper_protocol_s"]
        lines.append(f"{t:>5} {t:>5} | {f(tt[0]):>18} {f(tt[1]):>7} | {'':>16} {'':>7} | "
                     f"{f(w['train_T'], '{:.0f}'):>7} | "
                     f"{f(pp['train_T'], '{:.0f}'):>12} | {acc_pm(row, 'T@T'):>11}")
        lines.append(f"{s:>5} {s:>5} | {f(ts[0]):>18} {f(ts[1]):>7} | {'':>16} {'':>7} | "
                     f"{f(w['train_S'], '{:.0f}'):>7} | "
                     f"{f(pp['train_S'], '{:.0f}'):>12} | {acc_pm(row, 'S@S'):>11}")
        lines.append(f"{t:>5} {s:>5} | {f(tt[0]):>18} {f(tt[1]):>7} | {'':>16} {'':>7} | {'(no fix)':>7} | "
                     f"{f(pp['train_T'], '{:.0f}'):>12} | {acc_pm(row, 'T@S'):>11}")
        fw = None if w["finetune_S"] is None else w["train_T"] + w["finetune_S"]
        lines.append(f"{t:>5} {s:>5} | {f(tt[0]):>18} {f(tt[1]):>7} | {f(row['finetune_ms'][0]):>16} "
                     f"{f(row['finetune_ms'][1]):>7} | {f(fw, '{:.0f}'):>7} | {f(pp['train_T_fix_S'], '{:.0f}'):>12} | "
                     f"{acc_pm(row, 'T+fix@S'):>11}  <- train at {t} + fix at {s}")
        ratio = pp["train_T_fix_S"] / pp["train_S"] if pp["train_S"] else None
        lines.append(f"      cost of 'train {t} + fix {s}' / 'train {s}' (paper protocol): {f(ratio, '{:.2f}')}x"
                     + (" (fine-tuning used the activation cache)" if row["finetune_cache_used"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
