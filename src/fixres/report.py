"""The report of a ``fixres fix`` run: one self-contained HTML page, its PNGs and a JSON summary.

``collect(run_dir)`` gathers the step results a run left under its folder (``analyse.json``,
``train.json``, ``sweep_before.json``, ``finetune.json``, ``sweep_after.json``, ``stats.json``,
``export.json``, ``grid.json``, ``run.json``); ``summarize`` derives the headline (accuracy at the train
size, at the best untuned test size, after the fix; time spent); ``write_report`` draws the figures and
writes ``report/index.html`` with every image inline as a base64 data URI (no network, no external
CSS or JavaScript), so the page can be mailed or opened from anywhere. ``fixres report RUN_DIR``
rebuilds it from the JSON alone.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
from pathlib import Path

from fixres.atomic import write_json, write_text
from fixres.errors import UsageError
from fixres.progress import format_duration
from fixres.selection import best_row

REPORT_DIR = "report"
REPORT_HTML = "index.html"
REPORT_JSON = "report.json"
#: Step result files a run folder may hold (missing ones leave their section out of the report).
STEP_FILES = ("run", "analyse", "data", "train", "sweep_before", "finetune", "sweep_after", "stats", "export",
              "grid")
#: Points kept per CDF curve in the report (enough for a smooth line, small JSON).
CDF_POINTS = 200


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def collect(run_dir: str | os.PathLike) -> dict:
    """Load every step result present in ``run_dir`` into one dict keyed by step name."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run folder not found: {run_dir}")
    results = {name: _read(run_dir / f"{name}.json") for name in STEP_FILES}
    results = {k: v for k, v in results.items() if v is not None}
    if "sweep_before" not in results and "grid" not in results:
        raise UsageError(f"{run_dir} holds no results of a fixres fix run (no sweep_before.json or grid.json)")
    return results


# --------------------------------------------------------------------------- numbers

def _row_at(sweep: dict | None, size: int | None) -> dict | None:
    if not sweep or size is None:
        return None
    for row in sweep.get("rows", []):
        if int(row["test_size"]) == int(size):
            return row
    return None


def _best_row(sweep: dict | None, train_size: int | None = None) -> dict | None:
    return best_row((sweep or {}).get("rows", []), train_size=train_size)


def _curve(sweep: dict | None, label: str) -> dict | None:
    rows = sorted((sweep or {}).get("rows", []), key=lambda r: r["test_size"])
    if not rows:
        return None
    return {"label": label, "test_sizes": [r["test_size"] for r in rows], "top1": [r["top1"] for r in rows],
            "top1_std": [r.get("top1_std", 0.0) for r in rows]}


def summarize(results: dict) -> dict:
    """The headline: top-1 at T, at the best untuned size, after the fix at S (with fold std), time spent."""
    run = results.get("run", {})
    train_size = run.get("train_size")
    chosen = run.get("test_size") or (results.get("finetune") or {}).get("test_size")
    before, after = results.get("sweep_before"), results.get("sweep_after")
    at_t = _row_at(before, train_size)
    best = _best_row(before, train_size)
    fixed = _row_at(after, chosen)
    untuned_at_s = _row_at(before, chosen)
    head = {
        "model": run.get("model"),
        "train_size": train_size,
        "test_size": chosen,
        "recommended_test_size": (results.get("analyse") or {}).get("recommended_test_size"),
        "top1_at_train_size": at_t and at_t["top1"], "top1_at_train_size_std": at_t and at_t.get("top1_std"),
        "best_untuned_test_size": best and best["test_size"], "top1_best_untuned": best and best["top1"],
        "top1_best_untuned_std": best and best.get("top1_std"),
        "top1_untuned_at_test_size": untuned_at_s and untuned_at_s["top1"],
        "top1_untuned_at_test_size_std": untuned_at_s and untuned_at_s.get("top1_std"),
        "top1_fixed": fixed and fixed["top1"], "top1_fixed_std": fixed and fixed.get("top1_std"),
        "n_val": (before or {}).get("n_images"),
        "seconds_total": sum(float(v) for v in (run.get("timings") or {}).values()),
        "timings": run.get("timings") or {},
    }
    return head


