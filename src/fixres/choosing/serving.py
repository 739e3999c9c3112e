"""What is served: the cheapest candidate (a size fixed, or the model as trained at a size) not worse than the
best beyond noise on the choosing photos, within the deployment budget (size, ms per image, GFLOPs); its
two-fold cross-selected form; the sentence that says why.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from fixres.choosing.best import best_row
from fixres.choosing.outcomes import paired_on_read, percent_correct, read_bits
from fixres.choosing.significance import ALPHA, binomial_se
from fixres.errors import UsageError
from fixres.io.served import FIXED, UNTUNED

#: How the served candidate is chosen: the cheapest not worse than the best beyond noise (the default), or the
#: most accurate fixed candidate whatever it costs.
CHOOSE_CHEAPEST, CHOOSE_BEST = "cheapest", "best"


CHOOSE_MODES = (CHOOSE_CHEAPEST, CHOOSE_BEST)


def choose_test_size(*, recommended: int, sweep_rows: Sequence[Mapping], train_size: int) -> dict:
    """Before fixing: max(recommended, best untuned on the rows given), both measured; the choice and why."""
    best = best_row(sweep_rows, train_size=train_size)
    best_size = int(best["test_size"]) if best else train_size
    chosen = max(int(recommended), best_size)
    reason = ("the apparent-size recommendation" if chosen == int(recommended) and chosen != best_size else
              "the best untuned test size" if chosen == best_size and chosen != int(recommended) else
              "both the recommendation and the best untuned size")
    return {"test_size": chosen, "recommended": int(recommended), "best_untuned": best_size, "reason": reason}


def within_budget(row: Mapping, *, max_size: int | None = None, budget_ms: float | None = None,
                  budget_gflops: float | None = None) -> bool:
    """Whether a size's cost fits every budget given (a budget without a measured cost does not fit)."""
    if max_size is not None and int(row["test_size"]) > max_size:
        return False
    for budget, key in ((budget_ms, "ms"), (budget_gflops, "gflops")):
        if budget is not None and (row.get(key) is None or float(row[key]) > budget):
            return False
    return True


def choose_within_budget(rows: Sequence[Mapping], *, train_size: int | None = None, max_size: int | None = None,
                         budget_ms: float | None = None, budget_gflops: float | None = None) -> dict:
    """The row with the highest ``score`` among those within budget (ties: ``fixres.choosing.best``'s rule).

    ``rows``: one per candidate size with ``test_size``, ``top1`` (the selection score) and the costs ``ms`` (per image)
    and ``gflops``. Raises UsageError naming the cheapest size when nothing fits.
    """
    if not rows:
        raise UsageError("no candidate sizes to choose from")
    ok = [r for r in rows if within_budget(r, max_size=max_size, budget_ms=budget_ms, budget_gflops=budget_gflops)]
    if not ok:
        cheapest = min(rows, key=lambda r: int(r["test_size"]))
        raise UsageError(f"no candidate size fits the budget; the cheapest, {cheapest['test_size']}px, costs "
                         f"{cheapest.get('ms', 'n/a')} ms/image and {cheapest.get('gflops', 'n/a')} GFLOPs")
    return best_row(ok, train_size=train_size)


def within_noise(a: float, b: float, n: int, *, se_factor: float = 2.0) -> bool:
    """Whether two accuracies measured on n images each differ by less than ``se_factor`` standard errors
    of their difference (binomial, as if independent: a coarse rule for the terminal summary; a paired
    test on the same images is the finer one)."""
    return abs(a - b) < se_factor * math.hypot(binomial_se(a, n), binomial_se(b, n))


