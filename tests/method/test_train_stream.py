"""Training from streamed shards: the epoch's order decided by the seed alone (not the loader workers), each
photo's bytes read once per pass in the training process, the epoch's length from counting the shards, resume
at an epoch's end equal to an uninterrupted run, and one line for what cannot be trained on."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from helpers import tiny_resnet
from helpers.cli import VENV_BIN, cli
from helpers.layouts import training_shards

from fixres.data.streams import ShardStream, count_photos
from fixres.errors import UsageError
from fixres.method.shardepochs import ShardEpochs
from fixres.runtime.engine import Precision

TIMEOUT_S = 180
#: Training photos: 6 per class, 3 classes, and one unreadable photo.
TRAIN_PHOTOS = 3 * 6 + 1


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trainstream")
    training_shards(root)
    stream = ShardStream(str(root / "shards"), tuple(str(p) for p in sorted((root / "shards").glob("train-*"))),
                         ("0", "1", "2"))
    return {"dir": str(root / "shards"), "stream": stream, "root": root,
            "pipe": "pipe:cat " + str(root / "shards" / "train-{000000..000002}.tar")}


def _train(stream: ShardStream, out: Path, **kw) -> tuple[dict, dict]:
    from fixres.method.train import train
    bundle = tiny_resnet(num_classes=3)
    args = dict(val_samples=[], train_size=32, epochs=2, batch_size=4, out_dir=out, workers=0, progress=False,
                precision=Precision(False, None, False), model_name="fixres_tiny_resnet", lr=0.05, seed=3)
    args.update(kw)
    res = train(bundle.model, stream, cfg=bundle.data_config, **args)
    return {k: v.clone() for k, v in bundle.model.state_dict().items()}, res


def _keys(sampler: ShardEpochs, epoch: int) -> list[tuple[str, int]]:
    sampler.set_epoch(epoch)
    return [(item[2], position) for item, position, _ in sampler]


def test_the_shards_are_counted_from_their_headers_or_their_bytes(shards):
    local = sum(count_photos(s) for s in shards["stream"].shards)
    piped = sum(count_photos(f"pipe:cat {s}") for s in shards["stream"].shards)
    assert local == piped == TRAIN_PHOTOS


def test_an_epoch_is_the_indexed_count_in_groups_of_copies_dealt_by_shard(shards):
    stream = shards["stream"]
    one = ShardEpochs(stream, TRAIN_PHOTOS, repeats=3, rank=0, world_size=1, seed=0, len_factor=2.0, buffer=4)
    keys = _keys(one, 0)
    assert len(keys) == len(one) == 2 * TRAIN_PHOTOS
    assert [p for _, p in keys] == list(range(2 * TRAIN_PHOTOS))
    refs = [r for r, _ in keys]
    assert all(refs[i] == refs[i + 1] == refs[i + 2] for i in range(0, len(refs) - 2, 3))  # consecutive copies
    assert keys == _keys(one, 0) and keys != _keys(one, 1)  # seeded by (seed, epoch)
    wider = ShardEpochs(stream, TRAIN_PHOTOS, repeats=3, rank=0, world_size=1, seed=0, len_factor=2.0, buffer=16)
    assert _keys(wider, 0) != keys  # another buffer, another order
    # Two ranks: the shards split between them, positions dealt as the indexed sampler deals them.
    ranks = [ShardEpochs(stream, TRAIN_PHOTOS, repeats=1, rank=r, world_size=2, seed=0, len_factor=1.0)
             for r in range(2)]
    shards_read = [set(s.shards()) for s in ranks]
    assert not shards_read[0] & shards_read[1] and shards_read[0] | shards_read[1] == set(stream.shards)
    positions = [p for s in ranks for _, p in _keys(s, 0)]
    assert sorted(positions) == list(range(2 * len(ranks[0])))


def test_reading_ahead_gives_the_same_items_raises_their_error_and_stops_with_its_taker():
    from fixres.method.shardepochs import read_ahead
    assert list(read_ahead(iter(range(50)), 3)) == list(range(50))

    def failing():
        yield from range(4)
        raise UsageError("shard x: cut short")
    got = []
    with pytest.raises(UsageError, match="cut short"):
        for item in read_ahead(failing(), 2):
            got.append(item)
    assert got == [0, 1, 2, 3]  # every item read before the error, then the error itself

    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()  # what ends a pipe: command
    taken = read_ahead(endless(), 4)
    assert [next(taken) for _ in range(10)] == list(range(10))
    taken.close()
    assert closed.wait(5) and not any(t.name == "fixres-shard-reader" for t in threading.enumerate())


def test_same_seed_same_weights_whatever_the_worker_count_and_resume_continues_the_run(shards, tmp_path):
    base, res = _train(shards["stream"], tmp_path / "w0", workers=0)
    other, _ = _train(shards["stream"], tmp_path / "w2", workers=2)
    assert all(torch.equal(base[k], other[k]) for k in base), "another worker count gave other weights"
    assert res["hparams"]["n_train"] == TRAIN_PHOTOS and res["hparams"]["stream"]
    skipped = {s["path"].split("::")[1]: s["reason"] for s in res["skipped"]}
    assert skipped.keys() == {"class_2/img_zzz.jpg", "class_0/orphan"} and skipped["class_0/orphan"] == \
        "no .cls member", skipped
    # One epoch, then a resume to two: the weights of the uninterrupted run.
    _train(shards["stream"], tmp_path / "r", epochs=1)
    resumed, res = _train(shards["stream"], tmp_path / "r", resume=True)
    assert res["resumed_from"] == 1 and res["hparams"]["shuffle_buffer"] == 1000
    with pytest.raises(UsageError, match="shuffle_buffer=1000 \\(now 8\\)"):  # another order: not the same run
        _train(shards["stream"], tmp_path / "r", resume=True, shuffle_buffer=8)
    assert all(torch.equal(base[k], resumed[k]) for k in base), "the resumed run differs"
    moved, _ = _train(shards["stream"], tmp_path / "s4", seed=4)
    assert any(not torch.equal(base[k], moved[k]) for k in base if base[k].is_floating_point())


def test_cli_trains_on_a_pipe_and_validates_on_streamed_val(capsys, tmp_path, shards):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--model", "fixres_tiny_resnet", "--num-classes", "3", "--data",
                       shards["pipe"], "--val-data", shards["dir"], "--train-size", "32", "--val-sizes", "32",
                       "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-amp", "-q", "--out", out,
                       "--json")
    assert code == 0, err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["val_n"] == 6 and log[0]["step"] == 2 * TRAIN_PHOTOS // 4  # full batches of the 2N samples
    assert (out / "model.safetensors").exists()
    # The count given: the same training without the counting pass (one read of each shard fewer).
    def reads(*count) -> int:
        calls = tmp_path / f"calls{len(count)}"
        value = "pipe:echo >> " + str(calls) + "; cat " + shards["pipe"].split("cat ", 1)[1]
        code, _, err = cli(capsys, "train", "--model", "fixres_tiny_resnet", "--num-classes", "3", "--data", value,
                           *count, "--train-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                           "--no-amp", "-q", "--out", tmp_path / f"run{len(count)}")
        assert code == 0, err
        return len(calls.read_text().splitlines())
    assert reads() - reads("--train-count", str(TRAIN_PHOTOS)) == 3


@pytest.mark.parametrize("extra, says", [
    (["--data", "pipe:false"], "exited with status 1"),
    (["--data", "{dir}", "--stream"], "give --num-classes N"),
    (["--data", "{dir}", "--stream", "--num-classes", "2"], "class 2 is outside the model's 2 classes"),
    (["--data", "{root}/folder", "--val-data", "{dir}"], "--val-data is for streamed shards"),
    (["--data", "{root}/folder", "--train-count", "9"], "--train-count is for streamed shards"),
    (["--data", "{root}/folder", "--shuffle-buffer", "9"], "--shuffle-buffer is for streamed shards"),
])
def test_streams_that_cannot_train_get_one_line(capsys, tmp_path, shards, extra, says):
    extra = [e.format(dir=shards["dir"], root=shards["root"]) for e in extra]
    if "--num-classes" not in extra and "pipe:" in extra[1]:
        extra += ["--num-classes", "3"]
    code, _, err = cli(capsys, "train", "--model", "fixres_tiny_resnet", *extra, "--train-size", "32",
                       "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-amp", "-q", "--out",
                       tmp_path / "o")
    assert code == 2 and says in err and "Traceback" not in err, err


def test_torchrun_trains_on_streamed_shards_split_by_shard(tmp_path, shards):
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed in this environment")
    out = tmp_path / "ddp"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "fixres", "train",
                           "--model", "fixres_tiny_resnet", "--num-classes", "3", "--data", shards["pipe"],
                           "--train-size", "32", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                           "--no-amp", "-q", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # ceil(2N / 2) = N samples per rank, in full batches of 2 per rank: every rank takes the same steps.
    assert log[0]["step"] == TRAIN_PHOTOS // 2
    assert json.loads((out / "fixres.json").read_text())
