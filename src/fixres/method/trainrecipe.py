"""The paper's training recipe (section 5): the learning rate for a batch, its schedule, the length of an epoch.

SGD at 0.1 x B/256 (Goyal et al.), momentum 0.9, weight decay 1e-4, the rate divided by 10
every 30 epochs; a cosine and a linear warm-up as options (``lr_factor``); AdamW at DeiT's 5e-4 x B/512 for
the recipes vision transformers and ConvNeXts are trained with. With repeated augmentation an epoch draws
about 2N samples, as the official ``RASampler(len_factor=2.0)``, so the 30-epoch decay step keeps the
paper's schedule (``default_epoch_length_factor``); the optimizer, and the arguments a run accepts
(``check_arguments``). ``fixres.method.train`` trains with these.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fixres.errors import UsageError
from fixres.method.sampler import PAPER_LEN_FACTOR

#: Section 5: lr = BASE_LR x B / LR_BATCH_REFERENCE ("as in [15]", Goyal et al.).
BASE_LR = 0.1
LR_BATCH_REFERENCE = 256
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
#: Optimizers of ``--optimizer``: SGD (the paper) or AdamW (how ViTs and ConvNeXts are trained; DeiT's rate).
OPTIMIZERS = ("sgd", "adamw")
ADAMW_LR = 5e-4
ADAMW_LR_BATCH_REFERENCE = 512
#: Step schedule: the learning rate is divided by STEP_GAMMA^-1 every STEP_EPOCHS epochs.
STEP_EPOCHS = 30
STEP_GAMMA = 0.1
SCHEDULES = ("step", "cosine")
#: Training augmentations: RandomResizedCrop ("train DA"), appendix D's control, and the test-time ones.
TRAIN_AUGMENTS = ("train", "control", "test", "test2")


def default_lr(batch_size: int, optimizer: str = "sgd") -> float:
    """The paper's learning rate for a global batch of ``batch_size``: 0.1 x B / 256 (SGD); AdamW: DeiT's
    5e-4 x B / 512."""
    if optimizer == "adamw":
        return ADAMW_LR * batch_size / ADAMW_LR_BATCH_REFERENCE
    return BASE_LR * batch_size / LR_BATCH_REFERENCE


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, schedule: str = "step", warmup_epochs: float = 0,
              step_epochs: int = STEP_EPOCHS) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based), updated every step.

    Warm-up: linear from 1/warmup_steps to 1 over ``warmup_epochs``. "step": x0.1 every ``step_epochs``
    epochs. "cosine": half a cosine from 1 to 0 over the epochs after warm-up.
    """
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "step":
        return STEP_GAMMA ** ((step // steps_per_epoch) // step_epochs)
    total = max(1, epochs * steps_per_epoch - warmup_steps)
    t = min(1.0, (step - warmup_steps) / total)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def default_epoch_length_factor(repeats: int) -> float:
    """The paper's epoch: about 2N samples with repeated augmentation (official RASampler), N without."""
    return PAPER_LEN_FACTOR if repeats > 1 else 1.0


def make_optimizer(name: str, params, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum (the paper), or AdamW (``momentum`` unused)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def check_arguments(*, augment: str, schedule: str, epochs: int, batch_size: int, world_size: int,
                    label_smoothing: float, epoch_length_factor: float | None, state_path: Path,
                    resume: bool) -> None:
    """The arguments of a training run, each refused in one line naming it."""
    if augment not in TRAIN_AUGMENTS:
        raise UsageError(f"unknown training augmentation {augment!r}; choose one of {', '.join(TRAIN_AUGMENTS)}")
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if epochs <= 0:
        raise UsageError(f"epochs must be positive, got {epochs}")
    if batch_size <= 0 or batch_size % world_size:
        raise UsageError(f"--batch-size {batch_size} (global) must be a positive multiple of the "
                         f"{world_size} processes")
    if not 0.0 <= label_smoothing < 1.0:
        raise UsageError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    if epoch_length_factor is not None and not (math.isfinite(epoch_length_factor) and epoch_length_factor > 0):
        raise UsageError(f"the epoch length factor must be a positive number, got {epoch_length_factor}")
    if state_path.exists() and not resume:
        raise UsageError(f"{state_path} exists: pass --resume to continue that run, or choose another --out")
