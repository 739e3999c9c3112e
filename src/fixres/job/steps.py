"""The steps of ``fixres fix`` that are not the candidate fixes: data, train, analyze, sweeps, finetune, stats, report.

Each ``run_*`` reads the run's context and returns its result, which the pipeline (``fixres.job.pipeline``)
writes as ``RUN_DIR/<step>.json``; the candidate fixes and the fine-tuning schedule are ``fixres.job.candidates``.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, replace

import numpy as np
import torch

from fixres.choosing.photos import CHOOSING_RULES, RULE_CROSS
from fixres.choosing.serving import FIXED, UNTUNED
from fixres.config import EMBEDDED_TRAIN_LR
from fixres.data.folders import count_image_sizes
from fixres.data.synth import make_dataset
from fixres.io.atomic import plain_json, write_json
from fixres.io.documents import ReportInfo, RunDocuments
from fixres.io.evaluation import EvalResult
from fixres.io.results import Headline, Sweep
from fixres.job import candidates
from fixres.job.context import STATS_IMAGES, VAL, FixContext, stats_sizes_of, strip_private
from fixres.job.headline import headline_of
from fixres.method import analysis
from fixres.method import stats as fstats
from fixres.method.evaluate import evaluate
from fixres.method.robustness import corruption_table
from fixres.method.train import STATE_NAME as TRAIN_STATE
from fixres.method.train import train
from fixres.models.card import CardFacts
from fixres.models.export import export_model
from fixres.models.structure import find_parts
from fixres.report.page import AFTER_EACH_FIXED, AFTER_EXPORTED, write_report

#: Photo sizes read from the data set for the Monte-Carlo analysis and the figure-2 histogram.
MAX_PHOTO_SIZES = 2000


#: Monte-Carlo samples of the apparent-size analysis.
ANALYSIS_SAMPLES = 50_000


def run_data(x: FixContext) -> dict:
    c = x.config
    if c.embedded:
        made = make_dataset(x.run_dir / "data", classes=c.classes, train_per_class=c.train_per_class,
                            val_per_class=c.val_per_class, seed=c.seed, progress=c.progress,
                            overwrite=True)  # this step runs only when the data's settings changed
        info = {"root": str(made["root"]), "embedded": True, "manifest": strip_private(made, ("config",)),
                "synth_config": made.get("config")}
    else:
        info = {"root": str(c.data), "embedded": False}
    return info


def run_train(x: FixContext) -> dict:
    c = x.config
    lr = c.train_lr or (EMBEDDED_TRAIN_LR if not (c.model or c.has_weights) else None)
    train_dir = x.run_dir / "train"
    # Trained on the fitting part only: the held-out images stay unseen for choosing the test size.
    # No validation inside training: the sweep right after measures every size on all images.
    result = train(x.bundle.model, x.fit, [], x.data_config, train_size=x.data_config.train_size, epochs=c.train_epochs,
                   batch_size=c.train_batch_size, lr=lr, out_dir=train_dir, resume=(train_dir / TRAIN_STATE).is_file(),
                   repeats=c.train_repeats, augment=c.train_augment, schedule="cosine", warmup_epochs=1,
                   env=x.env, precision=x.precision, seed=c.seed, workers=c.workers, progress=c.progress,
                   model_name=x.bundle.name)
    result["batch_size"] = c.train_batch_size
    return strip_private(result)


def run_analyze(x: FixContext) -> dict:
    cfg = x.data_config
    sizes = count_image_sizes(x.val_index, limit=MAX_PHOTO_SIZES)
    an = analysis.analyze(train_size=cfg.train_size, crop_ratio=cfg.crop_ratio, stride=cfg.stride,
                          image_sizes=sizes or None, samples=ANALYSIS_SAMPLES, seed=x.config.seed,
                          train_augment=x.config.train_augment)
    an.pop("_mc", None)
    an["recommended_test_size"] = (an.get("monte_carlo") or {}).get("recommended_test_size",
                                                                     an["recommended_test_size"])
    an["recommended_test_size_closed_form"] = analysis.recommend_test_size(
        train_size=cfg.train_size, crop_ratio=cfg.crop_ratio, stride=cfg.stride,
        train_augment=x.config.train_augment)["test_size"]
    an["image_sizes"] = [list(s) for s in sorted({tuple(s) for s in sizes})[:500]]
    return an


def run_sweep_before(x: FixContext) -> dict:
    sweep = x.cut_cache().evaluate(x.base(), VAL, x.val_index, x.data_config, test_sizes=x.test_sizes,
                                   keep_outcomes=True, **x.eval_kw())
    return {**sweep.to_json(), "outcomes": candidates.outcomes_of(sweep, len(x.val_index.samples))}


def run_finetune(x: FixContext) -> dict:
    """The chosen candidate (or, label-free, batch-norm recalibration at the recommended size), exported; when
    the choice is the model as trained at a size, that model is exported unchanged."""
    test_size = x.choice.test_size
    model = x.work(holds="export")
    if x.config.label_free:
        ft = candidates.label_free_adapt(x, model, test_size)
    else:
        if x.choice.untuned:
            ft = {"test_size": test_size, "served": UNTUNED, "parts": [], "epochs": 0, "trainable": [],
                  "note": "served as trained: no candidate fixed beat it beyond noise, so nothing was fine-tuned"}
        else:
            ft = candidates.restore_candidate(x, model, test_size)
        if x.config.temperature_scale and x.holdout:
            ft["temperature"] = candidates.temperature_scale(x, model, test_size)
        elif x.config.temperature_scale:
            x.say("  temperature scaling skipped: it is fitted on photos that choose, and this rule has none "
                  "(give --select-data, or --holdout-untouched)")
    path = export_model(model, x.run_dir / "export", model_name=x.bundle.name, cfg=x.data_config, test_size=test_size,
                        train_size=x.data_config.train_size, class_names=list(x.train_index.classes),
                        card=CardFacts(command=x.config.command, license=x.config.license))
    x.results.export = {"path": str(path), "test_size": test_size, "train_size": x.data_config.train_size}
    write_json(x.run_dir / "export.json", x.results.export)
    return {**ft, "choice": x.choice.to_json(), "export_path": str(path)}


def run_sweep_after(x: FixContext) -> dict:
    test_size = x.choice.test_size
    fixed = x.fixed()
    sweep = _after_from_candidates(x)
    if sweep is None:
        sweep = {**evaluate(fixed, x.val_index, x.data_config, test_sizes=x.test_sizes, **x.eval_kw()).to_json(),
                 "after": AFTER_EXPORTED}
    sweep = plain_json(sweep)
    # Export again, now with the accuracy of what is served in the metadata: the headline's unbiased estimate.
    # The headline is computed here, once: the served accuracy goes into the export's metadata now, and the
    # report adds the run's timings to the same object.
    head = headline_of({**x.results.documents(), "sweep_after": sweep, "run": run_info(x, torch.get_num_threads())})
    x.results.headline = head
    accuracy = served_accuracy(x, head, Sweep.from_json(sweep))
    export_model(fixed, x.run_dir / "export", model_name=x.bundle.name, cfg=x.data_config, test_size=test_size,
                 train_size=x.data_config.train_size, class_names=list(x.train_index.classes), accuracy=accuracy,
                 extra={"top1": accuracy["top1"], "top1_rule": accuracy["top1_rule"]},
                 card=CardFacts(data=str(x.val_index.root), command=x.config.command, license=x.config.license))
    return sweep


#: The size was not chosen on any labelled photos (given, or the analysis' recommendation): val is unbiased.
UNCHOSEN_TEXT = "the size was not chosen on labelled photos, so every validation photo reports it without bias"


def served_accuracy(x: FixContext, head: Headline, sweep_after: Sweep) -> dict:
    """The served model's accuracy for ``fixres.json``, from the headline: ``top1`` is unbiased (validation photos
    that did not choose: the held-out rule's; under cross-selection the pooled estimate), ``top1_rule`` names how;
    the figure on all validation photos at a size chosen on them is kept only as ``top1_all_val_optimistic``."""
    choice = x.choice
    row = (x.results.sweep_before if choice.untuned else sweep_after).at(choice.test_size)
    served = {"top1": head.top1_served, "top1_se": head.top1_served_se, "test_size": choice.test_size}
    if choice.cross:
        return {**served, "n": choice.cross.n, "top1_rule": RULE_CROSS,
                "top1_rule_text": CHOOSING_RULES[RULE_CROSS], "top1_all_val_optimistic": row.top1,
                "served": choice.kind}
    rule = "given" if x.config.test_size else "label-free" if x.config.label_free else choice.rule or x.rule
    return {**served, "top1_std": row.top1_std, "n": row.n, "top1_rule": rule,
            "top1_rule_text": CHOOSING_RULES.get(rule, UNCHOSEN_TEXT), "served": choice.kind or FIXED}


def _after_from_candidates(x: FixContext) -> dict | None:
    """The curve after the fix without a forward: when every swept size is a candidate, each was fixed at its
    own size and scored on val by the select step (the candidate at S *is* the exported model), so the
    sweep's rows are theirs. None when a size is missing (then the exported model is evaluated)."""
    selected = x.results.select
    if x.config.label_free or selected is None or selected.document is None:
        return None
    scored = {c.test_size: c.val_after for c in selected.table.candidates}
    if not all(s in scored and scored[s].row is not None for s in x.test_sizes):
        return None
    rows = [scored[s].row for s in x.test_sizes]
    before = x.results.sweep_before
    after = EvalResult(rows=tuple(rows), n_images=before.n_images, n_samples=before.n_samples,
                       skipped=before.skipped, folds=before.folds, precision=before.precision,
                       reliability={r.label: scored[r.test_size].reliability for r in rows
                                    if scored[r.test_size].reliability is not None})
    return {**after.to_json(), "after": AFTER_EACH_FIXED}


