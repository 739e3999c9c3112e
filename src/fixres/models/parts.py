"""Choosing what a fine-tuning trains: ``--parts`` resolved on the parts tracing found in a model.

``select_parts`` turns a ``--parts`` specification (``classifier``, ``norm`` or its older name ``bn``,
``bn-stats``, ``last-stage``, or module names) into the modules whose parameters are trained and the
batch-norms whose running statistics are re-estimated, on the ``ModelParts`` of
``fixres.models.structure.find_parts``.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Sequence

from torch import nn

from fixres.errors import FixresError, UsageError
from fixres.models.structure import ModelParts, _module_has_params, is_batchnorm

#: Names accepted by ``--parts`` besides explicit module names (``bn`` is the older name of ``norm``).
PART_NAMES = ("classifier", "norm", "bn", "bn-stats", "last-stage")


@dataclass
class AdaptedParts:
    """Modules whose parameters are trained, and batch-norms put in train mode (statistics re-estimated)."""

    parts: list[str]
    trainable: list[str]
    stats: list[str]
    #: why a requested part adapts nothing (e.g. no norm feeds the pooled vector)
    notes: list[str] = field(default_factory=list)

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


def _norm_part(model: nn.Module, parts: ModelParts, p: str) -> tuple[list[str], list[str]]:
    """(trainable, statistics) of ``norm``/``bn`` (affine trained; a batch-norm's statistics re-estimated too)
    and ``bn-stats`` (a batch-norm's statistics only)."""
    modules = dict(model.named_modules())
    if p == "bn-stats":
        if not parts.pre_pool_bns:
            raise FixresError(f"--parts bn-stats: {parts.model_type} has no batch-norm nearest the pooled vector"
                              + (f" (its norm is {', '.join(parts.other_pre_pool_norms)}, which keeps no running "
                                 "statistics)" if parts.other_pre_pool_norms else "")
                              + "; use --parts classifier,norm, or name modules explicitly")
        return [], list(parts.pre_pool_bns)
    norms = parts.norms or parts.pre_pool_bns
    if not norms:
        raise FixresError(f"--parts {p}: no norm feeds the pooled vector of {parts.model_type}; "
                          "use --parts classifier, or name modules explicitly")
    trainable = [n for n in norms if _module_has_params(modules[n])]
    stats = [n for n in norms if is_batchnorm(modules[n])]
    if not trainable and not stats:
        raise FixresError(f"--parts {p}: the norm nearest the pooled vector ({', '.join(norms)}) has neither "
                          "affine weights nor running statistics; use --parts classifier")
    return trainable, stats


def _adaptable(modules: dict, norms: Sequence[str]) -> list[str]:
    """The norms with affine weights or running statistics (an RMSNorm without weight has neither)."""
    return [n for n in norms if _module_has_params(modules[n]) or is_batchnorm(modules[n])]


def select_parts(model: nn.Module, parts: ModelParts, spec: str | Sequence[str]) -> AdaptedParts:
    """Resolve ``--parts``: classifier, norm (alias bn: affine + a batch-norm's statistics), bn-stats
    (statistics only), last-stage, or module names."""
    names = parse_parts(spec)
    modules = dict(model.named_modules())
    trainable: list[str] = []
    stats: list[str] = []
    notes: list[str] = []

    def add(lst, items):
        for i in items:
            if i not in lst:
                lst.append(i)

    for p in names:
        if p == "classifier":
            add(trainable, [parts.classifier, *parts.extra_classifiers])
        elif p == "norm" and not _adaptable(modules, parts.norms or parts.pre_pool_bns) and len(names) > 1:
            notes.append(f"{parts.model_type} has no norm with weights or statistics feeding the pooled vector: "
                         "'norm' adapts nothing")
        elif p in ("norm", "bn", "bn-stats"):
            train_norms, stat_norms = _norm_part(model, parts, p)
            add(trainable, train_norms)
            add(stats, stat_norms)
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
            close = difflib.get_close_matches(p, list(PART_NAMES) + [n for n in modules if n], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"unknown part {p!r}: use {', '.join(PART_NAMES)} or a module name{hint}")
    # a trained module's parameters include nested ones: drop names already covered by an ancestor
    trainable = [t for t in trainable if not any(t != o and t.startswith(o + ".") for o in trainable)]
    return AdaptedParts(parts=names, trainable=trainable, stats=stats, notes=notes)
