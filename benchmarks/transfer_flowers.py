"""Transfer learning with FixRes on flowers17 (paper table 3 protocol, table 6 ablation, appendix A).

(1) EfficientNet-Lite0 with its registry ImageNet weights gets a new 17-class head; (2) it is trained
on flowers17/train at 128 px (``fixres.method.train.train``, train DA); (3) it is evaluated on flowers17/val at
several test sizes (one pass, ``fixres.sweep``), and at the size fixres recommends for 128 px
(``fixres.analyze``) it is compared, on copies of the same trained model, with:

  * fine-tuned at S (``fixres.method.finetuning.finetune``, through benchmarks/_common.py, test DA, no
    evaluation before): classifier + batch-norm (the paper), batch-norm statistics only, classifier only
    (table 6);
  * label-free (``fixres.adapt``): bn-recalibrate, frechet (appendix A.1), gaussian (appendix A.2).

Every accuracy comes with the leave-one-fold-out std of section 5 (10 folds). Results go to
--out/transfer_flowers.json and a table on stdout.

``--trainable`` picks what step (2) trains: ``all`` (the paper's protocol: the whole network),
``last`` (the last stage, head conv and classifier; the rest frozen but its batch-norm statistics
still re-estimated at 128 px), or ``head``. On a small shared CPU, ``all`` costs minutes per epoch.
The trained model is kept in --out/train and reused by a later run with the same --out.

Usage:
  python benchmarks/transfer_flowers.py --quick                    # tiny model, generated images
  python benchmarks/transfer_flowers.py --epochs 2 --trainable last --out runs/transfer

Internal: fixres.method.train - the paper's transfer protocol trains the network, with only the parts
``--trainable`` names, at fixres's training precision on the CPU; the public API has no training function.
Sizes, the analysis, the label-free methods and every evaluation go through the public API; fine-tuning
without the evaluation before (fixres.finetune always evaluates first), the parts and the precision come
from benchmarks/_common.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import find_parts, finetune, precision_for, shared_folder, small_split, split_index

from fixres.method.train import train


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log (a line torn by a kill is left out)."""
    records = []
    for line in (path.read_text(encoding="utf-8").splitlines() if path.is_file() else []):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _freeze_for(model, trainable: str) -> list[str]:
    """requires_grad only on what ``trainable`` names; returns the trained module names."""
    if trainable == "all":
        return ["(all)"]
    parts = find_parts(model)
    if trainable == "head":
        names = [parts.classifier]
    else:
        start = parts.chain.index(parts.last_stage.split(".")[0]) if parts.last_stage else len(parts.chain) - 1
        names = ([parts.last_stage] if parts.last_stage else []) + parts.chain[start + 1:]
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on generated images (about a minute)")
    ap.add_argument("--train-size", type=int, default=128)
    ap.add_argument("--test-size", type=int, default=None, help="default: the size fixres recommends")
    ap.add_argument("--sizes", default="128,160,192,224,256", help="sweep sizes")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs at the train size")
    ap.add_argument("--trainable", choices=("all", "last", "head"), default="all")
    ap.add_argument("--batch-size", type=int, default=32, help="training batch")
    ap.add_argument("--repeats", type=int, default=1, help="repeated augmentation during training")
    ap.add_argument("--lr", type=float, default=None, help="training lr (default: fixres.method.train's 0.1 x B/256)")
    ap.add_argument("--schedule", choices=("step", "cosine"), default="step", help="training lr schedule")
    ap.add_argument("--warmup-epochs", type=float, default=0, help="linear warm-up of the training lr")
    ap.add_argument("--ft-epochs", type=int, default=10, help="fine-tuning epochs at the test size")
    ap.add_argument("--ft-batch-size", type=int, default=64)
    ap.add_argument("--adapt-images", type=int, default=None, help="images for the label-free statistics")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    import fixres

    out = Path(args.out or tempfile.mkdtemp(prefix="fixres_transfer_"))
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        torch.set_num_threads(1)
        root = small_split(out, val_per_class=8)
        model_kw = dict(name="fixres_tiny_resnet", num_classes=3, train_size=48, random_init=True)
        train_size, sizes, workers = 48, [48, 64, 96], 0
        test_size = args.test_size or 64
        epochs, trainable = min(args.epochs, 3), "all"
    else:
        root = shared_folder("flowers17")
        if root is None:
            return 0
        model_kw = dict(name="efficientnet-lite0", num_classes=17, train_size=args.train_size)
        train_size, workers, epochs, trainable = args.train_size, args.workers, args.epochs, args.trainable
        test_size = args.test_size
    train_idx = split_index(root, "train")
    val_idx = split_index(root, "val", classes=train_idx.classes)
    torch.manual_seed(0)
    weights = model_kw["name"] if not model_kw.get("random_init") else None  # the registry weights, if any
    bundle = fixres.load(model_kw.pop("name"), **model_kw)
    cfg = bundle.data_config
    if test_size is None:
        test_size = fixres.analyze(train_size, crop_ratio=cfg.crop_ratio).recommended_test_size
    if test_size not in sizes:
        sizes = sorted(sizes + [test_size])
    device = torch.device("cpu")
    precision = precision_for(device)  # its amp flag also sets the evaluations' precision
    timings: dict[str, float] = {}
    note = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    def at(m, sizes_: list[int]):
        """``m`` on val at ``sizes_`` in one pass (batch 64) at the inference precision, as ``fixres eval``."""
        return fixres.sweep(fixres.ModelBundle(m, cfg, bundle.name, bundle.source, {}), val_idx.samples, sizes_,
                            batch_size=64, device="cpu", amp=precision.amp, workers=workers)

    # (2) transfer: train at train_size (reuse a finished run in --out)
    model = bundle.model
    trained_path = out / "train" / "model.safetensors"
    t0 = time.perf_counter()
    if trained_path.is_file():
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(trained_path)), strict=True)
        train_res = json.loads((out / "train_result.json").read_text()) if (out / "train_result.json").is_file() else {}
        note(f"reusing the model trained at {train_size}px in {trained_path}")
    else:
        trained = _freeze_for(model, trainable)
        note(f"training {bundle.name} at {train_size}px for {epochs} epoch(s), trainable: {', '.join(trained)}")
        train_res = train(model, train_idx.samples, val_idx.samples, cfg, train_size=train_size, epochs=epochs,
                          batch_size=args.batch_size, lr=args.lr, out_dir=out / "train", resume=True,
                          repeats=args.repeats, val_sizes=[train_size], precision=precision, seed=0,
                          schedule=args.schedule, warmup_epochs=args.warmup_epochs,
                          workers=workers, progress=False, model_name=bundle.name)
        for p in model.parameters():
            p.requires_grad_(True)
        log = train_res.get("log") or train_res.get("epochs_log") or _read_jsonl(out / "train" / "log.jsonl")
        train_res = {"trainable": trained, "epochs": epochs, "schedule": args.schedule,
                     "warmup_epochs": args.warmup_epochs, "batch_size": args.batch_size,
                     "log": [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in log]}
        (out / "train_result.json").write_text(json.dumps(train_res, indent=2, default=str))
    timings["train_s"] = round(time.perf_counter() - t0, 1)

    # (3) sweep, one pass
    t0 = time.perf_counter()
    model.eval()
    sweep = at(model, sizes)
    timings["sweep_s"] = round(time.perf_counter() - t0, 1)
    rows = {r.test_size: {"top1": r.top1, "top1_std": r.top1_std} for r in sweep.rows}
    note("sweep: " + ", ".join(f"{s}px {r['top1']:.2f}" for s, r in rows.items()))
    trained_state = copy.deepcopy(model.state_dict())
    results = {"train_size_at_train_size": rows[train_size], "unfixed_at_S": rows[test_size]}

    def fresh():
        m = copy.deepcopy(model)
        m.load_state_dict(trained_state)
        return m

    # fine-tuning variants (table 6)
    for label, parts in (("finetune classifier+bn", "classifier,bn"), ("finetune bn-stats", "bn-stats"),
                         ("finetune classifier", "classifier")):
        t0 = time.perf_counter()
        res = finetune(fresh(), train_idx.samples, val_idx.samples, cfg, test_size=test_size, parts=parts,
                       augment="test", epochs=args.ft_epochs, batch_size=args.ft_batch_size,
                       out_dir=out / label.replace(" ", "_").replace("+", "_"), precision=precision, seed=0,
                       workers=workers, progress=False, evaluate_before=False)
        timings[label + "_s"] = round(time.perf_counter() - t0, 1)
        results[label] = {"top1": res["after"]["top1"], "top1_std": res["after"]["top1_std"],
                          "cache": res["cache"].get("cut"), "finetune_s": res["timing"]["finetune_s"]}
        note(f"{label}: {res['after']['top1']:.2f} ± {res['after']['top1_std']:.2f} ({timings[label + '_s']} s)")

    # label-free (appendix A)
    for method in ("bn-recalibrate", "frechet", "gaussian"):
        t0 = time.perf_counter()
        m = fresh()
        info = fixres.adapt(fixres.ModelBundle(m, cfg, bundle.name, bundle.source, {}), train_idx.samples,
                            test_size, method=method, train_size=train_size, device="cpu",  # amp: precision_for(cpu)
                            workers=workers, max_images=args.adapt_images, progress=False)
        ev = at(m, [test_size]).rows[0]
        timings[method + "_s"] = round(time.perf_counter() - t0, 1)
        results[method] = {"top1": ev.top1, "top1_std": ev.top1_std, "images": info.images}
        note(f"{method}: {ev.top1:.2f} ± {ev.top1_std:.2f} ({timings[method + '_s']} s)")

    result = {"model": bundle.name, "weights": weights, "data": str(root),
              "train_images": len(train_idx), "val_images": len(val_idx), "train_size": train_size,
              "test_size": test_size, "trainable": train_res.get("trainable"), "epochs": train_res.get("epochs"),
              "ft_epochs": args.ft_epochs, "precision": precision.describe(), "sweep": rows, "results": results,
              "timings": timings, "train_log": train_res.get("log")}
    (out / "transfer_flowers.json").write_text(json.dumps(result, indent=2, default=str))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(f"{bundle.name} transferred to {len(train_idx.classes)} classes, trained at {train_size}px "
          f"({train_res.get('epochs')} epochs, trainable: {', '.join(train_res.get('trainable') or ['?'])}); "
          f"val {len(val_idx)} images; top-1 % ± fold std")
    print("  sweep (no adaptation): " + ", ".join(f"{s}px {r['top1']:.2f} ± {r['top1_std']:.2f}"
                                                  for s, r in rows.items()))
    print(f"  fixres picks S = {test_size}px for train size {train_size}px")
    table = [(f"trained at {train_size}, tested at {train_size}", results["train_size_at_train_size"]),
             (f"unfixed at {test_size}", results["unfixed_at_S"])]
    table += [(f"{k} at {test_size}", results[k]) for k in results if k not in ("train_size_at_train_size",
                                                                                 "unfixed_at_S")]
    for label, r in table:
        print(f"  {label:<40} {r['top1']:6.2f} ± {r['top1_std']:.2f}")
    print("  seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    print(f"  results: {out / 'transfer_flowers.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
