"""The frozen-prefix cache of a fine-tuning (``fixres.method.finetuning``): built once before its epochs.

With the deterministic test DA everything before the first adapted module computes the same activations every
epoch: a check that the model runs from the cut on (``prefix.build_suffix``), then one pass over the training
photos (and, for ``--epoch-eval``, the validation photos) recording the activations entering the cut
(``prefix.fill_cache``), or the cache an earlier fine-tuning of the same photos left (``cutcache.FitCaches``).
Under torchrun every rank takes the cache or none of them does.
"""

from __future__ import annotations

import time

from fixres.data.transforms import build_transform
from fixres.method.prefix import _cache_folder, build_suffix, fill_cache, first_inputs
from fixres.method.tunerecipe import _set_modes
from fixres.runtime.dist import all_reduce_sum_int


def build_cache(t, *, enabled: bool, budget_mb: float) -> None:
    """The frozen-prefix cache of the fine-tuning ``t`` (a ``finetuning._Tune``); sets t.suffix / t.train_cache /
    t.cache_info."""
    if not enabled:
        t.cache_info["reason"] = "disabled"
        return
    if t.settings["augment"] != "test":
        t.cache_info["reason"] = f"augmentation {t.settings['augment']!r} is random: full forward each epoch"
        return
    t0 = time.perf_counter()
    sample = first_inputs(t.full_train, t.transform, t.env.device)  # the same on every rank
    if sample is None:
        t.cache_info["reason"] = "no readable sample image"
    else:
        t.suffix, t.cache_info["reason"] = build_suffix(t.model, t.chain, t.sel.first, sample)
    if t.suffix is not None:
        _fill_caches(t, budget_bytes=int(budget_mb * 2 ** 20))
    _set_modes(t.model, t.sel)
    t.t_cache = time.perf_counter() - t0
    t.cache_info["build_s"] = round(t.t_cache, 3)
    t.status(f"activation cache: {'used, ' if t.suffix is not None else 'not used: '}{t.cache_info['reason']}")


def _fill_caches(t, *, budget_bytes: int) -> None:
    t.model.eval()  # the prefix is frozen: eval mode throughout while filling
    kw = dict(batch_size=t.settings["batch_size"], workers=t.workers, device=t.env.device, precision=t.precision,
              budget_bytes=budget_bytes, progress=t.progress)
    hit = t.shared.lookup(t) if t.shared is not None else None
    t.train_cache, t.skipped = hit or fill_cache(t.model, t.suffix, t.train_samples, t.transform,
                                                 folder=t.out_dir / _cache_folder("cache", t.env),
                                                 desc=f"caching activations at {t.suffix.cut}", **kw)
    if t.shared is not None and hit is None and t.train_cache is not None:
        t.shared.keep(t, t.train_cache, t.skipped)
    if t.epoch_eval and t.val_samples and not t.env.distributed:
        t.val_cache, _ = fill_cache(t.model, t.suffix, t.val_samples,
                                     build_transform("test", size=t.settings["test_size"], cfg=t.cfg),
                                     folder=t.out_dir / "cache_val", desc="caching validation activations", **kw)
    if t.env.distributed and all_reduce_sum_int(int(t.train_cache is None), t.env):
        if t.train_cache is not None:  # all ranks must take the same path
            t.train_cache.close()
            t.train_cache = None
    if t.train_cache is None:
        t.suffix = None
        t.cache_info["reason"] = "no readable training image"
    else:
        t.cache_info.update(used=True, cut=t.suffix.cut, bytes=t.train_cache.bytes, on_disk=t.train_cache.on_disk,
                            shape=list(t.train_cache.shape))
