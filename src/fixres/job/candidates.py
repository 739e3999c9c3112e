"""Choosing after fixing: the model fixed at every candidate test size, scored where it is not reported.

Paper table 5 (right): after the fix the best test size is not the best untuned one (ResNet-50 at
224: 384 after the fix beats 288), and the fix pays most far from the train size. So each candidate
size gets its own fix (fine-tuning from the same model before the fix, with the frozen-prefix
cache: one prefix pass per size), is scored on the held-out training images (the choice) and on
the validation images (the report: before and after, the model's own table-5 column), and its
deployment cost is measured on the device at hand (ms per image at batch 1 and batch N, GFLOPs).
Only the adapted tensors of each candidate are kept (``adapted.safetensors``): a candidate is
restored by loading them over the model before the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from fixres.choosing.budget import estimate_seconds, fit_in_budget
from fixres.choosing.outcomes import outcome_bits, paired_on_read, percent_correct, read_bits
from fixres.choosing.photos import CHOOSING_RULES, HOLDOUT_METHOD, RULE_CROSS, stratified_halves
from fixres.choosing.serving import (
    FIXED,
    UNTUNED,
    choose_served,
    choose_within_budget,
    cross_select_served,
    option_name,
    served_options,
    served_sentence,
)
from fixres.choosing.significance import binomial_se, paired_test
from fixres.io.atomic import write_json
from fixres.io.checkpoint import load_state_dict, save_safetensors
from fixres.io.evaluation import EvalResult, ViewScore
from fixres.io.results import read_document
from fixres.io.schema import dump, parse, parse_or_none
from fixres.io.served import Choice, CrossSelection, PairedOnVal, SeenCheck
from fixres.job.context import HOLDOUT, SEEN, VAL, FixContext
from fixres.method.adaptation import adapt
from fixres.method.calibration import temperature_scale_model
from fixres.method.evaluate import evaluate, fold_std
from fixres.method.finetuning import STATE_NAME as FT_STATE
from fixres.method.finetuning import default_lr, finetune
from fixres.models.onnxrt import ONNXRUNTIME, costs_on
from fixres.runtime.progress import format_duration

#: The select step's working folder: one subfolder per candidate size.
CANDIDATES_DIR = "candidates"
ADAPTED_NAME = "adapted.safetensors"
RESULT_NAME = "candidate.json"
#: A candidate's fine-tuning record, beside its adapted tensors.
FINETUNE_RECORD = "finetune_result.json"
#: Fine-tuning schedules tried on the held-out images: the rate and the epochs times these.
SCHEDULE_LR_FACTORS = (1.0, 10.0)
SCHEDULE_EPOCH_FACTORS = (1, 3)
#: Label-free adaptation (``fixres fix --label-free``): batch-norm statistics re-estimated at the new size.
LABEL_FREE_METHOD = "bn-recalibrate"


def adapted_keys(state: dict, modules: Sequence[str]) -> list[str]:
    """State-dict keys of the adapted modules (their parameters and batch-norm buffers)."""
    prefixes = tuple(f"{m}." for m in modules)
    return [k for k in state if k.startswith(prefixes)]


def save_adapted(model: nn.Module, modules: Sequence[str], path: Path) -> None:
    state = model.state_dict()
    save_safetensors({k: state[k].detach().cpu().contiguous() for k in adapted_keys(state, modules)}, path)


def load_adapted(model: nn.Module, path: Path) -> None:
    """Load a candidate's adapted tensors over the model (which holds the weights before the fix)."""
    own = model.state_dict()
    for k, v in load_state_dict(path).items():
        own[k].copy_(v)