def run_stats(x: FixContext) -> dict:
    """Figures 3-4; KS distance at each size to the pooled values of the model *before* the fix at T (the
    distribution its classifier was trained on), for the model before and after the fix."""
    sizes = stats_sizes_of(x)
    stats: dict = {"sizes": sizes, "ks_reference": f"the model before the fix at {x.data_config.train_size}px"}
    grid = reference = None
    for label, model in (("before", x.base()), ("after", x.fixed())):
        replayed = _pooled_from_cut(x, model, sizes, reference)
        raw = _activation_stats(model, x.val_index.samples, x.data_config, sizes, env=x.env, precision=x.precision,
                                batch_size=x.config.batch_size, workers=x.config.workers, grid=grid,
                                reference=reference, pooled=replayed)
        pooled = raw.pop("_pooled")
        reference = pooled[x.data_config.train_size] if reference is None else reference
        stats[label] = normalize_stats(raw)
        stats[label]["pooled_from"] = raw.get("pooled_from")
        stats[label]["replayed_from_cut"] = replayed is not None
        first = next(iter(stats[label]["sizes"].values()), None)
        grid = first["x"] if first and grid is None else grid  # same x axis before and after
    return stats


def robustness_columns(x: FixContext) -> dict:
    """{column: (model, size)}: the fixed model at S first (compared with each other column), then the model
    before the fix at T and at S (what a user deploys without the fix, and the same size untuned). When the
    model as trained is served, the most accurate fixed candidate takes the fixed column, so the table still
    answers whether the fix costs robustness."""
    t, s = int(x.data_config.train_size), x.choice.test_size
    if x.choice.untuned:
        f = x.choice.best_fixed_size
        if f is None:
            return {f"untuned at {s}px": (x.base(), s), **({f"untuned at {t}px": (x.base(), t)} if s != t else {})}
        model = x.work(holds=f"candidate {f}")
        candidates.load_candidate(x, model, f)
        cols = {f"fixed at {f}px": (model, int(f)), f"untuned at {t}px": (x.base(), t)}
        cols.update({f"untuned at {size}px": (x.base(), size) for size in (s, int(f)) if size != t})
        return cols
    cols = {f"fixed at {s}px": (x.fixed(), s), f"untuned at {t}px": (x.base(), t)}
    if s != t:
        cols[f"untuned at {s}px"] = (x.base(), s)
    return cols


