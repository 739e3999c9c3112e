"""Finding the parts FixRes adapts, by tracing a forward pass rather than by module names.

One forward pass with hooks on every module (``fixres.models.hooks.trace_calls``) gives the execution
order, the shapes each module sees and the autograd graph between them. From it, for any timm or
torchvision classifier (CNNs, vision transformers, ConvNeXt, Swin, MLP-Mixers, ...):

* the **classifier**: timm's ``get_classifier()``, else the last Linear (or, as in SqueezeNet, the last
  1x1 Conv2d) executed;
* the **pooled vector**: what the classifier sees, i.e. its input. Where timm defines
  ``forward_head(pre_logits=True)`` it is checked against that (timm's own "what the classifier
  sees"). The **global pooling** that produced it is either a parameter-free module whose input is a
  spatial map and whose output has one value per channel (``pool``), or functional: an average of a
  map or of tokens, or a class token taken from the token sequence (ViT, DeiT): token pooling counts
  as global pooling. ``pooling`` names the kind;
* the **norm nearest the pooled vector** (``norms``): followed backwards through the autograd graph from
  the pooled vector, through parameter-free operations only (ReLU, residual add, concatenation, token
  selection, pooling), stopping at convolutions and linear layers. The norms reached across the fewest
  merges (residual adds) count: ResNet's last ``bn3`` (and the shortcut's BN when the last block
  downsamples), EfficientNet's ``bn2``, DenseNet's ``norm5``, ViT's ``norm`` (or ``fc_norm`` when it
  averages tokens), ConvNeXt's ``head.norm``, Swin's ``norm``. When the head transforms the pooled
  vector with a convolution first (MobileNetV3's ``conv_head``), the walk starts at the pooling input.
  ``pre_pool_bns`` are those norms that are batch-norms (running statistics to re-estimate);
* the **last stage**: the last sequence container of blocks executed before the pooling that holds no
  other such container (ResNet ``layer4``, EfficientNet ``blocks.6``, Swin ``layers.3.blocks``); in an
  isotropic model with one sequence of blocks (ViT, DeiT, Mixer) the last block (``blocks.11``);
* the **chain**: the model's top-level children in execution order (used to run the model from a
  cut point onwards, see ``fixres.method.finetuning``).

Which of these parts a fine-tuning trains (``--parts``) is ``fixres.models.parts``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from fixres.errors import FixresError
from fixres.models.hooks import Call, trace_calls
from fixres.models.inputsize import native_size
from fixres.models.timmcfg import model_pretrained_view

#: Trace input size: large enough that every classic CNN keeps a spatial map > 1x1 before pooling.
TRACE_SIZE = 64
#: Tried next when a model cannot run at TRACE_SIZE: ImageNet's 224 (fixed-size ViT/MaxViT), Inception's 299.
FALLBACK_TRACE_SIZES = (224, 299)
#: Autograd nodes that end the walk back from the pooled vector (layers with weights).
_STOP_NODES = ("Convolution", "Addmm", "Mm", "Bmm", "Linear", "Matmul", "Embedding", "Baddbmm")
_SEQUENCES = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: Normalisation layers by base class; other modules count when their class name says "Norm" (timm's
#: RmsNorm, LayerNorm2d, FrozenBatchNorm2d, ...) and they hold no sub-modules.
_NORM_BASES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
               nn.RMSNorm)
#: Autograd node names of pooling operations and what they mean for the pooled vector.
_POOL_NODES = ((("Mean", "Avg", "Sum"), "average"), (("Amax", "Max"), "max"), (("Select", "Index"), "class token"))
#: Relative tolerance when checking the classifier's input against timm's forward_head(pre_logits=True).
PRE_LOGITS_RTOL = 1e-4


def classifier_names(model: nn.Module) -> list[str]:
    """Every classifier head: timm's get_classifier() (two for distilled models: head, head_dist), else
    the one ``find_classifier_name`` finds."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = heads if isinstance(heads, (tuple, list)) else [heads] if heads is not None else []
    names = [name for h in heads for name, mod in model.named_modules() if mod is h and name]
    return names or [find_classifier_name(model)]


