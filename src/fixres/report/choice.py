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


def candidate_rows(select: dict, chosen: int | None) -> list[dict]:
    rows = []
    for c in select.get("candidates") or []:
        b, a = c.get("val_before") or {}, c.get("val_after") or {}
        gain = None if b.get("top1") is None or a.get("top1") is None else a["top1"] - b["top1"]
        rows.append({"size": f"{c['test_size']}" + (" ★ chosen" if c["test_size"] == chosen else ""),
                     "val_before": _num(b.get("top1")), "val_after": _num(a.get("top1")),
                     "gain": None if gain is None else f"{gain:+.1f}",
                     "nll": f"{_num(b.get('nll'), 3)} → {_num(a.get('nll'), 3)}",
                     "ece": f"{_num(b.get('ece'))} → {_num(a.get('ece'))}",
                     "held_out": _num((c.get("holdout_after") or c.get("seen_after") or {}).get("top1")),
                     "ms": _num(c.get("ms"), 2) + (OVERLAP_MARK if c.get("ms_overlaps") else ""),
                     "ms_batch": _num(c.get("ms_batch"), 2), "gflops": _num(c.get("gflops"), 3)})
    return rows


def calibration_sentence(select: dict, chosen: int | None) -> str | None:
    """Whether the fix restores calibration at the fixed size (ECE and NLL before vs after)."""
    c = next((c for c in select.get("candidates") or [] if c["test_size"] == chosen), None)
    if not c or (c.get("val_before") or {}).get("ece") is None or (c.get("val_after") or {}).get("ece") is None:
        return None
    b, a = c["val_before"], c["val_after"]
    better = a["ece"] < b["ece"] and (a.get("nll") or 0) <= (b.get("nll") or 0)
    return (f"At {chosen} px the fix moves ECE from {b['ece']:.1f} % to {a['ece']:.1f} % and NLL from "
            f"{_num(b.get('nll'), 3)} to {_num(a.get('nll'), 3)}: it "
            + ("restores calibration there." if better else "does not restore calibration there (see the "
                                                              "reliability diagram; --temperature-scale fits a "
                                                              "temperature on the held-out images)."))


def cross_sentence(cross) -> str | None:
    """The cross-selected headline in words (None without cross-selection)."""
    if not isinstance(cross, dict) or cross.get("top1") is None:
        return None
    a, b = (cross.get("half_a") or f"{cross.get('size_half_a')} px",
            cross.get("half_b") or f"{cross.get('size_half_b')} px")
    text = (f"Cross-selection: half A ({cross.get('n_half_a')} photos) chose {a}, half B ({cross.get('n_half_b')}) "
            f"chose {b}; scoring each half by the candidate the other chose gives {_num(cross['top1'])} % on "
            f"{cross.get('n')} photos, the headline.")
    paired = cross.get("paired_vs_untuned")
    if isinstance(paired, dict) and cross.get("untuned_top1") is not None:
        text += (f" The untuned model at the same sizes: {_num(cross['untuned_top1'])} % (paired test: "
                 f"{paired.get('only_a')} photos right only after the fix, {paired.get('only_b')} only before, "
                 f"p = {_num(paired.get('p'), 3)}).")
    return text


def seen_sentence(seen, train_size) -> str | None:
    """Why the training photos did not choose: their score beside val's (None when not measured)."""
    if not isinstance(seen, dict) or seen.get("seen_top1_at_train_size") is None:
        return None
    return (f"For comparison, {seen.get('n')} training photos (which this model may have been trained on) score "
            f"{_num(seen['seen_top1_at_train_size'])} % at {train_size} px against "
            f"{_num(seen.get('val_top1_at_train_size'))} % on the validation photos; choosing on them would have "
            f"picked {seen.get('size_chosen_on_seen')} px. The table's held-out column shows them after the fix.")


def ks_rows(stats: dict | None) -> list[dict]:
    """Per size: KS distance of the pooled activations to those at the train size, before and after."""
    rows = []
    before = ((stats or {}).get("before") or {}).get("sizes") or {}
    after = ((stats or {}).get("after") or {}).get("sizes") or {}
    for size in sorted(before, key=lambda s: int(s)):
        kb, ka = (before.get(size) or {}).get("ks_to_reference"), (after.get(size) or {}).get("ks_to_reference")
        if kb is not None or ka is not None:
            rows.append({"size": str(size), "before": _num(kb, 3), "after": _num(ka, 3)})
    return rows


