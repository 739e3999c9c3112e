"""Forward hooks that are always removed: the one way fixres looks inside a model while it runs.

Every hook fixres registers goes through ``hooked(...)``, a context manager whose ``finally``
removes the handles, so an exception in the middle of a forward pass (or a Ctrl-C) never leaves a
hook behind that would silently change the next run. ``capture`` records the input or output of
named modules; ``trace_calls`` records the order in which modules start and finish and the shapes
they see, which is what ``fixres.models.structure`` reads the model's structure from.

One hook is kept on purpose: a label-free adaptation that is a map after the pooling, not a change of
weights (the Frechet equalisation), stays on the model as its *kept hook* (``keep_hook``), so that an
exporter can refuse it (``kept_hook``) with the reason its owner gave, instead of silently dropping it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

#: The attribute of a model that holds its kept hook (set with ``object.__setattr__``: not a submodule).
KEPT_HOOK_ATTR = "_fixres_kept_hook"


@dataclass
class KeptHook:
    """A hook kept on a model until ``drop_kept_hook``: its handle, what it computes, why it is not in the weights."""

    handle: object
    payload: object
    not_in_weights: str


def keep_hook(model: nn.Module, module: nn.Module, kind: str, fn: Callable, *, payload: object,
              not_in_weights: str) -> None:
    """Register ``fn`` on ``module`` ("forward" or "pre") and keep it on ``model``, replacing an earlier kept hook."""
    drop_kept_hook(model)
    if kind == "pre":
        handle = module.register_forward_pre_hook(fn)
    elif kind == "forward":
        handle = module.register_forward_hook(fn)
    else:  # pragma: no cover - programming error
        raise ValueError(f"unknown hook kind {kind!r}")
    object.__setattr__(model, KEPT_HOOK_ATTR, KeptHook(handle, payload, not_in_weights))


def kept_hook(model: nn.Module) -> KeptHook | None:
    return getattr(model, KEPT_HOOK_ATTR, None)


def drop_kept_hook(model: nn.Module) -> bool:
    """Remove the kept hook; False when there was none."""
    current = kept_hook(model)
    if current is None:
        return False
    current.handle.remove()
    object.__setattr__(model, KEPT_HOOK_ATTR, None)
    return True


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks registered on ``model`` and its submodules (for tests and checks)."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return total


@contextlib.contextmanager
def hooked(registrations: Sequence[tuple[nn.Module, str, Callable]]) -> Iterator[None]:
    """Register ``(module, "forward"|"pre", fn)`` hooks for the duration of the block, then remove them all."""
    handles = []
    try:
        for module, kind, fn in registrations:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            elif kind == "forward":
                handles.append(module.register_forward_hook(fn))
            else:  # pragma: no cover - programming error
                raise ValueError(f"unknown hook kind {kind!r}")
        yield
    finally:
        for h in handles:
            h.remove()


def _first_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str], *, where: str = "output",
            fn: Callable[[str, torch.Tensor], None] | None = None) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the ``where`` ("input" or "output") tensor of each named module on every call.

    With ``fn`` the tensor is passed to ``fn(name, tensor)`` at once, before any later in-place op can
    change it (streaming statistics without holding all activations in memory); otherwise the yielded
    dict collects detached copies.
    """
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def make(name):
        def sink(t):
            if t is None:
                return
            t = t.detach()
            if fn is not None:
                fn(name, t)
            else:
                # a copy: residual blocks add and ReLU in place into a batch-norm's output after its hook
                store[name].append(t.clone())
        if where == "input":
            return lambda mod, args: sink(_first_tensor(args))
        return lambda mod, args, out: sink(_first_tensor(out))

    regs = [(model.get_submodule(n), "pre" if where == "input" else "forward", make(n)) for n in names]
    with hooked(regs):
        yield store


@dataclass
class Call:
    """One module call seen while tracing: start/end order and the first input/output tensors."""

    name: str
    start: int
    end: int = -1
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    output: torch.Tensor | None = field(default=None, repr=False)
    input: torch.Tensor | None = field(default=None, repr=False)
    #: autograd nodes at call time (an in-place op later re-bases the tensor's own grad_fn).
    in_grad_fn: object | None = field(default=None, repr=False)
    out_grad_fn: object | None = field(default=None, repr=False)


@contextlib.contextmanager
def trace_calls(model: nn.Module, *, keep_tensors: bool = False) -> Iterator[list[Call]]:
    """Record every module call (first call only per module) in start order, with shapes.

    ``keep_tensors`` keeps references to the first input and output tensors (with their autograd
    graph), for following the data flow backwards.
    """
    calls: list[Call] = []
    by_name: dict[str, Call] = {}
    counter = [0]

    def pre(name):
        def hook(mod, args):
            if name in by_name:
                return
            counter[0] += 1
            x = _first_tensor(args)
            call = Call(name=name, start=counter[0], in_shape=tuple(x.shape) if x is not None else None)
            if keep_tensors:
                call.input = x
                call.in_grad_fn = getattr(x, "grad_fn", None)
            by_name[name] = call
            calls.append(call)
        return hook

    def post(name):
        def hook(mod, args, out):
            call = by_name.get(name)
            if call is None or call.end >= 0:
                return
            counter[0] += 1
            call.end = counter[0]
            y = _first_tensor(out)
            call.out_shape = tuple(y.shape) if y is not None else None
            if keep_tensors:
                call.output = y
                call.out_grad_fn = getattr(y, "grad_fn", None)
        return hook

    regs = []
    for name, module in model.named_modules():
        if module is model:
            continue
        regs.append((module, "pre", pre(name)))
        regs.append((module, "forward", post(name)))
    with hooked(regs):
        yield calls


def first_non_finite_output(model: nn.Module, x: torch.Tensor) -> str | None:
    """The first layer, in the order the forward pass finishes them, whose output holds NaN or infinity on ``x``:
    its name, "the input" when ``x`` already does, "the output" when only the final result does; None when every
    output is finite. Each output is checked in its hook, before a later in-place op could overwrite it."""
    if not bool(torch.isfinite(x).all()):
        return "the input"
    found: list[str] = []

    def make(name):
        def check(_mod, _args, out):
            t = _first_tensor(out)
            if not found and t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                found.append(name)
        return check

    leaves = [(m, "forward", make(n)) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    with hooked(leaves), torch.no_grad():
        out = _first_tensor(model(x))
    if found:
        return found[0]
    return None if out is None or bool(torch.isfinite(out).all()) else "the output"
