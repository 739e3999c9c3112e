"""Finding the parts FixRes adapts, by tracing a forward pass rather than by module names.

One forward pass with hooks on every module (``fixres.hooks.trace_calls``) gives the execution
order and the shapes each module sees. From it:

* the **classifier**: timm's ``get_classifier()``, else the last Linear executed;
* the **global pooling**: the first parameter-free module whose input is a spatial map (H*W > 1) and
  whose output has one value per channel. Models that pool functionally (torchvision DenseNet) have
  none; their pooled vector is then the classifier's input;
* the **batch-norm(s) before pooling**: followed backwards through the autograd graph from the
  pooling input, through parameter-free operations only (ReLU, residual add, concatenation), stopping
  at convolutions and linear layers. The norms reached across the fewest merges (residual adds) are
  the ones that directly feed the pooling: ResNet's last ``bn3`` (and the shortcut's BN when the last
  block downsamples), EfficientNet's ``bn2`` after ``conv_head``, DenseNet's ``norm5``. ConvNeXt's last
  norm is a LayerNorm: no batch-norm is reported and only the classifier can be fine-tuned;
* the **last stage**: the last sequence container of blocks executed before the pooling that holds
  no other such container (ResNet ``layer4``, EfficientNet ``blocks.6``);
* the **chain**: the model's top-level children in execution order (used to run the model from a
  cut point onwards, see ``fixres.finetune``).

``select_parts`` turns a ``--parts`` specification into the modules to train and the batch-norms
whose running statistics are re-estimated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from fixres.errors import FixresError, UsageError

#: Names accepted by ``--parts`` besides explicit module names.
PART_NAMES = ("classifier", "bn", "bn-stats", "last-stage")
#: Trace input size: large enough that every classic CNN keeps a spatial map > 1x1 before pooling.
TRACE_SIZE = 64
_STOP_NODES = ("Convolution", "Addmm", "Mm", "Bmm", "Linear", "Matmul", "Embedding")
_SEQUENCES = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def find_classifier_name(model: nn.Module) -> str:
    """Name of the final classifier module (timm's get_classifier, else the last Linear)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, mod in model.named_modules():
            if mod is head and name:
                return name
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    if last is None:
        raise FixresError(f"no classifier (Linear layer) found in {type(model).__name__}")
    return last


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                               nn.modules.instancenorm._InstanceNorm))


@dataclass
class ModelParts:
    """What fixres found in a model (names are ``named_modules`` names)."""

    classifier: str
    pool: str | None
    pre_pool_bns: list[str]
    last_stage: str | None
    chain: list[str]
    num_features: int | None
    pooled_from: str = "pool output"  # or "classifier input" (functional pooling)
    other_pre_pool_norms: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model_type: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        bns = ", ".join(self.pre_pool_bns) or "none" + (
            f" (last norm: {', '.join(self.other_pre_pool_norms)})" if self.other_pre_pool_norms else "")
        return (f"classifier {self.classifier}; pooling {self.pool or '(functional, before ' + self.classifier + ')'};"
                f" batch-norm before pooling {bns}; last stage {self.last_stage or 'none'}")


def _module_has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=True))


def _spatial(shape) -> int:
    return int(shape[2] * shape[3]) if shape is not None and len(shape) == 4 else 0


def _per_sample(shape) -> int:
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


def _walk_back(start, norm_nodes: dict) -> list[tuple[int, str]]:
    """Norm modules reachable backwards from ``start`` through parameter-free nodes: [(merges, name)]."""
    found: dict[str, int] = {}
    best: dict[int, int] = {}
    stack = [(start, 0)]
    while stack:
        node, merges = stack.pop()
        if node is None:
            continue
        key = id(node)
        if key in best and best[key] <= merges:
            continue
        best[key] = merges
        if key in norm_nodes:
            name = norm_nodes[key]
            found[name] = min(merges, found.get(name, merges))
            continue
        kind = type(node).__name__
        if any(s in kind for s in _STOP_NODES):
            continue
        nexts = [n for n, _ in getattr(node, "next_functions", ()) if n is not None
                 and type(n).__name__ != "AccumulateGrad"]
        step = 1 if len(nexts) > 1 else 0
        for n in nexts:
            stack.append((n, merges + step))
    return sorted((m, n) for n, m in found.items())


