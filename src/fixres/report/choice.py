"""The report's part on choosing the served size after fixing: what a user needs to pick a size.

From ``select.json`` (every candidate fixed at its own size), ``run.json`` (the choice) and the sweeps:
the model's own table 5 (right column: validation top-1 before and after the fix at every candidate,
with NLL and ECE), the accuracy-versus-cost frontier (top-1 against ms per image and GFLOPs, before and
after), a reliability diagram at the fixed size before and after, and the Kolmogorov-Smirnov distance
of the pooled activations at each size to those at the train size (figure 4's question: does the fix
bring them back toward T?). Returns plain data (rows, column titles, captions, sentences);
``fixres.report.page`` turns it into escaped HTML.
"""

from __future__ import annotations

from pathlib import Path

from fixres.io.documents import RunDocuments, StatsInfo
from fixres.io.evaluation import Reliability
from fixres.io.served import CandidateRow, CandidateTable, CrossSelection, SeenCheck
from fixres.report.plots import _pyplot, _save

#: Columns of the candidate table: (key in the row, title).
CANDIDATE_COLUMNS = [("size", "test size (px)"), ("val_before", "val top-1 before"), ("val_after", "val top-1 after"),
                     ("gain", "gain (points)"), ("nll", "NLL before → after"), ("ece", "ECE % before → after"),
                     ("held_out", "held-out top-1 after"), ("ms", "ms/image (batch 1)"),
                     ("ms_batch", "ms/image (batch N)"), ("gflops", "GFLOPs")]


#: Marks a latency whose spread over the timing rounds overlaps a neighbouring size's (``fixres.runtime.cost``).
OVERLAP_MARK = " ~"
OVERLAP_NOTE = ("~ after a latency: its fastest-to-slowest spread over the interleaved timing rounds overlaps a "
                "neighbouring size's, so their order is within timing noise (GFLOPs order them exactly).")


def _num(v, digits: int = 1) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def candidate_rows(table: CandidateTable, chosen: int | None) -> list[dict]:
    rows = []
    for c in table.candidates:
        b, a = c.val_before, c.val_after
        gain = None if b.top1 is None or a.top1 is None else a.top1 - b.top1
        rows.append({"size": f"{c.test_size}" + (" ★ chosen" if c.test_size == chosen else ""),
                     "val_before": _num(b.top1), "val_after": _num(a.top1),
                     "gain": None if gain is None else f"{gain:+.1f}",
                     "nll": f"{_num(b.nll, 3)} → {_num(a.nll, 3)}", "ece": f"{_num(b.ece)} → {_num(a.ece)}",
                     "held_out": _num(c.held_out.top1),
                     "ms": _num(c.ms, 2) + (OVERLAP_MARK if c.ms_overlaps else ""),
                     "ms_batch": _num(c.ms_batch, 2), "gflops": _num(c.gflops, 3), "ms_torch": _num(c.ms_torch, 2)})
    return rows


def latency_runtime(table: CandidateTable) -> str | None:
    """The runtime the candidates' ms were read on, when not PyTorch (``--latency-on``)."""
    return next((c.latency_on for c in table.candidates if c.latency_on), None)


def candidate_columns(table: CandidateTable) -> list[tuple[str, str]]:
    """``CANDIDATE_COLUMNS``, naming the runtime that timed the latency and with PyTorch's beside it when another
    runtime did."""
    runtime = latency_runtime(table)
    if runtime is None:
        return CANDIDATE_COLUMNS
    cols = [(k, f"{t}, {runtime}" if k in ("ms", "ms_batch") else t) for k, t in CANDIDATE_COLUMNS]
    at = next(i for i, (k, _) in enumerate(cols) if k == "ms_batch") + 1
    return cols[:at] + [("ms_torch", "ms/image (batch 1), PyTorch")] + cols[at:]


