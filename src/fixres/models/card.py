"""The model card beside an export: ``README.md`` with the front matter the Hugging Face hub reads.

The front matter is the one timm's own hub exports carry (``library_name``, ``license``, ``tags``,
``pipeline_tag``), so ``huggingface-cli upload USER/NAME EXPORT_FOLDER`` publishes the folder as it is (fixres
itself uploads nothing). The body says what a user of the weights needs and cannot see in them: the size the
model was fixed for and its pre-processing, the accuracy with the rule that makes it unbiased (or says it is
not) and its noise, the photos it was measured on, and the command that made it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from fixres.config import DataConfig
from fixres.data.transforms import geometry_for

#: The file name the hub renders as the model's page.
CARD_NAME = "README.md"
#: What the card says of the weights' licence when the user does not: the hub's own word for it.
UNKNOWN_LICENSE = "unknown"
#: The hub's task for an image classifier.
PIPELINE_TAG = "image-classification"
#: The library the hub loads the folder with: timm reads ``config.json``; other models load as plain PyTorch.
LIBRARY_TIMM, LIBRARY_PLAIN = "timm", "pytorch"
#: When the accuracy names no rule: the command measured the photos after the fact and chose nothing on them.
NO_RULE_TEXT = "measured after the command finished; nothing was chosen on these photos"
NOT_MEASURED = "Not measured when this export was written."
PAPER = "FixRes (Touvron et al., \"Fixing the train-test resolution discrepancy\", NeurIPS 2019)"


@dataclass(frozen=True)
class CardFacts:
    """What the card says beyond the export's metadata: the photos its accuracy was measured on, the command that
    made it, the licence of the weights."""

    data: str | None = None
    command: str | None = None
    license: str = UNKNOWN_LICENSE


def front_matter(*, library: str, license: str, tags: list[str]) -> str:
    """The YAML block the hub reads; every value a JSON string (a valid YAML scalar whatever it holds)."""
    lines = ["---", f"library_name: {json.dumps(library)}", f"license: {json.dumps(license)}", "tags:"]
    lines += [f"- {json.dumps(t)}" for t in tags]
    lines += [f"pipeline_tag: {json.dumps(PIPELINE_TAG)}", "---"]
    return "\n".join(lines)


def accuracy_sentence(accuracy: Any, test_size: int, data: str | None) -> str:
    """One paragraph: top-1 with its binomial standard error, the number of photos, where and under what rule."""
    if accuracy is None:
        return NOT_MEASURED
    acc = accuracy if isinstance(accuracy, Mapping) else {"top1": float(accuracy)}
    top1, n = acc.get("top1"), acc.get("n")
    size = int(acc.get("test_size") or test_size)
    if isinstance(top1, Mapping):  # one figure per size (a training run's validation): the exported size's
        top1 = top1.get(str(size), top1.get(size))
    if not isinstance(top1, (int, float)):
        return NOT_MEASURED
    se = acc.get("top1_se")
    if se is None and n:
        se = 100.0 * math.sqrt(max(0.0, top1 / 100.0 * (1.0 - top1 / 100.0)) / n)
    noise = f" ± {se:.1f} (binomial standard error)" if se is not None else ""
    photos = f" on {n} photos" if n else ""
    where = f" of `{data}`" if data else ""
    rule = acc.get("top1_rule_text") or NO_RULE_TEXT
    return f"Top-1 **{top1:.1f} %**{noise} at {size} px{photos}{where}: {rule}."


def card_text(meta: Mapping[str, Any], cfg: DataConfig, facts: CardFacts | None, *, timm_ready: bool) -> str:
    """README.md of an export, from its ``fixres.json`` content (``meta``) and the ``facts`` only the caller knows."""
    facts = facts or CardFacts()
    size, train = int(meta["test_size"]), int(meta["train_size"])
    geometry = geometry_for(size, cfg, float(meta["crop_ratio"]))
    tags = [PIPELINE_TAG, "fixres"] + ([LIBRARY_TIMM] if timm_ready else [])
    lines = [front_matter(library=LIBRARY_TIMM if timm_ready else LIBRARY_PLAIN, license=facts.license, tags=tags),
             "",
             f"# {meta['model']}, fixed at {size} px",
             "",
             f"Trained at {train} px and fixed for testing at {size} px by fixres {meta['fixres_version']}, after "
             f"{PAPER}.",
             "",
             "## Pre-processing",
             "",
             "| | |",
             "|---|---|",
             f"| test size | {size} px (centre crop) |",
             f"| resize | shorter side to {geometry.resize} px, {meta['interpolation']} (crop ratio "
             f"{float(meta['crop_ratio']):g}) |",
             f"| normalisation | mean {meta['mean']}, std {meta['std']} |",
             f"| classes | {meta['num_classes']} |",
             "",
             "## Accuracy",
             "",
             accuracy_sentence(meta.get("accuracy"), size, facts.data),
             ""]
    if facts.command:
        lines += ["## How it was made", "", "```bash", facts.command, "```", ""]
    lines += ["## Files", "",
              "`model.safetensors` (the weights), `fixres.json` (the sizes and pre-processing above), "
              + ("`config.json` (for timm and the hub), " if timm_ready else "")
              + "`USAGE.md` (how to load it with timm, torchvision or fixres). `huggingface-cli upload USER/NAME "
              "THIS_FOLDER` publishes the folder as it is.", ""]
    return "\n".join(lines)
