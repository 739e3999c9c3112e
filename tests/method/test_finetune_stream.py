"""Fine-tuning on streamed shards: with the activation cache, the same batches and weights as the shards indexed;
without it, epochs read as ``train --stream`` reads them (seeded, whatever the loader workers, resumable); the
count checked, and one line for what cannot be fine-tuned on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_checkpoint, tiny_resnet
from helpers.cli import VENV_BIN, cli
from helpers.layouts import training_shards

from fixres.data.shards import index_shards, resolve_shards
from fixres.data.streams import ShardStream
from fixres.errors import UsageError
from fixres.method.finetuning import FinetuneInterrupted, finetune
from fixres.runtime.engine import Precision

TIMEOUT_S = 180
#: Training photos with a class: 6 per class, 3 classes, and one unreadable photo.
TRAIN_PHOTOS = 3 * 6 + 1
CLASSES = ("0", "1", "2")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tunestream")
    training_shards(root)
    listed = {split: tuple(str(p) for p in sorted((root / "shards").glob(f"{split}-*"))) for split in ("train", "val")}
    return {"dir": str(root / "shards"), "root": root,
            "train": ShardStream(str(root / "shards"), listed["train"], CLASSES),
            "val": ShardStream(str(root / "shards"), listed["val"], CLASSES),
            "indexed": [index_shards(resolve_shards(str(root / "shards"), split), num_classes=3, warn=False)
                        for split in ("train", "val")],
            "pipe": "pipe:cat " + str(root / "shards" / "train-{000000..000002}.tar"),
            "val_pipe": "pipe:cat " + str(root / "shards" / "val-{000000..000002}.tar")}


def _tune(train, val, out: Path, **kw) -> tuple[dict, dict]:
    bundle = tiny_resnet(num_classes=3)
    args = dict(test_size=48, epochs=2, batch_size=4, out_dir=out, workers=0, progress=False,
                precision=Precision(False, None, False), seed=3)
    args.update(kw)
    res = finetune(bundle.model, train, val, bundle.data_config, **args)
    return {k: v.clone() for k, v in bundle.model.state_dict().items()}, res


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _skipped(res: dict) -> dict:
    return {s["path"].split("::")[1]: s["reason"] for s in res["skipped"]}


@pytest.mark.parametrize("pipe", [False, True])
def test_with_the_cache_streamed_shards_fine_tune_to_the_indexed_weights(shards, tmp_path, pipe):
    train, val = shards["indexed"]
    indexed, res_i = _tune(train, val, tmp_path / "indexed")
    stream = (ShardStream(shards["pipe"], tuple(f"pipe:cat {s}" for s in shards["train"].shards), CLASSES) if pipe
              else shards["train"])
    streamed, res_s = _tune(stream, shards["val"], tmp_path / "streamed")
    assert res_i["cache"]["used"] and res_s["cache"]["used"]
    assert _same(indexed, streamed), "the streamed fine-tuning drew other batches than the indexed one"
    for key in ("top1", "nll", "n"):
        assert res_i["before"][key] == res_s["before"][key] and res_i["after"][key] == res_s["after"][key]
    assert [r["loss"] for r in res_i["log"]] == [r["loss"] for r in res_s["log"]]
    assert _skipped(res_s) == {"class_2/img_zzz.jpg": "not an image", "class_0/orphan": "no .cls member"}


def test_without_the_cache_epochs_are_seeded_whatever_the_workers_and_resume_continues(shards, tmp_path):
    kw = dict(augment="train", shuffle_buffer=4)
    base, res = _tune(shards["train"], shards["val"], tmp_path / "w0", **kw)
    assert not res["cache"]["used"] and res["log"][0]["images"] == TRAIN_PHOTOS - 1  # the unreadable one skipped
    other, _ = _tune(shards["train"], shards["val"], tmp_path / "w2", workers=2, **kw)
    assert _same(base, other), "another worker count gave other weights"
    assert _skipped(res) == {"class_2/img_zzz.jpg": "not an image", "class_0/orphan": "no .cls member"}
    with pytest.raises(FinetuneInterrupted):
        _tune(shards["train"], shards["val"], tmp_path / "r", stop_after_batches=6, **kw)
    resumed, res = _tune(shards["train"], shards["val"], tmp_path / "r", resume=True, **kw)
    assert res["resumed_from_epoch"] == 1 and _same(base, resumed), "the resumed run differs"
    wider, _ = _tune(shards["train"], shards["val"], tmp_path / "b8", augment="train", shuffle_buffer=8)
    assert not _same(base, wider)  # another buffer, another order
    with pytest.raises(UsageError, match="stream=True \\(now False\\)"):  # the indexed order is another run
        _tune(shards["indexed"][0], shards["indexed"][1], tmp_path / "r", resume=True, **kw)


def test_a_wrong_count_is_one_line_and_the_right_one_fine_tunes_alike(shards, tmp_path):
    from dataclasses import replace
    # The cache's fill reads every photo: a count it does not find is an error (without the cache the count is
    # the epoch's length, as for train --stream).
    with pytest.raises(UsageError, match="more than the 12 photos --train-count says"):
        _tune(replace(shards["train"], count=12), None, tmp_path / "c12", evaluate_before=False,
              evaluate_after=False)
    given, _ = _tune(replace(shards["train"], count=TRAIN_PHOTOS), shards["val"], tmp_path / "given")
    counted, _ = _tune(shards["train"], shards["val"], tmp_path / "counted")
    assert _same(given, counted)


def test_fewer_shards_than_processes_is_one_line_before_any_reading(shards, tmp_path):
    from dataclasses import replace

    from fixres.runtime.dist import DistEnv
    one = replace(shards["train"], shards=shards["train"].shards[:1])
    with pytest.raises(UsageError, match="1 shard\\(s\\) for 2 processes"):
        _tune(one, None, tmp_path / "o", env=DistEnv(rank=0, world_size=2), evaluate_before=False,
              evaluate_after=False)


def test_cli_fine_tunes_a_pipe_validated_on_streamed_val(capsys, tmp_path, shards):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "finetune", "--model", "fixres_tiny_resnet", "--checkpoint", ckpt, "--data",
                            shards["pipe"], "--val-data", shards["val_pipe"], "--test-size", "64", "--epochs", "2",
                            "--batch-size", "4", "--workers", "0", "--no-amp", "-q", "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["data"] == shards["pipe"] and result["cache"]["used"] and result["after"]["n"] == 6
    assert (out / "model.safetensors").exists()
    # The same photos indexed from their folder of shards: the same numbers.
    code, stdout, err = cli(capsys, "finetune", "--model", "fixres_tiny_resnet", "--checkpoint", ckpt, "--data",
                            shards["dir"], "--test-size", "64", "--epochs", "2", "--batch-size", "4",
                            "--workers", "0", "--no-amp", "-q", "--out", tmp_path / "indexed", "--json")
    assert code == 0, err
    indexed = json.loads(stdout)
    assert [r["loss"] for r in indexed["log"]] == [r["loss"] for r in result["log"]]
    assert indexed["after"]["top1"] == result["after"]["top1"]


@pytest.mark.parametrize("extra, says", [
    (["--data", "pipe:false"], "exited with status 1"),
    (["--data", "{root}/folder", "--val-data", "{dir}"], "--val-data is for streamed shards"),
    (["--data", "{root}/folder", "--train-count", "9"], "--train-count is for streamed shards"),
    (["--data", "{dir}", "--stream", "--train-count", "30"], "--train-count 30, but the shards hold 19"),
])
def test_streams_that_cannot_be_fine_tuned_on_get_one_line(capsys, tmp_path, shards, extra, says):
    extra = [e.format(dir=shards["dir"], root=shards["root"]) for e in extra]
    code, _, err = cli(capsys, "finetune", "--model", "fixres_tiny_resnet", "--checkpoint",
                       save_tiny_checkpoint(tmp_path / "tiny.safetensors"), *extra, "--test-size", "64",
                       "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-amp", "-q", "--no-export",
                       "--out", tmp_path / "o")
    assert code == 2 and says in err and "Traceback" not in err, err


def test_torchrun_fine_tunes_streamed_shards_of_unequal_size(tmp_path, shards):
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed in this environment")
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "ddp"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "fixres", "finetune",
                           "--model", "fixres_tiny_resnet", "--checkpoint", str(ckpt), "--data", shards["pipe"],
                           "--val-data", shards["val_pipe"], "--test-size", "64", "--epochs", "2",
                           "--batch-size", "4", "--device", "cpu", "--no-amp", "-q", "--no-export",
                           "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    # Each rank fine-tunes on its shards' photos (a rank's last batch of one photo is left out, as in an indexed
    # run: batch norms); every val photo is scored once.
    readable = TRAIN_PHOTOS - 1
    assert result["cache"]["used"] and all(readable - 2 <= r["images"] <= readable for r in result["log"])
    assert result["after"]["n"] == 6