def _public(result: dict) -> dict:
    """A library result without its private (non-JSON) keys."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


# --------------------------------------------------------------------------- the steps of ``fixres fix`` that choose
# the size after fixing (run by fixres.job.pipeline's table of steps, on its context)

def _finetune_at(x: "FixContext", model, size: int, *, lr: float | None, epochs: int, out_dir: Path) -> dict:
    """Fine-tune ``model`` (the working copy) at ``size`` on the fitting images, resuming a killed attempt."""
    c = x.config
    return finetune(model, x.fit, [], x.data_config, test_size=size, parts=c.parts, augment=c.augment, epochs=epochs,
                    lr=lr, batch_size=c.batch_size, cache=True, out_dir=out_dir,
                    resume=(out_dir / FT_STATE).is_file(), env=x.env, precision=x.precision, seed=c.seed,
                    workers=c.workers, progress=c.progress, evaluate_before=False,
                    evaluate_after=False, shared=x.fit_caches())  # scored below, on the images each score is for


def _score(x: "FixContext", model, name: str, samples, size: int, *, outcomes: bool = False,
           full: bool = False) -> dict:
    """top-1, its fold std, NLL and ECE of ``model`` at ``size`` (inference precision) on the photos ``name``;
    with ``outcomes`` also every image's outcome (``outcome_bits``), for cross-selection and paired tests. Run
    from the activations at the cut where the model before the fix recorded them on these photos at this size."""
    kw = {**x.eval_kw(), "progress": False}
    res = x.cut_cache().score(model, name, samples, x.data_config, size, keep_outcomes=outcomes, **kw)
    if res is None:
        res = evaluate(model, samples, x.data_config, test_sizes=[size], per_class=False, keep_outcomes=outcomes,
                       **kw)
    row = res.rows[0]
    score = score_fields(row)
    if outcomes:
        score["outcomes"] = outcomes_of(res, len(getattr(samples, "samples", samples)))[str(size)]
    if full:  # the whole row and its reliability bins: the sweep after the fix reads them instead of re-running
        score["row"] = dump(row)
        score["reliability"] = dump(res.reliability_at(size))
    return score


#: What a candidate's score on a set of photos keeps of an evaluation row.
SCORE_FIELDS = ("top1", "top1_std", "nll", "ece", "n")


def score_fields(row: ViewScore | None) -> dict:
    """A row's score (``SCORE_FIELDS``; all None without a row)."""
    return {k: None if row is None else getattr(row, k) for k in SCORE_FIELDS}


def outcomes_of(result: EvalResult, n: int) -> dict[str, str]:
    """{test size: per-image outcomes over the ``n`` evaluated images} of an ``evaluate(keep_outcomes=True)``
    result."""
    return {str(r.test_size): outcome_bits(result.hits_at(r), result.arrays.idx, n) for r in result.rows}


def run_schedule(x: "FixContext") -> dict:
    """The fine-tuning rate and length chosen on the held-out images from a small grid (cached)."""
    c = x.config
    size = schedule_size(x)
    lr0 = c.lr or default_lr(c.batch_size)
    rows = []
    for lr_f in SCHEDULE_LR_FACTORS:
        for ep_f in SCHEDULE_EPOCH_FACTORS:
            lr, epochs = lr0 * lr_f, c.finetune_epochs * ep_f
            model = x.work(holds=f"schedule {lr} {epochs}")
            if not rows:  # the held-out photos' activations at the cut, recorded once for the whole grid
                _before_on(x, HOLDOUT, x.holdout, [size])
            _finetune_at(x, model, size, lr=lr, epochs=epochs, out_dir=x.run_dir / "schedule" / f"lr{lr:g}_ep{epochs}")
            rows.append({"lr": lr, "epochs": epochs, "test_size": size, **_score(x, model, HOLDOUT, x.holdout, size)})
    # Most accurate on the held-out images; ties (common on few images) to the lower NLL, then the shorter run.
    best = max(rows, key=lambda r: (r["top1"], -(r["nll"] if r["nll"] is not None else 0.0), -r["epochs"]))
    return {
        "test_size": size, "rows": rows, "n_images": len(x.holdout), "lr": best["lr"], "epochs": best["epochs"],
        "how": f"best of {len(rows)} (lr, epochs) pairs on {len(x.holdout)} {x.chooser_words} at {size}px "
               "(top-1, ties to the lower NLL)"}


def schedule_size(x: "FixContext") -> int:
    """The size the schedule grid runs at: the candidate nearest the unrounded recommendation (upper on ties),
    other than the train size when there is another: at T a fine-tuning schedule is judged on a model that
    has nothing to adapt to, and the gentlest one always wins."""
    exact = recommended_exact(x)
    away = [s for s in x.candidates if s != x.data_config.train_size] or list(x.candidates)
    return min(away, key=lambda s: (abs(s - exact), -s))


