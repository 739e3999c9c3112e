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

CLEAN = "clean"
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


def _dicts(v) -> list[dict]:
    return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []


def _columns(result: dict) -> list[str]:
    cols = result.get("columns") if isinstance(result, dict) else None
    return [c for c in cols if isinstance(c, str)] if isinstance(cols, list) else []


def _pairs(result: dict) -> list[tuple[str, str]]:
    """The compared (a, b) pairs, in the order of the result's paired tests."""
    return list(dict.fromkeys((t.get("a"), t.get("b")) for t in _dicts(result.get("paired"))
                              if isinstance(t.get("a"), str) and isinstance(t.get("b"), str)))


def _tests(result: dict, a: str, b: str) -> list[dict]:
    return [t for t in _dicts(result.get("paired")) if t.get("a") == a and t.get("b") == b
            and _num(t.get("p")) is not None and isinstance(t.get("corruption"), str)]


def judged_p(t: dict) -> float | None:
    """The p a verdict reads: Holm-adjusted where the result has it, else the raw p."""
    adjusted = _num(t.get("p_holm"))
    return adjusted if adjusted is not None else _num(t.get("p"))


def corrected(result: dict) -> bool:
    return any(_num(t.get("p_holm")) is not None for t in _dicts(result.get("paired")))


def _difference(t: dict) -> str:
    d = _num(t.get("difference"))
    return f"{t['corruption']} ({'n/a' if d is None else f'{d:+.1f}'} points, {p_text(judged_p(t))})"


def verdict(result: dict, a: str, b: str, *, alpha: float = ALPHA) -> str:
    """One sentence on columns a and b: on how many corruptions they are within noise, where a is higher or
    lower (with the difference in points and p), and the clean photos' difference."""
    tests = _tests(result, a, b)
    corrupted = [t for t in tests if t["corruption"] != CLEAN]
    if not corrupted:
        return f"{a} vs {b}: no paired test under corruptions"
    differ = [t for t in corrupted if judged_p(t) < alpha]
    higher = [t for t in differ if (_num(t.get("only_a")) or 0) > (_num(t.get("only_b")) or 0)]
    lower = [t for t in differ if t not in higher]
    adjusted = corrected(result)
    text = (f"{a} vs {b}: within noise on {len(corrupted) - len(differ)} of {len(corrupted)} corruptions "
            f"({'Holm-adjusted ' if adjusted else ''}paired p >= {alpha:g})")
    if higher:
        text += f"; {a} higher on " + ", ".join(_difference(t) for t in higher)
    if lower:
        text += f"; {a} lower on " + ", ".join(_difference(t) for t in lower)
    if differ and not adjusted:
        text += f" (p not corrected for {len(corrupted)} tests)"
    clean = [t for t in tests if t["corruption"] == CLEAN]
    if clean:
        d = _num(clean[0].get("difference"))
        text += f"; clean photos: {'n/a' if d is None else f'{d:+.1f}'} points, {p_text(judged_p(clean[0]))}"
    n = _num(result.get("n_images"))
    return text + (f"; {int(n)} images" if n is not None else "") + "."


def verdicts(result: dict, *, alpha: float = ALPHA) -> list[str]:
    """``verdict`` for every compared pair of the result (none when it has a single column)."""
    return [verdict(result, a, b, alpha=alpha) for a, b in _pairs(result)]


def _test_heading(result: dict) -> str:
    if corrected(result):
        n = sum(t.get("corruption") != CLEAN for t in _dicts(result.get("paired")))
        return (f"paired tests, photo as the unit (hits summed over severities; exact sign test): photos a got right "
                f"more often / b more often, p, and p Holm-adjusted across the table's {n} tests under corruptions")
    return "paired tests over every (image, severity) pair, uncorrected: only a right / only b right"


def format_corruption_table(result: dict) -> str:
    """The plain-text table for the terminal: top-1 per corruption and severity per column, the means, the
    paired tests and the verdicts."""
    cols = _columns(result)
    width = max([9, *(len(c) for c in cols)])
    lines = [(f"robustness under corruptions: {result.get('n_images')} images (seed {result.get('seed')}), "
              f"top-1 %, every photo decoded at full size, {_top1(result.get('seconds'))} s"),
             f"{'corruption':<20} {'sev':>3} " + " ".join(f"{c:>{width}}" for c in cols)]
    for r in _dicts(result.get("rows")):
        sev = "-" if r.get("corruption") == CLEAN else str(r.get("severity"))
        lines.append(f"{r.get('corruption')!s:<20} {sev:>3} " + " ".join(f"{_top1(r.get(c)):>{width}}" for c in cols))
    lines.append(f"{'mean over severities':<24} " + " ".join(f"{'':>{width}}" for _ in cols))
    for r in _dicts(result.get("mean")):
        if r.get("corruption") != CLEAN:
            lines.append(f"{r.get('corruption')!s:<24} " + " ".join(f"{_top1(r.get(c)):>{width}}" for c in cols))
    tests = _dicts(result.get("paired"))
    if tests:
        lines.append(_test_heading(result))
        lines += [f"  {t.get('corruption')!s:<20} {t.get('a')} vs {t.get('b')}: {t.get('only_a')} / "
                  f"{t.get('only_b')}, {p_text(t.get('p'))}"
                  + (f", Holm {p_text(t.get('p_holm'))}" if _num(t.get("p_holm")) is not None else "") for t in tests]
    lines += verdicts(result)
    if len(cols) == 1:
        lines.append("one column, nothing to compare: the drop from the clean row is its robustness")
    return "\n".join(lines)


def _p_note(result: dict) -> str:
    if corrected(result):
        return ("exact sign test with the photo as the unit (its hits summed over the severities), Holm-adjusted "
                "across the tests under corruptions")
    return "exact paired test over every (image, severity) pair, not corrected for the several tests"


def section(result) -> dict | None:
    """The report's part: {title, notes, tables: [(rows, columns)]}: mean top-1 per corruption per column and
    the paired p of each compared pair, with the verdicts; None when the result is missing or unusable."""
    cols = _columns(result) if isinstance(result, dict) else []
    means = _dicts(result.get("mean")) if cols else []
    if not means:
        return None
    pairs = _pairs(result)
    columns = [("corruption", "corruption")] + [(f"c{i}", f"{c} top-1 %") for i, c in enumerate(cols)]
    columns += [(f"p{j}", f"p: {a} vs {b}") for j, (a, b) in enumerate(pairs)]
    p_of = {(t.get("corruption"), t.get("a"), t.get("b")): judged_p(t) for t in _dicts(result.get("paired"))}
    rows = []
    for m in means:
        row = {"corruption": str(m.get("corruption")), **{f"c{i}": _top1(m.get(c)) for i, c in enumerate(cols)}}
        row.update({f"p{j}": p_text(p_of.get((m.get("corruption"), a, b))).removeprefix("p ").removeprefix("= ")
                    for j, (a, b) in enumerate(pairs)})
        rows.append(row)
    severities = result.get("severities")
    sev = ", ".join(map(str, severities)) if isinstance(severities, list) else "each severity"
    notes = [(f"Top-1 on corrupted copies of {result.get('n_images')} validation photos (seed "
              f"{result.get('seed')}), each corruption applied to the photo before resizing, averaged over severities "
              f"{sev}; p: {_p_note(result)}."), *verdicts(result)]
    return {"title": TITLE, "notes": notes, "tables": [(rows, columns)]}
