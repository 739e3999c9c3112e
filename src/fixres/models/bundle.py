"""The loaded model: a ``ModelBundle`` holds the module, its data config and a record of where it came from.

``load_model`` (``fixres.models.loading``) builds one. ``meta`` is the JSON-like record the load wrote
(``checkpoint``, ``export``, ``test_size``, ``new_head``, ...); it is read back once per use as a typed
``LoadRecord`` (``fixres.io.schema``), so ``bundle.export`` is the export's ``fixres.json`` as an
``ExportMeta`` and ``bundle.test_size`` the size the model runs at.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from fixres.config import DataConfig
from fixres.data.transforms import geometry_for, torchvision_transform
from fixres.io.meta import ExportMeta
from fixres.io.schema import parse


@dataclass(frozen=True)
class LoadRecord:
    """The keys of ``ModelBundle.meta`` that are read back, typed: what a load recorded about the model."""

    export: ExportMeta | None = None  # the fixres.json of an export it was loaded from
    test_size: int | None = None  # the size its source says it runs at (a timm folder, torchvision weights)
    new_head: int | None = None  # the number of classes of a head that replaced the pretrained one


@dataclass
class ModelBundle:
    model: nn.Module
    data_config: DataConfig
    name: str
    source: str
    #: JSON-like record of where the model came from (``checkpoint``, ``export``, ``test_size``, ``new_head``, ...);
    #: code that reads it back goes through ``record``
    meta: dict = field(default_factory=dict)

    @property
    def record(self) -> LoadRecord:
        """``meta`` read as a ``LoadRecord`` (read now: callers may add to ``meta``)."""
        return parse(LoadRecord, self.meta)

    @property
    def export(self) -> ExportMeta | None:
        """The fixres.json of the export it was loaded from, typed; None for any other source."""
        return self.record.export

    @property
    def new_head(self) -> int | None:
        """The number of classes of a head put in place of the pretrained one, else None."""
        return self.record.new_head

    @property
    def test_size(self) -> int:
        """The size the model runs at: an export's fixed test size, else the train size."""
        record = self.record
        return int((record.export.test_size if record.export else None) or record.test_size
                   or self.data_config.train_size)

    @property
    def transform(self):
        """Its pre-processing at ``test_size`` as plain torchvision v2 ops (serving needs no fixres)."""
        return torchvision_transform(geometry_for(self.test_size, self.data_config), self.data_config)

    def __repr__(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        cfg = self.data_config
        return (f"ModelBundle({self.name!r} from {self.source}, {params / 1e6:.2f}M parameters, "
                f"{cfg.num_classes or '?'} classes, train {cfg.train_size}px, runs at {self.test_size}px, "
                f"crop {cfg.crop_ratio:g}, {cfg.interpolation})")

    def copy(self) -> "ModelBundle":
        """An independent copy (module deep-copied, same data config): a fresh model before an adaptation
        without building it or reading its weights again."""
        return ModelBundle(copy.deepcopy(self.model), self.data_config, self.name, self.source,
                           copy.deepcopy(self.meta))

    def state_snapshot(self) -> dict[str, torch.Tensor]:
        """CPU copies of every parameter and buffer (undo an in-place adaptation with ``restore``)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(snapshot, strict=True)
