"""The fine-tuning recipe (sections 4.2 and 5): what trains in which mode, the rate's schedule, each epoch's order.

Only the selected parts adapt: every other module stays frozen in eval mode without gradients, and the
adapted batch-norms run in train mode, so their statistics are re-estimated at the new resolution
(``_set_modes``); what an epoch changes, and a saved state keeps, is the adapted modules' state
(``_adapted_state``). SGD with momentum 0.9 and weight decay 1e-4, at 0.008 for a batch of 512 scaled
linearly (``fixres.method.finetuning.default_lr``), divided by 10 half-way (``decay_step``). Epoch e visits
the images in an order fixed by the seed and e (``_epoch_batches``), so a resumed run replays it. Which
arguments a fine-tuning accepts is ``_check_arguments``; ``fixres.method.finetuning`` runs the recipe.
"""

from __future__ import annotations

import torch
from torch import nn

from fixres.config import FINETUNE_AUGMENTATIONS, validate_size
from fixres.errors import UsageError
from fixres.models.parts import AdaptedParts
from fixres.runtime.dist import DistEnv

#: The paper's fine-tuning rate (section 5): 0.008 for a batch of 512, scaled linearly.
PAPER_LR = 0.008
PAPER_BATCH = 512
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
#: Step decay: the rate is divided by LR_DECAY every ``epochs * DECAY_AT`` epochs (paper: 60 epochs, /10 at 30).
LR_DECAY = 0.1
DECAY_AT = 0.5
#: Per-epoch seeds are seed * EPOCH_SEED_STRIDE + epoch: distinct for any run shorter than this many epochs.
EPOCH_SEED_STRIDE = 100_003
#: Seeds of ranks > 0 are offset by multiples of this, far from any seed a user would pick.
RANK_SEED_STRIDE = 1_000_003


def decay_step(epochs: int) -> int:
    return max(1, int(round(epochs * DECAY_AT)))


def _set_modes(model: nn.Module, sel: AdaptedParts) -> None:
    """Frozen modules in eval mode (and no gradient); adapted batch-norms in train mode."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for name in sel.trainable:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    for name in sel.stats:
        model.get_submodule(name).train()


def _adapted_state(model: nn.Module, sel: AdaptedParts) -> dict[str, torch.Tensor]:
    """State (parameters and buffers) of every adapted module: all that fine-tuning changes."""
    sd = model.state_dict()
    prefixes = tuple(n + "." for n in set(sel.trainable) | set(sel.stats))
    return {k: v.detach().cpu().clone() for k, v in sd.items() if k.startswith(prefixes)}


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Epoch ``epoch``'s batches: a permutation fixed by (seed, epoch); no batch of one image (batch-norm)."""
    g = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def _check_arguments(*, test_size: int, augment: str, epochs: int, batch_size: int, lr: float,
                     env: DistEnv) -> None:
    validate_size(test_size, "test_size")
    if augment not in FINETUNE_AUGMENTATIONS:
        raise UsageError(f"unknown fine-tuning augmentation {augment!r}; choose one of "
                         f"{', '.join(FINETUNE_AUGMENTATIONS)}")
    if epochs < 0:
        raise UsageError(f"epochs must be >= 0, got {epochs}")
    if batch_size <= 0:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    if env.distributed and batch_size % env.world_size:
        raise UsageError(f"the batch size ({batch_size}) is global: make it a multiple of the "
                         f"{env.world_size} processes")
    if not lr > 0:
        raise UsageError(f"learning rate must be > 0, got {lr}")
