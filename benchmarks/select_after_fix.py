"""Selection after fixing: does choosing the fixed size on held-out training images work?

Runs ``fixres fix`` (every candidate size fixed at its own size, cached; the size chosen on a
held-out part of the training images), then for every candidate prints the validation top-1 before
and after the fix with the fold std and the binomial standard error, an exact paired test (McNemar /
sign test: fixed vs unfixed on the same validation images), the size chosen on the held-out
training images and the size that choosing on the validation images would have picked (the
optimistic, leaky choice the held-out split avoids).

  --quick       the embedded data set and the tiny CNN trained at 64 (``fixres fix`` with no arguments)
  --data DIR    a photo folder (train/ + val/) with --checkpoint (e.g. a lite0 trained there at 128)

Writes benchmarks/results/select_after_fix_embedded.json (--quick) or select_after_fix_DATA.json, and the run
folder runs/select_after_fix_embedded (its report holds the frontier and reliability PNGs).

Internal: fixres.method.calibration - the paired test needs every photo's prediction, before and after (fp32,
the test pre-processing: ``predict``); the public API returns each size's totals only.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from _common import REPO, binomial_se, paired_test, split_index, write_json

import fixres


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="embedded data, tiny CNN at 64 (the demo)")
    p.add_argument("--data", default=None, help="ImageFolder with train/ and val/")
    p.add_argument("--checkpoint", default=None, help="the model to fix (with --data)")
    p.add_argument("--model", default=None)
    p.add_argument("--run-dir", default=None, help="fix run folder (reused when its inputs are unchanged)")
    p.add_argument("--out", default=None, help="result JSON")
    p.add_argument("--workers", type=int, default=None)
    # cuts for a slow machine (each one is recorded in the result JSON)
    p.add_argument("--candidates", default=None, help="comma-separated candidate sizes (default: fixres fix's)")
    p.add_argument("--test-sizes", default=None, help="comma-separated sweep sizes (default: fixres fix's)")
    p.add_argument("--stats-sizes", default=None, help="comma-separated pooled-activation sizes")
    p.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (the grid's x1)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning lr (the grid's x1)")
    p.add_argument("--no-tune-schedule", action="store_true", help="skip the (lr, epochs) grid")
    p.add_argument("--select-budget", type=float, default=None, help="minutes for the candidates")
    return p.parse_args()


def _sizes(text: str | None) -> list[int] | None:
    return [int(v) for v in text.split(",")] if text else None


def _best_size(rows: list[dict], key: str) -> int:
    """The most accurate size by ``key``, by the project's one rule (``fixres.SweepResult.best``: ties go to the
    smaller size)."""
    results = tuple(fixres.SizeResult.from_row({"test_size": r["test_size"], "top1": r[key]}) for r in rows)
    return fixres.SweepResult(rows=results, n_images=0, skipped=0).best.test_size


def _load_adapted(model, path: Path) -> None:
    """A candidate's adapted tensors (fix's candidates/SIZE/adapted.safetensors) copied over the model before the
    fix."""
    from safetensors.torch import load_file
    own = model.state_dict()
    for k, v in load_file(str(path)).items():
        own[k].copy_(v)


def _per_image(run_dir: Path, a: argparse.Namespace, sizes: list[int]) -> dict[int, tuple[list, list]]:
    """Per validation image: correct before and after the fix at each candidate size (same images)."""
    from fixres.method.calibration import predict
    data = json.loads((run_dir / "data.json").read_text())["root"]
    # the model before the fix: the one fix trained, else the given checkpoint (its fixres.json names the model)
    base_ck = run_dir / "train" / "model.safetensors" if (run_dir / "train").is_dir() else a.checkpoint
    bundle = fixres.load(base_ck)
    run = json.loads((run_dir / "run.json").read_text())
    cfg = bundle.data_config.with_overrides(crop_ratio=run["config"].get("crop_ratio"))
    train = split_index(data, "train")
    val = split_index(data, "val", classes=train.classes)
    out = {}
    for s in sizes:
        fixed = copy.deepcopy(bundle.model)
        _load_adapted(fixed, run_dir / "candidates" / str(s) / "adapted.safetensors")
        kw = dict(batch_size=64, workers=a.workers, device="cpu")
        lb, y = predict(bundle.model, val.samples, cfg, s, **kw)
        la, _ = predict(fixed, val.samples, cfg, s, **kw)
        out[s] = ((lb.argmax(1) == y).tolist(), (la.argmax(1) == y).tolist())
    return out


def _table(sel: dict, paired: dict, choice: dict) -> tuple[list[dict], dict]:
    rows = []
    for c in sel["candidates"]:
        s, b, a, n = c["test_size"], c["val_before"], c["val_after"], c["val_after"]["n"]
        rows.append({"test_size": s, "val_before": b["top1"], "val_before_fold_std": b["top1_std"],
                     "val_after": a["top1"], "val_after_fold_std": a["top1_std"],
                     "binomial_se_after": binomial_se(a["top1"], n), "n_val": n,
                     "holdout_before": (c.get("holdout_before") or {}).get("top1"),
                     "holdout_after": (c.get("holdout_after") or {}).get("top1"),
                     "val_nll_before": b.get("nll"), "val_nll_after": a.get("nll"),
                     "val_ece_before": b.get("ece"), "val_ece_after": a.get("ece"),
                     "holdout_nll_before": (c.get("holdout_before") or {}).get("nll"),
                     "holdout_nll_after": (c.get("holdout_after") or {}).get("nll"),
                     "paired": paired_test(paired[s][1], paired[s][0]) if s in paired else None,
                     # the paired test's own top-1 (a separate predict pass): a check on the table's numbers
                     "paired_top1_before": 100.0 * sum(paired[s][0]) / len(paired[s][0]) if s in paired else None,
                     "paired_top1_after": 100.0 * sum(paired[s][1]) / len(paired[s][1]) if s in paired else None,
                     "ms": c.get("ms"), "ms_batch": c.get("ms_batch"), "gflops": c.get("gflops")})
    by_val = _best_size(rows, "val_after")
    by_val_before = _best_size(rows, "val_before")
    summary = {"chosen_on_held_out": choice["test_size"], "would_choose_on_val": by_val,
               "best_untuned_on_val": by_val_before, "recommended": sel["recommended"],
               "recommended_exact": sel["recommended_exact"], "n_holdout": sel["n_holdout"],
               "schedule": sel.get("schedule")}
    return rows, summary


def _print(rows: list[dict], summary: dict) -> None:
    print(f"{'size':>5} {'before':>14} {'after':>14} {'SE':>5} {'held-out b/a':>13} {'only fixed/only unfixed':>24} "
          f"{'p':>6} {'ms/img':>7} {'GFLOPs':>7}")
    for r in rows:
        mark = "*" if r["test_size"] == summary["chosen_on_held_out"] else " "
        p = r["paired"] or {}
        ho = f"{r['holdout_before'] or 0:.1f}/{r['holdout_after'] or 0:.1f}"
        print(f"{r['test_size']:>4}{mark} {r['val_before']:>6.1f} ± {r['val_before_fold_std']:>4.1f} "
              f"{r['val_after']:>6.1f} ± {r['val_after_fold_std']:>4.1f} {r['binomial_se_after']:>5.1f} {ho:>13} "
              f"{p.get('only_a', 0):>11}/{p.get('only_b', 0):<12} {p.get('p', float('nan')):>6.3f} "
              f"{r['ms'] or 0:>7.2f} {r['gflops'] or 0:>7.3f}")
    print(f"chosen on {summary['n_holdout']} held-out training images: {summary['chosen_on_held_out']}px; "
          f"choosing on val would pick {summary['would_choose_on_val']}px; best untuned on val "
          f"{summary['best_untuned_on_val']}px; analysis recommends {summary['recommended']}px "
          f"(exact {summary['recommended_exact']:.1f})")


def main() -> int:
    a = _args()
    if not a.quick and not (a.data and a.checkpoint):
        print("give --quick, or --data DIR --checkpoint FILE", file=sys.stderr)
        return 2
    # --quick is the full run on the embedded data (the demo): its result is kept, not a smoke test
    name = "select_after_fix_embedded" if a.quick else f"select_after_fix_{Path(a.data).name}"
    run_dir = Path(a.run_dir or REPO / "runs" / ("select_after_fix_quick" if a.quick else name))
    t0 = time.perf_counter()
    # ``fixres fix`` through the API (with no data: the embedded demo): the model name (--model), the data, and
    # the settings as FixConfig's fields
    result = fixres.fix(a.model, None if a.quick else a.data, out=str(run_dir), workers=a.workers,
                        checkpoint=None if a.quick else a.checkpoint,
                        candidates=_sizes(a.candidates), test_sizes=_sizes(a.test_sizes),
                        stats_sizes=_sizes(a.stats_sizes), lr=a.lr, tune_schedule=not a.no_tune_schedule,
                        **({"finetune_epochs": a.finetune_epochs} if a.finetune_epochs else {}),
                        **({"select_budget_min": a.select_budget} if a.select_budget else {}))
    wall = time.perf_counter() - t0
    sel = json.loads((run_dir / "select.json").read_text())
    sizes = [c["test_size"] for c in sel["candidates"]]
    rows, summary = _table(sel, _per_image(run_dir, a, sizes), result.choice.to_json())
    _print(rows, summary)
    run = json.loads((run_dir / "run.json").read_text())
    out = {"command": " ".join(sys.argv), "rows": rows, **summary, "fix_wall_s_this_call": round(wall, 1),
           "step_seconds": run.get("timings"), "device": run.get("device"), "torch_threads": run.get("torch_threads"),
           "headline": result.headline.to_json(),
           "noise": "± = leave-one-fold-out std over 10 folds; SE = binomial standard error of one accuracy; "
                    "p = exact two-sided McNemar (sign) test, fixed vs unfixed on the same validation images"}
    path = Path(a.out or REPO / "benchmarks" / "results" / f"{name}.json")
    write_json(path, out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