def run_robustness(x: FixContext) -> dict:
    """Top-1 under corruptions of the photos (noise, blur, JPEG, contrast; 3 severities, seeded), fixed vs
    untuned, with a paired test per corruption: does the fix cost robustness on this model and data?"""
    c = x.config
    return corruption_table(robustness_columns(x), x.val_index, x.data_config, seed=c.seed,
                            max_images=c.robustness_images, batch_size=c.batch_size, env=x.env,
                            precision=x.eval_precision, workers=c.workers, progress=c.progress,
                            cut_cache=x.cut_cache())


def run_report(x: FixContext) -> dict:
    """The page that renders the headline (computed with the curve after the fix), with the run's timings."""
    info = run_info(x, torch.get_num_threads())
    write_json(x.run_dir / "run.json", info)
    docs = RunDocuments.of({**x.results.documents(), "run": plain_json(info)})
    head = x.results.headline
    if head is None:  # the curve after the fix was read back on resume: the headline comes from the documents
        head = headline_of(docs)
    else:
        head = replace(head, seconds_total=docs.run.total_seconds, timings=dict(docs.run.timings))
    return write_report(x.run_dir, docs, head)


def resume_report(x: FixContext, summary: dict) -> ReportInfo:
    """The report's summary; its headline joins the run's results."""
    info = ReportInfo.from_json(summary)
    x.results.headline = info.headline
    return info