def sections(results: dict) -> list[dict]:
    """[{title, notes: [str], figures: [(figure name, caption)], tables: [(rows, columns)]}]."""
    select, run = results.get("select"), results.get("run") or {}
    out = []
    choice = run.get("choice") or {}
    if select:
        chosen = choice.get("test_size")
        served = choice.get("served") if isinstance(choice.get("served"), str) else None
        notes = [served and f"Served: {served}.", f"Chosen: {choice.get('chosen_on', 'n/a')}.",
                 choice.get("rule_text") and f"Which photos chose: {choice['rule_text']}.",
                 cross_sentence(choice.get("cross")), seen_sentence(choice.get("seen_check"), run.get("train_size")),
                 choice.get("why_not_recommended"),
                 (run.get("schedule") or {}).get("how") and f"Fine-tuning schedule: lr {run['schedule'].get('lr')}, "
                 f"{run['schedule'].get('epochs')} epochs ({run['schedule']['how']}).",
                 calibration_sentence(select, chosen),
                 f"Not fixed (over the time budget): {', '.join(map(str, select['dropped']))} px."
                 if select.get("dropped") else None,
                 OVERLAP_NOTE if any(c.get("ms_overlaps") for c in select.get("candidates") or []) else None]
        out.append({"title": "Every candidate size, before and after the fix (table 5, right column)",
                    "notes": [n for n in notes if n],
                    "figures": [("frontier", "Top-1 on the validation images against the cost of serving each size "
                                 "(ms per image at batch 1 on the device this ran on, and GFLOPs), before and after "
                                 "the fix; the chosen size is circled."),
                                ("reliability", f"Reliability at {chosen} px before and after the fix: accuracy "
                                 "against confidence in 15 bins (the diagonal is perfect calibration).")],
                    "tables": [(candidate_rows(select, chosen), CANDIDATE_COLUMNS)]})
    ks = ks_rows(results.get("stats"))
    if ks:
        out.append({"title": "Pooled activations: distance to the train size (figure 4)",
                    "notes": ["Kolmogorov-Smirnov distance between the pooled-activation distribution at each size "
                              "and at the train size; the fix brings a size back toward T when its distance drops."],
                    "figures": [], "tables": [(ks, [("size", "test size (px)"), ("before", "KS before"),
                                                    ("after", "KS after")])]})
    return out


def draw(results: dict, out_dir: Path) -> dict[str, Path]:
    figs = {}
    select, run = results.get("select"), results.get("run") or {}
    chosen = (run.get("choice") or {}).get("test_size")
    if select and select.get("candidates"):
        figs["frontier"] = _frontier(select["candidates"], chosen, out_dir / "accuracy_vs_cost.png")
        rel = _reliability_pair(results, chosen)
        if rel:
            figs["reliability"] = _reliability(rel, chosen, out_dir / "reliability.png")
    return figs


def _frontier(cands: list[dict], chosen, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "ms", "ms per image (batch 1)"), (axes[1], "gflops", "GFLOPs per image")):
        pts = sorted((c for c in cands if c.get(key) is not None), key=lambda c: c[key])  # a frontier reads by cost
        x = [c[key] for c in pts]
        for which, style in (("val_before", "o--"), ("val_after", "s-")):
            ax.plot(x, [c[which]["top1"] for c in pts], style, label=which.replace("val_", "") + " the fix")
        for c in pts:
            ax.annotate(str(c["test_size"]), (c[key], c["val_after"]["top1"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
            if c["test_size"] == chosen:
                ax.plot([c[key]], [c["val_after"]["top1"]], "o", ms=14, mfc="none", mec="tab:green")
        ax.set_xlabel(label)
        ax.set_ylabel("val top-1 (%)")
        ax.legend(fontsize=8)
    axes[0].set_title("Accuracy vs latency")
    axes[1].set_title("Accuracy vs compute")
    return _save(fig, path)


def _reliability_pair(results: dict, size) -> dict | None:
    pair = {}
    for label, step in (("before", "sweep_before"), ("after", "sweep_after")):
        rel = (results.get(step) or {}).get("reliability") or {}
        key = next((k for k in rel if str(k).split("@")[0] == str(size)), None)
        if key is None:
            return None
        pair[label] = rel[key]
    return pair


def _reliability(pair: dict, size, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    for label, style in (("before", "o--"), ("after", "s-")):
        r = pair[label]
        pts = [(c, a) for c, a, n in zip(r["confidence"], r["accuracy"], r["count"]) if n and c is not None]
        ax.plot([c for c, _ in pts], [a for _, a in pts], style, label=f"{label} the fix")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability at {size} px")
    ax.legend(fontsize=8)
    return _save(fig, path)
