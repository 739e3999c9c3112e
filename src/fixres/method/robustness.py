"""Robustness under corruptions: top-1 of models on corrupted copies of the validation photos, compared in pairs.

Is a model fixed at a test size less robust out of distribution than the untuned one? ``corruption_table``
answers with numbers: every column (a model at a test size) is evaluated on the clean photos and on
every corruption of ``fixres.data.corruptions`` at every severity, the same corrupted photo for every
column (seeded per photo), each photo decoded at full size so that the rows differ only by the
corruption. Each model is evaluated once per corruption and severity with all its test sizes in one
pass (``evaluate``). Two columns are compared per corruption with the photo as the unit: each photo's
hits are summed over the severities and an exact sign test runs on the per-photo differences
(``significance.clustered_sign_test``); the p-values under corruptions are then Holm-corrected together
(``p_holm``), since a table of many tests finds a "difference" by chance otherwise. ``max_images`` bounds the time
with a seeded, class-stratified subset of the photos (the same subset for every column).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from fixres.choosing.significance import clustered_sign_test, holm
from fixres.config import DEFAULT_BATCH_SIZE, DataConfig
from fixres.data.corruptions import CORRUPTIONS, SEVERITIES, Corruption, corruption_set, parameter
from fixres.data.folders import FolderIndex
from fixres.errors import UsageError
from fixres.io.evaluation import PERCENT
from fixres.method.evaluate import evaluate
from fixres.runtime import dist as fdist
from fixres.runtime.engine import Precision
from fixres.runtime.progress import status

#: The row of the uncorrupted photos, and its severity in the rows.
CLEAN = "clean"
CLEAN_SEVERITY = 0
#: How a compared pair is tested, and how the table's p-values are corrected (recorded in the result).
PAIRED_TEST = "exact sign test per photo, hits summed over severities"
CORRECTION = "holm"
#: Row keys a column may not be named.
RESERVED_KEYS = ("corruption", "severity", "n")


def stratified_subset(labels: Sequence[int], max_images: int | None, *, seed: int = 0) -> list[int]:
    """Indices of at most ``max_images`` samples, every class in proportion to its count (seeded), in input order.

    Each class gets the floor of its share; the images left over go to the classes with the largest
    remainders (ties: the lower class). None, or a number at least the data set's size, keeps every image.
    """
    n = len(labels)
    if max_images is None or max_images >= n:
        return list(range(n))
    if isinstance(max_images, bool) or int(max_images) < 1:
        raise UsageError(f"the number of images must be a positive integer, got {max_images!r}")
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    quota = {c: max_images * len(idx) / n for c, idx in by_class.items()}
    take = {c: int(q) for c, q in quota.items()}
    left = max_images - sum(take.values())
    for c in sorted(by_class, key=lambda c: (-(quota[c] - take[c]), c))[:left]:
        take[c] += 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for c in sorted(by_class):
        chosen.extend(rng.sample(by_class[c], take[c]))
    return sorted(chosen)


class AtIndex:
    """A corruption keyed on each photo's index in the whole data set, not in the subset evaluated
    (so a photo is corrupted the same way whatever subset it is in). Picklable, for DataLoader workers."""

    def __init__(self, corruption: Corruption, indices: Sequence[int]) -> None:
        self.corruption = corruption
        self.indices = list(indices)

    def __call__(self, img, i: int):
        return self.corruption(img, self.indices[i])


def _columns(models: Mapping[str, tuple[nn.Module, int]]) -> dict[str, tuple[nn.Module, int]]:
    if not models:
        raise UsageError("no model to evaluate under corruptions")
    out = {}
    for name, spec in models.items():
        if not isinstance(name, str) or not name or name in RESERVED_KEYS:
            raise UsageError(f"a column needs a name other than {', '.join(RESERVED_KEYS)}, got {name!r}")
        model, size = spec
        out[name] = (model, int(size))
    return out


def _pairs(columns: Sequence[str], pairs: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """The compared pairs: those given, or the first column against each other one."""
    pairs = [(columns[0], c) for c in columns[1:]] if pairs is None else [tuple(p) for p in pairs]
    for a, b in pairs:
        for c in (a, b):
            if c not in columns:
                raise UsageError(f"unknown column {c!r} in a compared pair; the columns are {', '.join(columns)}")
        if a == b:
            raise UsageError(f"a compared pair needs two different columns, got {a!r} twice")
    return pairs


def _groups(columns: Mapping[str, tuple[nn.Module, int]]) -> list[tuple[nn.Module, dict[str, int]]]:
    """Each distinct model once, with {column: test size} of its columns (one evaluation serves them all)."""
    groups: dict[int, tuple[nn.Module, dict[str, int]]] = {}
    for name, (model, size) in columns.items():
        groups.setdefault(id(model), (model, {}))[1][name] = size
    return list(groups.values())


def _evaluate_condition(groups, samples, cfg: DataConfig, corrupt, eval_kw: dict, cut_cache=None,
                        key: str = "") -> tuple[dict, int]:
    """{column: (image indices, bool array of top-1 hits)} under one corruption (None: clean), and the skips.

    With ``cut_cache`` (``fixres.method.cutcache.CutCache``) the model with the most sizes runs first and records
    its activations at the cut as ``key``; a model that differs from it only after the cut is then scored from
    them (the fixed model against the model before the fix at the same size: one prefix pass for both)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    skipped = 0
    kw = dict(per_class=False, keep_outcomes=True, reduced_decode=False, corrupt=corrupt, **eval_kw)
    for model, sizes in sorted(groups, key=lambda g: -len(set(g[1].values()))):
        wanted = sorted(set(sizes.values()))
        scored = {}
        if cut_cache is not None and out:  # the first model records; the others may run from it
            for size in wanted:
                got = cut_cache.score(model, key, samples, cfg, size, **kw)
                if got is not None:
                    scored[size] = got
        missing = [size for size in wanted if size not in scored]
        if missing:
            res = (cut_cache.evaluate(model, key, samples, cfg, test_sizes=missing, **kw) if cut_cache is not None
                   else evaluate(model, samples, cfg, test_sizes=missing, crop_ratios=[cfg.crop_ratio], **kw))
            scored.update({size: res for size in missing})
        for name, size in sizes.items():
            res = scored[size]
            skipped = max(skipped, len(res.skipped))
            out[name] = (np.asarray(res.arrays.idx), np.asarray(res.hits_at(res.at(size)), dtype=bool))
    if cut_cache is not None:
        cut_cache.forget(key)
    return out, skipped


