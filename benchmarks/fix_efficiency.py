"""Where ``fixres fix``'s time goes, against the work it cannot avoid, measured side by side.

For a finished fix run (``--run DIR``, read only) or one this script starts (``python -m fixres fix`` as a
timed subprocess), prints per step: its wall seconds (``run.json`` "timings"), the images it forwarded and
the forwards per image, COUNTED from the step's inputs as the run's JSONs record them (sweeps: images x
sizes; select and schedule: per fine-tuning one prefix pass over the fitting images, the cached epochs
over the suffix only, and the scores; stats: sizes x images x 2 models), and its share of the total.
Then the unavoidable work, measured here on the same model, data and settings: (a) one evaluation of the
model before the fix on val at every sweep size, (b) for each candidate size one full forward (an upper
bound on the frozen prefix) over the fitting images and the photos that choose. The ratio of fix's total
to that is the overhead. The plan estimate fix printed ("plan (...)") is set against the measured time.

Usage:
  python benchmarks/fix_efficiency.py --quick --out /tmp/fe               # tiny model on generated images, < 1 min
  python benchmarks/fix_efficiency.py --data DIR --checkpoint CK --model NAME --train-size 128 --out OUT
  python benchmarks/fix_efficiency.py --run OUT/fix --log OUT/fix.log      # a finished run: nothing new about fix
  python benchmarks/fix_efficiency.py ... --label before                   # tag the result
  python benchmarks/fix_efficiency.py --compare A/fix_efficiency.json B/fix_efficiency.json
Writes OUT/fix_efficiency.json (and, when it runs fix, OUT/fix/ and OUT/fix.log). Without --data (or with
--data absent) it says so and measures nothing.

Internal: fixres.job.context - the unavoidable work is measured on fix's own context, rebuilt from the run's
config (``FixConfig``, ``FixContext``, its step names and stats sample size), so that the model, the fitting
images and the photos that choose are exactly the ones fix used; the public API runs fix (``fixres.fix``) but
does not expose that context.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    REPO,
    DistEnv,
    corruption_table,
    inference_precision,
    resolve_device,
    save_tiny_checkpoint,
    small_split,
    write_json,
)

from fixres.job.context import STATS_IMAGES, STEPS, FixConfig, FixContext, load_weights

RESULT_NAME = "fix_efficiency.json"
FIX_LOG = "fix.log"
#: --quick: the generated split, the tiny model and fix's settings (well under a minute on one core).
QUICK_VAL_PER_CLASS = 4
QUICK_TRAIN_PER_CLASS = 16
QUICK_CLASSES = 3
QUICK_MODEL = "fixres_tiny_resnet"
QUICK_TRAIN_SIZE = 32
QUICK_FIX_ARGS = ("--test-sizes", "32,48", "--epochs", "1", "--workers", "0", "--batch-size", "8")
QUICK_THREADS = "1"
#: Seconds allowed to the fix subprocess (--quick, and otherwise).
QUICK_FIX_TIMEOUT_S = 600
FIX_TIMEOUT_S = 7 * 24 * 3600
PLAN_PREFIX = "plan ("
PLAN_ITEM = re.compile(r"(\w+) ~([\d.]+) (s|min)")
PLAN_TOTAL = re.compile(r"total ~([\d.]+) (s|min)")
SECONDS_PER = {"s": 1.0, "min": 60.0}
#: What fix's sweep_after.json says in "after" when every size was fixed at its own size (its run format).
AFTER_EACH_FIXED = "each size fixed at its own size"
#: The weights file ``fixres train`` (and fix's train step) writes in its folder.
WEIGHTS_NAME = "model.safetensors"
#: fix's latency/FLOP probe per candidate (warm-up calls, then timed calls, at batch 1 and at this batch), one
#: FLOP count beside it: synthetic inputs, named in the select step's note, not counted.
LATENCY_WARMUP, LATENCY_REPEATS, LATENCY_BATCH = 2, 5, 16
COUNTED_FROM = ("images and forwards are COUNTED from the run's JSONs (sweep_*.json n_images x rows; select.json "
                "candidates with candidates/<size>/finetune_result.json; schedule.json rows with "
                "schedule/lr*_ep*/finetune.json; stats.json sizes; train.json epochs), not measured")


# --------------------------------------------------------------------------- running fix, reading a run

def run_fix(args, out: Path) -> tuple[Path, str, float, list[str]]:
    """``python -m fixres fix`` on args' data into OUT/fix, timed; (run dir, its log, wall s, command)."""
    run_dir = out / "fix"
    cmd = [sys.executable, "-m", "fixres", "fix", "--data", str(args.data), "--out", str(run_dir)]
    for flag, value in (("--checkpoint", args.checkpoint), ("--model", args.model), ("--train-size", args.train_size)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += list(args.fix_args)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if args.quick:
        env["OMP_NUM_THREADS"] = QUICK_THREADS
    print("running: " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=QUICK_FIX_TIMEOUT_S if args.quick else FIX_TIMEOUT_S)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (out / FIX_LOG).write_text(log, encoding="utf-8")
    if proc.returncode != 0:
        raise SystemExit(f"fixres fix failed (exit {proc.returncode}); its log: {out / FIX_LOG}\n{log[-2000:]}")
    return run_dir, log, wall, cmd


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_run(run_dir: Path) -> dict:
    """Every step's JSON of a finished run ({step: dict or None}), run.json under "run"."""
    run = read_json(run_dir / "run.json")
    if run is None:
        raise SystemExit(f"{run_dir} holds no run.json: not a finished fix run")
    return {"run": run, **{s: read_json(run_dir / f"{s}.json") for s in STEPS if s != "report"}}


# --------------------------------------------------------------------------- counting what each step forwarded

def _count(full: int = 0, suffix: int = 0, train: int = 0, per: float | None = None, unit: str = "",
           note: str = "") -> dict:
    return {"full_forwards": int(full), "suffix_passes": int(suffix), "train_passes": int(train),
            "per_image": per, "unit": unit, "note": note}


def finetune_passes(ft: dict | None, n_fit: int, epochs: int) -> tuple[int, int, int, str]:
    """(full forwards, cached suffix passes, uncached forward+backward passes, note) of one fine-tuning."""
    if ft is None:  # result file absent: the recorded settings instead
        return n_fit, epochs * n_fit, 0, "finetune result absent: n_fit prefix + epochs x n_fit assumed"
    epoch_images = sum(int(e.get("images", 0)) for e in ft.get("log") or [])
    cache = ft.get("cache") or {}
    if cache.get("used"):  # cache "shape" is one image's activation shape: the prefix pass read every fit image
        return n_fit, epoch_images, 0, ""
    return 0, 0, epoch_images, f"no cache ({cache.get('reason')})"


def count_sweep(sweep: dict | None) -> dict:
    if sweep is None:
        return _count(note="skipped")
    n, k = int(sweep["n_images"]), len(sweep["rows"])
    return _count(full=n * k, per=float(k), unit="val image", note=f"{n} val x {k} sizes")


def count_select(sel: dict | None, run_dir: Path, n_fit: int, epochs: int) -> dict:
    if sel is None:
        return _count(note="skipped")
    full = suffix = train = 0
    notes = set()
    rows = sel["candidates"]
    for row in rows:
        ft = read_json(run_dir / "candidates" / str(row["test_size"]) / "finetune_result.json")
        f, s, t, note = finetune_passes(ft, n_fit, epochs)
        full, suffix, train = full + f, suffix + s, train + t
        notes.add(note)
        full += sum(int((row.get(k) or {}).get("n") or 0) for k in ("val_after", "holdout_after", "seen_after"))
        full += sum(int((row.get(k) or {}).get("n") or 0) for k in ("holdout_before", "seen_before"))
    full += int((sel.get("seen_before_at_train_size") or {}).get("n") or 0)  # the training photos at T, once
    probes = len(rows) * ((LATENCY_WARMUP + LATENCY_REPEATS) * (1 + LATENCY_BATCH) + 1)
    notes.add(f"{len(rows)} candidates; + {probes} synthetic latency/FLOP inputs not counted")
    return _count(full=full, suffix=suffix, train=train, per=(full + train) / max(1, n_fit), unit="fit image",
                  note="; ".join(n for n in sorted(notes) if n))


def count_schedule(sched: dict | None, run_dir: Path, n_fit: int) -> dict:
    if sched is None:
        return _count(note="skipped")
    full = suffix = train = 0
    notes = set()
    for row in sched["rows"]:
        ft = read_json(run_dir / "schedule" / f"lr{row['lr']:g}_ep{row['epochs']}" / "finetune.json")
        f, s, t, note = finetune_passes(ft, n_fit, int(row["epochs"]))
        full, suffix, train = full + f + int(row.get("n") or 0), suffix + s, train + t
        notes.add(note)
    notes.add(f"{len(sched['rows'])} fine-tunings at {sched.get('test_size')}px + held-out scores")
    return _count(full=full, suffix=suffix, train=train, per=(full + train) / max(1, n_fit), unit="fit image",
                  note="; ".join(n for n in sorted(notes) if n))


def count_stats(stats: dict | None, n_val: int) -> dict:
    if stats is None:
        return _count(note="skipped")
    n, k = min(STATS_IMAGES, n_val), len(stats["sizes"])
    replayed = sum(bool((stats.get(m) or {}).get("replayed_from_cut")) for m in ("before", "after"))
    return _count(full=(2 - replayed) * k * n, suffix=replayed * k * n, per=2.0 * k * n / max(1, n_val),
                  unit="val image", note=f"{k} sizes x {n} images x 2 models (n assumed: min(STATS_IMAGES, n_val))"
                  + (f"; {replayed} of them from the activations at the cut" if replayed else ""))


def count_other(name: str, doc: dict | None, n_fit: int, n_holdout: int) -> dict:
    """data, train, analyze, finetune, report."""
    if doc is None and name != "report":
        return _count(note="skipped")
    if name == "train":
        passes = sum(int(e.get("images", 0)) for e in doc.get("epochs") or [])
        return _count(train=passes, per=passes / max(1, n_fit), unit="fit image", note="forward+backward at T")
    if name == "robustness":
        n, conditions, cols = int(doc.get("n_images") or 0), len(doc.get("rows") or []), len(doc.get("columns") or [])
        return _count(full=n * conditions * cols, per=conditions * cols, unit="robustness photo",
                      note=f"{n} photos x {conditions} conditions x {cols} columns, decoded at full size")
    if name == "finetune":
        if doc.get("temperature"):
            return _count(full=n_holdout, note="temperature fitted on the held-out images")
        if doc.get("n_unlabeled"):
            return _count(full=int(doc["n_unlabeled"]), note="label-free batch-norm recalibration")
        return _count(note="the chosen candidate's tensors loaded, exported")
    return _count(note={"analyze": "photo headers only"}.get(name, ""))


def count_steps(docs: dict, run_dir: Path) -> dict:
    """{step: counts} in step order; wall seconds and shares from run.json "timings"."""
    run = docs["run"]
    n_fit, n_holdout = int(run["n_fit"]), int(run["n_holdout"])
    n_val = int((docs.get("sweep_before") or {}).get("n_images") or 0)
    epochs = int((run.get("schedule") or {}).get("epochs") or 1)
    timings = run.get("timings") or {}
    out = {}
    for name in ("data", "train", "analyze", "sweep_before", "schedule", "select", "finetune", "sweep_after",
                 "stats", "robustness", "report"):
        if name == "sweep_after" and (docs.get(name) or {}).get("after") == AFTER_EACH_FIXED:
            c = _count(note="read from the candidates' scores (each size fixed at its own size): no forward")
        elif name in ("sweep_before", "sweep_after"):
            c = count_sweep(docs.get(name))
        elif name == "select":
            c = count_select(docs.get(name), run_dir, n_fit, epochs)
        elif name == "schedule":
            c = count_schedule(docs.get(name), run_dir, n_fit)
        elif name == "stats":
            c = count_stats(docs.get(name), n_val)
        else:
            c = count_other(name, docs.get(name), n_fit, n_holdout)
        c["wall_s"] = timings.get(name)
        out[name] = c
    total = sum(v for v in timings.values() if v is not None)
    for c in out.values():
        c["share"] = (c["wall_s"] / total) if c["wall_s"] is not None and total > 0 else None
    return out


# --------------------------------------------------------------------------- the plan estimate

def parse_plan(log: str | None) -> dict | None:
    """{"line", "steps": {step: s}, "total_s"} from the "plan (" line of fix's log, or None."""
    line = next((ln.strip() for ln in (log or "").splitlines() if ln.strip().startswith(PLAN_PREFIX)), None)
    if line is None:
        return None
    body = line.split("): ", 1)[-1]
    total = PLAN_TOTAL.search(body)
    steps = {m.group(1): float(m.group(2)) * SECONDS_PER[m.group(3)] for m in PLAN_ITEM.finditer(body)
             if m.group(1) != "total"}
    return {"line": line, "steps": steps,
            "total_s": float(total.group(1)) * SECONDS_PER[total.group(2)] if total else sum(steps.values())}


def plan_vs_measured(plan: dict | None, timings: dict) -> dict | None:
    if plan is None:
        return None
    measured = sum(timings.get(k) or 0.0 for k in plan["steps"])
    return {**plan, "measured_same_steps_s": measured,
            "ratio": measured / plan["total_s"] if plan["total_s"] > 0 else None,
            "per_step": {k: {"estimated_s": v, "measured_s": timings.get(k)} for k, v in plan["steps"].items()}}


# --------------------------------------------------------------------------- the unavoidable work, measured here

def rebuild_context(run: dict, run_dir: Path, docs: dict):
    """fix's context as ``FixContext.index_data`` / ``assign_choosing_photos`` build it, from the run's config."""
    fields = {f.name for f in dataclasses.fields(FixConfig)}
    config = FixConfig(**{k: v for k, v in (run.get("config") or {}).items() if k in fields}, progress=False)
    x = FixContext(config=config, run_dir=run_dir, say=lambda msg: print(msg, file=sys.stderr))
    x.index_data(Path(config.data or (docs.get("data") or {})["root"]))
    x.load_model()
    x.assign_choosing_photos()
    if x.needs_training:  # the model before the fix is the one fix trained
        load_weights(x.bundle.model, run_dir / "train" / WEIGHTS_NAME)
    x.bundle.model.eval()
    return x


def measure_unavoidable(run: dict, run_dir: Path, docs: dict) -> dict:
    """(a) the model before the fix on val at every sweep size, one call; (b) per candidate size one full
    forward (upper bound on the frozen prefix) over the fitting images and the photos that choose."""
    import torch

    import fixres
    torch.set_num_threads(int(run.get("torch_threads") or torch.get_num_threads()))
    x = rebuild_context(run, run_dir, docs)
    # fix's device and inference precision (amp), batch and workers, as ``fixres eval`` runs them
    kw = {"data_config": x.data_config, "batch_size": x.config.batch_size, "device": x.config.device,
          "amp": x.config.amp, "workers": x.config.workers, "progress": False}
    sizes = [int(s) for s in run["test_sizes"]]
    t0 = time.perf_counter()
    fixres.sweep(x.bundle, x.val_index, sizes, **kw)
    sweep_s = time.perf_counter() - t0
    fit = set(x.fit)
    samples = list(x.fit) + [s for s in (x.holdout or x.seen) if s not in fit]
    cands = [int(r["test_size"]) for r in (docs.get("select") or {}).get("candidates") or []] or [run["test_size"]]
    per = {}
    for size in cands:
        t0 = time.perf_counter()
        fixres.sweep(x.bundle, samples, [size], **kw)
        per[str(size)] = time.perf_counter() - t0
    corrupted = measure_corrupted(x, docs.get("robustness"))
    return {"sweep_s": sweep_s, "sweep_images": len(x.val_index.samples), "sweep_sizes": sizes,
            "candidates_s": per, "candidate_images": len(samples), **corrupted,
            "total_s": sweep_s + sum(per.values()) + corrupted["corrupted_s"],
            "rule": x.rule, "n_fit": len(x.fit), "n_chooser": len(x.holdout or x.seen),
            "how": "(a) evaluate(model before the fix, val, every sweep size); (b) per candidate evaluate(model, "
                   "fit + choosing photos not in fit, [size]): full forward, an upper bound on the frozen prefix; "
                   "(c) the robustness step's photos under every corruption and severity, one pass of the model "
                   "before the fix at each size the table shows: full forwards, an upper bound on the prefix"}


def measure_corrupted(x, table: dict | None) -> dict:
    """(c) one prefix pass per (corrupted photo, size): the model before the fix at every distinct size of the
    robustness table, in one pass per condition over the same photos, decoded and corrupted as the step did."""
    if not table:
        return {"corrupted_s": 0.0, "corrupted_sizes": [], "corrupted_images": 0, "corrupted_conditions": 0}
    sizes = sorted({int(s) for s in (table.get("test_sizes") or {}).values()})
    c = x.config
    env = DistEnv(device=resolve_device(c.device))
    t0 = time.perf_counter()
    corruption_table({f"{s}px": (x.bundle.model, s) for s in sizes}, x.val_index, x.data_config, seed=c.seed,
                     max_images=c.robustness_images, batch_size=c.batch_size, env=env,
                     precision=inference_precision(env.device, c.amp), workers=c.workers, progress=False)
    return {"corrupted_s": time.perf_counter() - t0, "corrupted_sizes": sizes,
            "corrupted_images": int(table.get("n_images") or 0), "corrupted_conditions": len(table.get("rows") or [])}


# --------------------------------------------------------------------------- the result and its rendering

def machine() -> dict:
    import torch
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def build_result(args, run_dir: Path, log: str | None, wall: float | None, fix_cmd: list[str] | None) -> dict:
    docs = read_run(run_dir)
    run = docs["run"]
    steps = count_steps(docs, run_dir)
    total = sum(v for v in (run.get("timings") or {}).values() if v is not None)
    unavoidable = measure_unavoidable(run, run_dir, docs)
    u = unavoidable["total_s"]
    return {"label": args.label, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "fix_command": fix_cmd,
            "run_dir": str(run_dir), "machine": {**machine(), "fix_torch_threads": run.get("torch_threads")},
            "counted_from": COUNTED_FROM, "model": run.get("model"), "device": run.get("device"),
            "n_fit": run.get("n_fit"), "n_holdout": run.get("n_holdout"),
            # the run's own record of its rule (a run from before the rules existed chose on held-out photos)
            "rule": (run.get("choice") or {}).get("rule") or (docs.get("select") or {}).get("method") or "n/a",
            "n_val": (docs.get("sweep_before") or {}).get("n_images"), "candidates": run.get("candidates"),
            "test_sizes": run.get("test_sizes"), "test_size": run.get("test_size"), "steps": steps,
            "total_steps_s": total, "process_wall_s": wall, "unavoidable": unavoidable,
            "ratio": total / u if u > 0 else None, "ratio_process": (wall / u) if wall and u > 0 else None,
            "plan": plan_vs_measured(parse_plan(log), run.get("timings") or {})}


def _fmt(v, spec: str = ".2f", dash: str = "—") -> str:
    return dash if v is None else format(v, spec)


def _forwarded(c: dict) -> str:
    text = f"{c['full_forwards'] + c['train_passes']:,}"
    if c["train_passes"]:
        text += f" ({c['train_passes']:,} fwd+bwd)"
    if c["suffix_passes"]:
        text += f" + {c['suffix_passes']:,} suffix"
    return text


def render(r: dict) -> str:
    title = (f"## fix efficiency{' — ' + r['label'] if r.get('label') else ''}: {r['model']} on {r['device']}, "
             f"{r['n_fit']} fit / {r['n_holdout']} held-out / {r['n_val']} val images, rule {r['rule']}, "
             f"candidates {r['candidates']}, sweep sizes {r['test_sizes']}")
    lines = [title, "",
             "| step | wall s | images forwarded | forwards per image | share of total | counted as |",
             "|---|---:|---:|---:|---:|---|"]
    for name, c in r["steps"].items():
        per = f"{c['per_image']:.2f} per {c['unit']}" if c["per_image"] is not None else "—"
        share = "—" if c["share"] is None else f"{100 * c['share']:.1f}%"
        lines.append(f"| {name} | {_fmt(c['wall_s'])} | {_forwarded(c)} | {per} | {share} | {c['note']} |")
    u = r["unavoidable"]
    parts = ", ".join(f"{s}px {v:.2f} s" for s, v in u["candidates_s"].items())
    lines += ["", f"- {r['counted_from']}; 'suffix' = cached epochs (the adapted suffix only, forward+backward)",
              f"- fix total: {r['total_steps_s']:.2f} s (sum of step timings)"
              + (f"; process wall {r['process_wall_s']:.2f} s" if r.get("process_wall_s") else ""),
              (f"- unavoidable work: {u['total_s']:.2f} s = (a) sweep {u['sweep_s']:.2f} s ({u['sweep_images']} val "
               f"x {len(u['sweep_sizes'])} sizes) + (b) {u['candidate_images']} fit+choosing images per candidate: "
               f"{parts}"
               + (f" + (c) {u['corrupted_images']} photos x {u['corrupted_conditions']} conditions at "
                  f"{u['corrupted_sizes']}: {u['corrupted_s']:.2f} s" if u.get("corrupted_s") else "")
               + f" [{u['how']}]"),
              f"- ratio fix / unavoidable: {_fmt(r['ratio'])}x"
              + (f" (process wall: {r['ratio_process']:.2f}x)" if r.get("ratio_process") else "")]
    p = r.get("plan")
    if p:
        lines.append(f"- plan estimate: {p['total_s']:.0f} s for {', '.join(p['steps'])}; measured "
                     f"{p['measured_same_steps_s']:.2f} s; measured/estimated {_fmt(p['ratio'])}  ("
                     + ", ".join(f"{k} {v['estimated_s']:.0f}->{_fmt(v['measured_s'], '.1f')}"
                                 for k, v in p["per_step"].items()) + ")")
    else:
        lines.append("- plan estimate: not available (no fix log; give --log)")
    m = r["machine"]
    lines += [(f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']} here, "
               f"{m.get('fix_torch_threads')} in fix; torch {m['torch']}, Python {m['python']}"),
              f"- date {r['date']}; command: {r['command']}"]
    return "\n".join(lines)


def compare(a_path: str, b_path: str) -> str:
    a, b = (json.loads(Path(p).read_text(encoding="utf-8")) for p in (a_path, b_path))
    la, lb = a.get("label") or Path(a_path).parent.name, b.get("label") or Path(b_path).parent.name
    lines = [f"| step | {la} s | {lb} s | {lb}/{la} |", "|---|---:|---:|---:|"]

    def row(name, va, vb):
        ratio = vb / va if va and vb is not None else None
        lines.append(f"| {name} | {_fmt(va)} | {_fmt(vb)} | {_fmt(ratio)} |")
    for name in dict.fromkeys([*a["steps"], *b["steps"]]):  # steps of either run, in order
        row(name, a["steps"].get(name, {}).get("wall_s"), b["steps"].get(name, {}).get("wall_s"))
    row("**total**", a["total_steps_s"], b["total_steps_s"])
    row("unavoidable", a["unavoidable"]["total_s"], b["unavoidable"]["total_s"])
    lines.append(f"\nratio fix / unavoidable: {_fmt(a['ratio'])}x -> {_fmt(b['ratio'])}x ({la} -> {lb})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny untrained model on generated images (< 1 min)")
    ap.add_argument("--run", default=None, metavar="DIR", help="a finished fix run folder: read, not rerun")
    ap.add_argument("--log", default=None, metavar="FILE",
                    help="with --run: fix's captured output, for the plan line (default DIR/../fix.log if there)")
    ap.add_argument("--data", default=None, metavar="DIR", help="ImageFolder with train/ and val/ for fix")
    ap.add_argument("--checkpoint", default=None, metavar="CK")
    ap.add_argument("--model", default=None, help="model name for the checkpoint (passed to fix)")
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--fix-arg", dest="fix_args", action="append", default=[], metavar="ARG",
                    help="one more argument for fix (repeat; e.g. --fix-arg=--epochs --fix-arg=2)")
    ap.add_argument("--label", default=None, help="tag of this result (e.g. before / after)")
    ap.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="fixres_fix_efficiency_"))
    out.mkdir(parents=True, exist_ok=True)
    log = wall = cmd = None
    if args.run:
        run_dir = Path(args.run)
        log = Path(args.log).read_text(encoding="utf-8") if args.log else read_text_or_none(run_dir.parent / FIX_LOG)
    else:
        if args.quick:
            args.data = small_split(out, val_per_class=QUICK_VAL_PER_CLASS, classes=QUICK_CLASSES,
                                    train_per_class=QUICK_TRAIN_PER_CLASS)
            args.checkpoint = save_tiny_checkpoint(out / "tiny.safetensors", num_classes=QUICK_CLASSES)
            args.model, args.train_size = QUICK_MODEL, QUICK_TRAIN_SIZE
            args.fix_args = [*QUICK_FIX_ARGS, *args.fix_args]
        elif not args.data or not Path(args.data).is_dir():
            why = f"{args.data} is absent" if args.data else "no --data, --run or --quick"
            print(f"skipped: no data to fix ({why}): nothing to measure")
            return 0
        run_dir, log, wall, cmd = run_fix(args, out)
    result = build_result(args, run_dir, log, wall, cmd)
    write_json(out / RESULT_NAME, result)
    print(render(result))
    print(f"\nresults: {out / RESULT_NAME}")
    return 0


def read_text_or_none(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


if __name__ == "__main__":
    raise SystemExit(main())