def cross_select(outcomes: Mapping[int, Sequence[bool | None]], halves: Sequence[int], *, costs: Mapping[int, Mapping],
                 train_size: int | None = None, **budget) -> dict:
    """Two-fold cross-selection: the size chosen on each half (``choose_within_budget`` on that half's top-1),
    and every image scored by the size chosen on the *other* half, so no image reports a choice it made.

    ``outcomes``: {size: per-image correct (None for an image that could not be read)}, images in the order of
    ``halves``; ``costs``: {size: {"ms", "gflops"}} for the budget. Returns the size each half chose, the
    pooled per-image outcomes and their top-1 (percent over the readable images).
    """
    chosen, pooled = {}, [None] * len(halves)
    for h in (0, 1):
        rows = [{"test_size": s, "top1": _top1(o, halves, h), **costs.get(s, {})} for s, o in outcomes.items()]
        chosen[h] = int(choose_within_budget(rows, train_size=train_size, **budget)["test_size"])
    for i, h in enumerate(halves):
        pooled[i] = outcomes[chosen[1 - h]][i]  # half h is reported by the other half's choice
    return {"size_half_a": chosen[0], "size_half_b": chosen[1], "pooled": pooled,
            "n": sum(o is not None for o in pooled), "top1": percent_correct(pooled)}


def _top1(outcome: Sequence[bool | None], halves: Sequence[int], h: int) -> float:
    return percent_correct([o for o, hh in zip(outcome, halves) if hh == h])


def option_name(option: Mapping) -> str:
    return f"{option['test_size']}px {option['kind']}"


def _cost(option: Mapping, key: str) -> float:
    return float(option[key]) if key != "test_size" else float(option["test_size"]) ** 2


def cost_key(options: Sequence[Mapping]) -> str:
    """What "cheaper" compares: GFLOPs where counted, else latency measured on this machine, else the pixel count.

    The candidates are one architecture at several sizes, so GFLOPs order them as their latency does in
    expectation, and exactly: a latency from a few timed calls is noisy (a tiny model has timed faster at 64 px
    than at 32 px), and a choice that follows it would not be the same on a rerun with the same seed."""
    for key in ("gflops", "ms"):
        if options and all(isinstance(o.get(key), (int, float)) for o in options):
            return key
    return "test_size"


def choose_served(options: Sequence[Mapping], *, mode: str = CHOOSE_CHEAPEST, alpha: float = ALPHA,
                  train_size: int | None = None, **budget) -> dict:
    """The candidate to serve among ``options`` (each: ``kind`` FIXED or UNTUNED, ``test_size``, ``top1`` on the
    choosing photos, ``outcomes`` per photo on them (None: unread), costs ``ms`` / ``gflops``).

    CHOOSE_CHEAPEST: the best is the most accurate option within budget; every option whose top-1 is not below
    the best's beyond noise (top-1 at least the best's, or the exact paired test against the best at p >=
    ``alpha``) is "as good"; the cheapest of those is served. Equal costs (the fixed and the untuned model at
    one size) go to the higher top-1, the fine-tuning being already paid for, then to the untuned model.
    CHOOSE_BEST: the most accurate fixed option (the argmax).
    Returns {"option", "best", "as_good" (names), "mode", "alpha", "cost_key", "p_vs_best"}.
    """
    if mode not in CHOOSE_MODES:
        raise UsageError(f"unknown choice rule {mode!r}; choose {' or '.join(CHOOSE_MODES)}")
    ok = [o for o in options if o.get("top1") is not None and within_budget(o, **budget)]
    if mode == CHOOSE_BEST:
        ok = [o for o in ok if o["kind"] == FIXED] or ok
    if not ok:
        choose_within_budget(options, train_size=train_size, **budget)  # raises the budget's one-line error
        raise UsageError("no candidate has a measured top-1 to choose from")
    best = min(ok, key=lambda o: (-float(o["top1"]), o["kind"] != FIXED,
                                  abs(int(o["test_size"]) - int(train_size or o["test_size"])), int(o["test_size"])))
    key = cost_key(ok)
    out = {"best": dict(best), "mode": mode, "alpha": alpha, "cost_key": key, "p_vs_best": None}
    if mode == CHOOSE_BEST:
        return {**out, "option": dict(best), "as_good": [option_name(best)]}
    as_good = []
    for o in ok:
        p = _p_against(o, best)
        if float(o["top1"]) >= float(best["top1"]) or (p is not None and p >= alpha):
            as_good.append((o, p))
    pick, p = min(as_good, key=lambda op: (_cost(op[0], key), -float(op[0]["top1"]), op[0]["kind"] != UNTUNED))
    return {**out, "option": dict(pick), "as_good": [option_name(o) for o, _ in as_good], "p_vs_best": p}


