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
import math
import os
from pathlib import Path

from markupsafe import Markup

from fixres.errors import UsageError
from fixres.io.atomic import write_json, write_text
from fixres.io.documents import FinetuneInfo, Grid, RunDocuments, StatsInfo, TrainInfo
from fixres.io.results import AnalysisDocument, Headline, Sweep, read_documents
from fixres.io.schema import dump
from fixres.method.analysis import RRC_AUGMENT, TRAIN_AUGMENTS, monte_carlo_ratio
from fixres.report import choice as report_select
from fixres.report import plots
from fixres.report import robustness as report_robustness
from fixres.report.html import (
    _PAGE,
    CSS,
    _cards,
    _figure,
    _fmt,
    _grid_table,
    _ms,
    _note,
    _num_text,
    _number,
    _section,
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

#: Photo boxes sampled for the regions-of-classification figure (figure 2).
ROC_SAMPLES = 20_000
#: Unreadable files listed on the page (the run's sweep_before.json keeps them all).
SKIPPED_SHOWN = 20


def collect(run_dir: str | os.PathLike) -> RunDocuments:
    """Every step document present in ``run_dir``, read as types (``fixres.io.documents.RunDocuments``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run folder not found: {run_dir}")
    documents = read_documents(run_dir)
    if "sweep_before" not in documents and "grid" not in documents:
        raise UsageError(f"{run_dir} holds no results of a fixres fix run (no sweep_before.json or grid.json)")
    return RunDocuments.of(documents)


# --------------------------------------------------------------------------- numbers

def _numbers(values) -> bool:
    return isinstance(values, (list, tuple)) and bool(values) and all(_number(v) is not None for v in values)


def _curve(sweep: Sweep | None, label: str) -> dict | None:
    rows = sorted(sweep.rows, key=lambda r: r.test_size) if sweep else []
    if not rows:
        return None
    return {"label": label, "test_sizes": [r.test_size for r in rows], "top1": [r.top1 for r in rows],
            "top1_se": [r.se or 0.0 for r in rows]}


def _train_cost(docs: RunDocuments) -> dict:
    run, train = docs.run, docs.train or TrainInfo()
    hp = train.hparams
    return {"step": f"train ({hp.augment or 'train'} DA)", "size": train.train_size or run.train_size,
            "batch_size": hp.batch_size or train.batch_size, "forward_ms": _ms(train.forward_ms),
            "backward_ms": _ms(train.backward_ms), "epochs": train.n_epochs,
            "seconds": run.timings["train"] if "train" in run.timings else train.wall_s}


def _finetune_cost(docs: RunDocuments) -> dict:
    run, ft = docs.run, docs.finetune or FinetuneInfo()
    return {"step": f"fine-tune ({','.join(ft.parts)}, {ft.augment} DA" + (", cached" if ft.cached else "") + ")",
            "size": ft.test_size or run.test_size, "batch_size": ft.batch_size,
            "forward_ms": _ms(ft.timing.ms_per_batch_forward or ft.forward_ms),
            "backward_ms": _ms(ft.timing.ms_per_batch_backward or ft.backward_ms), "epochs": ft.epochs,
            "seconds": run.timings["finetune"] if "finetune" in run.timings else ft.timing.wall_s}


def cost_rows(docs: RunDocuments) -> list[dict]:
    """Table 7: time per batch of training and fine-tuning (forward, backward), wall seconds per step."""
    timings = docs.run.timings
    rows = []
    if docs.train is not None or "train" in timings:
        rows.append(_train_cost(docs))
    if docs.finetune is not None or "finetune" in timings:
        rows.append(_finetune_cost(docs))
    rows += [{"step": step.replace("_", " "), "seconds": timings[step]}
             for step in ("data", "analyze", "sweep_before", "sweep_after", "stats", "report") if step in timings]
    if timings:
        rows.append({"step": "total", "seconds": docs.run.total_seconds})
    return rows


def _cdf_panels(stats: StatsInfo | None) -> list[dict]:
    """The pooled activations' CDFs per size, before and after the fix, as plot panels."""
    panels = []
    for state, block in (("before", stats and stats.before), ("after", stats and stats.after)):
        curves = []
        for size, s in block.items() if block else ():
            if not (_numbers(s.x) and _numbers(s.cdf) and len(s.x) == len(s.cdf)):
                continue
            zeros = f" (zeros {100 * s.zeros:.1f}%)" if s.zeros is not None else ""
            curves.append({"label": f"test {size}{zeros}", "x": list(s.x), "cdf": list(s.cdf)})
        if curves:
            panels.append({"title": f"{state} the fix", "curves": curves})
    return panels


# --------------------------------------------------------------------------- figures

def _plot_size(v) -> str:
    """A size as plot text: the number, or "?" (plot labels are matplotlib text, where "$" starts maths)."""
    n = _number(v)
    return f"{n:g}" if n is not None else "?"


def _after_label(sweep: Sweep | None, test) -> str:
    if sweep is not None and sweep.after == AFTER_EACH_FIXED:
        return "after the fix (each size fixed at its own size)"
    return f"after the fix (adapted at {_plot_size(test)})"


def _accuracy_figure(docs: RunDocuments, head: Headline, out_dir: Path) -> Path | None:
    train, test = _number(head.train_size), _number(head.test_size)
    curves = [c for c in (_curve(docs.sweep_before, f"before the fix (trained at {_plot_size(train)})"),
                          _curve(docs.sweep_after, _after_label(docs.sweep_after, test))) if c]
    if not curves:
        return None
    marks = [(train, f"train size {_plot_size(train)}")] if train else []
    marks += [(test, f"fixed test size {_plot_size(test)}")] if test else []
    rec = _number(head.recommended_test_size)
    if rec and rec not in (test, train):
        marks.append((rec, f"recommended {_plot_size(rec)} (apparent size)"))
    return plots.plot_accuracy_curves(curves, out_dir / "accuracy_vs_test_size.png", marks=marks)


def _train_crop_words(an: AnalysisDocument) -> str:
    if an.train_augment == "control":
        return "the control augmentation (resize + fixed-size random crop)"
    return "RandomResizedCrop"


def _grid_figures(grid: Grid | None, out_dir: Path) -> dict[str, Path]:
    figs: dict[str, Path] = {}
    if grid is None:
        return figs
    specs = (("grid", grid, grid.top1, "Top-1 (%), train x test size, no fine-tuning (table 5)"),
             ("grid_fixed", grid, grid.top1_fixed, "Top-1 (%), train x test size, after the fix (table 5, right)"),
             ("grid_control", grid.control, grid.control and grid.control.top1,
              "Control (appendix D): resize + fixed-size random crop"))
    for name, block, matrix, title in specs:
        if block is not None and block.complete(matrix):
            figs[name] = plots.plot_grid_heatmap([_plot_size(s) for s in block.train_sizes],
                                                 [_plot_size(s) for s in block.test_sizes],
                                                 [[math.nan if v is None else v for v in row] for row in matrix],
                                                 out_dir / f"grid_heatmap{name[4:]}.png", title=title)
    return figs


def _roc_figure(docs: RunDocuments, head: Headline, out_dir: Path) -> Path | None:
    an, train_size = docs.analyze, _number(head.train_size)
    sizes = [s for s in an.image_sizes if len(s) == 2] if an else []
    if not (sizes and train_size and an.crop_ratio):
        return None
    augment = an.train_augment if an.train_augment in TRAIN_AUGMENTS else RRC_AUGMENT
    mc = monte_carlo_ratio(train_size=int(train_size), crop_ratio=an.crop_ratio, image_sizes=sizes,
                           samples=ROC_SAMPLES, seed=0, train_augment=augment)
    return plots.plot_roc_areas(mc.train_area_fraction, mc.test_area_fraction, out_dir / "roc_areas.png",
                                ratios=mc.ratios)


def draw_figures(docs: RunDocuments, head: Headline, out_dir: Path) -> dict[str, Path]:
    """Write the report's PNGs; returns {figure name: path} for those the results allow."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    accuracy = _accuracy_figure(docs, head, out_dir)
    if accuracy is not None:
        figs["accuracy"] = accuracy
    figs.update(_grid_figures(docs.grid, out_dir))
    roc = _roc_figure(docs, head, out_dir)
    if roc is not None:
        figs["roc"] = roc
    panels = _cdf_panels(docs.stats)
    if panels:
        figs["cdf"] = plots.plot_activation_cdf_panels(panels, out_dir / "activation_cdfs.png")
    # choosing the size after fixing (fixres.report.choice)
    figs.update(report_select.draw(docs, out_dir))
    return figs


def _selection_sections(docs: RunDocuments, figs: dict[str, Path]) -> list[dict]:
    """``fixres.report.choice``'s plain sections (candidates, frontier, reliability, KS) as page sections."""
    return [_section(s["title"], notes=[[n] for n in s["notes"]],
                     figures=[_figure(figs[k], k, cap) for k, cap in s["figures"] if k in figs],
                     tables=[_table(rows, cols) for rows, cols in s["tables"]])
            for s in report_select.sections(docs)]


# --------------------------------------------------------------------------- the page's sections

def _accuracy_section(docs: RunDocuments, figs: dict[str, Path], head: Headline) -> dict:
    rec = head.recommended_test_size
    each = docs.sweep_after is not None and docs.sweep_after.after == AFTER_EACH_FIXED
    return _section("Accuracy against test size", figures=[_figure(
        figs["accuracy"], "accuracy vs test size",
        "Top-1 before the fix (the model as trained) and after it (classifier and the batch-norm before "
        "pooling fine-tuned with test-time augmentation, "
        + ("each size at its own size, as in the paper's table 5). " if each else "at the fixed size). ")
        + (f"The apparent-size analysis recommends {rec} px. " if rec else "")
        + "Error bars: ± binomial standard error.")])


def _roc_section(an: AnalysisDocument, figs: dict[str, Path]) -> dict:
    mc = an.monte_carlo.mean if an.monte_carlo else None
    return _section("Regions of classification and apparent object size (figure 2)", figures=[_figure(
        figs["roc"], "RoC areas",
        f"RoC area as a fraction of the photo for {_train_crop_words(an)} at training and the centre crop at test, "
        f"sampled on this data set's photo sizes. Objects look {_num_text(an.ratio, 3)}× as large at test "
        "time as in training (closed form)" + (f"; Monte Carlo {_num_text(mc, 3)}" if mc is not None else "")
        + ".")])


def _figure_sections(docs: RunDocuments, figs: dict[str, Path], head: Headline) -> list[dict]:
    sections = []
    if "accuracy" in figs:
        sections.append(_accuracy_section(docs, figs, head))
    grid = docs.grid
    if grid is not None and grid.complete(grid.top1):
        captions = (("grid", "No fine-tuning."), ("grid_fixed", "After the fix at each test size."),
                    ("grid_control", "Appendix D control: trained with a resize and a fixed-size random crop "
                                     "instead of RandomResizedCrop."))
        sections.append(_section(
            "Train × test size (table 5)", notes=[[f"From {grid.source}."]] if grid.source else [],
            figures=[_figure(figs[k], k, cap) for k, cap in captions if k in figs], tables=[_grid_table(grid)]))
    if "roc" in figs and docs.analyze is not None:
        sections.append(_roc_section(docs.analyze, figs))
    if "cdf" in figs:
        sections.append(_section("Pooled activations (figures 3 and 4)", figures=[_figure(
            figs["cdf"], "activation CDFs", "CDF of the globally pooled activations at several test sizes, before "
            "and after the fix.")], tables=[_stats_table(docs.stats)]))
    return sections


def _robustness_sections(docs: RunDocuments) -> list[dict]:
    """``robustness.json`` (top-1 under corruptions, paired tests), as ``fixres.report.robustness`` reads it."""
    part = report_robustness.section(docs.robustness)
    if part is None:
        return []
    return [_section(part["title"], notes=[[n] for n in part["notes"]],
                     tables=[_table(rows, cols) for rows, cols in part["tables"]])]


def _table_sections(docs: RunDocuments) -> list[dict]:
    sections = _robustness_sections(docs)
    costs = cost_rows(docs)
    if costs:
        sections.append(_section("Cost (table 7)", tables=[_table(costs, [
            ("step", "step"), ("size", "size (px)"), ("batch_size", "batch"), ("forward_ms", "forward ms/batch"),
            ("backward_ms", "backward ms/batch"), ("epochs", "epochs"), ("seconds", "wall s")])]))
    path = docs.export.path if docs.export else None
    if path:
        sections.append(_section("Fixed model", notes=[[
            "Exported to ", {"code": path}, "; evaluate it with ",
            {"code": f"fixres eval --checkpoint {path} --data DIR"}, " (no other flag needed)."]]))
    skipped = docs.sweep_before.skipped if docs.sweep_before else ()
    if skipped:
        sections.append(_section("Skipped files", notes=[[f"{len(skipped)} unreadable file(s) were skipped:"]],
                                 tables=[_table([dump(s) for s in skipped[:SKIPPED_SHOWN]],
                                                [("path", "path"), ("reason", "reason")])]))
    return sections


def render_html(docs: RunDocuments, figs: dict[str, Path], head: Headline) -> str:
    """The report page: every value from the run's files is escaped by the template (autoescape)."""
    run = docs.run
    classes = docs.data.class_names
    served = "served as trained at" if head.served_kind == "untuned" else "fixed for"
    subtitle = [f"trained at {_fmt(head.train_size)} px, {served} {_fmt(head.test_size)} px · data ",
                {"code": str(docs.data.root or run.data)}, f" ({_fmt(head.n_val)} validation images)",
                f" · classes: {', '.join(classes)}" if classes else "",
                f" · {run.finished or run.started or ''}"]
    sections = _figure_sections(docs, figs, head) + _selection_sections(docs, figs) + _table_sections(docs)
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


def write_report(run_dir: str | os.PathLike, docs: RunDocuments, head: Headline) -> dict:
    """Draw the figures and write ``RUN_DIR/report/index.html`` and ``report.json`` from the run's step documents
    and its headline; returns their paths."""
    run_dir = Path(run_dir)
    out = report_folder(run_dir)
    figs = draw_figures(docs, head, out)
    html_path = out / REPORT_HTML
    write_text(html_path, render_html(docs, figs, head))
    summary = {"headline": head.to_json(), "cost": cost_rows(docs),
               "figures": {k: str(v) for k, v in figs.items()}, "html": str(html_path)}
    write_json(out / REPORT_JSON, summary)
    return summary
