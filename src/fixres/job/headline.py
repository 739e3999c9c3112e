"""The headline of a ``fixres fix`` run, computed once, and a run folder's report rebuilt around it: top-1 at the
train size, at the best untuned size, untuned and fixed at the served size, and what is served with its unbiased
top-1 (``fixres.io.results.Headline``).

The report, the terminal summary, the export's metadata and the Python API all render this one object. It is
computed from the run's step documents (in memory during a run; read from the run folder when ``fixres
report`` rebuilds a page), so a broken or hand-edited field shows as missing rather than as a wrong number.
"""

from __future__ import annotations

from fixres.choosing.best import best_row
from fixres.io.results import FIXED, UNTUNED, Headline, number
from fixres.report.page import collect, row_at, row_se, rows_of, total_seconds, write_report

#: The headline's rule under two-fold cross-selection: every validation photo scored by the other half's choice.
CROSS_RULE = "cross-val"


def headline_of(documents: dict) -> Headline:
    """The headline of the step documents ``documents`` ({step: document}, with ``run`` the run's summary)."""
    run = documents.get("run") if isinstance(documents.get("run"), dict) else {}
    train_size = run.get("train_size")
    chosen = run.get("test_size") or (documents.get("finetune") or {}).get("test_size")
    before, after = documents.get("sweep_before"), documents.get("sweep_after")
    at_t, fixed, untuned_at_s = row_at(before, train_size), row_at(after, chosen), row_at(before, chosen)
    best = best_row(rows_of(before), train_size=train_size if number(train_size) is not None else None)
    choice = run.get("choice") if isinstance(run.get("choice"), dict) else {}
    cross = choice.get("cross") if isinstance(choice.get("cross"), dict) else None
    cross = cross if cross is not None and number(cross.get("top1")) is not None else None
    kind = choice.get("kind") if choice.get("kind") in (FIXED, UNTUNED) else FIXED
    fixed_figures = {"top1_fixed": fixed and fixed["top1"], "top1_fixed_std": fixed and fixed.get("top1_std"),
                     "top1_fixed_se": row_se(fixed)}
    if cross is not None:  # the headline is every validation photo scored by the size chosen on the other half
        fixed_figures = {"top1_fixed": cross["top1"], "top1_fixed_std": number(cross.get("top1_std")),
                         "top1_fixed_se": row_se(cross), "headline_rule": CROSS_RULE,
                         "top1_fixed_all_val": fixed and fixed["top1"],
                         "top1_untuned_same_choice": number(cross.get("untuned_top1"))}
    untuned = {"top1_untuned_at_test_size": untuned_at_s and untuned_at_s["top1"],
               "top1_untuned_at_test_size_std": untuned_at_s and untuned_at_s.get("top1_std"),
               "top1_untuned_at_test_size_se": row_se(untuned_at_s)}
    if cross is not None:
        served = (cross["top1"], fixed_figures["top1_fixed_se"])
    elif kind == UNTUNED:
        served = (untuned["top1_untuned_at_test_size"], untuned["top1_untuned_at_test_size_se"])
    else:
        served = (fixed_figures["top1_fixed"], fixed_figures["top1_fixed_se"])
    return Headline(
        model=run.get("model"), train_size=train_size, test_size=chosen,
        recommended_test_size=(documents.get("analyze") or {}).get("recommended_test_size"),
        top1_at_train_size=at_t and at_t["top1"], top1_at_train_size_std=at_t and at_t.get("top1_std"),
        top1_at_train_size_se=row_se(at_t),
        best_untuned_test_size=best and best["test_size"], top1_best_untuned=best and best["top1"],
        top1_best_untuned_std=best and best.get("top1_std"), top1_best_untuned_se=row_se(best),
        **untuned, **fixed_figures,
        n_val=(before or {}).get("n_images"), seconds_total=total_seconds(run.get("timings")),
        timings=run.get("timings") or {},
        served_kind=kind, served=choice.get("served") if isinstance(choice.get("served"), str) else None,
        top1_served=served[0], top1_served_se=served[1],
        n_swept_sizes=len(rows_of(before)) if before else 0)


def write_run_report(run_dir) -> dict:
    """``fixres report RUN_DIR``: the page of a run folder rebuilt from the documents its steps left there."""
    documents = collect(run_dir)
    return write_report(run_dir, documents, headline_of(documents))