def _p_against(option: Mapping, best: Mapping) -> float | None:
    """The exact paired test of an option against the best on the photos both read (None without outcomes)."""
    a, b = option.get("outcomes"), best.get("outcomes")
    if option is best:
        return 1.0
    if a is None or b is None or len(a) != len(b):
        return None
    return paired_on_read(a, b)["p"]


def served_sentence(choice: Mapping) -> str:
    """One line on what is served and why: the cheapest candidate not worse than the best beyond noise."""
    o, best = choice["option"], choice["best"]
    unit = {"ms": "ms/image", "gflops": "GFLOPs", "test_size": "pixels"}[choice["cost_key"]]
    if choice["mode"] == CHOOSE_BEST:
        return f"serve {option_name(o)}: the most accurate fixed candidate on the choosing photos (--choose best)"
    if o["kind"] == UNTUNED and option_name(o) != option_name(best):
        return (f"nothing beats {o['test_size']} px untuned beyond noise (best: {option_name(best)}, "
                f"{float(best['top1']) - float(o['top1']):+.1f} points, paired p {_p(choice['p_vs_best'])} >= "
                f"{choice['alpha']:g}): serve it as trained, the cheapest such candidate by {unit}")
    if option_name(o) == option_name(best):
        return (f"serve {option_name(o)}: the most accurate candidate and the cheapest ({unit}) of the "
                f"{len(choice['as_good'])} not worse than it beyond noise (paired p >= {choice['alpha']:g})")
    return (f"serve {option_name(o)}: the cheapest candidate by {unit} not worse than the best ({option_name(best)}, "
            f"{float(best['top1']) - float(o['top1']):+.1f} points, paired p {_p(choice['p_vs_best'])} >= "
            f"{choice['alpha']:g})")


def _p(p) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def cross_select_served(options: Sequence[Mapping], halves: Sequence[int], *, mode: str = CHOOSE_CHEAPEST,
                        train_size: int | None = None, **budget) -> dict:
    """Two-fold cross-selection of ``choose_served``: each half chooses on its own photos, every photo is scored
    by the candidate the *other* half chose. ``options`` carry per-photo ``outcomes`` over all the photos, in
    the order of ``halves``. Returns the option each half chose (names), the pooled outcomes and top-1."""
    chosen, pooled = {}, [None] * len(halves)
    for h in (0, 1):
        mine = [{**o, "outcomes": [x for x, hh in zip(o["outcomes"], halves) if hh == h],
                 "top1": _top1(o["outcomes"], halves, h)} for o in options]
        chosen[h] = choose_served(mine, mode=mode, train_size=train_size, **budget)["option"]
    by_name = {option_name(o): o for o in options}
    for i, h in enumerate(halves):
        pooled[i] = by_name[option_name(chosen[1 - h])]["outcomes"][i]
    return {"half_a": option_name(chosen[0]), "half_b": option_name(chosen[1]),
            "size_half_a": int(chosen[0]["test_size"]), "size_half_b": int(chosen[1]["test_size"]),
            "pooled": pooled, "n": sum(o is not None for o in pooled), "top1": percent_correct(pooled)}


def served_options(sel: dict, fixed_score, untuned_score, *, need_outcomes: bool = False) -> list[dict]:
    """The candidates of the choice: every size fixed and the model as trained at every size, with costs, top-1
    and per-photo outcomes. ``fixed_score(row)`` / ``untuned_score(row)`` give a candidate row's score ({top1,
    outcomes}); with ``need_outcomes`` a score without per-photo outcomes is left out (cross-selection needs
    them), else its top-1 stands alone (a result cached before outcomes were kept)."""
    options = []
    for r in sel["candidates"]:
        cost = {"test_size": int(r["test_size"]), "ms": r.get("ms"), "gflops": r.get("gflops")}
        for kind, score in ((FIXED, fixed_score(r)), (UNTUNED, untuned_score(r))):
            bits = (score or {}).get("outcomes")
            if bits:
                outcomes = read_bits(bits)
                options.append({**cost, "kind": kind, "outcomes": outcomes, "top1": percent_correct(outcomes)})
            elif not need_outcomes and score and score.get("top1") is not None:
                options.append({**cost, "kind": kind, "outcomes": None, "top1": score["top1"]})
    return options
