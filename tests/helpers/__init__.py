"""What the tests share: factories and helpers, importable as ``helpers`` (pytest puts tests/ on ``sys.path``).

- ``helpers.folders``: the repository root, the optional real photos, tiny generated ImageFolder trees;
- ``helpers.models``: the tiny models (the library's ``fixres_tiny_resnet`` seeded, with non-degenerate batch
  norms, or saved as a checkpoint; a hand-built conv classifier) and fp32 precision;
- ``helpers.runs``: fake ``fixres fix`` run folders for the report's tests, a plausible one and a hostile one;
- ``helpers.cli``: running ``fixres`` in-process or as a program, valid command flags, one-line error checks;
- ``helpers.corpus``: the generated corpus of broken and awkward image files, and folder traps.

The factories used most are exported here: ``from helpers import write_image_folder, tiny_bundle``.
"""

from .folders import REPO, SHARED_DATA, tiny_data, write_image_folder
from .models import TINY_RESNET, fp32, save_tiny_checkpoint, tiny_bundle, tiny_classifier, tiny_resnet
from .runs import fake_run_dir

__all__ = ["REPO", "SHARED_DATA", "TINY_RESNET", "fake_run_dir", "fp32", "save_tiny_checkpoint", "tiny_bundle",
           "tiny_classifier", "tiny_data", "tiny_resnet", "write_image_folder"]