def recommended_exact(x: "FixContext") -> float:
    return x.results.analyze.recommended_exact


def run_select(x: "FixContext") -> dict:
    """Fix at every candidate size, score on the held-out training images and on val, measure cost."""
    sizes, dropped, estimate = _planned_candidates(x)
    before = x.results.sweep_before
    held_before = _before_on(x, HOLDOUT, x.holdout, sizes, outcomes=True)
    t = int(x.data_config.train_size)  # the training photos' score before the fix is only shown at T
    seen_before = _before_on(x, SEEN, x.seen, sizes)  # every size: each candidate is scored from it
    seen_at_t = seen_before.get(t) if t in sizes else None
    # The cost of a size does not depend on the fix: every size timed together, interleaved, on the model before it.
    if x.config.latency_on == ONNXRUNTIME:
        x.say(f"  timing {len(sizes)} sizes in ONNX Runtime (one ONNX export per size)")
    costs = costs_on(x.base(), sizes, runtime=x.config.latency_on, device=x.env.device, precision=x.eval_precision)
    rows = []
    for size in sizes:
        row = _fix_candidate(x, size)
        cost = costs[size]
        rows.append({"test_size": size, **cost, "holdout_before": held_before.get(size), **row,
                     "val_before": score_fields(before.at(size))})
    x.say("  " + x.cut_cache().describe())
    return {
        "method": x.rule if (x.holdout or len(sizes) > 1) else "recommendation", "rule": x.rule,
        "rule_text": CHOOSING_RULES.get(x.rule), "n_holdout": len(x.holdout), "n_seen": len(x.seen),
        "seen_before_at_train_size": seen_at_t,
        "n_val": x.results.sweep_before.n_images, "candidates": rows, "dropped": dropped,
        "estimate_s": estimate, "budget_min": x.config.select_budget_min, "schedule": x.schedule.to_json(),
        "recommended": x.results.analyze.recommended_test_size, "recommended_exact": recommended_exact(x),
        "scored_from_cut": x.cut_cache().summary()}


def _before_on(x: "FixContext", name: str, samples, sizes: Sequence[int], *, outcomes: bool = False) -> dict:
    """The model before the fix on the photos ``name`` at every size (one pass, recording the activations at the
    cut), {size: score}; with ``outcomes`` also every photo's outcome (the untuned candidates of the choice are
    compared in pairs on them)."""
    if not samples:
        return {}
    res = x.cut_cache().evaluate(x.base(), name, samples, x.data_config, test_sizes=list(sizes), per_class=False,
                                 keep_outcomes=outcomes, **{**x.eval_kw(), "progress": False})
    bits = outcomes_of(res, len(samples)) if outcomes else {}
    return {r.test_size: {**score_fields(r), **({"outcomes": bits[str(r.test_size)]} if outcomes else {})}
            for r in res.rows}


def candidate_folder(x: "FixContext", size: int) -> Path:
    """Where the select step keeps the candidate fixed at ``size``: its adapted tensors, its records."""
    return x.run_dir / CANDIDATES_DIR / str(size)


def load_candidate(x: "FixContext", model, size: int) -> None:
    """The candidate fixed at ``size`` over ``model`` (which holds the weights before the fix)."""
    load_adapted(model, candidate_folder(x, size) / ADAPTED_NAME)


def restore_candidate(x: "FixContext", model, size: int) -> dict:
    """The candidate fixed at ``size`` restored over ``model`` from the select step's folder; returns its
    fine-tuning record."""
    load_candidate(x, model, size)
    return read_document(candidate_folder(x, size) / FINETUNE_RECORD)