def _last_stage(model: nn.Module, calls, before: int) -> str | None:
    """Last leaf sequence container of blocks that finished before the pooling started."""
    modules = dict(model.named_modules())

    def block(m: nn.Module) -> bool:
        return not isinstance(m, _SEQUENCES) and any(True for _ in m.children()) and _module_has_params(m)

    def stage_like(m: nn.Module) -> bool:
        if not isinstance(m, _SEQUENCES):
            return False
        kids = list(m.children())
        return bool(kids) and all(block(k) or stage_like(k) for k in kids)

    done = [c for c in calls if c.end >= 0 and c.end < before]
    candidates = [c for c in done if stage_like(modules[c.name])]
    names = [c.name for c in candidates]
    leaves = [c for c in candidates
              if not any(o != c.name and o.startswith(c.name + ".") for o in names)]
    if not leaves:
        # a flat list of blocks (torchvision MobileNet): the last block is the last stage
        leaves = [c for c in done if block(modules[c.name]) and "." in c.name]
        leaves = [c for c in leaves if not any(c.name.startswith(o.name + ".") for o in leaves)]
    if not leaves:
        return None
    return max(leaves, key=lambda c: c.end).name


def find_parts(model: nn.Module, *, input_size: int = TRACE_SIZE, in_chans: int = 3) -> ModelParts:
    """Trace one forward pass of ``model`` at ``input_size`` and name the parts FixRes adapts.

    Raises FixresError naming what is missing when the model has no classifier or no global pooling.
    """
    from fixres.hooks import trace_calls
    kind = type(model).__name__
    was_training = model.training
    model.eval()
    modules = dict(model.named_modules())
    try:
        x = torch.zeros(2, in_chans, input_size, input_size).normal_(generator=torch.Generator().manual_seed(0))
        p = next(model.parameters(), None)
        if p is not None:
            x = x.to(p.device)
        x.requires_grad_(True)
        with torch.enable_grad(), trace_calls(model, keep_tensors=True) as calls:
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - any failure of a user model's forward
        raise FixresError(f"cannot trace {kind} at {input_size}px: {str(exc).splitlines()[0]}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise FixresError(f"{kind} does not return class scores of shape (batch, classes); "
                          "fixres needs a classification model")
    by_name = {c.name: c for c in calls}

    # classifier
    try:
        classifier = find_classifier_name(model)
    except FixresError:
        classifier = None
    if classifier is None or classifier not in by_name:
        linears = [c for c in calls if isinstance(modules[c.name], nn.Linear)]
        if not linears:
            raise FixresError(f"{kind}: no classifier found (no Linear layer runs in the forward pass)")
        classifier = max(linears, key=lambda c: c.start).name
    clf_call = by_name[classifier]

    # global pooling: parameter-free, spatial in, one value per channel out, before the classifier
    # (the last such module: squeeze-excitation blocks pool too, but spatial layers run after them)
    ordered = sorted(calls, key=lambda c: c.start)
    pool = None
    for c in ordered:
        if c.start >= clf_call.start:
            break
        m = modules[c.name]
        if (_spatial(c.in_shape) > 1 and c.out_shape is not None and len(c.out_shape) in (2, 4)
                and _per_sample(c.out_shape) == c.in_shape[1] and not _module_has_params(m)):
            spatial_after = any(o.start > c.end and o.start < clf_call.start and _spatial(o.in_shape) > 1
                                for o in ordered)
            if not spatial_after and (pool is None or not c.name.startswith(pool + ".")):
                pool = c.name
    if pool is not None:
        pool_call = by_name[pool]
        start_node, pooled_from = pool_call.in_grad_fn, "pool output"
        num_features = int(pool_call.in_shape[1])
        pool_start = pool_call.start
    else:
        # functional pooling (e.g. torchvision DenseNet): the pooled vector is the classifier's input
        spatial = [c for c in ordered if c.start < clf_call.start and c.out_shape is not None
                   and len(c.out_shape) == 4 and _spatial(c.out_shape) > 1]
        last_map = max(spatial, key=lambda c: c.end, default=None)
        if (clf_call.in_shape is None or len(clf_call.in_shape) != 2 or last_map is None
                or last_map.out_shape[1] != clf_call.in_shape[1]):
            raise FixresError(f"{kind}: no global pooling found before the classifier {classifier!r} "
                              "(fixres needs a CNN that pools a spatial map into one vector)")
        start_node, pooled_from = clf_call.in_grad_fn, "classifier input"
        num_features = int(clf_call.in_shape[1])
        pool_start = clf_call.start

    # norms feeding the pooling, by data flow
    norm_nodes = {id(c.out_grad_fn): c.name for c in calls
                  if c.out_grad_fn is not None and is_norm(modules[c.name]) and c.start < pool_start}
    reached = _walk_back(start_node, norm_nodes)
    notes: list[str] = []
    pre_pool_bns: list[str] = []
    other: list[str] = []
    if reached:
        fewest = reached[0][0]
        direct = [n for m, n in reached if m == fewest]
        pre_pool_bns = [n for n in direct if is_batchnorm(modules[n])]
        other = [f"{n} ({type(modules[n]).__name__})" for n in direct if not is_batchnorm(modules[n])]
    if not pre_pool_bns:
        notes.append("no batch-norm feeds the global pooling"
                     + (f" (the last norm is {', '.join(other)})" if other else "")
                     + ": only the classifier (or explicit modules) can be adapted")

    # top-level chain, in execution order
    top = [c for c in calls if "." not in c.name]
    chain = [c.name for c in sorted(top, key=lambda c: c.start)]
    last_stage = _last_stage(model, calls, pool_start)
    # drop the traced graph (it holds activations)
    for c in calls:
        c.input = c.output = c.in_grad_fn = c.out_grad_fn = None
    return ModelParts(classifier=classifier, pool=pool, pre_pool_bns=pre_pool_bns, last_stage=last_stage,
                      chain=chain, num_features=num_features, pooled_from=pooled_from,
                      other_pre_pool_norms=other, notes=notes, model_type=kind)