def calibration_sentence(table: CandidateTable, chosen: int | None) -> str | None:
    """Whether the fix restores calibration at the fixed size (ECE and NLL before vs after)."""
    c = table.at(chosen)
    if c is None or c.val_before.ece is None or c.val_after.ece is None:
        return None
    b, a = c.val_before, c.val_after
    better = a.ece < b.ece and (a.nll or 0) <= (b.nll or 0)
    return (f"At {chosen} px the fix moves ECE from {b.ece:.1f} % to {a.ece:.1f} % and NLL from "
            f"{_num(b.nll, 3)} to {_num(a.nll, 3)}: it "
            + ("restores calibration there." if better else "does not restore calibration there (see the "
                                                              "reliability diagram; --temperature-scale fits a "
                                                              "temperature on the held-out images)."))


def cross_sentence(cross: CrossSelection | None) -> str | None:
    """The cross-selected headline in words (None without cross-selection)."""
    if cross is None or cross.top1 is None:
        return None
    a, b = cross.half_a or f"{cross.size_half_a} px", cross.half_b or f"{cross.size_half_b} px"
    text = (f"Cross-selection: half A ({cross.n_half_a} photos) chose {a}, half B ({cross.n_half_b}) "
            f"chose {b}; scoring each half by the candidate the other chose gives {_num(cross.top1)} % on "
            f"{cross.n} photos, the headline.")
    paired = cross.paired_vs_untuned
    if paired is not None and cross.untuned_top1 is not None:
        text += (f" The untuned model at the same sizes: {_num(cross.untuned_top1)} % (paired test: "
                 f"{paired.only_a} photos right only after the fix, {paired.only_b} only before, "
                 f"p = {_num(paired.p, 3)}).")
    return text


def seen_sentence(seen: SeenCheck | None, train_size) -> str | None:
    """Why the training photos did not choose: their score beside val's (None when not measured)."""
    if seen is None or seen.seen_top1_at_train_size is None:
        return None
    return (f"For comparison, {seen.n} training photos (which this model may have been trained on) score "
            f"{_num(seen.seen_top1_at_train_size)} % at {train_size} px against "
            f"{_num(seen.val_top1_at_train_size)} % on the validation photos; choosing on them would have "
            f"picked {seen.size_chosen_on_seen} px. The table's held-out column shows them after the fix.")


def ks_rows(stats: StatsInfo | None) -> list[dict]:
    """Per size: KS distance of the pooled activations to those at the train size, before and after."""
    before = dict(stats.before.items()) if stats and stats.before else {}
    after = dict(stats.after.items()) if stats and stats.after else {}
    rows = []
    for size, s in sorted(before.items()):
        kb, ka = s.ks_to_reference, after[size].ks_to_reference if size in after else None
        if kb is not None or ka is not None:
            rows.append({"size": str(size), "before": _num(kb, 3), "after": _num(ka, 3)})
    return rows


def _notes(docs: RunDocuments, table: CandidateTable) -> list[str]:
    run = docs.run
    choice, schedule = run.choice, run.schedule
    chosen = choice.test_size if choice else None
    notes = [cross_sentence(choice.cross), seen_sentence(choice.seen_check, run.train_size),
             choice.why_not_recommended] if choice else []
    if choice:
        notes[:0] = [choice.served and f"Served: {choice.served}.", f"Chosen: {choice.chosen_on}.",
                     choice.rule_text and f"Which photos chose: {choice.rule_text}."]
    else:
        notes.append("Chosen: n/a.")
    notes += [schedule and f"Fine-tuning schedule: lr {schedule.lr}, {schedule.epochs} epochs ({schedule.how}).",
              calibration_sentence(table, chosen),
              f"Not fixed (over the time budget): {', '.join(map(str, table.dropped))} px." if table.dropped else None,
              OVERLAP_NOTE if any(c.ms_overlaps for c in table.candidates) else None]
    return [n for n in notes if n]