def _fix_candidate(x: "FixContext", size: int) -> dict:
    """One candidate: fine-tuned from the model before the fix, its adapted tensors kept, scored (cached)."""
    folder = candidate_folder(x, size)
    if (folder / RESULT_NAME).is_file():  # finished before a kill, with the same inputs (else wiped): resumed
        return read_document(folder / RESULT_NAME)
    model = x.work(holds=f"candidate {size}")
    ft = _finetune_at(x, model, size, lr=x.schedule.lr, epochs=x.schedule.epochs, out_dir=folder)
    save_adapted(model, list(ft["trainable"]) + list(ft.get("stats_modules") or ()), folder / ADAPTED_NAME)
    row = {"holdout_after": _score(x, model, HOLDOUT, x.holdout, size, outcomes=True) if x.holdout else None,
           "seen_after": _score(x, model, SEEN, x.seen, size) if x.seen else None,
           "val_after": _score(x, model, VAL, x.val_index, size, outcomes=True, full=True),
           "finetune_s": (ft.get("timing") or {}).get("wall_s")}
    write_json(folder / RESULT_NAME, row)
    write_json(folder / FINETUNE_RECORD, _public(ft))
    return row


def _planned_candidates(x: "FixContext") -> tuple[list[int], list[int], dict]:
    """The candidates whose estimated time fits the budget (printed up front), the dropped ones, the estimate."""
    sweep = x.results.sweep_before
    area = sweep.n_images * sum(s * s for s in x.test_sizes) or 1
    per_pixel = sweep.seconds / area  # seconds per image-pixel of a forward
    # where the model before the fix recorded val at the cut, every score replays the modules after it only
    n_scored = len(x.holdout) + (0 if x.cut_cache().cut is not None else sweep.n_images)
    cached, held = x.config.augment == "test", x.fit_caches().sizes()  # held: no prefix pass over the fitting photos
    est = {s: estimate_seconds(s, seconds_per_pixel=per_pixel, n_fit=len(x.fit), n_scored=n_scored,
                               epochs=x.schedule.epochs, cached=cached, cached_share=x.cached_share)
           - (estimate_seconds(s, seconds_per_pixel=per_pixel, n_fit=len(x.fit), n_scored=0, epochs=0, cached=True)
              if cached and s in held else 0.0)
           for s in x.candidates}
    budget = None if x.config.select_budget_min is None else 60.0 * x.config.select_budget_min
    keep = sorted({schedule_size(x), x.data_config.train_size})
    sizes = fit_in_budget(x.candidates, est, budget, keep=keep)
    dropped = [s for s in x.candidates if s not in sizes]
    total = sum(est[s] for s in sizes)
    x.say(f"  {len(sizes)} candidate sizes {','.join(map(str, sizes))}px, about {_dur(total)} (estimated from the "
          f"sweep's speed)" + (f"; budget {x.config.select_budget_min:g} min" if budget else "")
          + (f"; dropped {','.join(map(str, dropped))}px to fit it" if dropped else ""))
    return sizes, dropped, {str(s): round(est[s], 1) for s in x.candidates}


def _dur(seconds: float) -> str:
    return format_duration(seconds)


def _val_options(x: "FixContext", sel: dict) -> list[dict]:
    """The candidates with their outcomes on every validation photo: fixed from the select step, untuned from
    the sweep before the fix."""
    before = x.results.sweep_before.outcomes
    return served_options(sel, lambda r: r.get("val_after"), lambda r: {"outcomes": before.get(str(r["test_size"]))},
                          need_outcomes=True)


