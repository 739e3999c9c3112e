"""Evaluation of streamed shards: one pass front to back, the same numbers as the shards indexed, counted exactly.

``evaluate_stream`` is ``fixres.method.evaluate.evaluate`` for a ``data.streams.ShardStream``: each rank reads its
shards (``data.streams.shards_for``) and scores them with the same views, forward pass and outcomes. After the
pass every rank's shard records are gathered: each shard must have been read exactly once and to its end, the
photos are counted from them (``n_samples``, which ``--val-count`` checks), and the per-photo outcomes are put
in the order the indexed shards give (class, then key), so every number, fold std included, equals the indexed
evaluation's and does not depend on the ranks or loader workers. ``evaluate_at`` gives the figures at one size of
either kind of photos (fine-tuning's before and after).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
from torch import nn

from fixres.config import DEFAULT_BATCH_SIZE, DEFAULT_FOLDS, DataConfig
from fixres.data.loaders import default_workers, make_loader, pin_memory_for
from fixres.data.shards import say_left_out
from fixres.data.streams import ShardReading, ShardStream, StreamedShards, StreamOrder, stream_collate
from fixres.io.evaluation import EvalResult
from fixres.method.evaluate import _check_coverage, _one_pass, assemble, evaluate, views_transform
from fixres.method.views import _check_classes, _model_outputs, _Plan, _request
from fixres.runtime import dist as fdist
from fixres.runtime.engine import Precision, inference_precision


def evaluate_stream(model: nn.Module, stream: ShardStream, cfg: DataConfig, *, test_sizes: Sequence[int],
                    crop_ratios: Sequence[float] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    env: fdist.DistEnv | None = None, precision: Precision | None = None,
                    workers: int | None = None, ensembles: Sequence[Sequence] = (), ten_crop: bool = False,
                    folds: int = DEFAULT_FOLDS, progress: bool = True, num_classes: int | None = None,
                    per_class: bool = True, keep_log_probs: bool = False,
                    reduced_decode: bool = True) -> EvalResult:
    """``evaluate``'s result for the photos of ``stream``, read once (``n_samples``: the photos its shards held)."""
    env = env or fdist.DistEnv()
    precision = precision or inference_precision(env.device)
    views, ens_views = _request(cfg, test_sizes=test_sizes, crop_ratios=crop_ratios, ensembles=ensembles,
                                batch_size=batch_size, folds=folds)
    _check_classes(_model_outputs(model), num_classes, stream.num_classes - 1)
    plan = _Plan([], views, ens_views, list(stream.classes), num_classes, 0)
    workers = default_workers(env.world_size) if workers is None else workers
    dataset = StreamedShards(stream, views_transform(plan, cfg, ten_crop=ten_crop, workers=workers),
                             rank=env.rank, world_size=env.world_size, reduced_decode=reduced_decode)
    reading = ShardReading(make_loader(dataset, batch_size=batch_size, workers=workers,
                                   pin_memory=pin_memory_for(env.device), collate_fn=stream_collate))
    res, counts, skipped, n_out, fallbacks, seconds = _one_pass(
        model, plan, reading, total=None, ten_crop=ten_crop, env=env, precision=precision, progress=progress,
        keep_log_probs=keep_log_probs)
    order = StreamOrder(stream, [e for ends in fdist.all_gather_objects(reading.ends, env) for e in ends])
    order.check()
    say_left_out(order.left, enabled=progress and env.is_main)
    at = order.positions()
    res.idx = np.array([at[int(i)] for i in res.idx], dtype=np.int64)
    res = res.reordered(np.argsort(res.idx, kind="stable"))
    skipped = sorted((at[i], path, why) for i, path, why in skipped)
    plan = replace(plan, samples=range(order.total))
    _check_coverage(res, counts, skipped, order.total)
    return assemble(res, plan, [{"path": p, "reason": why} for _, p, why in skipped], n_out=n_out,
                    fallbacks=fdist.all_reduce_sum_int(fallbacks, env), seconds=seconds, env=env, precision=precision,
                    batch_size=batch_size, workers=workers, ten_crop=ten_crop, folds=folds, per_class=per_class,
                    keep_log_probs=keep_log_probs, keep_outcomes=False)


def evaluate_at(model: nn.Module, samples, cfg: DataConfig, *, test_size: int, batch_size: int,
                env: fdist.DistEnv, precision: Precision, workers: int | None, progress: bool) -> dict:
    """top-1 (binomial SE and fold std), top-5, loss, NLL and ECE of ``model`` at ``test_size``, at the data
    config's crop ratio, on indexed photos or a ``ShardStream``.

    Measured at the inference precision, so the number is the one ``fixres eval`` gives for the
    export. Returns {test_size, top1, top1_se, top1_std, top5, loss, nll, ece, n, skipped (a count)}.
    """
    run = evaluate_stream if isinstance(samples, ShardStream) else evaluate
    res = run(model, samples, cfg, test_sizes=[test_size], crop_ratios=[cfg.crop_ratio], batch_size=batch_size,
              env=env, precision=inference_precision(env.device, precision.amp), workers=workers, progress=progress,
              per_class=False)
    row = res.rows[0]
    return {"test_size": test_size, "top1": row.top1, "top1_se": row.top1_se, "top1_std": row.top1_std,
            "top5": row.top5, "loss": row.loss, "nll": row.nll, "ece": row.ece, "n": row.n,
            "skipped": len(res.skipped)}
