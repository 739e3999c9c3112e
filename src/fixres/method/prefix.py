"""The frozen prefix of a fine-tuning: the model run from a cut point, and the cache of its activations.

With the deterministic test DA, everything before the first adapted module computes the same activations
every epoch. They are computed once (one decode per image), kept in RAM (or on disk in fp16 beyond a
memory budget), and each epoch only runs the model from the cut on (``Suffix``). The cut is at a module
boundary of the model's own sequential structure (the top-level children in execution order, descending
into ``nn.Sequential`` containers), so the "rest of the model" is exactly the modules the forward runs
after it; the suffix is checked against the full forward on a sample before it is trusted
(``build_suffix``), and the caller falls back to the full forward when it does not match.
Token models (ViT, DeiT, Mixer, LeViT, ...) pool inside timm's ``forward_head`` (a class token taken,
tokens averaged: no module does it), so a cut in the chain cannot be replayed there; for them the cut is in
the modules ``forward_features`` runs (ViT ``norm``) or at its output, and the suffix ends with
``forward_head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fixres.data.images import BadImage, load_rgb
from fixres.data.loaders import ImageDataset, collate, yield_to_compute
from fixres.errors import FixresError
from fixres.models.fold import fold_batchnorms
from fixres.models.hooks import hooked, trace_calls
from fixres.models.parts import select_parts
from fixres.models.structure import find_parts
from fixres.runtime import progress as prog
from fixres.runtime.cost import median_seconds
from fixres.runtime.dist import DistEnv
from fixres.runtime.engine import Precision, SingleThreaded, autocast, to_device

#: Relative tolerance when checking the suffix runner against the full forward (fp32).
SUFFIX_RTOL = 1e-4


SUFFIX_ATOL = 1e-4


class _StopForward(Exception):
    pass


@dataclass
class Suffix:
    """The model from a cut point on: ``steps`` run in order on the activation entering ``steps[0]``, then
    ``head`` (timm's ``forward_head``, where the token pooling happens outside any module) if set.
    ``from_features``: the cut is forward_features' output (no step: only the head runs)."""

    cut: str
    steps: list[tuple[str, nn.Module, int]]  # (name, module, input ndim in the full forward)
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_features: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for _name, module, ndim in self.steps:
            if x.dim() != ndim:
                if ndim == 2 and x.dim() == 4 and x.shape[2] * x.shape[3] == 1:
                    x = x.flatten(1)  # the functional torch.flatten between pooling and classifier
                else:
                    raise FixresError(f"cannot run the model from {self.cut}: {_name} expects {ndim}-D input")
            x = module(x)
        return self.head(x) if self.head is not None else x


def plan_suffix(model: nn.Module, chain: Sequence[str], first_adapted: Sequence[str], *,
                ndims: dict[str, int]) -> Suffix | None:
    """Cut at the chain element containing the first adapted module (descending into plain Sequentials)."""
    def contains(name: str) -> bool:
        return any(a == name or a.startswith(name + ".") for a in first_adapted)

    steps: list[str] = []
    names = list(chain)
    while True:
        k = next((i for i, n in enumerate(names) if contains(n)), None)
        if k is None:
            return None
        head = names[k]
        module = model.get_submodule(head)
        rest = names[k + 1:]
        is_plain = isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
        if is_plain and head not in first_adapted and len(module) > 0:
            steps = rest + steps
            names = [f"{head}.{c}" for c, _ in module.named_children()]
            continue
        steps = [head] + rest + steps
        break
    if any(n not in ndims for n in steps):
        return None
    return Suffix(cut=steps[0], steps=[(n, model.get_submodule(n), ndims[n]) for n in steps])


def capture_cut(model: nn.Module, suffix: Suffix, x: torch.Tensor) -> torch.Tensor:
    """Run the model's own forward up to the cut point and return the activation entering it."""
    if suffix.from_features:
        return model.forward_features(x)
    box: list[torch.Tensor] = []

    def hook(mod, args):
        box.append(args[0])
        raise _StopForward

    # By name: ``model`` may be a copy of the one the suffix was planned on (``frozen_prefix``).
    with hooked([(model.get_submodule(suffix.cut), "pre", hook)]):
        try:
            model(x)
        except _StopForward:
            pass
    if not box:
        raise FixresError(f"the forward pass never reached {suffix.cut}")
    return box[0]


def plan_head_suffix(model: nn.Module, chain: Sequence[str], first_adapted: Sequence[str], *,
                     ndims: dict[str, int], in_features: set[str]) -> Suffix | None:
    """timm's split (``forward_features`` then ``forward_head``): cut at the first chain element run by
    forward_features that holds an adapted module (ViT/Mixer ``norm``, a last block), or at forward_features'
    output when every adapted module runs in forward_head (LeViT's heads); the suffix runs the remaining
    forward_features modules, then ``model.forward_head``, which does the token pooling no module does."""
    head = getattr(model, "forward_head", None)
    if not callable(head) or not callable(getattr(model, "forward_features", None)):
        return None
    features_chain = [n for n in chain if n in in_features]
    inside = [a for a in first_adapted if any(a == n or a.startswith(n + ".") for n in features_chain)]
    if not inside:
        return Suffix(cut="forward_features output", steps=[], head=head, from_features=True)
    base = plan_suffix(model, features_chain, inside, ndims=ndims)
    return Suffix(cut=base.cut, steps=base.steps, head=head) if base is not None else None


def _trace_ndims(model: nn.Module, size: int, device) -> dict[str, int]:
    x = torch.zeros(2, 3, size, size, device=device)
    with torch.no_grad(), trace_calls(model) as calls:
        model(x)
    return {c.name: len(c.in_shape) for c in calls if c.in_shape is not None}


def _features_modules(model: nn.Module, chain: Sequence[str], sample: torch.Tensor) -> set[str]:
    """The chain elements that timm's ``forward_features`` runs (empty for a model without one)."""
    if not callable(getattr(model, "forward_features", None)):
        return set()
    try:
        with torch.no_grad(), trace_calls(model) as calls:
            model.forward_features(sample)
    except Exception:  # noqa: BLE001 - a forward_features that needs more arguments: no head plan
        return set()
    return {c.name for c in calls} & set(chain)


def _check_suffix(model: nn.Module, suffix: Suffix, sample: torch.Tensor, full: torch.Tensor) -> str | None:
    """None when the suffix reproduces the full forward on ``sample``, else why not."""
    try:
        part = suffix(capture_cut(model, suffix, sample))
    except Exception as exc:  # noqa: BLE001 - e.g. a cell that takes two inputs (NASNet): no cut, no cache
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if part.shape != full.shape or not torch.allclose(part, full, rtol=SUFFIX_RTOL, atol=SUFFIX_ATOL):
        return f"running the model from {suffix.cut} does not reproduce its forward"
    return None


def build_suffix(model: nn.Module, chain: Sequence[str], first_adapted: Sequence[str], sample: torch.Tensor
                 ) -> tuple[Suffix | None, str]:
    """A verified suffix runner, or (None, reason). ``sample``: a few real inputs at the test size (fp32).

    Tried in order: a cut in the model's chain of modules (``plan_suffix``), then timm's features/head split
    (``plan_head_suffix``: token models, whose pooling is no module). The first that reproduces the full
    forward on ``sample`` is used."""
    was = model.training
    model.eval()
    try:
        ndims = _trace_ndims(model, sample.shape[-1], sample.device)
        reasons = []
        with torch.no_grad():
            full = model(sample)
            plans = [lambda: plan_suffix(model, chain, first_adapted, ndims=ndims),
                     lambda: plan_head_suffix(model, chain, first_adapted, ndims=ndims,
                                              in_features=_features_modules(model, chain, sample))]
            for plan in plans:
                suffix = plan()
                if suffix is None:
                    continue
                why = _check_suffix(model, suffix, sample, full)
                if why is None:
                    return suffix, f"cut at {suffix.cut}" + (", then forward_head" if suffix.head else "")
                reasons.append(why)
        return None, reasons[0] if reasons else "no module boundary found before the adapted modules"
    finally:
        model.train(was)


class PrefixCache:
    """Activations entering the cut point, one row per image (in RAM, or an fp16 memmap on disk)."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, *, budget_bytes: int,
                 folder: Path | None) -> None:
        self.n = n
        self.shape = shape
        self.dtype = dtype
        self.valid = torch.zeros(n, dtype=torch.bool)
        self.labels = torch.full((n,), -1, dtype=torch.long)
        per = int(np.prod(shape))
        self.bytes = n * per * torch.tensor([], dtype=dtype).element_size()
        self.on_disk = self.bytes > budget_bytes and folder is not None
        if self.on_disk:
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / "prefix_cache.f16"
            self.store = np.lib.format.open_memmap(str(self.path), mode="w+", dtype=np.float16, shape=(n, *shape))
            self.bytes = n * per * 2
        else:
            self.path = None
            self.store = torch.empty((n, *shape), dtype=dtype)

    def put(self, idx: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> None:
        x = x.detach().to("cpu")
        if self.on_disk:
            self.store[idx.numpy()] = x.float().numpy().astype(np.float16)
        else:
            self.store[idx] = x.to(self.dtype)
        self.valid[idx] = True
        self.labels[idx] = labels

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on_disk:
            x = torch.from_numpy(np.ascontiguousarray(self.store[np.sort(idx.numpy())]))
            order = torch.argsort(torch.argsort(idx))
            x = x[order].to(self.dtype)
        else:
            x = self.store[idx]
        return x, self.labels[idx]

    def close(self) -> None:
        if self.on_disk:
            del self.store
            if self.path is not None and self.path.exists():
                self.path.unlink()


def image_loader(samples, transform, batches: list[list[int]], workers: int) -> DataLoader:
    ds = ImageDataset(samples, SingleThreaded(transform) if workers == 0 else transform)
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate, persistent_workers=False,
                      worker_init_fn=yield_to_compute)


def frozen_prefix(model: nn.Module, suffix: Suffix, size: int) -> nn.Module:
    """The eval-mode ``model`` to record the activation entering the cut with: a copy with the batch norms before
    the cut folded into their convolutions (the same function, fewer layers to run; the prefix is frozen), the
    modules from the cut on left as they are, or ``model`` itself where nothing folds."""
    if suffix.from_features:
        return model
    return fold_batchnorms(model, size, keep=[name for name, _, _ in suffix.steps])[0]


def fill_cache(model, suffix, samples, transform, *, batch_size, workers, device, precision, budget_bytes,
               folder, progress, desc) -> tuple[PrefixCache | None, list[dict]]:
    """The cache of ``samples``' activations entering the cut, row i the i-th photo's (``record_cut``)."""
    n = len(samples)
    batches = [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
    return record_cut(model, suffix, image_loader(samples, transform, batches, workers), n, device=device,
                      precision=precision, budget_bytes=budget_bytes, folder=folder, progress=progress, desc=desc,
                      shown=n)


def record_cut(model, suffix, batches, n: int, *, device, precision, budget_bytes, folder, progress, desc,
               shown: int | None, rows: Callable | None = None) -> tuple[PrefixCache | None, list[dict]]:
    """(a cache of ``n`` rows holding the activations entering the cut of each photo of the loader's ``batches``,
    the photos skipped); ``rows(batch)``: the rows its photos go to (default: their indices). None without a
    readable photo. ``shown``: the photos the progress bar counts to (None: not known)."""
    cache = None
    prefix_model = None
    skipped: list[dict] = []
    bar = prog.bar(shown, desc, enabled=progress)
    try:
        with torch.no_grad():
            for batch in batches:
                skipped.extend(s.to_dict() for s in batch.skipped)
                bar.update(len(batch) + len(batch.skipped))
                if batch.inputs is None:
                    continue
                x = to_device(batch.inputs, device, precision)
                if prefix_model is None:
                    prefix_model = frozen_prefix(model, suffix, x.shape[-1])
                with autocast(device, precision):
                    a = capture_cut(prefix_model, suffix, x)
                if cache is None:
                    cache = PrefixCache(n, tuple(a.shape[1:]), a.dtype, budget_bytes=budget_bytes, folder=folder)
                cache.put(batch.indices if rows is None else rows(batch), a, batch.labels)
    finally:
        bar.close()
    return cache, skipped


def replay(suffix: Suffix, cache: PrefixCache, *, batch_size: int, device, precision):
    """(row indices, labels, fp32 logits on the CPU) of the suffix on every cached row, in row order, a batch at
    a time."""
    rows = torch.nonzero(cache.valid).flatten()
    with torch.no_grad():
        for i in range(0, rows.numel(), batch_size):
            idx = rows[i:i + batch_size]
            x, y = cache.get(idx)
            with autocast(device, precision):
                logits = suffix(x.to(device))
            yield idx, y, logits.float().cpu()


def cached_top1(suffix: Suffix, cache: PrefixCache, *, batch_size: int, device, precision) -> float:
    hits = total = 0
    for idx, y, logits in replay(suffix, cache, batch_size=batch_size, device=device, precision=precision):
        hits += int((logits.argmax(1) == y).sum())
        total += idx.numel()
    return 100.0 * hits / max(1, total)


def adapted_cut(model: nn.Module, parts) -> tuple[list[str], list[str]]:
    """(the model's chain of modules, the first of the modules ``parts`` adapts): where a cut can go
    (``build_suffix``)."""
    structure = find_parts(model)
    return list(structure.chain), list(select_parts(model, structure, parts).first)


def _cache_folder(name: str, env: DistEnv) -> str:
    return f"{name}_rank{env.rank}" if env.distributed else name


def first_inputs(samples, transform, device, count: int = 2) -> torch.Tensor | None:
    """A few decoded inputs for checking the suffix runner (fp32)."""
    xs = []
    for path, _ in samples:
        try:
            xs.append(transform(load_rgb(path)))
        except BadImage:
            continue
        if len(xs) == count:
            break
    return torch.stack(xs).to(device) if xs else None


#: Timed repeats (after one warm-up) of each side of ``cached_step_share``.
SHARE_REPEATS = 3


def _median_seconds(fn: Callable[[], object]) -> float:
    return median_seconds(fn, repeats=SHARE_REPEATS)


def cached_step_share(model: nn.Module, chain: Sequence[str], first_adapted: Sequence[str], batch: torch.Tensor,
                      *, relative_to: float | None = None, precision: Precision | None = None) -> float | None:
    """Seconds of one cached fine-tuning step (the modules after the cut, forward and backward) per second of a
    full forward of the same ``batch``, measured now, or, with ``relative_to``, per ``relative_to`` seconds (a
    forward's time per image measured elsewhere); None when no cut reproduces the model (the fine-tuning then runs
    whole epochs). ``precision``: the fine-tuning's, under which the activations are recorded and the step runs
    (default fp32)."""
    suffix, _ = build_suffix(model, chain, first_adapted, batch)
    if suffix is None:
        return None
    precision = precision or Precision(amp=False, dtype=None, channels_last=False)
    was = model.training
    model.eval()
    params = [p for _, module, _ in suffix.steps for p in module.parameters()]
    if not params:  # the cut at forward_features' output: the head's parameters are not the chain's
        return None
    grads = [p.requires_grad for p in params]
    try:
        with torch.no_grad(), autocast(batch.device, precision):
            acts = capture_cut(model, suffix, batch)
            full = _median_seconds(lambda: model(batch))
        for p in params:
            p.requires_grad_(True)

        def step() -> None:
            with autocast(batch.device, precision):
                out = suffix(acts)
            out.float().sum().backward()
        tail = _median_seconds(step)
    finally:
        for p, g in zip(params, grads):
            p.requires_grad_(g)
            p.grad = None
        model.train(was)
    if relative_to is not None:
        return tail / batch.shape[0] / relative_to if relative_to > 0 else None
    return tail / full if full > 0 else None