def find_classifier_name(model: nn.Module) -> str:
    """Name of the final classifier module (timm's get_classifier, else the last Linear, else the last Conv2d)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        head = head[0] if isinstance(head, (tuple, list)) and head else head
        for name, mod in model.named_modules():
            if mod is head and name:
                return name
    last = {nn.Linear: None, nn.Conv2d: None}
    for name, mod in model.named_modules():
        for kind in last:
            if type(mod) is kind or (kind is nn.Linear and isinstance(mod, nn.Linear)):
                last[kind] = name
    found = last[nn.Linear] or last[nn.Conv2d]
    if found is None:
        raise FixresError(f"no classifier (Linear layer) found in {type(model).__name__}")
    return found


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def is_norm(module: nn.Module) -> bool:
    if isinstance(module, _NORM_BASES):
        return True
    return "Norm" in type(module).__name__ and not any(True for _ in module.children())


@dataclass
class ModelParts:
    """What fixres found in a model (names are ``named_modules`` names)."""

    classifier: str
    pool: str | None
    pre_pool_bns: list[str]
    last_stage: str | None
    chain: list[str]
    num_features: int | None
    pooled_from: str = "pool output"  # or "classifier input" (functional or token pooling)
    other_pre_pool_norms: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model_type: str = ""
    #: the norm(s) nearest the pooled vector, any kind ("norm" in --parts)
    norms: list[str] = field(default_factory=list)
    #: "batchnorm", "layernorm", "groupnorm", "rmsnorm", ... of ``norms`` (their class names, lower case)
    norm_kinds: list[str] = field(default_factory=list)
    #: how the pooled vector is made: "spatial average", "class token", "token average", ...
    pooling: str = ""
    #: the pooled vector equals timm's forward_head(pre_logits=True) (None: not a timm model)
    pre_logits_checked: bool | None = None
    #: further classifier heads trained with ``classifier`` (distilled models: head_dist)
    extra_classifiers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        norms = ", ".join(f"{n} ({k})" for n, k in zip(self.norms, self.norm_kinds)) or "none"
        return (f"classifier {self.classifier}; pooling {self.pooling}"
                f"{' (' + self.pool + ')' if self.pool else ''}; norm nearest the pooled vector {norms}; "
                f"last stage {self.last_stage or 'none'}")


def _module_has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=True))


def _spatial(shape) -> int:
    return int(shape[2] * shape[3]) if shape is not None and len(shape) == 4 else 0


def _per_sample(shape) -> int:
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


def _parents(node) -> list:
    return [n for n, _ in getattr(node, "next_functions", ()) if n is not None
            and type(n).__name__ != "AccumulateGrad"]


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
        if any(s in type(node).__name__ for s in _STOP_NODES):
            continue
        nexts = _parents(node)
        step = 1 if len(nexts) > 1 else 0
        for n in nexts:
            stack.append((n, merges + step))
    return sorted((m, n) for n, m in found.items())


def _pooling_kind(start, stop_ids: set) -> str:
    """Name the functional pooling between the pooled vector and the last map or token sequence (autograd
    node names along the first-input path: a token selection, a mean, a max)."""
    names: list[str] = []
    node, seen = start, 0
    while node is not None and id(node) not in stop_ids and seen < 12:
        kind = type(node).__name__
        if any(s in kind for s in _STOP_NODES):
            break
        names.append(kind)
        parents = _parents(node)
        node, seen = (parents[0] if parents else None), seen + 1
    for kind in names:  # the pooling nearest the classifier decides
        for marks, label in _POOL_NODES:
            if any(m in kind for m in marks):
                return label
    return "class token" if any("Slice" in k for k in names) else "none found"


def _last_stage(model: nn.Module, calls, before: int) -> str | None:
    """Last leaf sequence container of blocks that finished before the pooling started (isotropic models:
    the last block of their one sequence)."""
    modules = dict(model.named_modules())

    def block(m: nn.Module) -> bool:
        return not isinstance(m, _SEQUENCES) and any(True for _ in m.children()) and _module_has_params(m)

    def stage_like(m: nn.Module) -> bool:
        if not isinstance(m, _SEQUENCES):
            return False
        kids = list(m.children())
        return bool(kids) and all(block(k) or stage_like(k) for k in kids)

    done = [c for c in calls if 0 <= c.end < before]
    candidates = [c for c in done if stage_like(modules[c.name])]
    names = [c.name for c in candidates]
    leaves = [c for c in candidates
              if not any(o != c.name and o.startswith(c.name + ".") for o in names)]
    if len(leaves) == 1 and len(list(modules[leaves[0].name].children())) > 1:
        # one sequence of blocks (ViT, DeiT, Mixer, torchvision MobileNet's features): its last block
        last = leaves[0].name
        kids = [c for c in done if c.name.rpartition(".")[0] == last]
        return max(kids, key=lambda c: c.end).name if kids else last
    if not leaves:
        # no sequence of blocks (NASNet cells, Inception mixes are attributes): the last outermost block
        leaves = [c for c in done if block(modules[c.name])]
        leaves = [c for c in leaves if not any(c.name.startswith(o.name + ".") for o in leaves)]
    if not leaves:
        return None
    return max(leaves, key=lambda c: c.end).name


def _trace(model: nn.Module, input_size: int, in_chans: int):
    """Forward two random images with every module hooked; returns (calls, output, input)."""
    x = torch.zeros(2, in_chans, input_size, input_size).normal_(generator=torch.Generator().manual_seed(0))
    p = next(model.parameters(), None)
    if p is not None:
        x = x.to(p.device)
    x.requires_grad_(True)
    with torch.enable_grad(), trace_calls(model, keep_tensors=True) as calls:
        out = model(x)
    return calls, out, x


def _trace_at_some_size(model: nn.Module, input_size: int | None, in_chans: int):
    kind = type(model).__name__
    sizes = [input_size] if input_size else [native_size(model) or TRACE_SIZE]
    cfg_size = (model_pretrained_view(model).input_size or (0,))[-1]
    if not input_size:  # e.g. models too deep for a 64 px trace, fixed-size torchvision models
        sizes += [s for s in (int(cfg_size or 0), *FALLBACK_TRACE_SIZES) if s and s not in sizes]
    error = ""
    for size in sizes:
        try:
            calls, out, x = _trace(model, size, in_chans)
            return calls, out, x, size
        except Exception as exc:  # noqa: BLE001 - any failure of a user model's forward
            error = f"cannot trace {kind} at {size}px: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
    raise FixresError(error)


def _classifier(model: nn.Module, calls: list[Call], out: torch.Tensor) -> str:
    kind = type(model).__name__
    modules = dict(model.named_modules())
    by_name = {c.name: c for c in calls}
    try:
        classifier = find_classifier_name(model)
    except FixresError:
        classifier = None
    if classifier is None or classifier not in by_name:
        linears = [c for c in calls if isinstance(modules[c.name], nn.Linear)]
        if not linears:
            raise FixresError(f"{kind}: no classifier found (no Linear layer runs in the forward pass)")
        classifier = max(linears, key=lambda c: c.start).name
    return classifier


def _leaf_layer(head: Call, calls: list[Call], modules: dict) -> Call:
    """The layer that classifies inside a head module (LeViT's NormLinear: its Linear after a batch-norm)."""
    inner = [c for c in calls
             if c.name.startswith(head.name + ".") and isinstance(modules[c.name], (nn.Linear, nn.Conv2d))]
    return max(inner, key=lambda c: c.start) if inner else head


def _spatial_pool(calls: list[Call], modules: dict, clf_call: Call) -> Call | None:
    """The last parameter-free module before the classifier that pools a spatial map to one value per channel
    (squeeze-excitation blocks pool too, but spatial layers run after them)."""
    ordered = sorted(calls, key=lambda c: c.start)
    pool = None
    for c in ordered:
        if c.start >= clf_call.start:
            break
        if (_spatial(c.in_shape) > 1 and c.out_shape is not None and len(c.out_shape) in (2, 4)
                and _per_sample(c.out_shape) == c.in_shape[1] and not _module_has_params(modules[c.name])):
            spatial_after = any(clf_call.start > o.start > c.end and _spatial(o.in_shape) > 1 for o in ordered)
            if not spatial_after and (pool is None or not c.name.startswith(pool.name + ".")):
                pool = c
    return pool


def _check_global(kind: str, classifier: str, clf_call: Call, calls: list[Call], pool: Call | None,
                  pre_logits: bool | None) -> None:
    """The classifier must see a pooled vector: a pooling module ran before it, its input is timm's
    forward_head(pre_logits=True) (timm's heads pool), or its width is the channel width of the last map
    or tokens (functional or token pooling)."""
    if pool is not None or pre_logits:
        return
    width = clf_call.in_shape[-1] if clf_call.in_shape else None
    before = [c for c in calls if c.start < clf_call.start and c.out_shape is not None and len(c.out_shape) >= 3]
    last = max(before, key=lambda c: c.end, default=None)
    if clf_call.in_shape is not None and len(clf_call.in_shape) == 4:
        return  # a 1x1 convolution classifier (SqueezeNet): the pooling comes after it
    if (width is None or len(clf_call.in_shape) != 2 or last is None
            or width not in (last.out_shape[1], last.out_shape[-1])):
        raise FixresError(f"{kind}: no global pooling found before the classifier {classifier!r} "
                          "(fixres needs a network that pools a spatial map or its tokens into one vector)")


def _check_pre_logits(model: nn.Module, x: torch.Tensor, clf_call: Call) -> bool | None:
    """Does the classifier's input equal timm's forward_head(pre_logits=True)? None when not a timm model."""
    if not (hasattr(model, "forward_head") and hasattr(model, "forward_features")) or clf_call.input is None:
        return None
    try:
        with torch.no_grad():
            pre = model.forward_head(model.forward_features(x.detach()), pre_logits=True)
    except Exception:  # noqa: BLE001 - a model whose forward_head takes other arguments
        return None
    seen = clf_call.input.detach()
    if not isinstance(pre, torch.Tensor):
        return None  # distilled models return one vector per head
    pre, seen = pre.flatten(1), seen.flatten(1)  # a 1x1 convolution classifier sees (C, 1, 1): DLA, DPN
    return bool(pre.shape == seen.shape
                and torch.allclose(pre, seen, rtol=PRE_LOGITS_RTOL, atol=PRE_LOGITS_RTOL))


def _nearest_norms(calls: list[Call], modules: dict, clf_call: Call, pool: Call | None) -> list[str]:
    """Norms nearest the pooled vector (fewest merges): back from the classifier input, else the first norm
    of a head after the pooling, else back from the pooling input."""
    norm_nodes = {id(c.out_grad_fn): c.name for c in calls
                  if c.out_grad_fn is not None and is_norm(modules[c.name]) and c.start < clf_call.start}
    reached = _walk_back(clf_call.in_grad_fn, norm_nodes)
    maps = [c for c in calls if c.start < clf_call.start and c.out_shape is not None and len(c.out_shape) >= 3
            and not c.name.startswith(clf_call.name.rpartition(".")[0] + ".")] if "." in clf_call.name else []
    head_start = pool.end if pool is not None else max((c.end for c in maps), default=None)
    if not reached and head_start is not None:
        # a head that transforms the pooled vector (MaxViT, MambaOut: norm, then a hidden layer): its first norm
        after = [c for c in calls if head_start < c.start < clf_call.start and is_norm(modules[c.name])]
        if after:
            return [min(after, key=lambda c: c.start).name]
    if not reached and pool is not None:
        reached = _walk_back(pool.in_grad_fn, norm_nodes)  # MobileNetV3: conv_head after the pooling
    if reached:
        fewest = reached[0][0]
        return [n for m, n in reached if m == fewest]
    return []


def _pooling_name(pool: Call | None, clf_call: Call, calls: list[Call]) -> str:
    if pool is not None:  # also before a 1x1 convolution classifier on the pooled (C, 1, 1) map (DLA, DPN)
        return "spatial average" if "max" not in type(pool).__name__.lower() else "spatial"
    if _spatial(clf_call.in_shape) > 1:
        return "after the classifier (1x1 convolution classifier)"
    maps = [c for c in calls if c.start < clf_call.start and c.out_shape is not None and len(c.out_shape) >= 3]
    last = max(maps, key=lambda c: c.end, default=None)
    tokens = last is not None and len(last.out_shape) == 3
    how = _pooling_kind(clf_call.in_grad_fn, {id(last.out_grad_fn)} if last is not None else set())
    if tokens:
        return {"class token": "class token", "average": "token average"}.get(how, "token (attention) pooling")
    return "spatial average (functional)" if how in ("average", "none found") else f"spatial {how} (functional)"


def find_parts(model: nn.Module, *, input_size: int | None = None, in_chans: int = 3) -> ModelParts:
    """Trace one forward pass of ``model`` and name the parts FixRes adapts (see the module docstring).

    ``input_size`` None: 64 px, or the size a fixed-size model was built for. Raises FixresError naming
    what is missing when the model has no classifier or no global pooling.
    """
    kind = type(model).__name__
    was_training = model.training
    model.eval()
    modules = dict(model.named_modules())
    calls: list[Call] = []  # what the finally below releases, also when tracing itself fails
    try:
        calls, out, x, _ = _trace_at_some_size(model, input_size, in_chans)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise FixresError(f"{kind} does not return class scores of shape (batch, classes); "
                              "fixres needs a classification model")
        by_name = {c.name: c for c in calls}
        clf_call = by_name[_classifier(model, calls, out)]  # the head module: its input is the pooled vector
        heads = [_leaf_layer(clf_call, calls, modules)] + [
            _leaf_layer(by_name[n], calls, modules) for n in classifier_names(model)
            if n in by_name and n != clf_call.name]
        classifier = heads[0].name
        if clf_call.in_shape is None or len(clf_call.in_shape) != 2:
            clf_call = heads[0]  # a head module that pools inside (timm ClassifierHead): its layer sees the vector
        pool = _spatial_pool(calls, modules, clf_call)
        checked = _check_pre_logits(model, x, clf_call)
        _check_global(kind, classifier, clf_call, calls, pool, checked)
        norms = list(dict.fromkeys(n for h in heads for n in _nearest_norms(calls, modules, h, pool)))
        pooling = _pooling_name(pool, clf_call, calls)
        last_stage = _last_stage(model, calls, (pool or clf_call).start)
        chain = [c.name for c in sorted((c for c in calls if "." not in c.name), key=lambda c: c.start)]
    finally:
        model.train(was_training)
        for c in calls:  # drop the traced graph (it holds activations)
            c.input = c.output = c.in_grad_fn = c.out_grad_fn = None
    parts = _parts(model, classifier=classifier, pool=pool, clf_call=clf_call, norms=norms, pooling=pooling,
                   last_stage=last_stage, chain=chain, checked=checked)
    parts.extra_classifiers = [h.name for h in heads[1:]]
    return parts


def _parts(model: nn.Module, *, classifier: str, pool: Call | None, clf_call: Call, norms: list[str],
           pooling: str, last_stage: str | None, chain: list[str], checked: bool | None) -> ModelParts:
    modules = dict(model.named_modules())
    kind = type(model).__name__
    bns = [n for n in norms if is_batchnorm(modules[n])]
    other = [f"{n} ({type(modules[n]).__name__})" for n in norms if not is_batchnorm(modules[n])]
    notes = []
    if not norms:
        notes.append("no norm feeds the pooled vector: only the classifier (or explicit modules) can be adapted")
    if checked is False:
        notes.append("the classifier's input differs from timm's forward_head(pre_logits=True)")
    if pool is not None:
        pooled_from, width = "pool output", int(pool.in_shape[1])
    else:
        pooled_from = "classifier input"
        width = int(clf_call.in_shape[1]) if clf_call.in_shape is not None else None
    return ModelParts(classifier=classifier, pool=pool.name if pool is not None else None, pre_pool_bns=bns,
                      last_stage=last_stage, chain=chain, num_features=width, pooled_from=pooled_from,
                      other_pre_pool_norms=other, notes=notes, model_type=kind, norms=list(norms),
                      norm_kinds=[type(modules[n]).__name__.lower() for n in norms], pooling=pooling,
                      pre_logits_checked=checked)
