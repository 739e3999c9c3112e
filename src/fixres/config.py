"""Typed configuration shared by the library: the data (pre-processing) config of a model.

Run configs of each command are dataclasses too, built from argparse only at the CLI edge
(``fixres.cli``); library functions take explicit arguments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fixres.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

#: PyTorch's default test pre-processing: resize to 256, centre crop 224.
DEFAULT_CROP_RATIO = 0.875
DEFAULT_TRAIN_SIZE = 224
DEFAULT_INTERPOLATION = "bilinear"
#: Appendix B: sizes that are multiples of the network stride avoid border effects.
DEFAULT_STRIDE = 32
#: RandomResizedCrop's defaults in PyTorch, used by the paper (section 3.1): area fraction and aspect ratio.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)

INTERPOLATION_NAMES = ("nearest", "bilinear", "bicubic")
#: Largest train or test size (pixels) anything accepts: a batch of 64 photos at 2048 px is already 3 GB of
#: fp32 input, and the paper's largest test size is 800; past this a typo reaches an out-of-memory kill.
MAX_SIZE = 2048
#: Seeds are non-negative and below 2**32, the range every generator (torch, numpy, random) takes alike.
SEED_LIMIT = 2 ** 32
#: Smallest crop ratio: resize = size / crop_ratio, so 0.05 already resizes to 20x the crop.
MIN_CROP_RATIO = 0.05
#: Normalisation values are in [0, 1] units: a mean or std past this magnitude is a unit mistake (0-255) or a
#: typo, and its normalised pixels overflow float32 or lose every digit of the photo.
MAX_RGB_VALUE = 10.0
#: Smallest std: dividing by less magnifies one grey level (1/255) past 4, and 1e-45 turns pixels into infinity.
MIN_STD = 1e-3
#: Folds of the leave-one-fold-out standard deviation (paper, section 5).
DEFAULT_FOLDS = 10
#: What FixRes adapts by default (the paper): the classifier and the norm nearest the pooled vector (the
#: batch-norm before pooling in a CNN, as the paper; a LayerNorm's affine weights in a transformer or ConvNeXt).
DEFAULT_PARTS = ("classifier", "norm")
#: Fine-tuning augmentations (section 5): test DA, test DA2, train DA.
FINETUNE_AUGMENTATIONS = ("test", "test2", "train")
#: The embedded data set's default size: classes and photos per class; the size its model is trained at.
EMBEDDED_TRAIN_SIZE = 64
DEFAULT_CLASSES = 10
DEFAULT_TRAIN_PER_CLASS = 150
DEFAULT_VAL_PER_CLASS = 50


# --------------------------------------------------------------------------- the defaults of every command

#: Every command writes to runs/<command> unless given --out (``default_out``).
RUNS_DIR = Path("runs")
#: Images per batch of evaluation and fine-tuning (statistics and training from scratch use smaller ones).
DEFAULT_BATCH_SIZE = 64
DEFAULT_STATS_BATCH_SIZE = 32
DEFAULT_TRAIN_BATCH_SIZE = 32
DEFAULT_TRAIN_EPOCHS = 10
#: Fine-tuning at the test size (section 5: a few epochs of the classifier and the last norm suffice).
DEFAULT_FINETUNE_EPOCHS = 10
#: The frozen-prefix activation cache of fine-tuning is used when it fits in this many MB.
DEFAULT_CACHE_BUDGET_MB = 2048
#: Section 5: "With a Repeated Augmentation of 3".
DEFAULT_REPEATS = 3
#: Monte-Carlo samples of the apparent-size analysis, and points of an activation CDF.
DEFAULT_ANALYSIS_SAMPLES = 100_000
DEFAULT_CDF_POINTS = 200
#: The sizes ``fixres sweep`` measures unless given.
DEFAULT_SWEEP_SIZES = (128, 160, 192, 224, 256, 288, 320, 352, 384)
#: Default cap on the time the candidate fixes of ``fixres fix`` may take (estimated up front; farthest sizes
#: dropped first).
DEFAULT_SELECT_BUDGET_MIN = 60.0
#: ``fixres fix`` training a model (the embedded one, or a new head): batch size, and no repeated augmentation
#: (a short from-scratch run gains more from distinct photos than from repeats of each).
FIX_TRAIN_BATCH_SIZE = 64
FIX_TRAIN_REPEATS = 1
#: The embedded default of ``fixres fix``: a small built-in CNN trained from scratch on the generated data at a low
#: train size, for this many epochs, at a higher rate than the paper's 0.1 x B/256 (0.025 at B=64), which a short
#: from-scratch run needs to converge.
EMBEDDED_MODEL = "fixres_tiny_resnet"
EMBEDDED_TRAIN_EPOCHS = 30
EMBEDDED_TRAIN_LR = 0.2


def default_out(command: str) -> str:
    """Where ``fixres COMMAND`` writes unless given --out: runs/COMMAND (``make-dataset``: runs/data)."""
    return str(RUNS_DIR / ("data" if command == "make-dataset" else command))


@dataclass(frozen=True)
class DataConfig:
    """How a model expects its input: normalisation, resampling and the geometry it was trained at."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = DEFAULT_INTERPOLATION
    crop_ratio: float = DEFAULT_CROP_RATIO
    train_size: int = DEFAULT_TRAIN_SIZE
    stride: int = DEFAULT_STRIDE
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        validate_crop_ratio(self.crop_ratio)
        validate_size(self.train_size, "train_size")
        if self.interpolation not in INTERPOLATION_NAMES:
            raise UsageError(
                f"unknown interpolation {self.interpolation!r}; choose one of {', '.join(INTERPOLATION_NAMES)}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise UsageError("mean and std need three values each, std > 0")

    def with_overrides(self, **overrides) -> "DataConfig":
        """Return a copy with the non-None overrides applied (flags beat the model's own config)."""
        clean = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
        return replace(self, **clean)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.class_names is not None:
            d["class_names"] = list(self.class_names)
        return d


def validate_size(size: int, name: str = "size") -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise UsageError(f"{name} must be a positive whole number of pixels, got {size!r}")
    if size > MAX_SIZE:
        raise UsageError(f"{name} {size} is over the largest supported size {MAX_SIZE} pixels")
    return size


def validate_crop_ratio(crop_ratio: float) -> float:
    if not (0.0 < float(crop_ratio) <= 1.0):
        raise UsageError(f"crop_ratio must be in (0, 1], got {crop_ratio!r}")
    return float(crop_ratio)


def resize_for(test_size: int, crop_ratio: float) -> int:
    """The shorter-side resize that precedes a ``test_size`` centre crop: round(test_size / crop_ratio).

    The one place this is computed (transforms, analysis and evaluation all call it). The issue's
    vocabulary rounds; timm and the official FixRes code truncate, which can differ by one pixel.
    """
    validate_size(test_size, "test_size")
    validate_crop_ratio(crop_ratio)
    return max(test_size, int(round(test_size / crop_ratio)))


#: Validation photos (a seeded, class-stratified subset) that ``fixres fix`` evaluates under every corruption x
#: severity: each of the 13 conditions decodes them at full size for two models, so the step costs about 26 full
#: evaluations of this many photos; 200 give 600 image-severity pairs per paired test.
ROBUSTNESS_IMAGES = 200