# --------------------------------------------------------------------------- --parts

@dataclass
class Selection:
    """Modules whose parameters are trained, and batch-norms put in train mode (statistics re-estimated)."""

    parts: list[str]
    trainable: list[str]
    stats: list[str]

    @property
    def first(self) -> list[str]:
        return sorted(set(self.trainable) | set(self.stats))

    def to_dict(self) -> dict:
        return asdict(self)


def parse_parts(spec: str | Sequence[str]) -> list[str]:
    """'classifier,bn' or ['classifier', 'bn'] -> ['classifier', 'bn'] (explicit module names kept)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    parts = [p.strip() for p in items if p and p.strip()]
    if not parts:
        raise UsageError(f"--parts is empty; choose from {', '.join(PART_NAMES)} or module names")
    return parts


def _bns_inside(model: nn.Module, name: str) -> list[str]:
    root = model.get_submodule(name)
    return [f"{name}.{n}" if n else name for n, m in root.named_modules() if is_batchnorm(m)]


def select_parts(model: nn.Module, parts: ModelParts, spec: str | Sequence[str]) -> Selection:
    """Resolve ``--parts``: classifier, bn (affine + statistics), bn-stats (statistics only), last-stage, names."""
    names = parse_parts(spec)
    modules = dict(model.named_modules())
    trainable: list[str] = []
    stats: list[str] = []

    def add(lst, items):
        for i in items:
            if i not in lst:
                lst.append(i)

    for p in names:
        if p == "classifier":
            add(trainable, [parts.classifier])
        elif p in ("bn", "bn-stats"):
            if not parts.pre_pool_bns:
                raise FixresError(f"--parts {p}: {parts.model_type} has no batch-norm before the global pooling"
                                  + (f" (the last norm is {', '.join(parts.other_pre_pool_norms)})"
                                     if parts.other_pre_pool_norms else "")
                                  + "; use --parts classifier, or name modules explicitly")
            add(stats, parts.pre_pool_bns)
            if p == "bn":
                add(trainable, parts.pre_pool_bns)
        elif p == "last-stage":
            if parts.last_stage is None:
                raise FixresError(f"--parts last-stage: no stage of blocks found in {parts.model_type}; "
                                  "name the modules to adapt explicitly")
            add(trainable, [parts.last_stage])
            add(stats, _bns_inside(model, parts.last_stage))
        elif p in modules and p:
            add(trainable, [p])
            add(stats, _bns_inside(model, p))
        else:
            import difflib
            close = difflib.get_close_matches(p, list(PART_NAMES) + [n for n in modules if n], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"unknown part {p!r}: use {', '.join(PART_NAMES)} or a module name{hint}")
    # a trained module's parameters include nested ones: drop names already covered by an ancestor
    trainable = [t for t in trainable if not any(t != o and t.startswith(o + ".") for o in trainable)]
    return Selection(parts=names, trainable=trainable, stats=stats)
