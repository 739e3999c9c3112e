"""``fixres fix`` scores its candidates from the activations the model before the fix recorded at the cut, and
every number it writes is the one a full forward gives."""

from __future__ import annotations

import json

import pytest
from helpers import save_tiny_checkpoint, write_image_folder

from fixres.job import pipeline
from fixres.method.cutcache import CutCache

RUN = dict(model="fixres_tiny_resnet", train_size=32, test_sizes=[32, 48], finetune_epochs=1, workers=0,
           progress=False, batch_size=8, holdout_untouched=True, amp=False)  # fp32: the same numbers to rounding
SCORES = ("holdout_after", "val_after")


def _fix(tmp_path, name: str, monkeypatch, *, replay: bool) -> tuple[dict, list]:
    data = tmp_path / "data"
    if not data.exists():
        write_image_folder(data / "train", per_class=8, seed=1)
        write_image_folder(data / "val", per_class=3, seed=2)
        save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    answers = []
    real = CutCache.score

    def spy(self, *a, **kw):
        got = real(self, *a, **kw) if replay else None
        answers.append(got is not None)
        return got

    monkeypatch.setattr(CutCache, "score", spy)
    out = tmp_path / name
    pipeline.run_fix(pipeline.FixConfig(checkpoint=str(tmp_path / "tiny.safetensors"), data=str(data), out=str(out),
                                        **RUN))
    return json.loads((out / "select.json").read_text()), answers


def test_candidates_scored_from_the_cut_equal_full_forwards(tmp_path, monkeypatch):
    cached, answers = _fix(tmp_path, "cached", monkeypatch, replay=True)
    full, _ = _fix(tmp_path, "full", monkeypatch, replay=False)
    assert answers and all(answers), "every fixed model should be scored from the recorded activations"
    assert not list((tmp_path / "cached").rglob("prefix_cache.f16")), "the recorded activations outlive the run"
    assert cached["scored_from_cut"]["replayed"] > 0 and cached["scored_from_cut"]["cut"]
    assert full["scored_from_cut"]["replayed"] == 0
    for a, b in zip(cached["candidates"], full["candidates"], strict=True):
        for key in SCORES:
            got, want = a[key], b[key]
            assert (got["top1"], got["n"], got.get("outcomes")) == (want["top1"], want["n"], want.get("outcomes"))
            assert got["nll"] == pytest.approx(want["nll"], rel=1e-5)
        assert a["val_after"]["row"]["correct"] == b["val_after"]["row"]["correct"]
