"""Robustness under corruptions in words: the terminal table, the verdict on each compared pair, the report's part.

Reads a ``fixres.method.robustness.corruption_table`` result (``corruptions.json`` of ``fixres eval
--corruptions``, or ``robustness.json`` in a run folder: the same schema). The verdict says what the
paired test shows and no more: "within noise" means no difference at Holm-adjusted p >= ``ALPHA`` on these
images (a few hundred images can hide a difference of a point or two); a difference is named with its
direction, size and adjusted p. The test takes the photo as the unit (its hits summed over the severities);
a result written before ``p_holm`` existed is read with its raw p and said to be uncorrected. Every field is read
defensively (a broken file leaves the report's part out, never stops the report). Pure Python, no torch.
"""

from __future__ import annotations

import math

from fixres.choosing.significance import ALPHA
from fixres.io.documents import CLEAN, PairedTest, RobustnessTable

#: Below this p a value is printed as "< P_FLOOR".
P_FLOOR = 0.001
TITLE = "Robustness under corruptions"


def _num(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _top1(v) -> str:
    n = _num(v)
    return "n/a" if n is None else f"{n:.1f}"


def p_text(p) -> str:
    """'p = 0.034', 'p < 0.001', or 'p n/a'."""
    n = _num(p)
    if n is None:
        return "p n/a"
    return f"p < {P_FLOOR:g}" if n < P_FLOOR else f"p = {n:.3f}"


def _table(result) -> RobustnessTable:
    return result if isinstance(result, RobustnessTable) else RobustnessTable.from_json(result)


def _pairs(table: RobustnessTable) -> list[tuple[str, str]]:
    """The compared (a, b) pairs, in the order of the result's paired tests."""
    return list(dict.fromkeys((t.a, t.b) for t in table.paired))


def _tests(table: RobustnessTable, a: str, b: str) -> list[PairedTest]:
    return [t for t in table.paired if t.a == a and t.b == b and t.p is not None]


def _difference(t: PairedTest) -> str:
    d = t.difference
    return f"{t.corruption} ({'n/a' if d is None else f'{d:+.1f}'} points, {p_text(t.judged_p)})"


def verdict(result, a: str, b: str, *, alpha: float = ALPHA) -> str:
    """One sentence on columns a and b: on how many corruptions they are within noise, where a is higher or
    lower (with the difference in points and p), and the clean photos' difference."""
    table = _table(result)
    tests = _tests(table, a, b)
    corrupted = [t for t in tests if t.corruption != CLEAN]
    if not corrupted:
        return f"{a} vs {b}: no paired test under corruptions"
    differ = [t for t in corrupted if t.judged_p < alpha]
    higher = [t for t in differ if (t.only_a or 0) > (t.only_b or 0)]
    lower = [t for t in differ if t not in higher]
    adjusted = table.corrected
    text = (f"{a} vs {b}: within noise on {len(corrupted) - len(differ)} of {len(corrupted)} corruptions "
            f"({'Holm-adjusted ' if adjusted else ''}paired p >= {alpha:g})")
    if higher:
        text += f"; {a} higher on " + ", ".join(_difference(t) for t in higher)
    if lower:
        text += f"; {a} lower on " + ", ".join(_difference(t) for t in lower)
    if differ and not adjusted:
        text += f" (p not corrected for {len(corrupted)} tests)"
    clean = [t for t in tests if t.corruption == CLEAN]
    if clean:
        d = clean[0].difference
        text += f"; clean photos: {'n/a' if d is None else f'{d:+.1f}'} points, {p_text(clean[0].judged_p)}"
    n = table.n_images
    return text + (f"; {int(n)} images" if n is not None else "") + "."


def verdicts(result, *, alpha: float = ALPHA) -> list[str]:
    """``verdict`` for every compared pair of the result (none when it has a single column)."""
    table = _table(result)
    return [verdict(table, a, b, alpha=alpha) for a, b in _pairs(table)]


def _test_heading(table: RobustnessTable) -> str:
    if table.corrected:
        n = sum(t.corruption != CLEAN for t in table.paired)
        return (f"paired tests, photo as the unit (hits summed over severities; exact sign test): photos a got right "
                f"more often / b more often, p, and p Holm-adjusted across the table's {n} tests under corruptions")
    return "paired tests over every (image, severity) pair, uncorrected: only a right / only b right"


def format_corruption_table(result) -> str:
    """The plain-text table for the terminal: top-1 per corruption and severity per column, the means, the
    paired tests and the verdicts."""
    table = _table(result)
    cols = table.columns
    width = max([9, *(len(c) for c in cols)])
    n = "None" if table.n_images is None else int(table.n_images)
    lines = [(f"robustness under corruptions: {n} images (seed {table.seed}), "
              f"top-1 %, every photo decoded at full size, {_top1(table.seconds)} s"),
             f"{'corruption':<20} {'sev':>3} " + " ".join(f"{c:>{width}}" for c in cols)]
    for r in table.rows:
        sev = "-" if r.get("corruption") == CLEAN else str(r.get("severity"))
        lines.append(f"{r.get('corruption')!s:<20} {sev:>3} " + " ".join(f"{_top1(r.get(c)):>{width}}" for c in cols))
    lines.append(f"{'mean over severities':<24} " + " ".join(f"{'':>{width}}" for _ in cols))
    for r in table.mean:
        if r.get("corruption") != CLEAN:
            lines.append(f"{r.get('corruption')!s:<24} " + " ".join(f"{_top1(r.get(c)):>{width}}" for c in cols))
    if table.paired:
        lines.append(_test_heading(table))
        lines += [f"  {t.corruption:<20} {t.a} vs {t.b}: {t.only_a} / {t.only_b}, {p_text(t.p)}"
                  + (f", Holm {p_text(t.p_holm)}" if t.p_holm is not None else "") for t in table.paired]
    lines += verdicts(table)
    if len(cols) == 1:
        lines.append("one column, nothing to compare: the drop from the clean row is its robustness")
    return "\n".join(lines)


def _p_note(table: RobustnessTable) -> str:
    if table.corrected:
        return ("exact sign test with the photo as the unit (its hits summed over the severities), Holm-adjusted "
                "across the tests under corruptions")
    return "exact paired test over every (image, severity) pair, not corrected for the several tests"


def section(result) -> dict | None:
    """The report's part: {title, notes, tables: [(rows, columns)]}: mean top-1 per corruption per column and
    the paired p of each compared pair, with the verdicts; None when the result is missing or unusable."""
    table = _table(result)
    cols = table.columns
    if not (cols and table.mean):
        return None
    pairs = _pairs(table)
    columns = [("corruption", "corruption")] + [(f"c{i}", f"{c} top-1 %") for i, c in enumerate(cols)]
    columns += [(f"p{j}", f"p: {a} vs {b}") for j, (a, b) in enumerate(pairs)]
    p_of = {(t.corruption, t.a, t.b): t.judged_p for t in table.paired}
    rows = []
    for m in table.mean:
        row = {"corruption": str(m.get("corruption")), **{f"c{i}": _top1(m.get(c)) for i, c in enumerate(cols)}}
        row.update({f"p{j}": p_text(p_of.get((m.get("corruption"), a, b))).removeprefix("p ").removeprefix("= ")
                    for j, (a, b) in enumerate(pairs)})
        rows.append(row)
    sev = ", ".join(map(str, table.severities)) if table.severities is not None else "each severity"
    n = "None" if table.n_images is None else int(table.n_images)
    notes = [(f"Top-1 on corrupted copies of {n} validation photos (seed {table.seed}), each corruption "
              f"applied to the photo before resizing, averaged over severities {sev}; p: {_p_note(table)}."),
             *verdicts(table)]
    return {"title": TITLE, "notes": notes, "tables": [(rows, columns)]}