def sections(docs: RunDocuments) -> list[dict]:
    """[{title, notes: [str], figures: [(figure name, caption)], tables: [(rows, columns)]}]."""
    out = []
    table = docs.select
    if table is not None:
        chosen = docs.run.choice.test_size if docs.run.choice else None
        out.append({"title": "Every candidate size, before and after the fix (table 5, right column)",
                    "notes": _notes(docs, table),
                    "figures": [("frontier", "Top-1 on the validation images against the cost of serving each size "
                                 "(ms per image at batch 1 on the device this ran on, and GFLOPs), before and after "
                                 "the fix; the chosen size is circled."),
                                ("reliability", f"Reliability at {chosen} px before and after the fix: accuracy "
                                 "against confidence, binned by confidence (the diagonal is perfect calibration).")],
                    "tables": [(candidate_rows(table, chosen), candidate_columns(table))]})
    ks = ks_rows(docs.stats)
    if ks:
        out.append({"title": "Pooled activations: distance to the train size (figure 4)",
                    "notes": ["Kolmogorov-Smirnov distance between the pooled-activation distribution at each size "
                              "and at the train size; the fix brings a size back toward T when its distance drops."],
                    "figures": [], "tables": [(ks, [("size", "test size (px)"), ("before", "KS before"),
                                                    ("after", "KS after")])]})
    return out


def draw(docs: RunDocuments, out_dir: Path) -> dict[str, Path]:
    figs = {}
    chosen = docs.run.choice.test_size if docs.run.choice else None
    # the frontier draws the candidates with both top-1 values; the table lists them all
    drawn = [c for c in docs.select.candidates if c.val_before.top1 is not None and c.val_after.top1 is not None] \
        if docs.select else []
    if drawn:
        figs["frontier"] = _frontier(drawn, chosen, out_dir / "accuracy_vs_cost.png")
        rel = _reliability_pair(docs, chosen)
        if rel:
            figs["reliability"] = _reliability(rel, chosen, out_dir / "reliability.png")
    return figs


def _frontier(cands: list[CandidateRow], chosen, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    runtime = next((c.latency_on for c in cands if c.latency_on), "PyTorch")
    for ax, key, label in ((axes[0], "ms", f"ms per image (batch 1, {runtime})"),
                           (axes[1], "gflops", "GFLOPs per image")):
        pts = sorted((c for c in cands if getattr(c, key) is not None), key=lambda c: getattr(c, key))
        x = [getattr(c, key) for c in pts]  # a frontier reads by cost
        ax.plot(x, [c.val_before.top1 for c in pts], "o--", label="before the fix")
        ax.plot(x, [c.val_after.top1 for c in pts], "s-", label="after the fix")
        for c in pts:
            ax.annotate(str(c.test_size), (getattr(c, key), c.val_after.top1), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
            if c.test_size == chosen:
                ax.plot([getattr(c, key)], [c.val_after.top1], "o", ms=14, mfc="none", mec="tab:green")
        ax.set_xlabel(label)
        ax.set_ylabel("val top-1 (%)")
        ax.legend(fontsize=8)
    axes[0].set_title("Accuracy vs latency")
    axes[1].set_title("Accuracy vs compute")
    return _save(fig, path)


def _reliability_pair(docs: RunDocuments, size) -> dict[str, Reliability] | None:
    pair = {label: sweep.reliability_at(size) if sweep else None
            for label, sweep in (("before", docs.sweep_before), ("after", docs.sweep_after))}
    return pair if all(pair.values()) else None


def _reliability(pair: dict, size, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    for label, style in (("before", "o--"), ("after", "s-")):
        r = pair[label]
        pts = [(c, a) for c, a, n in zip(r.confidence, r.accuracy, r.count) if n and c is not None]
        ax.plot([c for c, _ in pts], [a for _, a in pts], style, label=f"{label} the fix")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability at {size} px")
    ax.legend(fontsize=8)
    return _save(fig, path)
