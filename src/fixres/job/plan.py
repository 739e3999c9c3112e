"""The plan ``fixres fix`` prints before it starts: rough seconds per step from a timed probe.

A forward at the train size and the time to read one photo are measured on a few training images; each
step's cost is then estimated from the images it reads and the sizes it runs at.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass

import torch

from fixres.choosing.budget import candidate_sizes, estimate_seconds
from fixres.data.corruptions import CORRUPTIONS, SEVERITIES, Corruption
from fixres.data.images import load_rgb
from fixres.data.transforms import build_transform
from fixres.job import candidates
from fixres.job.context import STATS_IMAGES, FixContext, tunes_schedule
from fixres.method.prefix import adapted_cut, cached_step_share
from fixres.models.fold import fold_batchnorms
from fixres.runtime.cost import latency_ms, train_step_seconds
from fixres.runtime.progress import format_duration

#: Training images read to estimate the time per image before the run starts (few: on a CPU a large model's
#: probe must not cost minutes).
PLAN_PROBE_IMAGES = 8
#: Reads of each probe photo, the fastest kept.
PROBE_READS = 2
#: The batch the forward is timed on: a few images' per-image time stands for the run's loops better than a large
#: batch alone, as those loops share the cores with the loader workers decoding (docs/results.md, the plan).
PLAN_PROBE_BATCH = 4
#: The most images a cached fine-tuning step is timed on (the probe images repeated to the run's batch): on a few
#: images it is per-call overhead, and on a small network it then reads 2-3x what the fine-tuning's batches cost.
#: It is timed at the size the schedule grid fine-tunes at, where most cached epochs run, and its time per image
#: taken as a share of the forward timed on ``PLAN_PROBE_BATCH``, scaled to that size.
SHARE_PROBE_BATCH = 128
#: The most images a training step is timed on (the probe images repeated to the run's training batch): a large
#: model's step on a CPU takes seconds, and past a few dozen images its cost per image hardly falls.
TRAIN_PROBE_BATCH = 32


#: A training step per photo in forwards (the forward and its backward, about twice its cost), when not timed.
TRAIN_FORWARDS = 3
#: Objects look about 0.8x as large at test time with the default crops (eq. 5): the fix lands near T / 0.8.
LIKELY_APPARENT_RATIO = 0.8
#: Whether the model as trained or a fixed one will be served is only known after the choice: even odds.
UNTUNED_SERVED_ODDS = 0.5


@dataclass(frozen=True)
class Probe:
    """What the plan's estimates scale, measured on a few training photos before the run: seconds per image of a
    forward at T (batch norms folded, as evaluations run), to read and pre-process one photo, to corrupt one
    (the robustness step's average corruption), and a cached fine-tuning step's time per image on the run's batch
    as a share of that forward (None when the fine-tuning will run whole epochs)."""

    fwd_s: float
    load_s: float
    corrupt_s: float = 0.0
    cached_share: float | None = None
    #: seconds of a training step per image at T, per second of that forward (None when the run does not train)
    train_share: float | None = None


def probe_speed(x: FixContext) -> Probe:
    """The plan's ``Probe``, measured now."""
    # The model as built: the plan runs before any training, and weights do not change what a forward costs.
    model = x.bundle.model
    was = model.training
    model.eval()
    try:  # evaluations fold the batch norms into their convolutions: the probe times the model they run
        folded = fold_batchnorms(model, x.data_config.train_size)[0]
        fwd = latency_ms(folded, x.data_config.train_size, device=x.env.device, precision=x.eval_precision,
                         batch=PLAN_PROBE_BATCH) / 1000.0
    finally:
        model.train(was)
    transform = build_transform("test", size=x.data_config.train_size, cfg=x.data_config)
    probe = x.train_index.samples[:PLAN_PROBE_IMAGES]
    for path, _ in probe[:1]:  # the first decode of a run pays one-off start-up (codecs, file cache): untimed
        with contextlib.suppress(Exception):
            transform(load_rgb(path))
    load, photos, inputs = read_seconds(probe, transform)
    share = None
    if photos and x.config.augment == "test":
        chain, first = adapted_cut(model, x.config.parts)
        size = grid_size(x)
        at_size = build_transform("test", size=size, cfg=x.data_config)
        repeated = [at_size(photos[i % len(photos)]) for i in range(min(SHARE_PROBE_BATCH, x.config.batch_size))]
        # per second of the forward timed above scaled to that size, as the estimates scale it: a step's cost on
        # the run's batch
        share = cached_step_share(model, chain, first, torch.stack(repeated).to(x.env.device),
                                  relative_to=fwd * (size / x.data_config.train_size) ** 2, precision=x.precision)
    train = None
    if inputs and x.needs_training:
        repeated = [inputs[i % len(inputs)] for i in range(min(TRAIN_PROBE_BATCH, x.config.train_batch_size))]
        step = train_step_seconds(model, torch.stack(repeated), device=x.env.device, precision=x.precision)
        train = step / len(repeated) / fwd if fwd > 0 else None
    return Probe(fwd, load, _corrupt_seconds(photos) if x.config.robustness else 0.0, share, train)


def read_seconds(samples, transform) -> tuple[float, list, list]:
    """(seconds to read and pre-process a photo, averaged over ``samples``; the photos read; their inputs). Each
    photo is read ``PROBE_READS`` times and its fastest read kept: a read that the machine delays (another process)
    would otherwise move the mean of a few photos by as much as the rest together."""
    reads, photos, inputs = [], [], []
    for path, _ in samples:
        best = math.inf
        for _ in range(PROBE_READS):
            t0 = time.perf_counter()
            try:
                photo = load_rgb(path)
                tensor = transform(photo)
            except Exception:  # noqa: BLE001 - an unreadable probe image only makes the estimate rougher
                photo = None
            best = min(best, time.perf_counter() - t0)
        reads.append(best)
        if photo is not None:
            photos.append(photo)
            inputs.append(tensor)
    return (statistics.fmean(reads) if reads else 0.0), photos, inputs


def _corrupt_seconds(photos) -> float:
    """Seconds to corrupt one photo, averaged over the corruptions at their middle severity."""
    if not photos:
        return 0.0
    severity = SEVERITIES[len(SEVERITIES) // 2]
    t0 = time.perf_counter()
    for name in CORRUPTIONS:
        for i, photo in enumerate(photos):
            Corruption(name, severity)(photo, i)
    return (time.perf_counter() - t0) / (len(photos) * len(CORRUPTIONS))


def _candidates(x: FixContext) -> list[int]:
    c = x.config
    return c.candidates or ([c.test_size] if c.test_size else candidate_sizes(x.data_config.train_size,
                                                                               x.data_config.stride))


def grid_size(x: FixContext) -> int:
    """The size the schedule grid will fine-tune at, as far as it is known before the run: the middle candidate
    other than T (the recommendation it is nearest to comes later)."""
    t = x.data_config.train_size
    away = sorted(s for s in _candidates(x) if s != t) or [t]
    return away[len(away) // 2]


def plan_estimates(x: FixContext, fwd: float, load: float, cached_share: float | None = None,
                   corrupt: float = 0.0, train_share: float | None = None) -> dict[str, float]:
    """Rough seconds per step from a forward time at T, a read time per photo (one decode serves every size of
    a pass), a cached fine-tuning step's share of a forward and a corruption's time per photo (``Probe``)."""
    c, t = x.config, x.data_config.train_size
    n_fit, n_hold, n_val = len(x.fit), len(x.holdout), len(x.val_index.samples)
    cands = _candidates(x)
    area = lambda sizes: sum((s / t) ** 2 for s in sizes)  # noqa: E731
    sweep = n_val * (load + fwd * area(x.test_sizes))
    n_seen = len(getattr(x, "seen", ()))  # cross-selection: training photos scored for comparison
    # the statistics' sizes (T/2, T, the fixed size, the largest swept): the fixed size is not known yet
    stats = c.stats_sizes or [t / 2, t, t / LIKELY_APPARENT_RATIO, max(x.test_sizes)]
    # ... replayed from the validation photos' activations at the cut where they were all swept (one process)
    stats_replayed = (cached_share is not None and not x.env.distributed
                      and (not c.stats_sizes or set(c.stats_sizes) <= set(x.test_sizes)))

    def one(size: int, epochs: int, n_scored: int) -> float:  # reading costs the same at every size
        return estimate_seconds(size, seconds_per_pixel=fwd / (t * t), read_s=load, n_fit=n_fit, n_scored=n_scored,
                                epochs=epochs, cached=c.augment == "test", cached_share=cached_share)
    def before_pass(n: int, sizes) -> float:  # the model before the fix, recording its activations at the cut
        return n * (load + fwd * area(sizes))
    # The grid runs at one size near the recommendation (not known yet): the middle candidate other than T. Its
    # fine-tunings are scored from the held-out photos' activations at the cut, recorded in one pass.
    # A cached fine-tuning hands its fitting photos' activations to the next one at its size (``FitCaches``): the
    # grid makes one prefix pass, and the candidate at the grid's size none.
    at = grid_size(x)
    shared_pass = one(at, 0, 0) if c.augment == "test" else 0.0
    tuned = tunes_schedule(x)
    grid = [one(at, c.finetune_epochs * f, 0)
            for _ in candidates.SCHEDULE_LR_FACTORS for f in candidates.SCHEDULE_EPOCH_FACTORS]
    grid.append(before_pass(n_hold, [at]) - (len(grid) - 1) * shared_pass)
    # Each candidate is scored on the photos that choose, the training photos shown and val from the activations
    # the model before the fix recorded at the cut (val's in the sweep before the fix).
    select = (sum(one(s, c.finetune_epochs, 0) for s in cands) + before_pass(n_hold + n_seen, cands)
              - (shared_pass if tuned and at in cands else 0.0))
    # training: a step per photo (as timed, else a forward and its backward: about 3 forwards) and a read; the loader
    # workers read while a GPU computes, but on a CPU they take the cores the step runs on
    step = fwd * (train_share if train_share is not None else TRAIN_FORWARDS)
    per_photo = max(step, load) if x.env.device.type == "cuda" else step + load
    est = {"train": c.train_epochs * n_fit * per_photo if x.needs_training else 0.0,
           "sweep_before": sweep,
           # every swept size a candidate: the curve after the fix is the candidates' scores (no forward)
           "sweep_after": 0.0 if not c.label_free and set(x.test_sizes) <= set(cands) else sweep,
           "schedule": sum(grid) if tuned else 0.0,
           "select": 0.0 if c.label_free else select,
           "stats": 2 * min(STATS_IMAGES, n_val) * (fwd * area(stats) * cached_share if stats_replayed
                                                    else len(stats) * load + fwd * area(stats)),
           "robustness": _robustness_estimate(x, fwd, load + corrupt, area)}
    return {k: v for k, v in est.items() if v > 0}


def _robustness_estimate(x: FixContext, fwd: float, load: float, area) -> float:
    """Every condition reads the subset at full size once and runs the model before the fix at T and at the fixed
    size (the fixed model is scored from its activations at the cut); the fixed size is not known yet: the
    analysis' geometry puts it near T / 0.8. Where the model as trained is served, the table also shows the best
    fixed size, often the largest candidate, one pass more (``UNTUNED_SERVED_ODDS``). ``load`` is a photo's read
    and corruption (on two cores the loader workers overlap little with the forwards)."""
    c = x.config
    if not c.robustness:
        return 0.0
    n = len(x.val_index.samples)
    m = min(n, c.robustness_images or n)
    conditions = 1 + len(CORRUPTIONS) * len(SEVERITIES)
    likely = x.data_config.train_size / LIKELY_APPARENT_RATIO
    largest = max(c.candidates or x.test_sizes)
    return conditions * m * (load + fwd * (1 + area([likely]) + UNTUNED_SERVED_ODDS * area([largest])))


def print_plan(x: FixContext) -> None:
    """The steps ahead with rough times; steps finished before are marked (they are reused when their
    inputs are unchanged, which only their keys, computed as the run goes, can tell)."""
    p = probe_speed(x)
    x.cached_share = p.cached_share  # the select step's own estimate reads it too
    fwd, load = p.fwd_s, p.load_s
    est = plan_estimates(x, fwd, load, p.cached_share, p.corrupt_s, p.train_share)
    done = {k for k in est if x.state.done(k)}
    todo = sum(v for k, v in est.items() if k not in done)
    x.say(f"plan ({x.env.device}; rough estimates from a {1000 * fwd:.1f} ms/image forward at "
          f"{x.data_config.train_size}px "
          f"and {1000 * load:.0f} ms/image reading): "
          + ", ".join(f"{k} " + ("done before" if k in done else f"~{format_duration(v)}") for k, v in est.items())
          + f"; total ~{format_duration(todo)}" + (" for the steps not done before" if done else ""))
