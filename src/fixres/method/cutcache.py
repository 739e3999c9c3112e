"""Activations at the fix's cut, computed once per (photos, size, decode) and shared by every model that differs
from the one they were computed on only after the cut.

The fix changes only the modules after a cut (the last norm and the classifier, or the last stage:
``fixres.models.parts``); everything before it computes the same activations for the model before the fix and
for every fixed candidate. ``CutCache.evaluate`` evaluates the model before the fix as ``evaluate`` does and keeps,
per photo and view, the activation entering the cut (``CutRecorder``; in memory within a budget, else in fp16
on disk). ``CutCache.score`` then scores a fixed model on the same photos at one size by running only the modules
after the cut (``fixres.method.prefix.Suffix``), once that runner has reproduced the model's full forward on a
few photos. It answers None, and the caller evaluates in full, when nothing was recorded for those photos at
that size, or the photos, crop, decode or the weights before the cut differ from the recorded ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fixres.config import DEFAULT_FOLDS, DataConfig
from fixres.data.transforms import geometry_for, test_transform
from fixres.io.evaluation import EvalResult
from fixres.method.evaluate import PerImage, assemble, batch_outcomes, evaluate
from fixres.method.prefix import PrefixCache, Suffix, adapted_cut, build_suffix, first_inputs, replay
from fixres.method.views import _plan
from fixres.models.hooks import capture
from fixres.runtime.dist import DistEnv
from fixres.runtime.engine import Precision

#: Bytes per megabyte, for budgets given in MB.
MB = 2 ** 20


def photos_digest(samples) -> str:
    """Which photos, in which order, with which labels."""
    h = hashlib.blake2b(digest_size=16)
    for path, label in getattr(samples, "samples", samples):
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()


def prefix_digest(model: nn.Module, after: Sequence[str]) -> str:
    """The weights and buffers of ``model`` outside the modules ``after`` the cut: what the cached activations
    depend on."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        if any(name.startswith(m + ".") for m in after):
            continue
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


class CutRecorder:
    """The activation entering the module ``cut`` for every photo and view of one ``evaluate`` pass (``record=``).

    ``keep``: the modules from the cut on, which the pass must run unfolded (``fold_batchnorms(keep=...)``)."""

    def __init__(self, cut: str, keep: Sequence[str], n: int, views: int, *, budget_bytes: int, folder: Path):
        self.cut, self.keep, self.n = cut, tuple(keep), n
        self.stores: list[PrefixCache | None] = [None] * views
        self.budget_bytes, self.folder = budget_bytes, folder
        self._view = 0
        self._current: dict[int, torch.Tensor] = {}

    def view(self, i: int) -> None:
        self._view = i

    @contextlib.contextmanager
    def attached(self, models: Sequence[nn.Module]):
        handles = [m.get_submodule(self.cut).register_forward_pre_hook(self._hook)
                   for m in {id(m): m for m in models}.values()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, module, args) -> None:
        self._current[self._view] = args[0].detach()

    def batch_done(self, indices: torch.Tensor, labels: torch.Tensor) -> None:
        for v, act in self._current.items():
            if self.stores[v] is None:
                self.stores[v] = PrefixCache(self.n, tuple(act.shape[1:]), torch.float32,
                                             budget_bytes=max(0, self.budget_bytes - self.bytes),
                                             folder=self.folder / f"view{v}")
            self.stores[v].put(indices, act.float(), labels)
        self._current.clear()

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.stores if s is not None)


@dataclass
class _Entry:
    """What was recorded for one set of photos at one size."""

    store: PrefixCache
    photos: str
    prefix: str
    crop_ratio: float
    reduced_decode: bool
    skipped: list[dict]
    n_samples: int


