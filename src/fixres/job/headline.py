"""The headline of a ``fixres fix`` run, computed once, and a run folder's report rebuilt around it: top-1 at the
train size, at the best untuned size, untuned and fixed at the served size, and what is served with its unbiased
top-1 (``fixres.io.results.Headline``).

The report, the terminal summary, the export's metadata and the Python API all render this one object. It is
computed from the run's step documents (in memory during a run; read from the run folder when ``fixres
report`` rebuilds a page), so a broken or hand-edited field shows as missing rather than as a wrong number.
"""

from __future__ import annotations

from fixres.choosing.best import best_row
from fixres.io.documents import RunDocuments
from fixres.io.evaluation import ViewScore, binomial_se_of
from fixres.io.results import Headline
from fixres.io.served import FIXED, UNTUNED
from fixres.report.page import collect, write_report

#: The headline's rule under two-fold cross-selection: every validation photo scored by the other half's choice.
CROSS_RULE = "cross-val"


def _figures(row: ViewScore | None) -> tuple[float | None, float | None, float | None]:
    """(top-1, fold std, binomial SE) of a sweep row; Nones without it."""
    return (None, None, None) if row is None else (row.top1, row.top1_std, row.se)


def headline_of(documents: dict | RunDocuments) -> Headline:
    """The headline of a run's documents ({step: document}, with ``run`` the run's summary, or as read)."""
    docs = documents if isinstance(documents, RunDocuments) else RunDocuments.of(documents)
    run = docs.run
    train_size = run.train_size
    chosen = run.test_size or (docs.finetune.test_size if docs.finetune else None)
    before, after = docs.sweep_before, docs.sweep_after
    rows = before.rows if before else ()
    at_t = _figures(before.at(train_size) if before else None)
    untuned = _figures(before.at(chosen) if before else None)
    fixed = _figures(after.at(chosen) if after else None)
    best = best_row(rows, train_size=train_size)
    choice = run.choice
    cross = choice.cross if choice is not None and choice.cross is not None and choice.cross.top1 is not None \
        else None
    kind = choice.kind if choice is not None and choice.kind in (FIXED, UNTUNED) else FIXED
    fixed_figures = {"top1_fixed": fixed[0], "top1_fixed_std": fixed[1], "top1_fixed_se": fixed[2]}
    if cross is not None:  # the headline is every validation photo scored by the size chosen on the other half
        fixed_figures = {"top1_fixed": cross.top1, "top1_fixed_std": cross.top1_std,
                         "top1_fixed_se": cross.top1_se if cross.top1_se is not None else
                         binomial_se_of(cross.top1, cross.n), "headline_rule": CROSS_RULE,
                         "top1_fixed_all_val": fixed[0], "top1_untuned_same_choice": cross.untuned_top1}
    if cross is not None or kind == FIXED:
        served = (fixed_figures["top1_fixed"], fixed_figures["top1_fixed_se"])
    else:
        served = (untuned[0], untuned[2])
    return Headline(
        model=run.model, train_size=train_size, test_size=chosen,
        recommended_test_size=docs.analyze.recommended_test_size if docs.analyze else None,
        top1_at_train_size=at_t[0], top1_at_train_size_std=at_t[1], top1_at_train_size_se=at_t[2],
        best_untuned_test_size=best and best.test_size, top1_best_untuned=best and best.top1,
        top1_best_untuned_std=best and best.top1_std, top1_best_untuned_se=best and best.se,
        top1_untuned_at_test_size=untuned[0], top1_untuned_at_test_size_std=untuned[1],
        top1_untuned_at_test_size_se=untuned[2], **fixed_figures,
        n_val=(before.n_images or None) if before else None, seconds_total=run.total_seconds,
        timings=dict(run.timings), served_kind=kind, served=choice.served if choice is not None else None,
        top1_served=served[0], top1_served_se=served[1], n_swept_sizes=len(rows))


def write_run_report(run_dir) -> dict:
    """``fixres report RUN_DIR``: the page of a run folder rebuilt from the documents its steps left there."""
    docs = collect(run_dir)
    return write_report(run_dir, docs, headline_of(docs))