def _ms(value) -> str | None:
    """'12.3 ± 1.2' from a number or a {"mean", "std"} dict (ms per batch)."""
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("mean") is None:
            return None
        return f"{value['mean']:.1f} ± {value.get('std') or 0.0:.1f}"
    return f"{float(value):.1f}"


def cost_rows(results: dict) -> list[dict]:
    """Table 7: time per batch of training and fine-tuning (forward, backward), wall seconds per step."""
    rows = []
    run = results.get("run") or {}
    timings = run.get("timings") or {}
    train = results.get("train") or {}
    ft = results.get("finetune") or {}
    if train or "train" in timings:
        hp = train.get("hparams") or {}
        epochs = train.get("epochs")
        rows.append({"step": f"train ({hp.get('augment', 'train')} DA)", "size": train.get("train_size",
                                                                                        run.get("train_size")),
                     "batch_size": hp.get("batch_size", train.get("batch_size")),
                     "forward_ms": _ms(train.get("forward_ms")), "backward_ms": _ms(train.get("backward_ms")),
                     "epochs": len(epochs) if isinstance(epochs, list) else epochs,
                     "seconds": timings.get("train", train.get("wall_s"))})
    if ft or "finetune" in timings:
        timing = ft.get("timing") or {}
        cache = ft.get("cache") or {}
        used = cache.get("used") if isinstance(cache, dict) else cache
        rows.append({"step": "fine-tune (" + ",".join(ft.get("parts") or ["classifier", "bn"]) + ", "
                             + f"{ft.get('augment', 'test')} DA" + (", cached" if used else "") + ")",
                     "size": ft.get("test_size", run.get("test_size")), "batch_size": ft.get("batch_size"),
                     "forward_ms": _ms(timing.get("ms_per_batch_forward", ft.get("forward_ms"))),
                     "backward_ms": _ms(timing.get("ms_per_batch_backward", ft.get("backward_ms"))),
                     "epochs": ft.get("epochs"), "seconds": timings.get("finetune", timing.get("wall_s"))})
    for step in ("data", "analyse", "sweep_before", "sweep_after", "stats", "report"):
        if step in timings:
            rows.append({"step": step.replace("_", " "), "seconds": timings[step]})
    if timings:
        rows.append({"step": "total", "seconds": float(sum(timings.values()))})
    return rows


def _cdf_panels(stats: dict | None) -> list[dict]:
    """Turn helper stats ({"before"/"after": {"sizes": {size: {"x", "cdf", ...}}}}) into plot panels."""
    if not stats:
        return []
    panels = []
    for state in ("before", "after"):
        block = stats.get(state)
        if not block:
            continue
        per_size = block.get("sizes", block)
        curves = []
        for size, s in sorted(per_size.items(), key=lambda kv: int(kv[0])):
            if not isinstance(s, dict):
                continue
            x = s.get("x") or s.get("cdf_x") or s.get("values")
            y = s.get("cdf") or s.get("cdf_y") or s.get("p")
            if x is None or y is None:
                continue
            label = f"test {size}"
            if s.get("zeros") is not None:
                label += f" (zeros {100 * float(s['zeros']):.1f}%)"
            curves.append({"label": label, "x": x, "cdf": y})
        if curves:
            title = {"before": "before the fix", "after": "after the fix"}[state]
            panels.append({"title": title, "curves": curves})
    return panels


# --------------------------------------------------------------------------- figures and HTML

