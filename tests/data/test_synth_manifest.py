"""What makes a folder the generated data set: its manifest read as ``synth.ManifestHead``."""

from __future__ import annotations

import json

import pytest

from fixres.data import synth
from fixres.errors import UsageError
from fixres.io import schema

SMALL = {"classes": 2, "train_per_class": 1, "val_per_class": 1, "short_side": (40, 48), "workers": 0,
         "progress": False}


def test_the_manifest_head_reads_what_decides_reuse(tmp_path):
    synth.make_dataset(tmp_path / "a", seed=0, **SMALL)
    head = schema.parse(synth.ManifestHead, synth.read_manifest(tmp_path / "a"))
    assert head.generator == "fixres.data.synth" and head.generator_version == synth.GENERATOR_VERSION
    assert head.config["seed"] == 0
    assert schema.parse(synth.ManifestHead, {"generator_version": "2", "config": [1]}) == synth.ManifestHead()


def test_a_manifest_that_is_not_an_object_is_not_a_data_set(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / synth.MANIFEST).write_text(json.dumps([1, 2]), encoding="utf-8")
    with pytest.raises(UsageError, match="it is not a fixres data set"):
        synth.make_dataset(out, seed=0, overwrite=True, **SMALL)