def corruption_table(models: Mapping[str, tuple[nn.Module, int]], samples, cfg: DataConfig, *,
                     corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES,
                     pairs: Sequence[tuple[str, str]] | None = None, seed: int = 0, max_images: int | None = None,
                     batch_size: int = DEFAULT_BATCH_SIZE, env: fdist.DistEnv | None = None,
                     precision: Precision | None = None, workers: int | None = None, progress: bool = True,
                     num_classes: int | None = None, cut_cache=None) -> dict:
    """Top-1 of every column on the clean photos and on every corruption x severity; paired tests per corruption.

    ``models``: {column name: (model, test size)}, e.g. {"untuned at 128px": (base, 128), "fixed at 160px":
    (fixed, 160)}; columns sharing a model are evaluated in one pass. ``samples``: a ``FolderIndex`` or
    (path, label) pairs; ``max_images``: a seeded class-stratified subset of them (``stratified_subset``).
    ``pairs``: (a, b) columns compared per corruption, per photo over its severities (default: the first
    column against each other one). Every row is decoded at full size (the clean one too). ``cut_cache``: see
    ``_evaluate_condition``.

    Returns a JSON-ready dict: ``columns`` (names, in order), ``test_sizes`` ({column: size}),
    ``crop_ratio``, ``corruptions``, ``severities``, ``parameters`` ({corruption: {severity: value}}),
    ``rows`` ([{corruption, severity, n, <column>: top-1 %}], the clean row first with severity 0),
    ``mean`` ([{corruption, n, <column>: mean top-1 % over its severities}], clean first), ``paired``
    ([{corruption, a, b, n (photos), n_trials (image-severity pairs), only_a / only_b (photos a / b got right
    more often), p (sign test per photo), p_holm (Holm-adjusted across the table), test, difference (a - b,
    points)}]), ``correction``,
    ``n_images``, ``n_samples`` (before ``max_images``), ``max_images``, ``skipped``, ``seed``,
    ``decode`` ("full") and ``seconds``.
    """
    start = time.perf_counter()
    columns = _columns(models)
    names = list(columns)
    pairs = _pairs(names, pairs)
    corruptions, severities = list(dict.fromkeys(corruptions)), sorted(set(severities))
    conditions = [(CLEAN, CLEAN_SEVERITY)] + corruption_set(corruptions, severities)
    all_samples = list(samples.samples if isinstance(samples, FolderIndex) else samples)
    if not all_samples:
        raise UsageError("no images to evaluate under corruptions")
    chosen = stratified_subset([label for _, label in all_samples], max_images, seed=seed)
    subset = [all_samples[i] for i in chosen]
    env = env or fdist.DistEnv()
    eval_kw = {"batch_size": batch_size, "env": env, "precision": precision, "workers": workers,
               "progress": progress, "num_classes": num_classes}
    groups, outcomes, skipped = _groups(columns), {}, 0
    for k, (name, severity) in enumerate(conditions):
        status(f"robustness: {name}{'' if name == CLEAN else f' {severity}'} ({k + 1}/{len(conditions)}) on "
               f"{len(subset)} images", enabled=progress and env.is_main)
        corrupt = None if name == CLEAN else AtIndex(Corruption(name, severity, seed), chosen)
        outcomes[(name, severity)], skips = _evaluate_condition(groups, subset, cfg, corrupt, eval_kw, cut_cache,
                                                                f"corrupted {name} {severity} seed {seed}")
        skipped = max(skipped, skips)
    rows = [_row(name, severity, outcomes[(name, severity)], names) for name, severity in conditions]
    kinds = [CLEAN, *corruptions]
    return {
        "columns": names, "test_sizes": {c: columns[c][1] for c in names}, "crop_ratio": cfg.crop_ratio,
        "corruptions": corruptions, "severities": severities,
        "parameters": {c: {str(s): parameter(c, s) for s in severities} for c in corruptions},
        "rows": rows, "mean": [_mean(kind, rows, names) for kind in kinds],
        "paired": _with_holm([_paired(kind, a, b, outcomes) for kind in kinds for a, b in pairs]),
        "correction": CORRECTION,
        "n_images": rows[0]["n"], "n_samples": len(all_samples), "max_images": max_images, "skipped": skipped,
        "seed": seed, "decode": "full", "seconds": time.perf_counter() - start,
    }