def choose_after_fixing(x: "FixContext", sel: dict) -> Choice:
    """What is served: among every candidate size fixed and the model as trained at every size, the cheapest
    not worse than the best beyond noise on the photos of the selection rule (``choose_served``;
    ``--choose best``: the most accurate fixed one), within the deployment budget. Under cross-selection the
    choice on all validation photos is exported and the headline is the pooled cross-selected result."""
    c = x.config
    rule = sel.get("rule") or x.rule
    n = sel["n_holdout"]
    budget = dict(max_size=c.max_test_size, budget_ms=c.budget_ms, budget_gflops=c.budget_gflops)
    val_options = _val_options(x, sel)
    options = served_options(sel, lambda r: r.get("holdout_after"), lambda r: r.get("holdout_before")) if n \
        else val_options
    if c.test_size:  # a size given is fixed at that size: nothing else to choose
        options = [o for o in options if o["kind"] == FIXED]
    served = choose_served(options, mode=c.choose, train_size=x.data_config.train_size, **budget)
    size, kind = int(served["option"]["test_size"]), served["option"]["kind"]
    rows = [{**r, "top1": (r["holdout_after"] or r["val_after"])["top1"]} for r in sel["candidates"]]
    budgets = [f"{name} {v:g}" for name, v in (("max size", c.max_test_size), ("ms/image", c.budget_ms),
                                                 ("GFLOPs", c.budget_gflops)) if v is not None]
    cross = None
    if c.test_size:
        how = "given (--test-size)"
    elif n:
        how = (f"chosen on {n} {x.chooser_words} (not the validation images reported), among {len(options)} "
               f"candidates: {len(rows)} sizes, each fixed at its own size and untuned")
    elif rule == RULE_CROSS and len(options) > 1:
        cross = _cross_choice(x, val_options, budget)
        how = (f"two-fold cross-selection on the validation photos (the model was trained elsewhere: its training "
               f"photos are not unseen): half A chose {cross['half_a']}, half B {cross['half_b']}; exported: "
               f"{size}px {kind}, the choice on all validation photos, among {len(options)} candidates")
    else:
        how = "the only candidate (no training images to hold out)"
    how += f", within the budget ({', '.join(budgets)})" if budgets else ""
    fixed = [o for o in options if o["kind"] == FIXED]
    best_fixed = min(fixed, key=lambda o: (-float(o["top1"]), int(o["test_size"]))) if fixed else None
    return Choice(test_size=size, kind=kind, choose=c.choose, served=served_sentence(served),
                  best_fixed_size=int(best_fixed["test_size"]) if best_fixed else None,
                  best=option_name(served["best"]), as_good=tuple(served["as_good"]), p_vs_best=served["p_vs_best"],
                  cost_key=served["cost_key"], alpha=served["alpha"], method=sel["method"], rule=rule,
                  rule_text=CHOOSING_RULES.get(rule), reason="selected after fixing" if (n or cross) else how,
                  chosen_on=how, recommended=sel["recommended"], n_images=n or (sel["n_val"] if cross else 0),
                  why_not_recommended=_why_not_recommended(size, sel, rows, f"the {n} {x.chooser_words}" if n else
                                                           "all validation photos"),
                  cross=None if cross is None else parse(CrossSelection, cross),
                  paired_val=None if cross else parse_or_none(PairedOnVal, _paired_on_val(x, val_options, size, kind)),
                  seen_check=parse_or_none(SeenCheck, _seen_check(x, sel, rows, budget)))


def _paired_on_val(x: "FixContext", val_options: list[dict], size: int, kind: str) -> dict | None:
    """The served model against the untuned one at the same size and at the train size, photo by photo on the
    validation photos (which did not choose under this rule): exact paired tests, not two error bars."""
    options = {(o["kind"], int(o["test_size"])): o["outcomes"] for o in val_options}
    served = options.get((kind, size))
    if served is None:
        return None
    out = {}
    for name, key in (("untuned", (UNTUNED, size)), ("train_size", (UNTUNED, int(x.data_config.train_size)))):
        other = options.get(key)
        if other is None or key == (kind, size):
            continue
        test = paired_on_read(served, other)
        out[f"{name}_top1"] = test.pop("b_top1")
        out[f"paired_vs_{name}"] = test
    return out