@dataclass
class CutCache:
    """A run's activations at the cut (see the module): ``evaluate`` records, ``score`` replays."""

    chain: list[str]
    first: list[str]
    folder: Path
    budget_bytes: int
    cut: str | None = None
    after: tuple[str, ...] = ()
    reason: str = "nothing recorded yet"
    entries: dict[tuple[str, int], _Entry] = field(default_factory=dict)
    replayed: int = 0

    @classmethod
    def for_model(cls, model: nn.Module, parts, *, folder: Path, budget_mb: float) -> "CutCache":
        chain, first = adapted_cut(model, parts)
        return cls(chain=chain, first=first, folder=Path(folder), budget_bytes=int(budget_mb * MB))

    @property
    def bytes(self) -> int:
        return sum(e.store.bytes for e in self.entries.values())

    def summary(self) -> dict:
        """How the fixed models were scored: the cut, how many scores ran from it, the memory it holds now."""
        return {"cut": self.cut, "replayed": self.replayed, "reason": self.reason,
                "megabytes": round(self.bytes / MB, 1), "on_disk": any(e.store.on_disk for e in self.entries.values())}

    def describe(self) -> str:
        """One line for the terminal: where the scores came from (``summary``)."""
        s = self.summary()
        if not s["replayed"]:
            return f"fixed models scored by full forwards ({s['reason']})"
        return (f"{s['replayed']} fixed-model scores ran only the modules after {s['cut']}, on the activations "
                f"the model before the fix left there ({self.bytes / MB:.0f} MB, "
                f"{'fp16 on disk' if s['on_disk'] else 'in memory'})")

    def forget(self, name: str) -> None:
        """Drop what was recorded for the photos ``name``."""
        for key in [k for k in self.entries if k[0] == name]:
            self.entries.pop(key).store.close()

    def close(self) -> None:
        for entry in self.entries.values():
            entry.store.close()
        self.entries.clear()

    def _suffix(self, model: nn.Module, samples, cfg: DataConfig, size: int, device) -> Suffix | None:
        """The verified runner of ``model`` from the cut, at ``size``; None (with ``reason``) when there is none."""
        sample = first_inputs(getattr(samples, "samples", samples),
                               test_transform(geometry_for(size, cfg, cfg.crop_ratio), cfg), device)
        if sample is None:
            self.reason = "no readable photo"
            return None
        suffix, why = build_suffix(model, self.chain, self.first, sample)
        if suffix is None or suffix.head is not None or suffix.from_features:
            self.reason = why if suffix is None else "the cut is inside timm's forward_head"
            return None
        if self.cut is not None and suffix.cut != self.cut:
            self.reason = f"the cut moved from {self.cut} to {suffix.cut}"
            return None
        return suffix

    def evaluate(self, model: nn.Module, name: str, samples, cfg: DataConfig, *, test_sizes: Sequence[int],
                 env: DistEnv, **kw) -> EvalResult:
        """``evaluate(model, samples, cfg, test_sizes=...)`` at the data config's crop, recording the activations
        at the cut as ``name`` (when one process runs it and the model has a cut a runner reproduces)."""
        recorder = None
        if not env.distributed and samples:
            suffix = self._suffix(model, samples, cfg, int(test_sizes[0]), env.device)
            if suffix is not None:
                self.cut, self.after = suffix.cut, tuple(n for n, _, _ in suffix.steps)
                recorder = CutRecorder(self.cut, self.after, len(getattr(samples, "samples", samples)),
                                       len(test_sizes), budget_bytes=max(0, self.budget_bytes - self.bytes),
                                       folder=self.folder / name)
        elif env.distributed:
            self.reason = "recorded in one process only"
        result = evaluate(model, samples, cfg, test_sizes=list(test_sizes), crop_ratios=[cfg.crop_ratio], env=env,
                          record=recorder, **kw)
        if recorder is not None:
            digest, prefix = photos_digest(samples), prefix_digest(model, self.after)
            skipped = [{"path": s.path, "reason": s.reason} for s in result.skipped]
            for size, store in zip((r.test_size for r in result.rows), recorder.stores):
                if store is not None:
                    if (name, int(size)) in self.entries:
                        self.entries[(name, int(size))].store.close()
                    self.entries[(name, int(size))] = _Entry(store, digest, prefix, cfg.crop_ratio,
                                                             kw.get("reduced_decode", True), skipped,
                                                             len(getattr(samples, "samples", samples)))
            self.reason = f"cut at {self.cut}"
        return result

    def _recorded(self, model: nn.Module, name: str, samples, cfg: DataConfig, size: int, *, env: DistEnv,
                  reduced_decode: bool) -> _Entry | None:
        """What was recorded for the photos ``name`` at ``size``, where it stands for ``model``'s forward on
        ``samples`` (the same photos, crop, decode and weights before the cut, in one process); else None."""
        entry = self.entries.get((name, int(size)))
        if entry is None or env.distributed:
            return None
        if (entry.photos != photos_digest(samples) or entry.crop_ratio != cfg.crop_ratio
                or entry.reduced_decode != reduced_decode or entry.prefix != prefix_digest(model, self.after)):
            return None
        return entry

    def score(self, model: nn.Module, name: str, samples, cfg: DataConfig, size: int, *, env: DistEnv,
              precision: Precision, batch_size: int, workers: int | None = None, reduced_decode: bool = True,
              keep_outcomes: bool = False, **_ignored) -> EvalResult | None:
        """``model`` on ``samples`` at ``size`` from the recorded activations, as ``evaluate`` would give it (one
        view at the data config's crop, no per-class table); None when they cannot stand for its forward."""
        entry = self._recorded(model, name, samples, cfg, size, env=env, reduced_decode=reduced_decode)
        if entry is None:
            return None
        suffix = self._suffix(model, samples, cfg, size, env.device)
        if suffix is None:
            return None
        start = time.perf_counter()
        plan = _plan(model, samples, cfg, test_sizes=[size], crop_ratios=[cfg.crop_ratio], ensembles=(),
                     batch_size=batch_size, folds=DEFAULT_FOLDS, num_classes=None, class_names=None)
        res, n_out = _replay(model, suffix, entry.store, plan, batch_size=batch_size, device=env.device,
                             precision=precision)
        self.replayed += 1
        return assemble(res, plan, entry.skipped, n_out=n_out, fallbacks=0, seconds=time.perf_counter() - start,
                        env=env, precision=precision, batch_size=batch_size, workers=workers or 0, ten_crop=False,
                        folds=DEFAULT_FOLDS, per_class=False, keep_log_probs=False, keep_outcomes=keep_outcomes)

    def pooled(self, model: nn.Module, name: str, samples, cfg: DataConfig, sizes: Sequence[int], *,
               rows: Sequence[int], point: tuple[str, str], env: DistEnv, precision: Precision, batch_size: int,
               reduced_decode: bool = True) -> tuple[dict[int, np.ndarray], list[dict]] | None:
        """({size: the values at ``point`` (module name, "input" | "output") of ``model``, one row per readable
        photo among ``rows`` of ``samples``, in their order}, the unreadable ones among them) from the recorded
        activations, as a forward with a hook there would give them (``method.stats.collect_pooled``); None when
        a size was not recorded for these photos or the record cannot stand for ``model``'s forward."""
        entries = [self._recorded(model, name, samples, cfg, s, env=env, reduced_decode=reduced_decode)
                   for s in sizes]
        if any(e is None for e in entries):
            return None
        wanted = torch.zeros(entries[0].n_samples if entries else 0, dtype=torch.bool)
        wanted[torch.as_tensor(list(rows), dtype=torch.long)] = True
        out: dict[int, np.ndarray] = {}
        for size, entry in zip(sizes, entries):
            suffix = self._suffix(model, samples, cfg, int(size), env.device)
            if suffix is None:
                return None
            seen: list[torch.Tensor] = []
            values: list[torch.Tensor] = []
            was = model.training
            model.eval()
            try:
                with capture(model, [point[0]], where=point[1], fn=lambda _n, t: seen.append(t.float().cpu())):
                    for idx, _y, _logits in replay(suffix, entry.store, batch_size=batch_size, device=env.device,
                                                   precision=precision):
                        if len(seen) != 1:  # the point is not (or not once) among the modules after the cut
                            return None
                        values.append(seen.pop()[wanted[idx]])
            finally:
                model.train(was)
            out[int(size)] = torch.cat(values).flatten(1).numpy() if values else np.zeros((0, 0), np.float32)
        paths = {str(getattr(samples, "samples", samples)[i][0]) for i in rows}
        skipped = [s for s in (entries[0].skipped if entries else []) if s["path"] in paths]
        self.replayed += 1
        return out, skipped


