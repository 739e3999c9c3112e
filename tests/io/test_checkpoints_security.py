"""Untrusted checkpoints: no pickled code ever runs; mismatches are named, never half-loaded."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_checkpoint, tiny_resnet
from helpers.cli import assert_one_line_error, cli

from fixres.errors import FixresError, UsageError
from fixres.io.checkpoint import (
    load_state_dict,
    load_training_state,
    save_safetensors,
    save_training_state,
    unwrap_state_dict,
)
from fixres.models.loading import load_model
from fixres.models.statedict import load_weights_strict


class MarkerPayload:
    """Unpickling this runs code: it creates ``marker`` (a stand-in for anything an attacker wants)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def tiny_state_dict(num_classes: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    return tiny_resnet(num_classes, seed=seed).model.state_dict()


def write_evil(path: Path, marker: Path, layout: str) -> Path:
    """Checkpoints with the payload hidden in different places and formats."""
    sd = {k: v.clone() for k, v in list(tiny_state_dict().items())[:3]}
    if layout == "nested":  # looks like a normal training checkpoint
        torch.save({"model": sd, "epoch": 3, "extra": MarkerPayload(marker)}, path)
    elif layout == "whole":
        torch.save(MarkerPayload(marker), path)
    elif layout == "legacy":  # pre-zip torch format
        torch.save({"state_dict": sd, "x": MarkerPayload(marker)}, path, _use_new_zipfile_serialization=False)
    elif layout == "raw_pickle":  # a plain pickle with a weights extension
        with open(path, "wb") as f:
            pickle.dump({"w": MarkerPayload(marker)}, f, protocol=2)
    else:
        raise ValueError(layout)
    return path


LAYOUTS = ("nested", "whole", "legacy", "raw_pickle")


def test_payload_is_real(tmp_path):
    """Control: the payload does run when unpickled unsafely, so the refusals below are meaningful."""
    marker = tmp_path / "control_marker"
    path = write_evil(tmp_path / "evil.pt", marker, "nested")
    torch.load(str(path), weights_only=False)
    assert marker.read_text() == "payload ran"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
def test_load_state_dict_refuses_code(tmp_path, layout, suffix):
    marker = tmp_path / "marker"
    path = write_evil(tmp_path / f"evil{suffix}", marker, layout)
    with pytest.raises(FixresError) as info:
        load_state_dict(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    if suffix != ".safetensors":
        assert "refused" in msg and "could run code" in msg
    assert not marker.exists()


def test_env_override_cannot_disable_the_guard(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 only affects calls that do not pass weights_only explicitly."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    path = write_evil(tmp_path / "evil.pt", marker, "nested")
    with pytest.raises(FixresError, match="refused"):
        load_state_dict(path)
    with pytest.raises(FixresError, match="refused"):
        load_training_state(path)
    assert not marker.exists()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_state_refuses_code(tmp_path, layout):
    marker = tmp_path / "marker"
    path = write_evil(tmp_path / "train_state.pt", marker, layout)
    with pytest.raises(FixresError, match="refused.*could run code"):
        load_training_state(path)
    assert not marker.exists()


def test_load_model_refuses_code(tmp_path):
    marker = tmp_path / "marker"
    path = write_evil(tmp_path / "evil.pt", marker, "nested")
    with pytest.raises(FixresError, match="refused"):
        load_model(model="fixres_tiny_resnet", checkpoint=str(path))
    assert not marker.exists()


@pytest.mark.parametrize("command,extra", [("eval", ["--test-size", "32"]), ("sweep", ["--test-sizes", "32"]),
                                           ("finetune", ["--test-size", "32", "--epochs", "1"])])
def test_cli_refuses_code(capsys, tmp_path, image_folder, command, extra):
    marker = tmp_path / "marker"
    path = write_evil(tmp_path / "evil.pt", marker, "nested")
    code, out, err = cli(capsys, command, "--model", "fixres_tiny_resnet", "--checkpoint", path, "--data", image_folder,
                         "--workers", "0", "--out", tmp_path / "out", *extra)
    assert code == 2  # a checkpoint that cannot be used is bad input
    assert_one_line_error(err, "refused", "could run code")
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_cli_subprocess_refuses_code(tmp_path, image_folder):
    """The same through the installed `fixres` script, in a fresh process."""
    from helpers.cli import fixres_subprocess
    marker = tmp_path / "marker"
    path = write_evil(tmp_path / "evil.pt", marker, "nested")
    res = fixres_subprocess("eval", "--model", "fixres_tiny_resnet", "--checkpoint", path, "--data", image_folder,
                            "--test-size", "32", "--workers", "0", "--out", tmp_path / "out")
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "refused")
    assert not marker.exists()


# --------------------------------------------------------------------------- broken files


@pytest.mark.parametrize("name,content", [
    ("empty.pt", b""),
    ("garbage.pt", b"\x00\x01 this is not a checkpoint" * 10),
    ("empty.safetensors", b""),
    ("garbage.safetensors", b"not safetensors at all"),
])
def test_broken_files_are_one_line_errors(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(FixresError) as info:
        load_state_dict(p)
    assert "\n" not in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_checkpoint(tmp_path, suffix):
    sd = tiny_state_dict()
    full = tmp_path / f"full{suffix}"
    if suffix == ".pt":
        torch.save(sd, full)
    else:
        save_safetensors(sd, full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(FixresError) as info:
        load_state_dict(cut)
    assert "\n" not in str(info.value)


def test_missing_and_folder_checkpoints(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_state_dict(tmp_path / "nope.pt")
    with pytest.raises(UsageError, match="not a file"):
        load_state_dict(tmp_path)
    with pytest.raises(UsageError, match="nothing to resume"):
        load_training_state(tmp_path / "nope.pt")


def test_no_tensors(tmp_path):
    p = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, p)
    with pytest.raises(FixresError, match="no (weights|tensors) found"):
        load_state_dict(p)


# --------------------------------------------------------------------------- layouts


def _expected():
    return tiny_state_dict(seed=7)


@pytest.mark.parametrize("layout", ["flat", "model_module", "state_dict", "state_dict_compiled", "with_extras",
                                    "safetensors", "safetensors_named_bin"])
def test_nested_layouts_load_exactly(tmp_path, layout):
    sd = _expected()
    path = tmp_path / "ck.pt"
    if layout == "flat":
        torch.save(sd, path)
    elif layout == "model_module":  # the official FixRes release: {'model': {'module.conv1.weight': ...}}
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif layout == "state_dict":
        torch.save({"state_dict": sd, "epoch": 90}, path)
    elif layout == "state_dict_compiled":
        torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}}, path)
    elif layout == "with_extras":
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        torch.save({"model": sd, "optimizer": opt.state_dict(), "epoch": 5, "args": {"lr": 0.1}}, path)
    elif layout == "safetensors":
        path = save_safetensors(sd, tmp_path / "ck.safetensors")
    elif layout == "safetensors_named_bin":
        save_safetensors(sd, tmp_path / "ck.safetensors")
        path = tmp_path / "pytorch_model.bin"
        path.write_bytes((tmp_path / "ck.safetensors").read_bytes())
    got = load_state_dict(path)
    assert set(got) == set(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    bundle = load_model(model="fixres_tiny_resnet", checkpoint=str(path))
    own = bundle.model.state_dict()
    assert all(torch.equal(own[k], sd[k]) for k in sd)


def test_unwrap_prefers_nested_weights():
    t = torch.ones(1)
    assert unwrap_state_dict({"model": {"module.a": t}}) == {"a": t}
    assert set(unwrap_state_dict({"net": {"b": t}, "epoch": 1})) == {"b"}


# --------------------------------------------------------------------------- mismatches


def test_num_classes_mismatch_names_the_way_out(tmp_path):
    ck = save_tiny_checkpoint(tmp_path / "ck.safetensors", num_classes=3)
    bundle = load_model(model="fixres_tiny_resnet", checkpoint=str(ck))  # classes read from the checkpoint
    assert bundle.model.num_classes == 3
    with pytest.raises(FixresError) as info:
        load_model(model="fixres_tiny_resnet", checkpoint=str(ck), num_classes=5)
    msg = str(info.value)
    assert "3 classes" in msg and "--num-classes 3" in msg and "\n" not in msg


def test_architecture_mismatch_is_named(tmp_path):
    ck = save_tiny_checkpoint(tmp_path / "ck.safetensors", num_classes=3)
    with pytest.raises(FixresError) as info:
        load_model(model="fixres_small_resnet", checkpoint=str(ck))
    assert "shape mismatch" in str(info.value) or "do not fit" in str(info.value)
    assert "\n" not in str(info.value)


def test_strict_load_is_all_or_nothing():
    """A checkpoint missing one tensor, or with one wrong shape, changes no weight of the model."""
    torch.manual_seed(1)
    model = load_model(model="fixres_tiny_resnet", num_classes=3, train_size=32).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = tiny_state_dict(seed=2)
    missing_one = dict(other)
    dropped = next(iter(missing_one))
    del missing_one[dropped]
    with pytest.raises(FixresError, match="1 missing"):
        load_weights_strict(model, missing_one, source="ck")
    wrong_shape = dict(other)
    key = next(k for k in other if k.startswith("layer2") and k.endswith("conv1.weight"))
    wrong_shape[key] = torch.zeros(1)
    with pytest.raises(FixresError, match=f"shape mismatch for {key}"):
        load_weights_strict(model, wrong_shape, source="ck")
    extra = {**other, "unexpected.weight": torch.zeros(1)}
    with pytest.raises(FixresError, match="unexpected"):
        load_weights_strict(model, extra, source="ck")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_data_with_more_classes_than_the_model(image_folder):
    from fixres.data.folders import scan_folder
    with pytest.raises(UsageError, match="3 classes but the model outputs 2.*--num-classes"):
        scan_folder(image_folder, num_classes=2)


def test_cli_num_classes_mismatch(capsys, tmp_path, image_folder):
    ck = save_tiny_checkpoint(tmp_path / "ck.safetensors", num_classes=3)
    code, out, err = cli(capsys, "eval", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--num-classes", "5",
                         "--data", image_folder, "--test-size", "32", "--workers", "0", "--out", tmp_path / "o")
    assert code in (1, 2)
    assert_one_line_error(err, "--num-classes 3")


# --------------------------------------------------------------------------- saving


def test_training_state_roundtrip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {"epoch": 2, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "rng_cpu": torch.get_rng_state(), "log": [{"epoch": 1, "top1": 50.0}], "name": "x"}
    path = save_training_state(state, tmp_path / "s" / "train_state.pt")
    back = load_training_state(path)
    assert back["epoch"] == 2 and back["log"] == state["log"] and back["name"] == "x"
    assert torch.equal(back["rng_cpu"], state["rng_cpu"])
    assert all(torch.equal(back["model"][k], v) for k, v in state["model"].items())
    assert [p.name for p in path.parent.iterdir()] == ["train_state.pt"]  # no temp file left


def test_safetensors_metadata_and_shared_storage(tmp_path):
    base = torch.arange(6.0)
    sd = {"a": base, "b": base.view(2, 3)}  # shared storage would make safetensors refuse to save
    path = save_safetensors(sd, tmp_path / "m.safetensors", metadata={"model": "x"})
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"model": "x"}
    got = load_state_dict(path)
    assert torch.equal(got["b"], base.view(2, 3))
