"""The report of a ``fixres fix`` run: one self-contained HTML page, its PNGs and a JSON summary.

``collect(run_dir)`` gathers the step results a run left under its folder (``analyze.json``,
``train.json``, ``sweep_before.json``, ``finetune.json``, ``sweep_after.json``, ``stats.json``,
``export.json``, ``grid.json``, ``run.json``; ``robustness.json``, top-1 under corruptions, gets a
table of its own); the headline (``fixres.io.results.Headline``) is computed by the job and rendered here;
``write_report`` draws the figures and
writes ``report/index.html`` with every image inline as a base64 data URI (no network, no external
CSS or JavaScript), so the page can be mailed or opened from anywhere. ``fixres report RUN_DIR``
rebuilds it from the JSON alone. The template, its cell text, tables and headline cards are
``fixres.report.html``.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from markupsafe import Markup

from fixres.errors import UsageError
from fixres.io.atomic import write_json, write_text
from fixres.io.results import Headline, read_documents
from fixres.method.analysis import RRC_AUGMENT, TRAIN_AUGMENTS, monte_carlo_ratio
from fixres.report import choice as report_select
from fixres.report import plots
from fixres.report import robustness as report_robustness
from fixres.report.html import (
    _PAGE,
    CSS,
    _binomial_se,
    _cards,
    _figure,
    _fmt,
    _grid_table,
    _ms,
    _note,
    _num_text,
    _number,
    _section,
    _size_items,
    _stats_table,
    _table,
    valid_utf8,
)

REPORT_DIR = "report"
REPORT_HTML = "index.html"
REPORT_JSON = "report.json"
#: What the curve after the fix (``sweep_after.json``'s "after") is: every size fixed at its own size (the
#: paper's table 5, right; read from the candidates of ``fixres fix``), or the exported model at every size.
AFTER_EACH_FIXED = "each size fixed at its own size"
AFTER_EXPORTED = "the exported model at every size"

#: Points kept per CDF curve in the report (enough for a smooth line, small JSON).
CDF_POINTS = 200


def collect(run_dir: str | os.PathLike) -> dict:
    """Every step document present in ``run_dir``, by step name, cleaned for the page (``clean_documents``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run folder not found: {run_dir}")
    results = clean_documents(read_documents(run_dir))
    if "sweep_before" not in results and "grid" not in results:
        raise UsageError(f"{run_dir} holds no results of a fixres fix run (no sweep_before.json or grid.json)")
    return results


def clean_documents(documents: dict) -> dict:
    """The step documents with ``select.json``'s numbers checked (``_clean_select``)."""
    if "select" in documents:
        return {**documents, "select": _clean_select(documents["select"])}
    return documents


# --------------------------------------------------------------------------- numbers

#: Fields of ``select.json`` that hold text; every other field of it, and of its candidates, is a number.
SELECT_TEXT = ("method", "rule", "rule_text", "dropped", "schedule")


def _clean_select(select) -> dict:
    """``select.json`` with every field that should be a number and is not (text, NaN, a list) as missing (None)
    and candidates without a whole-number size left out: the choice's tables and figures then show a broken
    number as n/a instead of stopping the report."""
    if not isinstance(select, dict):
        return {}

    def numbers(block) -> dict:
        return {k: _number(v) for k, v in block.items()} if isinstance(block, dict) else {}

    clean = {k: (v if k in SELECT_TEXT else _number(v) if not isinstance(v, dict) else numbers(v))
             for k, v in select.items() if k != "candidates"}
    candidates = select.get("candidates") if isinstance(select.get("candidates"), list) else []
    clean["candidates"] = [
        {k: (numbers(v) if isinstance(v, dict) or k.endswith(("_before", "_after")) else _number(v))
         for k, v in c.items()} | {"test_size": c["test_size"], "ms_overlaps": c.get("ms_overlaps") is True}
        for c in candidates if isinstance(c, dict) and _whole_size(c.get("test_size"))]
    return clean


def _whole_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _numbers(values) -> bool:
    return isinstance(values, list) and bool(values) and all(_number(v) is not None for v in values)


def total_seconds(timings) -> float:
    return float(sum(n for n in map(_number, (timings or {}).values()) if n is not None))


def rows_of(sweep: dict | None) -> list[dict]:
    """A sweep's rows that have a numeric test size and top-1 (a broken or hostile row is left out)."""
    rows = (sweep or {}).get("rows") if isinstance(sweep, dict) else None
    return [r for r in rows or [] if isinstance(r, dict) and _number(r.get("test_size")) is not None
            and _number(r.get("top1")) is not None]


def row_at(sweep: dict | None, size) -> dict | None:
    size = _number(size)
    return next((row for row in rows_of(sweep) if size is not None and _number(row["test_size"]) == size), None)


def _curve(sweep: dict | None, label: str) -> dict | None:
    rows = sorted(rows_of(sweep), key=lambda r: r["test_size"])
    if not rows:
        return None
    return {"label": label, "test_sizes": [r["test_size"] for r in rows], "top1": [r["top1"] for r in rows],
            "top1_se": [row_se(r) or 0.0 for r in rows]}


def row_se(row: dict | None) -> float | None:
    """The error bar of a result row: its binomial standard error (from top-1 and n when a file lacks it)."""
    if not row:
        return None
    return _number(row.get("top1_se")) if _number(row.get("top1_se")) is not None else _binomial_se(
        row.get("top1"), row.get("n"))


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
    for step in ("data", "analyze", "sweep_before", "sweep_after", "stats", "report"):
        if step in timings:
            rows.append({"step": step.replace("_", " "), "seconds": timings[step]})
    if timings:
        rows.append({"step": "total", "seconds": total_seconds(timings)})
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
        for size, s in _size_items(per_size):
            if not isinstance(s, dict):
                continue
            x = s.get("x") or s.get("cdf_x") or s.get("values")
            y = s.get("cdf") or s.get("cdf_y") or s.get("p")
            if not (_numbers(x) and _numbers(y) and len(x) == len(y)):
                continue
            label = f"test {size}"
            if _number(s.get("zeros")) is not None:
                label += f" (zeros {100 * _number(s['zeros']):.1f}%)"
            curves.append({"label": label, "x": x, "cdf": y})
        if curves:
            title = {"before": "before the fix", "after": "after the fix"}[state]
            panels.append({"title": title, "curves": curves})
    return panels


# --------------------------------------------------------------------------- figures

def _plot_size(v) -> str:
    """A size as plot text: the number, or "?" (plot labels are matplotlib text, where "$" starts maths)."""
    n = _number(v)
    return f"{n:g}" if n is not None else "?"


def _grid_ok(block) -> bool:
    """A grid block with size lists and a test x train matrix of numbers (or nulls)."""
    if not (isinstance(block, dict) and isinstance(block.get("train_sizes"), list) and block["train_sizes"]
            and isinstance(block.get("test_sizes"), list) and isinstance(block.get("top1"), list)):
        return False
    cols, matrix = len(block["train_sizes"]), block["top1"]
    return len(matrix) == len(block["test_sizes"]) and all(
        isinstance(row, list) and len(row) == cols and all(v is None or _number(v) is not None for v in row)
        for row in matrix)


def _after_label(sweep, test) -> str:
    if isinstance(sweep, dict) and sweep.get("after") == AFTER_EACH_FIXED:
        return "after the fix (each size fixed at its own size)"
    return f"after the fix (adapted at {_plot_size(test)})"


def _accuracy_figure(results: dict, head: Headline, out_dir: Path) -> Path | None:
    train, test = _number(head.train_size), _number(head.test_size)
    curves = [c for c in (_curve(results.get("sweep_before"), f"before the fix (trained at {_plot_size(train)})"),
                          _curve(results.get("sweep_after"), _after_label(results.get("sweep_after"), test))) if c]
    if not curves:
        return None
    marks = [(train, f"train size {_plot_size(train)}")] if train else []
    marks += [(test, f"fixed test size {_plot_size(test)}")] if test else []
    rec = _number(head.recommended_test_size)
    if rec and rec not in (test, train):
        marks.append((rec, f"recommended {_plot_size(rec)} (apparent size)"))
    return plots.plot_accuracy_curves(curves, out_dir / "accuracy_vs_test_size.png", marks=marks)


def _train_crop_words(an: dict) -> str:
    if an.get("train_augment") == "control":
        return "the control augmentation (resize + fixed-size random crop)"
    return "RandomResizedCrop"


def _grid_figures(grid, out_dir: Path) -> dict[str, Path]:
    figs: dict[str, Path] = {}
    specs = (("grid", grid, "top1", "Top-1 (%), train x test size, no fine-tuning (table 5)"),
             ("grid_fixed", grid, "top1_fixed", "Top-1 (%), train x test size, after the fix (table 5, right)"),
             ("grid_control", (grid or {}).get("control") if isinstance(grid, dict) else None, "top1",
              "Control (appendix D): resize + fixed-size random crop"))
    for name, block, key, title in specs:
        if isinstance(block, dict) and _grid_ok({**block, "top1": block.get(key)}):
            figs[name] = plots.plot_grid_heatmap([_plot_size(s) for s in block["train_sizes"]],
                                                 [_plot_size(s) for s in block["test_sizes"]], block[key],
                                                 out_dir / f"grid_heatmap{name[4:]}.png", title=title)
    return figs


def _plottable_select(results: dict) -> dict:
    """``results`` with only the candidates the accuracy-vs-cost figure can draw (both top-1 values present);
    the table still lists them all."""
    select = results.get("select")
    if not select:
        return results
    drawn = [c for c in select.get("candidates") or []
             if all((c.get(k) or {}).get("top1") is not None for k in ("val_before", "val_after"))]
    return {**results, "select": {**select, "candidates": drawn}}


def draw_figures(results: dict, head: Headline, out_dir: Path) -> dict[str, Path]:
    """Write the report's PNGs; returns {figure name: path} for those the results allow."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    accuracy = _accuracy_figure(results, head, out_dir)
    if accuracy is not None:
        figs["accuracy"] = accuracy
    figs.update(_grid_figures(results.get("grid"), out_dir))
    analyze = results.get("analyze") or {}
    train_size = _number(head.train_size)
    sizes = analyze.get("image_sizes")
    if isinstance(sizes, list) and sizes and all(_numbers(s) and len(s) == 2 for s in sizes) and train_size \
            and _number(analyze.get("crop_ratio")):
        augment = analyze.get("train_augment") if analyze.get("train_augment") in TRAIN_AUGMENTS else RRC_AUGMENT
        mc = monte_carlo_ratio(train_size=int(train_size), crop_ratio=float(analyze["crop_ratio"]),
                               image_sizes=[tuple(s) for s in analyze["image_sizes"]], samples=20_000, seed=0,
                               train_augment=augment)
        figs["roc"] = plots.plot_roc_areas(mc.train_area_fraction, mc.test_area_fraction, out_dir / "roc_areas.png",
                                           ratios=mc.ratios)
    panels = _cdf_panels(results.get("stats"))
    if panels:
        figs["cdf"] = plots.plot_activation_cdf_panels(panels, out_dir / "activation_cdfs.png")
    # choosing the size after fixing (fixres.report.choice)
    figs.update(report_select.draw(_plottable_select(results), out_dir))
    return figs


def _selection_sections(results: dict, figs: dict[str, Path]) -> list[dict]:
    """``fixres.report.choice``'s plain sections (candidates, frontier, reliability, KS) as page sections."""
    return [_section(s["title"], notes=[[n] for n in s["notes"]],
                     figures=[_figure(figs[k], k, cap) for k, cap in s["figures"] if k in figs],
                     tables=[_table(rows, cols) for rows, cols in s["tables"]])
            for s in report_select.sections(results)]


# --------------------------------------------------------------------------- the page's sections

def _classes(results: dict) -> list[str]:
    data = results.get("data") or {}
    names = data.get("classes") or (data.get("manifest") or {}).get("classes") or []
    return [str(n) for n in names] if isinstance(names, list) else [str(names)]


def _figure_sections(results: dict, figs: dict[str, Path], head: Headline) -> list[dict]:
    sections = []
    if "accuracy" in figs:
        rec = head.recommended_test_size
        sections.append(_section("Accuracy against test size", figures=[_figure(
            figs["accuracy"], "accuracy vs test size",
            "Top-1 before the fix (the model as trained) and after it (classifier and the batch-norm before "
            "pooling fine-tuned with test-time augmentation, "
            + ("each size at its own size, as in the paper's table 5). " if
               (results.get("sweep_after") or {}).get("after") == AFTER_EACH_FIXED else "at the fixed size). ")
            + (f"The apparent-size analysis recommends {rec} px. " if rec else "")
            + "Error bars: ± binomial standard error.")]))
    grid = results.get("grid")
    if _grid_ok(grid):
        captions = (("grid", "No fine-tuning."), ("grid_fixed", "After the fix at each test size."),
                    ("grid_control", "Appendix D control: trained with a resize and a fixed-size random crop "
                                     "instead of RandomResizedCrop."))
        sections.append(_section(
            "Train × test size (table 5)", notes=[[f"From {grid['source']}."]] if grid.get("source") else [],
            figures=[_figure(figs[k], k, cap) for k, cap in captions if k in figs], tables=[_grid_table(grid)]))
    if "roc" in figs:
        an = results.get("analyze") or {}
        mc = (an.get("monte_carlo") or {}).get("mean") if isinstance(an.get("monte_carlo"), dict) else None
        sections.append(_section("Regions of classification and apparent object size (figure 2)", figures=[_figure(
            figs["roc"], "RoC areas",
            f"RoC area as a fraction of the photo for {_train_crop_words(an)} at training and the centre crop at test, "
            f"sampled on this data set's photo sizes. Objects look {_num_text(an.get('ratio'), 3)}× as large at test "
            "time as in training (closed form)" + (f"; Monte Carlo {_num_text(mc, 3)}" if mc is not None else "")
            + ".")]))
    if "cdf" in figs:
        sections.append(_section("Pooled activations (figures 3 and 4)", figures=[_figure(
            figs["cdf"], "activation CDFs", "CDF of the globally pooled activations at several test sizes, before "
            "and after the fix.")], tables=[_stats_table(results.get("stats"))]))
    return sections


def _robustness_sections(results: dict) -> list[dict]:
    """``robustness.json`` (top-1 under corruptions, paired tests), as ``fixres.report.robustness`` reads it."""
    part = report_robustness.section(results.get("robustness"))
    if part is None:
        return []
    return [_section(part["title"], notes=[[n] for n in part["notes"]],
                     tables=[_table(rows, cols) for rows, cols in part["tables"]])]


def _table_sections(results: dict) -> list[dict]:
    sections = _robustness_sections(results)
    costs = cost_rows(results)
    if costs:
        sections.append(_section("Cost (table 7)", tables=[_table(costs, [
            ("step", "step"), ("size", "size (px)"), ("batch_size", "batch"), ("forward_ms", "forward ms/batch"),
            ("backward_ms", "backward ms/batch"), ("epochs", "epochs"), ("seconds", "wall s")])]))
    path = (results.get("export") or {}).get("path")
    if path:
        sections.append(_section("Fixed model", notes=[[
            "Exported to ", {"code": str(path)}, "; evaluate it with ",
            {"code": f"fixres eval --checkpoint {path} --data DIR"}, " (no other flag needed)."]]))
    skipped = (results.get("sweep_before") or {}).get("skipped") or []
    if skipped:
        sections.append(_section("Skipped files", notes=[[f"{len(skipped)} unreadable file(s) were skipped:"]],
                                 tables=[_table([s for s in skipped[:20] if isinstance(s, dict)],
                                                [("path", "path"), ("reason", "reason")])]))
    return sections


def render_html(results: dict, figs: dict[str, Path], head: Headline) -> str:
    """The report page: every value from the run's files is escaped by the template (autoescape)."""
    run = results.get("run") or {}
    data = results.get("data") or {}
    classes = _classes(results)
    served = "served as trained at" if head.served_kind == "untuned" else "fixed for"
    subtitle = [f"trained at {_fmt(head.train_size)} px, {served} {_fmt(head.test_size)} px · data ",
                {"code": str(data.get("root") or run.get("data"))}, f" ({_fmt(head.n_val)} validation images)",
                f" · classes: {', '.join(classes)}" if classes else "",
                f" · {run.get('finished') or run.get('started') or ''}"]
    sections = _figure_sections(results, figs, head) + _selection_sections(results, figs) + _table_sections(results)
    page = _PAGE.render(model=str(head.model), css=Markup(CSS), subtitle=subtitle, cards=_cards(head),
                        note=_note(head), sections=sections,
                        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
    return valid_utf8(page)


def report_folder(run_dir: Path) -> Path:
    """``RUN_DIR/report``, refused when it is a symbolic link (or not a folder): the report is written only
    below the run folder, never into wherever a link points."""
    out = run_dir / REPORT_DIR
    if out.is_symlink():
        raise UsageError(f"{out} is a symbolic link; refusing to write the report through it (remove the link)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; remove it to write the report")
    return out


def write_report(run_dir: str | os.PathLike, results: dict, head: Headline) -> dict:
    """Draw the figures and write ``RUN_DIR/report/index.html`` and ``report.json`` from the run's step documents
    and its headline; returns their paths."""
    run_dir = Path(run_dir)
    out = report_folder(run_dir)
    figs = draw_figures(results, head, out)
    html_path = out / REPORT_HTML
    write_text(html_path, render_html(results, figs, head))
    summary = {"headline": head.to_json(), "cost": cost_rows(results),
               "figures": {k: str(v) for k, v in figs.items()}, "html": str(html_path)}
    write_json(out / REPORT_JSON, summary)
    return summary