@dataclass
class _Rows:
    indices: torch.Tensor
    labels: torch.Tensor


def _replay(model: nn.Module, suffix: Suffix, store: PrefixCache, plan, *, batch_size: int, device,
            precision: Precision) -> tuple[PerImage, int | None]:
    """Per-image outcomes of the suffix on every recorded photo, in data-set order."""
    parts, n_out = [], None
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx, y, logits in replay(suffix, store, batch_size=batch_size, device=device, precision=precision):
                logp = torch.log_softmax(logits, 1)
                n_out = logp.shape[1]
                parts.append(batch_outcomes([logp], plan, _Rows(idx, y), keep_log_probs=False))
    finally:
        model.train(was)
    return PerImage.concat(parts, 1), n_out



class FitCaches:
    """The fitting photos' activations at the cut, kept across the fine-tunings of one run.

    Every fine-tuning of ``fixres fix`` (the schedule grid's and each candidate's) starts from the model before
    the fix on the same fitting photos, so at one size its frozen-prefix cache holds the same activations: it is
    filled once and handed to the next fine-tuning at that size (``finetune(shared=...)``). An entry is keyed on
    the photos, the size and pre-processing, the precision, the cut and the weights before it, so a cache is only
    handed to a fine-tuning it stands for. In-memory entries beyond ``budget_bytes`` are dropped, oldest first, and one
cache on disk is kept at a time (one of ImageNet's fitting photos at one size is tens of gigabytes).
    """

    def __init__(self, *, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.entries: dict[tuple, tuple[PrefixCache, list[dict]]] = {}
        self.reused = 0

    @staticmethod
    def _key(tune) -> tuple:
        cfg, suffix = tune.cfg, tune.suffix
        return (int(tune.settings["test_size"]), suffix.cut, photos_digest(tune.train_samples),
                prefix_digest(tune.model, [n for n, _, _ in suffix.steps]), tuple(cfg.mean), tuple(cfg.std),
                cfg.interpolation, cfg.crop_ratio, str(tune.precision), tune.env.rank)

    def lookup(self, tune) -> tuple[PrefixCache, list[dict]] | None:
        """The cache a fine-tuning (``method.finetuning``'s run) would fill, when one was filled before."""
        hit = self.entries.get(self._key(tune))
        self.reused += hit is not None
        return (hit[0], list(hit[1])) if hit is not None else None

    def keep(self, tune, cache: PrefixCache, skipped: list[dict]) -> None:
        self.entries[self._key(tune)] = (cache, list(skipped))
        while len(self.entries) > 1:
            caches = [c for c, _ in self.entries.values()]
            disk_over = sum(c.on_disk for c in caches) > 1
            if not disk_over and sum(c.bytes for c in caches if not c.on_disk) <= self.budget_bytes:
                break
            # the oldest of the kind over its limit: never the cache just kept, the newest
            oldest = next(k for k, (c, _) in self.entries.items() if c.on_disk == disk_over)
            self.entries.pop(oldest)[0].close()

    def sizes(self) -> set[int]:
        """The sizes a cache is held for (whatever photos and weights: the caller knows they are its own)."""
        return {key[0] for key in self.entries}

    def holds(self, cache: PrefixCache) -> bool:
        return any(c is cache for c, _ in self.entries.values())

    def close(self) -> None:
        for cache, _ in self.entries.values():
            cache.close()
        self.entries.clear()