def _row(name: str, severity: int, outcome: dict, columns: Sequence[str]) -> dict:
    n = int(outcome[columns[0]][1].size)
    return {"corruption": name, "severity": severity, "n": n,
            **{c: float(outcome[c][1].mean()) * PERCENT if outcome[c][1].size else None for c in columns}}


def _mean(kind: str, rows: Sequence[dict], columns: Sequence[str]) -> dict:
    """Mean top-1 over the severities of one corruption (the clean row's own for ``clean``)."""
    mine = [r for r in rows if r["corruption"] == kind]
    return {"corruption": kind, "n": sum(r["n"] for r in mine),
            **{c: None if any(r[c] is None for r in mine) else sum(r[c] for r in mine) / len(mine) for c in columns}}


def _paired(kind: str, a: str, b: str, outcomes: Mapping[tuple[str, int], dict]) -> dict:
    """The paired test of columns a and b on corruption ``kind``, the photo as the unit: each photo's hits are
    summed over the severities (a photo that flips at one severity tends to flip at the next, so its
    severities are not independent evidence) and the exact sign test runs on the per-photo differences."""
    per_photo_a: dict[int, int] = {}
    per_photo_b: dict[int, int] = {}
    trials = 0
    for (name, _), outcome in outcomes.items():
        if name != kind:
            continue
        (idx_a, top_a), (idx_b, top_b) = outcome[a], outcome[b]
        common, ia, ib = np.intersect1d(idx_a, idx_b, return_indices=True)
        trials += int(common.size)
        for photo, hit_a, hit_b in zip(common.tolist(), top_a[ia].tolist(), top_b[ib].tolist()):
            per_photo_a[photo] = per_photo_a.get(photo, 0) + int(hit_a)
            per_photo_b[photo] = per_photo_b.get(photo, 0) + int(hit_b)
    photos = sorted(per_photo_a)
    hits_a, hits_b = [per_photo_a[i] for i in photos], [per_photo_b[i] for i in photos]
    test = clustered_sign_test(hits_a, hits_b)
    diff = (sum(hits_a) - sum(hits_b)) / trials * PERCENT if trials else None
    return {"corruption": kind, "a": a, "b": b, "n": len(photos), "n_trials": trials, **test,
            "test": PAIRED_TEST, "difference": diff}


def _with_holm(tests: list[dict]) -> list[dict]:
    """Every test with ``p_holm``: its p adjusted by Holm's method across the table's tests under corruptions (the
    family of robustness claims); the clean photos' test answers another question and keeps its own p."""
    family = [i for i, t in enumerate(tests) if t["corruption"] != CLEAN]
    adjusted = dict(zip(family, holm([tests[i]["p"] for i in family])))
    return [{**t, "p_holm": adjusted.get(i, t["p"])} for i, t in enumerate(tests)]