def run_info(x: FixContext, threads: int) -> dict:
    c = x.config
    return {"model": x.bundle.name, "source": x.bundle.source, "train_size": x.data_config.train_size,
            "test_size": x.choice.test_size, "test_sizes": x.test_sizes, "data": str(x.data_root),
            "choice": x.choice.to_json(), "config": strip_private(asdict(c), ("progress",)),
            "device": str(x.env.device), "split": x.split,
            "precision": x.precision.describe(), "started": x.state.started,
            "finished": _dt.datetime.now().isoformat(timespec="seconds"), "timings": x.state.timings(),
            "torch_threads": threads, "n_fit": len(x.fit), "n_holdout": len(x.holdout),
            "schedule": x.schedule.to_json(),
            "candidates": x.candidates, "label_free": c.label_free}


def _pooled_from_cut(x: FixContext, model, sizes, reference) -> tuple[dict, list] | None:
    """The pooled values the statistics read, replayed from the activations the model before the fix left at the
    cut on the validation photos (only the modules after it run); None where they were not recorded."""
    samples = x.val_index.samples
    kw = x.eval_kw()
    return x.cut_cache().pooled(model, VAL, x.val_index, x.data_config,
                                fstats.measured_sizes(x.data_config, sizes, reference=reference),
                                rows=fstats.spread_rows(len(samples), STATS_IMAGES),
                                point=fstats.pooled_point(find_parts(model)), env=x.env, precision=kw["precision"],
                                batch_size=kw["batch_size"], reduced_decode=kw["reduced_decode"])


def _activation_stats(model, samples, cfg, sizes, *, env, precision, batch_size, workers, grid=None,
                      reference=None, pooled=None) -> dict:
    """Pooled-activation CDFs per size (``fixres.method.stats``), on a given x grid when ``grid`` is set; KS distances
    to ``reference`` (default: this model's values at the train size, also returned in ``_pooled``)."""
    return fstats.activation_stats(model, samples, cfg, test_sizes=sizes, batch_size=batch_size, env=env,
                                   precision=precision, workers=workers, progress=False, max_images=STATS_IMAGES,
                                   grid=None if grid is None else np.asarray(grid, dtype=float),
                                   reference=reference, keep_pooled=True, pooled=pooled)


def normalize_stats(raw: dict) -> dict:
    """A ``fixres.method.stats.activation_stats`` result as {"sizes": {size: {"x", "cdf", "zeros", "above_2"}}},
    the shape the report reads."""
    return {"sizes": {str(row["test_size"]): {"x": row["cdf_x"], "cdf": row["cdf"], "zeros": row["frac_zero"],
                                              "above_2": row["frac_above_2"],
                                              "ks_to_reference": row.get("ks_to_reference")}
                      for row in raw["sizes"]}}