def _cross_choice(x: "FixContext", val_options: list[dict], budget: dict) -> dict:
    """Each half of val reported by the candidate chosen on the other half (the same rule as the export's);
    pooled top-1 (binomial SE, fold std) and paired tests against the untuned model at the same sizes and at
    the train size, on the same photos."""
    labels = [int(y) for _, y in x.val_index.samples]
    halves = stratified_halves(labels, seed=x.config.seed)
    res = cross_select_served(val_options, halves, mode=x.config.choose,
                                      train_size=x.data_config.train_size, **budget)
    before = {int(k): read_bits(v) for k, v in x.results.sweep_before.outcomes.items()}
    chosen = {0: res["size_half_a"], 1: res["size_half_b"]}
    untuned = [before[chosen[1 - h]][i] if chosen[1 - h] in before else None for i, h in enumerate(halves)]
    at_t = before.get(int(x.data_config.train_size))
    known = [i for i, o in enumerate(res["pooled"]) if o is not None]
    fixed = [bool(res["pooled"][i]) for i in known]
    out = {"half_a": res["half_a"], "half_b": res["half_b"], "size_half_a": chosen[0], "size_half_b": chosen[1],
           "n": res["n"], "top1": res["top1"], "top1_se": binomial_se(res["top1"], res["n"]),
           "top1_std": fold_std(np.array(fixed, dtype=bool)) if fixed else None,
           "n_half_a": halves.count(0), "n_half_b": halves.count(1)}
    if all(untuned[i] is not None for i in known):
        u = [bool(untuned[i]) for i in known]
        out["untuned_top1"] = percent_correct(u)
        out["paired_vs_untuned"] = paired_test(fixed, u)
    if at_t is not None and all(at_t[i] is not None for i in known):
        t = [bool(at_t[i]) for i in known]
        out["train_size_top1"] = percent_correct(t)
        out["paired_vs_train_size"] = paired_test(fixed, t)
    return out


def _seen_check(x: "FixContext", sel: dict, rows: list[dict], budget: dict) -> dict | None:
    """Under cross-selection: what choosing on training photos (the model's own, possibly memorised) would
    have shown and chosen, beside the validation figures, so the difference between the rules is visible."""
    seen = [r for r in sel["candidates"] if r.get("seen_after")]
    if not seen:
        return None
    t = int(x.data_config.train_size)
    at_t = next((r for r in sel["candidates"] if int(r["test_size"]) == t), None)
    pick = choose_within_budget([{**r, "top1": r["seen_after"]["top1"]} for r in seen],
                                        train_size=t, **budget)
    return {"n": sel.get("n_seen"), "size_chosen_on_seen": int(pick["test_size"]),
            "seen_top1_at_train_size": (sel.get("seen_before_at_train_size") or {}).get("top1"),
            "val_top1_at_train_size": ((at_t or {}).get("val_before") or {}).get("top1")}


def _why_not_recommended(size: int, sel: dict, rows: list[dict], where: str) -> str | None:
    """One sentence when the chosen size differs from the analysis' recommendation."""
    rec = int(sel["recommended"])
    if size == rec:
        return None
    at = {int(r["test_size"]): r["top1"] for r in rows}
    fixed_here = f"{at[size]:.1f}%" if size in at else "n/a"
    fixed_rec = f"{at[rec]:.1f}%" if rec in at else "not measured"
    return (f"The analysis recommends {rec}px from the apparent object sizes alone (exact "
            f"{sel['recommended_exact']:.1f}px, rounded to the stride); after fixing, {size}px scored {fixed_here} on "
            f"{where} against {fixed_rec} at {rec}px: the fix also changes how the classifier reads the "
            "larger (or smaller) activations, which the geometry alone does not predict.")


def label_free_adapt(x: "FixContext", model, test_size: int) -> dict:
    """No label read: batch-norm statistics re-estimated at ``test_size`` on the training images."""
    unlabeled = [(p, 0) for p, _ in x.train_index.samples]  # labels are never read; zeroed to make it plain
    res = adapt(model, unlabeled, x.data_config, method=LABEL_FREE_METHOD, test_size=test_size,
                batch_size=x.config.batch_size, env=x.env, precision=x.precision, workers=x.config.workers,
                progress=x.config.progress)
    res.pop("_pooled", None)
    return {"method": LABEL_FREE_METHOD, "test_size": test_size, "parts": ["bn-stats"], "adapt": _public(res),
            "n_unlabeled": len(unlabeled)}


def temperature_scale(x: "FixContext", model, test_size: int) -> dict:
    """Fit T on the choosing photos' logits, then divide the classifier by T (same top-1, calibrated softmax)."""
    t = temperature_scale_model(model, x.holdout, x.data_config, test_size, batch_size=x.config.batch_size,
                                workers=x.config.workers, device=x.env.device)
    return {"T": t, "fitted_on": f"{len(x.holdout)} {HOLDOUT_METHOD}", "test_size": test_size}


