"""What each step of ``fixres fix`` depends on: its key, every input its result reads.

A step is recomputed exactly when its key changed (``fixres.job.runstate``), so a key must name every
setting, content hash and fingerprint the step's result depends on, and the keys of the steps it reads.
"""

from __future__ import annotations

from fixres.data.corruptions import CORRUPTIONS, SEVERITIES
from fixres.data.layouts import canonical
from fixres.job import candidates
from fixres.job.context import FIX_REDUCED_DECODE, STEPS, FixContext, stats_sizes_of
from fixres.models.onnxrt import TORCH


def key_data(x: FixContext) -> dict:
    c = x.config
    if c.embedded:
        return {"data": "embedded", "synth_classes": c.classes, "synth_train_per_class": c.train_per_class,
                "synth_val_per_class": c.val_per_class, "synth_seed": c.seed}
    return {"data": canonical(c.data)}


def _key_model(x: FixContext) -> dict:
    """The model as given: its name, the checkpoint's content, registry weights, head and train size."""
    c = x.config
    return {"model": c.model_name, "checkpoint_sha256": x.checkpoint_sha(), "weights": c.weights,
            "pretrained": c.pretrained,
            "num_classes": c.num_classes, "train_size": x.data_config.train_size, "stride": x.data_config.stride,
            "classes": x.fingerprints["classes"]}


def _key_prep(x: FixContext) -> dict:
    cfg = x.data_config
    return {"crop_ratio": cfg.crop_ratio, "interpolation": cfg.interpolation, "mean": list(cfg.mean),
            "std": list(cfg.std)}


def _key_train_images(x: FixContext) -> dict:
    """The fitting images and the photos that choose (the rule, and the --select-data folder's content)."""
    return {"train_images": x.fingerprints["train_images"], "holdout_fraction": x.config.holdout_fraction,
            "holdout_seed": x.config.seed, "selection_rule": x.rule,
            "select_images": x.fingerprints.get("select_images")}


def _key_base(x: FixContext) -> dict:
    """The model before the fix: the trained one (everything training read) or the one given."""
    return x.keys["train"] if x.needs_training else _key_model(x)


def _key_eval(x: FixContext) -> dict:
    return {"test_sizes": x.test_sizes, "batch_size": x.config.batch_size, "reduced_decode": FIX_REDUCED_DECODE,
            "eval_precision": x.eval_precision.describe(), "val_images": x.fingerprints["val_images"]}


def key_train(x: FixContext) -> dict:
    c = x.config
    return {**_key_model(x), **_key_prep(x), **_key_train_images(x), "train_epochs": c.train_epochs,
            "train_augment": c.train_augment, "train_repeats": c.train_repeats, "train_lr": c.train_lr,
            "train_batch_size": c.train_batch_size, "seed": c.seed, "precision": x.precision.describe()}


def key_analyze(x: FixContext) -> dict:
    dc = x.data_config
    return {"train_size": dc.train_size, "stride": dc.stride, "crop_ratio": dc.crop_ratio,
            "train_augment": x.config.train_augment, "val_images": x.fingerprints["val_images"],
            "analysis_seed": x.config.seed}


def key_sweep_before(x: FixContext) -> dict:
    return {**_key_base(x), **_key_prep(x), **_key_eval(x)}


def _key_finetuning(x: FixContext) -> dict:
    c = x.config
    return {**_key_base(x), **_key_prep(x), **_key_train_images(x), "parts": c.parts, "augment": c.augment,
            "batch_size": c.batch_size, "seed": c.seed, "precision": x.precision.describe(),
            "eval_precision": x.eval_precision.describe(), "reduced_decode": FIX_REDUCED_DECODE}


def key_schedule(x: FixContext) -> dict:
    grid = [list(candidates.SCHEDULE_LR_FACTORS), list(candidates.SCHEDULE_EPOCH_FACTORS)]
    return {**_key_finetuning(x), "schedule_size": candidates.schedule_size(x),
            "finetune_epochs": x.config.finetune_epochs, "lr": x.config.lr, "schedule_grid": grid}


def key_select(x: FixContext) -> dict:
    return {**_key_finetuning(x), "val_images": x.fingerprints["val_images"], "candidates": x.candidates,
            "schedule_lr": x.schedule.lr, "schedule_epochs": x.schedule.epochs,
            "select_budget_min": x.config.select_budget_min,
            # the runtime that timed the candidates (keyed only when not PyTorch: runs timed there stay valid)
            **({"latency_on": x.config.latency_on} if x.config.latency_on != TORCH else {})}


def key_finetune(x: FixContext) -> dict:
    c = x.config
    if c.label_free:
        return {**_key_base(x), **_key_prep(x), **_key_train_images(x), "label_free": True,
                "fix_test_size": x.choice.test_size, "batch_size": c.batch_size,
                "precision": x.precision.describe()}
    return {**x.keys["select"], "fix_test_size": x.choice.test_size, "served": x.choice.kind,
            "choose": c.choose, "temperature_scale": c.temperature_scale}


def key_sweep_after(x: FixContext) -> dict:
    return {**x.keys["finetune"], **_key_eval(x)}


def key_stats(x: FixContext) -> dict:
    return {**x.keys["finetune"], "stats_sizes": stats_sizes_of(x), "val_images": x.fingerprints["val_images"],
            "batch_size": x.config.batch_size, "precision": x.precision.describe()}


def key_report(x: FixContext) -> dict:
    merged: dict = {}
    for step in STEPS[:-1]:
        merged.update(x.keys.get(step, {}))
    return merged


def key_robustness(x: FixContext) -> dict:
    c = x.config
    return {**x.keys["finetune"], "val_images": x.fingerprints["val_images"], "corruptions": list(CORRUPTIONS),
            "severities": list(SEVERITIES), "robustness_images": c.robustness_images, "corruption_seed": c.seed,
            "batch_size": c.batch_size, "eval_precision": x.eval_precision.describe()}