def draw_figures(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write the report's PNGs; returns {figure name: path} for those the results allow."""
    from fixres import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    run = results.get("run") or {}
    head = summarize(results)
    curves = [c for c in (_curve(results.get("sweep_before"), "before the fix (trained at "
                                 f"{run.get('train_size')})"),
                          _curve(results.get("sweep_after"), f"after the fix (adapted at {head['test_size']})"))
              if c]
    marks = []
    if head["train_size"]:
        marks.append((head["train_size"], f"train size {head['train_size']}"))
    if head["test_size"]:
        marks.append((head["test_size"], f"fixed test size {head['test_size']}"))
    rec = head.get("recommended_test_size")
    if rec and rec not in (head["test_size"], head["train_size"]):
        marks.append((rec, f"recommended {rec} (apparent size)"))
    if curves:
        figs["accuracy"] = plots.plot_accuracy_curves(curves, out_dir / "accuracy_vs_test_size.png", marks=marks)
    grid = results.get("grid")
    if grid and len(grid.get("train_sizes", [])) >= 1:
        figs["grid"] = plots.plot_grid_heatmap(grid["train_sizes"], grid["test_sizes"], grid["top1"],
                                               out_dir / "grid_heatmap.png",
                                               title="Top-1 (%), train x test size, no fine-tuning (table 5)")
        if grid.get("top1_fixed"):
            figs["grid_fixed"] = plots.plot_grid_heatmap(
                grid["train_sizes"], grid["test_sizes"], grid["top1_fixed"], out_dir / "grid_heatmap_fixed.png",
                title="Top-1 (%), train x test size, after the fix (table 5, right)")
        if grid.get("control"):
            c = grid["control"]
            figs["grid_control"] = plots.plot_grid_heatmap(
                c["train_sizes"], c["test_sizes"], c["top1"], out_dir / "grid_heatmap_control.png",
                title="Control (appendix D): resize + fixed-size random crop")
    analyse = results.get("analyse") or {}
    if analyse.get("image_sizes") and head["train_size"]:
        from fixres.analysis import monte_carlo_ratio
        mc = monte_carlo_ratio(train_size=int(head["train_size"]), crop_ratio=float(analyse["crop_ratio"]),
                               image_sizes=[tuple(s) for s in analyse["image_sizes"]], samples=20_000, seed=0)
        figs["roc"] = plots.plot_roc_areas(mc.train_area_fraction, mc.test_area_fraction, out_dir / "roc_areas.png",
                                           ratios=mc.ratios)
    panels = _cdf_panels(results.get("stats"))
    if panels:
        figs["cdf"] = plots.plot_activation_cdf_panels(panels, out_dir / "activation_cdfs.png")
    return figs


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1000px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px} h2{font-size:1.2em;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
.sub{color:#5a6275;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px 16px;min-width:190px;flex:1}
.card .k{color:#5a6275;font-size:.85em} .card .v{font-size:1.7em;font-weight:600} .card .s{color:#5a6275;font-size:.8em}
.card.fix{border-color:#2f9e44} .card.fix .v{color:#2f9e44}
figure{background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:12px 0;padding:12px;text-align:center}
figure img{max-width:100%;height:auto} figcaption{color:#5a6275;font-size:.9em;margin-top:6px;text-align:left}
table{border-collapse:collapse;background:#fff;font-size:.9em;margin:8px 0}
th,td{border:1px solid #dde1e8;padding:4px 10px;text-align:right} th{background:#eef0f4} td.l,th.l{text-align:left}
.note{color:#5a6275;font-size:.9em} code{background:#eef0f4;padding:1px 4px;border-radius:3px}
"""


def _fmt(v, digits: int = 1, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _binomial_se(top1: float | None, n: int | None) -> float | None:
    if top1 is None or not n:
        return None
    p = top1 / 100.0
    return 100.0 * (p * (1 - p) / n) ** 0.5


def _pm(top1, std) -> str:
    if top1 is None:
        return "n/a"
    return f"{top1:.1f}%" + (f" <span class='s'>&plusmn; {std:.1f}</span>" if std is not None else "")


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th class='{'l' if i == 0 else ''}'>{html.escape(t)}</th>" for i, (_, t) in enumerate(columns))
    body = []
    for r in rows:
        cells = []
        for i, (k, _) in enumerate(columns):
            v = r.get(k)
            text = _fmt(v, 1 if k in ("seconds",) else 2) if isinstance(v, float) else ("" if v is None else str(v))
            cells.append(f"<td class='{'l' if i == 0 else ''}'>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _grid_table(grid: dict, key: str = "top1") -> str:
    train_sizes, test_sizes = grid["train_sizes"], grid["test_sizes"]
    values, stds = grid[key], grid.get(f"{key}_std")
    head = "<th class='l'>test \\ train</th>" + "".join(f"<th>{t}</th>" for t in train_sizes)
    rows = []
    for i, s in enumerate(test_sizes):
        cells = []
        for j in range(len(train_sizes)):
            v = values[i][j]
            sd = stds[i][j] if stds else None
            cells.append("<td>" + ("" if v is None else f"{v:.1f}" + (f" &plusmn;{sd:.1f}" if sd is not None else ""))
                         + "</td>")
        rows.append(f"<tr><td class='l'>{s}</td>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_html(results: dict, figs: dict[str, Path]) -> str:
    head = summarize(results)
    run = results.get("run") or {}
    data = results.get("data") or {}
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
             f"<title>fixres report: {e(str(head['model']))}</title><style>{CSS}</style></head><body><main>"]
    parts.append(f"<h1>FixRes report: {e(str(head['model']))}</h1>")
    src = data.get("root") or run.get("data")
    parts.append(f"<p class='sub'>trained at {e(_fmt(head['train_size']))} px, fixed for {e(_fmt(head['test_size']))} px"
                 f" &middot; data <code>{e(str(src))}</code> ({e(_fmt(head['n_val']))} validation images)"
                 f" &middot; {e(str(run.get('finished') or run.get('started') or ''))}</p>")
    parts.append("<div class='cards'>")
    parts.append(f"<div class='card'><div class='k'>top-1 at the train size ({e(_fmt(head['train_size']))} px)</div>"
                 f"<div class='v'>{_pm(head['top1_at_train_size'], head['top1_at_train_size_std'])}</div></div>")
    parts.append(f"<div class='card'><div class='k'>best untuned test size ({e(_fmt(head['best_untuned_test_size']))} px)"
                 f"</div><div class='v'>{_pm(head['top1_best_untuned'], head['top1_best_untuned_std'])}</div></div>")
    parts.append(f"<div class='card fix'><div class='k'>after the fix ({e(_fmt(head['test_size']))} px)</div>"
                 f"<div class='v'>{_pm(head['top1_fixed'], head['top1_fixed_std'])}</div>"
                 f"<div class='s'>untuned at this size: {_pm(head['top1_untuned_at_test_size'], None)}</div></div>")
    parts.append(f"<div class='card'><div class='k'>time spent</div><div class='v'>{format_duration(head['seconds_total'])}</div>"
                 f"<div class='s'>{e(', '.join(f'{k} {v:.0f}s' for k, v in head['timings'].items()))}</div></div>")
    parts.append("</div>")
    se = _binomial_se(head["top1_fixed"], head["n_val"])
    parts.append("<p class='note'>&plusmn; is the leave-one-fold-out standard deviation over 10 folds of the "
                 "validation set (paper, section 5)"
                 + (f"; for comparison, the binomial standard error of one accuracy on {head['n_val']} images is "
                    f"about {se:.1f} points" if se is not None else "") + ".</p>")

    if "accuracy" in figs:
        rec = head.get("recommended_test_size")
        parts.append("<h2>Accuracy against test size</h2><figure>" + _img(figs["accuracy"], "accuracy vs test size")
                     + "<figcaption>Top-1 before the fix (the model as trained) and after it (classifier and the "
                     "batch-norm before pooling fine-tuned at the fixed size with test-time augmentation). "
                     + (f"The apparent-size analysis recommends {rec} px. " if rec else "")
                     + "Error bars: fold std.</figcaption></figure>")
    grid = results.get("grid")
    if grid:
        parts.append("<h2>Train &times; test size (table 5)</h2>")
        if grid.get("source"):
            parts.append(f"<p class='note'>From {e(str(grid['source']))}.</p>")
        for key, cap in (("grid", "No fine-tuning."), ("grid_fixed", "After the fix at each test size."),
                         ("grid_control", "Appendix D control: trained with a resize and a fixed-size random crop "
                                          "instead of RandomResizedCrop.")):
            if key in figs:
                parts.append("<figure>" + _img(figs[key], key) + f"<figcaption>{cap}</figcaption></figure>")
        parts.append(_grid_table(grid))
    if "roc" in figs:
        an = results.get("analyse") or {}
        parts.append("<h2>Regions of classification and apparent object size (figure 2)</h2><figure>"
                     + _img(figs["roc"], "RoC areas")
                     + "<figcaption>RoC area as a fraction of the photo for RandomResizedCrop at training and the "
                     f"centre crop at test, sampled on this data set's photo sizes. Objects look "
                     f"{_fmt(an.get('ratio'), 3)}&times; as large at test time as in training (closed form, eq. 5)"
                     + (f"; Monte Carlo {_fmt((an.get('monte_carlo') or {}).get('mean'), 3)}" if an.get('monte_carlo') else "")
                     + ".</figcaption></figure>")
    if "cdf" in figs:
        parts.append("<h2>Pooled activations (figures 3 and 4)</h2><figure>" + _img(figs["cdf"], "activation CDFs")
                     + "<figcaption>CDF of the globally pooled activations at several test sizes, before and after "
                     "the fix.</figcaption></figure>")
        parts.append(_stats_table(results.get("stats")))
    costs = cost_rows(results)
    if costs:
        parts.append("<h2>Cost (table 7)</h2>")
        parts.append(_table(costs, [("step", "step"), ("size", "size (px)"), ("batch_size", "batch"),
                                    ("forward_ms", "forward ms/batch"), ("backward_ms", "backward ms/batch"),
                                    ("epochs", "epochs"), ("seconds", "wall s")]))
    ex = results.get("export") or {}
    if ex.get("path"):
        parts.append(f"<h2>Fixed model</h2><p>Exported to <code>{e(str(ex['path']))}</code>; evaluate it with "
                     f"<code>fixres eval --checkpoint {e(str(ex['path']))} --data DIR</code> (no other flag needed).</p>")
    skipped = (results.get("sweep_before") or {}).get("skipped") or []
    if skipped:
        parts.append(f"<h2>Skipped files</h2><p>{len(skipped)} unreadable file(s) were skipped:</p>"
                     + _table(skipped[:20], [("path", "path"), ("reason", "reason")]))
    parts.append(f"<p class='note'>Generated by fixres on {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}. "
                 "Rebuild with <code>fixres report RUN_DIR</code>.</p></main></body></html>")
    return "\n".join(parts)


def _stats_table(stats: dict | None) -> str:
    rows = []
    for state in ("before", "after"):
        block = (stats or {}).get(state) or {}
        for size, s in sorted(block.get("sizes", block).items(), key=lambda kv: int(kv[0])):
            if isinstance(s, dict) and ("zeros" in s or "above_2" in s):
                rows.append({"state": state, "test size": int(size),
                             "zeros %": None if s.get("zeros") is None else 100 * float(s["zeros"]),
                             "above 2 %": None if s.get("above_2") is None else 100 * float(s["above_2"])})
    if not rows:
        return ""
    return _table(rows, [("state", "state"), ("test size", "test size"), ("zeros %", "fraction of zeros (%)"),
                         ("above 2 %", "fraction above 2 (%)")])


def write_report(run_dir: str | os.PathLike, results: dict | None = None) -> dict:
    """Draw the figures and write ``RUN_DIR/report/index.html`` and ``report.json``; returns their paths."""
    run_dir = Path(run_dir)
    results = collect(run_dir) if results is None else results
    out = run_dir / REPORT_DIR
    figs = draw_figures(results, out)
    page = render_html(results, figs)
    html_path = out / REPORT_HTML
    write_text(html_path, page)
    summary = {"headline": summarize(results), "cost": cost_rows(results),
               "figures": {k: str(v) for k, v in figs.items()}, "html": str(html_path)}
    write_json(out / REPORT_JSON, summary)
    return summary
