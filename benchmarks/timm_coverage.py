"""Does FixRes work on every timm family?

For the smallest variant of every timm family (family = timm module, e.g. ``resnet``, ``vision_transformer``,
``convnext``; smallest = fewest parameters, counted on the meta device without allocating weights), random
initialisation and 10 classes, at two test sizes:

1. find the parts (classifier, the norm nearest the pooled vector, pooling kind, last stage, stride);
2. one fine-tuning step of ``classifier,norm`` with the activation cache and one without (the cache falls
   back to the full forward when the model cannot be cut; the table says which);
3. evaluate at both test sizes;
4. export (model.safetensors + fixres.json) and reload the export with no flags: the reloaded model must
   give the same logits at the test size.

Families whose smallest variant has more than ``--max-params`` million parameters are skipped and listed
(``pnasnet5large``, the paper's FixPNASNet, is always included). Flexible models run at 96 and 128 px; a
model with a fixed input size runs at its own size and one stride above it, through ``set_input_size``.

    python benchmarks/timm_coverage.py --quick          # 12 families, a couple of minutes
    nice -n 10 python benchmarks/timm_coverage.py       # every family (long on a small CPU)

Results go to benchmarks/results/timm_coverage.json (written after every model, so a killed run resumes:
models already measured are not run again unless --rerun).

Building, evaluating, exporting and reloading go through the public API (``fixres.load``, ``fixres.sweep``,
``fixres.export``); the parts found and adapted, and fine-tuning with the activation cache on and off, come
from benchmarks/_common.py.

Internal: fixres.models.loading - the input sizes measured per family (the network stride, a fixed input size,
and moving a fixed-size model to a test size, whose keywords the row records); no public function exposes
them.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from _common import REPO, FixresError, find_parts, finetune, select_parts, split_index, write_image_folder, write_json

import fixres
from fixres.models.loading import fit_input_size, fixed_input_size, network_stride

RESULTS = REPO / "benchmarks" / "results" / "timm_coverage.json"
#: Families tried by default: the smallest variant's parameters, in millions (pnasnet5large is always in).
DEFAULT_MAX_PARAMS_M = 100.0
ALWAYS = ("pnasnet5large",)
#: Test sizes of models that take any input size (multiples of 32: every stride divides them).
FLEX_SIZES = (96, 128)
NUM_CLASSES = 10
#: Images in the generated training / validation folders (one fine-tuning step of a batch this size).
IMAGES = 4
#: Largest difference between the logits of the model and of its reloaded export, relative to their scale.
RELOAD_RTOL = 1e-4
#: Seconds one model may take before it is recorded as a time-out.
MODEL_TIMEOUT_S = 600
#: Candidate names meta-built per family when looking for the smallest (chosen by size words in the name).
CANDIDATES_PER_FAMILY = 8
_SMALL_WORDS = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "micro", "small", "lite0", "b0",
                "050", "075", "18", "light")
_BIG_WORDS = ("large", "huge", "giant", "gigantic", "xl", "xxl", "base", "medium", "448", "384", "512")
QUICK_FAMILIES = ("resnet", "efficientnet", "mobilenetv3", "convnext", "vision_transformer", "deit",
                  "swin_transformer", "maxxvit", "levit", "mlp_mixer", "beit", "nasnet")


def _name_score(name: str) -> tuple:
    small = min((i for i, w in enumerate(_SMALL_WORDS) if w in name), default=len(_SMALL_WORDS))
    big = any(w in name for w in _BIG_WORDS)
    return (big, small, len(name))


def smallest_per_family(families=None) -> dict[str, tuple[str, float]]:
    """{family: (model, million parameters)} from meta-device builds of the likeliest candidates."""
    import timm
    import torch
    out = {}
    for family in families or timm.list_modules():
        names = timm.list_models(module=family)
        real = [n for n in names if not n.startswith("test_")]  # timm's own test configurations come last
        names = sorted(real or names, key=_name_score)[:CANDIDATES_PER_FAMILY]
        best = None
        for name in names:
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = timm.create_model(name, num_classes=NUM_CLASSES)
                n = sum(p.numel() for p in m.parameters()) / 1e6
            except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device
                continue
            if best is None or n < best[1]:
                best = (name, round(n, 3))
        if best is not None:
            out[family] = best
    return out


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    def handler(signum, frame):
        raise _Timeout(f"over {seconds} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _data(root: Path) -> tuple[list, list]:
    write_image_folder(root / "train", classes=IMAGES, per_class=1, seed=1)
    write_image_folder(root / "val", classes=IMAGES, per_class=1, seed=2)
    return split_index(root / "train", "train").samples, split_index(root / "val", "val").samples


def _sizes(model, native: bool) -> tuple[int, int]:
    """Flexible models: FLEX_SIZES, or (``native``) their own size and one stride above; fixed-size models:
    their size and one stride above."""
    fixed = fixed_input_size(model)
    if not fixed and native:
        fixed = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
    return (fixed, fixed + network_stride(model)) if fixed else FLEX_SIZES


def _steps(name: str, train, val, work: Path, row: dict, native: bool = False) -> None:
    """Every step for one model, filling ``row`` (raises on the first failing step, named in row['step'])."""
    import torch

    row["step"] = "build"
    torch.manual_seed(0)
    model = fixres.load(name, num_classes=NUM_CLASSES, random_init=True).model
    s1, s2 = _sizes(model, native)
    row.update(sizes=[s1, s2], stride=network_stride(model), step="find parts")
    parts = find_parts(model)
    sel = select_parts(model, parts, "classifier,norm")
    row.update(norm=", ".join(f"{n} ({k})" for n, k in zip(parts.norms, parts.norm_kinds)) or "none",
               pooling=parts.pooling, trainable=sel.trainable, notes=sel.notes + parts.notes)
    cfg = fixres.DataConfig(train_size=s1, stride=row["stride"])
    try:
        fit_input_size(model, s2, name=name)
    except FixresError as exc:  # a fixed input size with no timm mechanism to change it: the one size only
        row["one_size"], s2 = str(exc), s1
        row["sizes"] = [s1]
    common = dict(parts="classifier,norm", epochs=1, batch_size=IMAGES, workers=0, progress=False,
                  evaluate_before=False, evaluate_after=False)
    row["step"] = f"fine-tune at {s2} (cached)"
    kwargs = fit_input_size(model, s2, name=name)
    res = finetune(model, train, val, cfg, test_size=s2, cache=True, out_dir=work / "ft_cached", **common)
    row["cache"] = "used, " + res["cache"].get("cut", "") if res["cache"]["used"] else \
        "fallback: " + str(res["cache"].get("reason", ""))
    row["step"] = f"fine-tune at {s2} (uncached)"
    finetune(model, train, val, cfg, test_size=s2, cache=False, out_dir=work / "ft_plain", **common)
    row["step"] = "evaluate"
    bundle = fixres.ModelBundle(model, cfg, name, "timm", {})
    for size in sorted({s1, s2}):  # one size at a time: a fixed-size model follows each size
        fit_input_size(model, size, name=name)
        fixres.sweep(bundle, val, [size], device="cpu", workers=0)
    kwargs = fit_input_size(model, s2, name=name)
    row["step"] = "export and reload"
    # the export records what rebuilds the model at s2 (fixres.json "model_kwargs": the kwargs above) and the
    # train size s1 (cfg's)
    path = fixres.export(model, work / "export", test_size=s2, data_config=cfg, model_name=name)
    back = fixres.load(path).model.eval()
    x = torch.randn(2, 3, s2, s2, generator=torch.Generator().manual_seed(0))
    model = model.to(memory_format=torch.contiguous_format)  # fine-tuning may leave it channels_last
    with torch.no_grad():
        want, got = model.eval()(x), back(x)
    # random weights give logits up to 1e10: compare relative to their scale (memory formats round differently)
    if got.shape != want.shape or (got - want).abs().max() > RELOAD_RTOL * want.abs().max() + 1e-5:
        raise AssertionError(f"the reloaded export gives other logits (max difference {(got - want).abs().max():.3g})")
    row.update(step="", export_kwargs=kwargs)


def run_one(family: str, name: str, params_m: float, train, val, timeout_s: int) -> dict:
    t0 = time.perf_counter()
    row = {"family": family, "model": name, "params_m": params_m}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with _time_limit(timeout_s):
                try:
                    _steps(name, train, val, Path(tmp), row)
                except Exception as exc:  # noqa: BLE001 - some models need their own size (window/halo divisors)
                    if isinstance(exc, _Timeout) or row.get("sizes") != list(FLEX_SIZES):
                        raise
                    row["at_96_128"] = f"{row.get('step')}: {type(exc).__name__}: {str(exc)[:120]}"
                    _steps(name, train, val, Path(tmp), row, native=True)
            row["result"] = "pass (one size)" if row.get("one_size") else "pass"
        except Exception as exc:  # noqa: BLE001 - every failure is a row with its step and reason
            tb = traceback.extract_tb(exc.__traceback__)
            text = (str(exc).strip().splitlines() or [""])[0][:200]
            row.update(result="fail", reason=f"{type(exc).__name__}: {text}",
                       where=f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _table(rows: list[dict]) -> str:
    head = f"{'family':<26} {'model':<36} {'M':>6} {'norm found':<34} {'pooling':<22} {'str':>3} result"
    lines = [head, "-" * len(head)]
    for r in rows:
        norm = (r.get("norm") or "-")[:34]
        res = r["result"] if r["result"].startswith("pass") else f"FAIL at {r.get('step')}: {r.get('reason', '')[:90]}"
        if r["result"].startswith("pass") and str(r.get("cache", "")).startswith("fallback"):
            res += " (uncached: no cut point)"
        lines.append(f"{r['family']:<26} {r['model']:<36} {r['params_m']:>6.1f} {norm:<34} "
                     f"{(r.get('pooling') or '-')[:22]:<22} {r.get('stride', '-')!s:>3} {res}")
    return "\n".join(lines)


def summary(rows: list[dict], skipped: dict) -> dict:
    passed = [r for r in rows if r["result"].startswith("pass")]
    one_size = [r for r in passed if r["result"] != "pass"]
    cached = [r for r in passed if str(r.get("cache", "")).startswith("used")]
    return {"families_tried": len(rows), "passed": len(passed), "passed_at_one_size_only": len(one_size),
            "pass_fraction": round(len(passed) / len(rows), 4) if rows else None,
            "pass_fraction_two_sizes": round((len(passed) - len(one_size)) / len(rows), 4) if rows else None,
            "cache_used": len(cached), "skipped_over_limit": skipped,
            "one_size_only": {r["model"]: r["one_size"] for r in one_size},
            "failures": {r["model"]: f"{r.get('step')}: {r.get('reason')}" for r in rows
                         if not r["result"].startswith("pass")}}


def _save(path: Path, chosen: dict, max_params: float, keep: dict, skipped: dict) -> None:
    write_json(path, {"smallest": chosen, "max_params_m": max_params, "sizes": FLEX_SIZES,
                      "rows": list(keep.values()), "summary": summary(list(keep.values()), skipped)})


def main(argv=None) -> int:
    import torch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"only {len(QUICK_FAMILIES)} families")
    ap.add_argument("--families", default=None, help="comma-separated timm modules (default: all)")
    ap.add_argument("--max-params", type=float, default=DEFAULT_MAX_PARAMS_M, help="million parameters")
    ap.add_argument("--timeout", type=int, default=MODEL_TIMEOUT_S, help="seconds per model")
    ap.add_argument("--rerun", action="store_true", help="measure models already in the result file again")
    ap.add_argument("--retry-failed", action="store_true",
                    help="measure again the models of the result file that failed or ran at one size only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import json

    from fixres import export, load  # noqa: F401 - imported before the loop: a broken tree fails here, not per model
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    families = QUICK_FAMILIES if args.quick else (args.families.split(",") if args.families else None)
    chosen = {f: tuple(v) for f, v in (old.get("smallest") or {}).items() if not v[0].startswith("test_")}
    missing = [f for f in (families or __import__("timm").list_modules()) if f not in chosen]
    if missing:
        print(f"finding the smallest variant of {len(missing)} families (meta device)...", flush=True)
        chosen.update(smallest_per_family(missing))
    wanted = {f: v for f, v in chosen.items() if families is None or f in families}
    skipped = {f"{f} ({n})": m for f, (n, m) in chosen.items() if m > args.max_params and n not in ALWAYS}
    todo = [(f, n, m) for f, (n, m) in wanted.items() if m <= args.max_params or n in ALWAYS]
    done = {r["model"]: r for r in old.get("rows", [])
            if not args.rerun and not (args.retry_failed and r["result"] != "pass")}
    rows = []
    current = {n for n, _ in chosen.values()} | set(ALWAYS)
    keep = {r["model"]: r for r in old.get("rows", []) if r["model"] in current}
    with tempfile.TemporaryDirectory() as tmp:
        train, val = _data(Path(tmp))
        for i, (family, name, params) in enumerate(sorted(todo)):
            row = done.get(name) or run_one(family, name, params, train, val, args.timeout)
            rows.append(row)
            print(f"[{i + 1}/{len(todo)}] {family}: {name} {row['result']} ({row['seconds']} s)"
                  + (f" {row.get('step')}: {row.get('reason')}" if not row["result"].startswith("pass") else ""),
                  flush=True)
            keep[row["model"]] = row
            _save(args.out, chosen, args.max_params, keep, skipped)
    _save(args.out, chosen, args.max_params, keep, skipped)
    rows = list(keep.values())  # every family measured so far, this run or an earlier one
    print(_table(sorted(rows, key=lambda r: r["family"])))
    s = summary(rows, skipped)
    print(f"\npassed {s['passed']} of {s['families_tried']} families ({100 * (s['pass_fraction'] or 0):.1f} %), "
          f"{s['passed_at_one_size_only']} of them at their one fixed input size only (two sizes: "
          f"{100 * (s['pass_fraction_two_sizes'] or 0):.1f} %); "
          f"activation cache used in {s['cache_used']} of the passing ones")
    if skipped:
        print(f"skipped (over {args.max_params:g} M parameters): "
              + ", ".join(f"{k} {v:.0f} M" for k, v in skipped.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
