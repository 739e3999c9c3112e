"""The residual sum before the last activation, found by tracing (appendix A.2 on networks with shortcuts).

In a ResNet block the last activation reads ``bn3(x) + shortcut``, not the batch-norm's output: the
distribution before that activation is the sum's. ``find_last_sum`` traces one forward pass with
autograd and follows the graph back from the pooled vector through parameter-free nodes: when a sum
(an add node) is met before any norm, the shortcut joins before the last activation. It returns where
the sum can be read at run time (the input of the module that consumes it, at its n-th call in a
forward pass, so an activation module a block calls several times, as torchvision's ``relu``, is read
at the right call) and how a per-channel affine map ``r * sum + t`` (r > 0) is written into the weights:
every branch of the sum that ends in a batch-norm has that batch-norm's affine scaled by r (one of them
also shifted by t); an identity shortcut, the ReLU of the previous block's sum, is scaled by scaling
that sum the same way (a ReLU commutes with a positive scale), and every other layer reading that ReLU's
output (the next block's first convolution) divides its input channels by r. Nothing is found by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fixres.models.hooks import hooked

#: Trace input size: large enough that a classic CNN keeps a spatial map > 1x1 before pooling.
TRACE_SIZE = 64
#: Autograd nodes that end the walk back from the pooled vector (layers with weights, norms).
_STOP = ("Convolution", "Addmm", "Mm", "Linear", "BatchNorm", "LayerNorm", "GroupNorm")


@dataclass
class _Seen:
    """Every module call of a traced forward pass, with the autograd nodes of its input and output."""

    calls: list = field(default_factory=list)  # (name, occurrence, in_node, out_node)


@dataclass
class LastSum:
    """Where the sum before the last activation is read, and the layers an affine map on it changes."""

    consumer: str        # module whose input is the sum
    occurrence: int      # its call, counted from 0 within one forward pass
    calls_per_forward: int
    scale_bns: list[str]           # batch-norms scaled by r
    shift_bn: str                  # the one also shifted by t
    divide_inputs: list[str]       # convolutions whose input channels are divided by r

    def to_dict(self) -> dict:
        return {"read_at": f"input of {self.consumer} (call {self.occurrence + 1} of {self.calls_per_forward})",
                "scaled": self.scale_bns, "shifted": self.shift_bn, "inputs_divided": self.divide_inputs}


def _parents(node) -> list:
    return [n for n, _ in getattr(node, "next_functions", ()) if n is not None
            and type(n).__name__ != "AccumulateGrad"]


def _trace(model: nn.Module, size: int) -> tuple[_Seen, torch.Tensor]:
    seen = _Seen()
    count: dict[str, int] = {}

    def pre(name):
        def hook(mod, args):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            seen.calls.append([name, count.get(name, 0), getattr(x, "grad_fn", None), None])
            count[name] = count.get(name, 0) + 1
        return hook

    def post(name):
        def hook(mod, args, out):
            for c in reversed(seen.calls):
                if c[0] == name and c[3] is None:
                    c[3] = getattr(out, "grad_fn", None) if isinstance(out, torch.Tensor) else None
                    break
        return hook
    regs = [r for n, m in model.named_modules() if m is not model
            for r in ((m, "pre", pre(n)), (m, "forward", post(n)))]
    p = next(model.parameters())
    x = torch.zeros(2, 3, size, size, device=p.device).normal_(generator=torch.Generator().manual_seed(0))
    with torch.enable_grad(), hooked(regs):
        out = model(x.requires_grad_(True))
    seen.calls = [tuple(c) for c in seen.calls]
    return seen, out


def _consumers(root) -> dict[int, list]:
    """Autograd node id -> the nodes that read its output, over the whole graph."""
    children: dict[int, list] = {}
    stack, done = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in done:
            continue
        done.add(id(node))
        for p in _parents(node):
            children.setdefault(id(p), []).append(node)
            stack.append(p)
    return children


def _first_sum(start):
    """The first add node back from the pooled vector through parameter-free single-input nodes, or None."""
    node = start
    while node is not None:
        kind = type(node).__name__
        if kind.startswith("AddBackward"):
            return node
        if any(s in kind for s in _STOP) or len(_parents(node)) != 1:
            return None
        node = _parents(node)[0]
    return None


def _plan_scale(add, modules: dict, by_out: dict, children: dict, plan: dict) -> bool:
    """Add to ``plan`` what scales every branch of ``add`` by r; False when a branch is of an unknown kind."""
    for p in _parents(add):
        call = by_out.get(id(p))
        if call is not None and isinstance(modules[call[0]], nn.modules.batchnorm._BatchNorm):
            plan["bns"].append(call[0])
            continue
        inner = _parents(p)
        if not (type(p).__name__.startswith("Relu") and len(inner) == 1 and
                type(inner[0]).__name__.startswith("AddBackward")):
            return False
        for reader in children.get(id(p), []):  # the ReLU's other readers see r times their input: compensate
            if reader is add:
                continue
            conv = by_out.get(id(reader))
            if conv is None or not isinstance(modules[conv[0]], nn.Conv2d) or modules[conv[0]].groups != 1:
                return False
            plan["convs"].append(conv[0])
        if not _plan_scale(inner[0], modules, by_out, children, plan):
            return False
    return True


def find_last_sum(model: nn.Module, pooled: tuple[str, str], *, size: int = TRACE_SIZE) -> LastSum | None:
    """The sum the last activation before the pooling reads, when a shortcut joins there (else None: the
    last norm's output is what the activation reads, as in EfficientNet or DenseNet). ``pooled``: (module,
    "output" | "input"), where the pooled vector is read (``fixres.method.stats.pooled_point``). None too
    when an affine map on the sum cannot be written into the weights exactly (a branch of an unknown kind)."""
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    try:
        seen, _ = _trace(model, size)
    except Exception:  # noqa: BLE001 - a model that cannot run at the trace size: its last norm is used instead
        return None
    finally:
        model.train(was_training)
    first = [c for c in seen.calls if c[0] == pooled[0] and c[1] == 0]
    if not first:
        return None
    start = first[0][3] if pooled[1] == "output" else first[0][2]
    add = _first_sum(start)
    if add is None:
        return None
    readers = [c for c in seen.calls if c[2] is add]
    by_out = {id(c[3]): c for c in seen.calls if c[3] is not None}
    plan: dict = {"bns": [], "convs": []}
    if not readers or not _plan_scale(add, modules, by_out, _consumers(start), plan) or not plan["bns"]:
        return None
    reader = max(readers, key=lambda c: len(c[0]))  # the innermost module reading the sum (the activation)
    calls = sum(1 for c in seen.calls if c[0] == reader[0])
    top = [p for p in _parents(add) if id(p) in by_out and by_out[id(p)][0] in plan["bns"]]
    return LastSum(consumer=reader[0], occurrence=reader[1], calls_per_forward=calls,
                   scale_bns=list(dict.fromkeys(plan["bns"])),
                   shift_bn=by_out[id(top[0])][0] if top else plan["bns"][0],
                   divide_inputs=list(dict.fromkeys(plan["convs"])))


@torch.no_grad()
def apply_affine(model: nn.Module, last: LastSum, r: torch.Tensor, t: torch.Tensor) -> None:
    """Write sum -> r * sum + t (per channel, r > 0) into the weights, as ``last`` plans it."""
    for name in last.scale_bns:
        bn = model.get_submodule(name)
        bn.weight.copy_((bn.weight.double() * r).to(bn.weight.dtype))
        shift = t if name == last.shift_bn else torch.zeros_like(t)
        bn.bias.copy_((bn.bias.double() * r + shift).to(bn.bias.dtype))
    for name in last.divide_inputs:
        conv = model.get_submodule(name)
        conv.weight.copy_((conv.weight.double() / r.view(1, -1, 1, 1)).to(conv.weight.dtype))
