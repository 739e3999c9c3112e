"""Label-free adaptation and activation statistics on streamed shards: one read front to back gives the numbers of
the same shards indexed (``--max-images`` evenly spread in the order read), and one line for what cannot be
read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import fp32, save_tiny_checkpoint, tiny_resnet
from helpers.cli import cli
from helpers.layouts import training_shards

from fixres.data.shards import index_shards, resolve_shards
from fixres.data.streams import ShardStream, StreamedShards
from fixres.errors import UsageError
from fixres.method.adaptation import adapt
from fixres.method.stats import activation_stats
from fixres.runtime.engine import Precision

KW = dict(workers=0, progress=False, batch_size=4)
CLASSES = ("0", "1", "2")
#: Validation photos: 2 per class.
VAL_PHOTOS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adaptstream")
    folder = training_shards(root)
    listed = {split: tuple(str(p) for p in sorted(folder.glob(f"{split}-*"))) for split in ("train", "val")}
    return {"dir": str(folder), "root": root, "ckpt": save_tiny_checkpoint(root / "tiny.safetensors"),
            "stream": {split: ShardStream(str(folder), shards, CLASSES) for split, shards in listed.items()},
            "indexed": {split: index_shards(resolve_shards(str(folder), split), num_classes=3, warn=False)
                        for split in ("train", "val")},
            "pipe": {split: "pipe:cat " + str(folder / f"{split}-{{000000..000002}}.tar")
                     for split in ("train", "val")}}


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["bn-recalibrate", "gaussian", "frechet"])
def test_adapting_on_streamed_shards_is_the_same_whatever_the_workers_and_sums_as_the_indexed_shards(shards, method):
    states, results = [], []
    for photos, workers in ((shards["indexed"]["train"], 0), (shards["stream"]["train"], 0),
                            (shards["stream"]["train"], 2)):
        b = tiny_resnet(num_classes=3)
        res = adapt(b.model, photos, b.data_config, method=method, train_size=32, test_size=64, precision=fp32(),
                    **{**KW, "workers": workers})
        states.append(_state(b.model))
        results.append(res)
    assert {s["path"].split("::")[1] for s in results[1]["skipped"]} == {"class_2/img_zzz.jpg"}
    # Batches of 4 within each shard, the same with 0 or 2 workers.
    assert results[1]["images"] == results[2]["images"]
    assert all(torch.allclose(v.float(), states[2][k].float(), rtol=1e-5, atol=1e-6) for k, v in states[1].items())
    if method == "bn-recalibrate":
        # Every batch counts equally: the shards' batches (3 | 4 4 2 | 4 2, the last with the unreadable photo and
        # so left out, a batch-norm needing two) are not the indexed ones, and neither are the statistics.
        assert results[0]["images"] == 18 and results[1]["images"] == 17
        return
    assert results[0]["images"] == results[1]["images"] == 18  # 19 photos with a class, one unreadable
    for k, v in states[0].items():  # the same sums, added in another grouping of the photos
        assert torch.allclose(v.float(), states[1][k].float(), rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("max_images", [None, 4])
def test_statistics_of_streamed_shards_are_those_of_the_indexed_shards(shards, max_images):
    b = tiny_resnet(num_classes=3)
    kw = dict(test_sizes=[32, 64], precision=fp32(), max_images=max_images, **KW)
    indexed = activation_stats(b.model, shards["indexed"]["val"], b.data_config, **kw)
    streamed = activation_stats(b.model, shards["stream"]["val"], b.data_config, **kw)
    # The shards hold their photos in the indexed order, so the spread photos are the same ones.
    assert indexed["n_images"] == streamed["n_images"] == (max_images or VAL_PHOTOS)
    for a, s in zip(indexed["sizes"], streamed["sizes"]):
        assert a["frac_zero"] == s["frac_zero"] and a["n_values"] == s["n_values"]
        assert np.allclose(a["cdf"], s["cdf"]) and abs(a["mean"] - s["mean"]) < 1e-5


def test_only_the_spread_photos_are_decoded(shards, monkeypatch):
    decoded = []
    real = StreamedShards._shard

    def counting(self, s):
        for item in real(self, s):
            decoded.append(item)
            yield item
    monkeypatch.setattr(StreamedShards, "_shard", counting)
    b = tiny_resnet(num_classes=3)
    activation_stats(b.model, shards["stream"]["val"], b.data_config, test_sizes=[32], precision=fp32(), max_images=2,
                     **KW)
    assert sum(1 for d in decoded if not hasattr(d, "entries")) == 2  # the photos; the rest are shard records


def test_cli_adapts_a_pipe_and_measures_statistics_of_one(capsys, tmp_path, shards):
    code, out, err = cli(capsys, "adapt", "--method", "bn-recalibrate", "--model", "fixres_tiny_resnet",
                         "--checkpoint", shards["ckpt"], "--data", shards["pipe"]["train"], "--val-data",
                         shards["pipe"]["val"], "--test-size", "64", "--workers", "0", "--no-amp", "-q",
                         "--out", tmp_path / "adapt", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 18 and result["before"]["n"] == result["after"]["n"] == VAL_PHOTOS
    assert (tmp_path / "adapt" / "model.safetensors").exists()
    code, out, err = cli(capsys, "stats", "--model", "fixres_tiny_resnet", "--checkpoint", shards["ckpt"],
                         "--data", shards["pipe"]["val"], "--sizes", "32,64", "--workers", "0", "--no-amp", "-q",
                         "--out", tmp_path / "stats", "--json")
    assert code == 0, err
    assert json.loads(out)["before"]["n_images"] == VAL_PHOTOS


@pytest.mark.parametrize("command, extra, says", [
    ("adapt", ["--data", "pipe:false"], "exited with status 1"),
    ("stats", ["--data", "pipe:false"], "exited with status 1"),
    ("stats", ["--data", "pipe:false", "--max-images", "3"], "cannot count the photos of pipe:false"),
    ("adapt", ["--data", "{root}/folder", "--val-data", "{dir}"], "--val-data is for streamed shards"),
    ("adapt", ["--data", "{dir}", "--stream", "--train-count", "9"], "unrecognized arguments: --train-count"),
])
def test_streams_that_cannot_be_read_whole_get_one_line(capsys, tmp_path, shards, command, extra, says):
    extra = [e.format(dir=shards["dir"], root=shards["root"]) for e in extra]
    method = ["--method", "bn-recalibrate", "--test-size", "64"] if command == "adapt" else ["--sizes", "32"]
    code, _, err = cli(capsys, command, "--model", "fixres_tiny_resnet", "--checkpoint", shards["ckpt"], *method,
                       *extra, "--workers", "0", "--no-amp", "-q", "--out", tmp_path / "o")
    assert code == 2 and says in err and "Traceback" not in err, err


def test_a_stream_cut_short_is_an_error_not_fewer_photos(shards, tmp_path):
    cut = tmp_path / "cut.tar"
    data = open(shards["stream"]["val"].shards[2], "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    stream = ShardStream(str(cut), (*shards["stream"]["val"].shards[:2], str(cut)), CLASSES)
    b = tiny_resnet(num_classes=3)
    with pytest.raises(UsageError, match="cut.tar"):
        activation_stats(b.model, stream, b.data_config, test_sizes=[32], precision=Precision(False, None, False),
                         **KW)
