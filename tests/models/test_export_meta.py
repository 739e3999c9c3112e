"""The export pair and its metadata.

``model.safetensors`` and ``fixres.json`` appear together: a kill between the two writes never leaves
a loader with stale metadata. A tampered ``fixres.json`` is refused with one line naming the field
(one schema, ``fixres.io.meta``), and NaN/Infinity are never written into JSON.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import fixres.io.atomic
import fixres.io.checkpoint
from fixres.config import DataConfig
from fixres.errors import FixresError, UsageError
from fixres.io.meta import read_header_meta, read_meta_file
from fixres.models.export import export_model
from fixres.models.loading import create_model, load_model

MODEL = "fixres_tiny_resnet"


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so no handler on the way cleans up."""


def _model(seed: int, num_classes: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(MODEL, num_classes=num_classes)[0].eval()


def _export(model, out: Path, test_size: int, **kw) -> Path:
    cfg = DataConfig(train_size=32, crop_ratio=0.875)
    return export_model(model, out, model_name=MODEL, cfg=cfg, test_size=test_size, train_size=32,
                        class_names=["a", "b"], **kw)


def _kill_when_writing(monkeypatch, name: str) -> None:
    """Die as the file ``name`` is about to be written (every write goes through fixres.io.atomic)."""
    real_path, real_text = fixres.io.atomic.atomic_path, fixres.io.atomic.write_text

    def text(path, data):
        if Path(path).name == name:
            raise Killed
        return real_text(path, data)
    monkeypatch.setattr(fixres.io.atomic, "write_text", text)
    if name.endswith(".safetensors"):
        def path_ctx(path):
            if Path(path).name == name:
                raise Killed
            return real_path(path)
        monkeypatch.setattr(fixres.io.checkpoint, "atomic_path", path_ctx)


@pytest.mark.parametrize("killed_at", ["fixres.json", "model.safetensors"])
def test_a_kill_between_the_two_writes_never_pairs_weights_with_stale_metadata(tmp_path, monkeypatch, killed_at):
    old, new = _model(0), _model(1)
    out = tmp_path / "export"
    path = _export(old, out, test_size=64)
    with monkeypatch.context() as m:
        _kill_when_writing(m, killed_at)
        with pytest.raises(Killed):
            _export(new, out, test_size=96)
    back = load_model(checkpoint=str(path))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        got = back.model.eval()(x)
        want_new, want_old = new(x), old(x)
    # The export is written aside and swapped in whole: a kill while writing any of its files leaves the old pair.
    assert torch.allclose(got, want_old) and not torch.allclose(got, want_new)
    assert back.meta["export"]["test_size"] == 64
    # Whatever reads fixres.json alone (another tool, a person) never finds it describing other weights.
    meta_file = out / "fixres.json"
    assert read_meta_file(meta_file) == read_header_meta(path)


def test_the_weights_file_alone_is_a_complete_export(tmp_path):
    path = _export(_model(0), tmp_path / "x", test_size=64)
    (tmp_path / "x" / "fixres.json").unlink()
    back = load_model(checkpoint=str(path))
    assert back.meta["export"]["test_size"] == 64 and back.data_config.class_names == ("a", "b")


def test_a_stale_fixres_json_is_named_and_not_trusted(tmp_path, capsys):
    path = _export(_model(0), tmp_path / "x", test_size=64)
    meta_path = tmp_path / "x" / "fixres.json"
    meta = json.loads(meta_path.read_text())
    meta.update(test_size=128, test_input_size=[3, 128, 128])
    meta_path.write_text(json.dumps(meta))
    back = load_model(checkpoint=str(path))
    assert back.meta["export"]["test_size"] == 64
    err = capsys.readouterr().err
    assert "warning" in err and "test_size" in err and "fixres.json" in err


# --------------------------------------------------------------------------- a tampered fixres.json

def _edit(meta: dict, case: str):
    if case == "missing_mean":
        del meta["mean"]
    elif case == "list_not_object":
        return [meta]
    elif case == "num_classes_text":
        meta["num_classes"] = "two"
    elif case == "mean_text":
        meta["mean"] = "abc"
    elif case == "test_size_fraction":
        meta["test_size"] = 64.7
    elif case == "three_names_two_outputs":
        meta["class_names"] = ["a", "b", "c"]
    elif case == "interpolation_unknown":
        meta["interpolation"] = "lanczos9"
    elif case == "crop_ratio_zero":
        meta["crop_ratio"] = 0
    elif case == "std_negative":
        meta["std"] = [0.2, -1, 0.2]
    elif case == "crop_ratio_tiny":  # resize = size / crop_ratio: an OverflowError, or a photo past memory
        meta["crop_ratio"] = 1e-9
    elif case == "test_size_huge":
        meta["test_size"] = 100_000
    elif case == "std_tiny":
        meta["std"] = [1e-45, 0.2, 0.2]
    elif case == "mean_huge":
        meta["mean"] = [1e39, 0.5, 0.5]
    return meta


TAMPERED = {  # case -> the field the one-line error must name
    "missing_mean": "mean", "list_not_object": "JSON object", "num_classes_text": "num_classes",
    "mean_text": "mean", "test_size_fraction": "test_size", "three_names_two_outputs": "class_names",
    "interpolation_unknown": "interpolation", "crop_ratio_zero": "crop_ratio", "std_negative": "std",
    "crop_ratio_tiny": "crop_ratio", "test_size_huge": "test_size", "std_tiny": "std", "mean_huge": "mean",
}


def _legacy_export(tmp_path: Path) -> Path:
    """An export whose safetensors header holds no complete metadata (as before this change, or written by
    hand beside third-party weights): fixres.json is all the loader has."""
    from fixres.io.checkpoint import save_safetensors
    path = _export(_model(0), tmp_path / "x", test_size=64)
    save_safetensors(load_model(checkpoint=str(path)).model.state_dict(), path)  # no header metadata
    return path


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_fixres_json_is_one_line_naming_the_field(tmp_path, case):
    path = _legacy_export(tmp_path)
    meta_path = tmp_path / "x" / "fixres.json"
    meta_path.write_text(json.dumps(_edit(json.loads(meta_path.read_text()), case)))
    with pytest.raises(FixresError) as info:
        load_model(checkpoint=str(path))
    msg = str(info.value)
    assert "\n" not in msg and TAMPERED[case] in msg and "fixres.json" in msg


@pytest.mark.parametrize("raw,phrase", [(b'{"mean": [0.5, 0.5, \xff]}', "UTF-8"),
                                        (b'{"num_classes": 2, "mean": [NaN, 0, 0]}', "non-finite"),
                                        (b'{"num_classes": 2, "std": [Infinity, 1, 1]}', "non-finite"),
                                        (b'{"num_classes": 2, "mean": [1e999, 0, 0]}', "non-finite"),
                                        (b'{"num_classes": 2,', "not valid JSON")])
def test_undecodable_or_non_finite_fixres_json(tmp_path, raw, phrase):
    path = _legacy_export(tmp_path)
    (tmp_path / "x" / "fixres.json").write_bytes(raw)
    with pytest.raises(FixresError) as info:
        load_model(checkpoint=str(path))
    assert phrase in str(info.value) and "\n" not in str(info.value)


def test_cli_reports_a_tampered_fixres_json_in_one_line(tmp_path, capsys, image_folder):
    from helpers.cli import assert_one_line_error, cli
    path = _legacy_export(tmp_path)
    meta_path = tmp_path / "x" / "fixres.json"
    meta_path.write_text(json.dumps(_edit(json.loads(meta_path.read_text()), "missing_mean")))
    code, _, err = cli(capsys, "eval", "--checkpoint", path, "--data", image_folder, "--workers", "0",
                       "--out", tmp_path / "o")
    assert code == 2
    assert_one_line_error(err, "mean", "missing")


# --------------------------------------------------------------------------- never NaN/Infinity in JSON

def test_non_finite_values_are_never_written_as_json(tmp_path):
    with pytest.raises(FixresError, match="NaN or infinity"):
        fixres.io.atomic.write_json(tmp_path / "r.json", {"loss": float("nan")})
    assert not (tmp_path / "r.json").exists()
    cfg = DataConfig(train_size=32, std=(float("inf"), 1.0, 1.0))
    with pytest.raises(UsageError, match="std"):
        export_model(_model(0), tmp_path / "x", model_name=MODEL, cfg=cfg, test_size=64)
    assert not (tmp_path / "x" / "fixres.json").exists() and not (tmp_path / "x" / "model.safetensors").exists()


# --------------------------------------------------------------------------- no models <-> export cycle

def test_models_reads_export_metadata_from_meta_not_export():
    src = Path(__file__).resolve().parents[2] / "src" / "fixres"
    imported = {node.module for node in ast.walk(ast.parse((src / "models" / "loading.py").read_text()))
                if isinstance(node, ast.ImportFrom)}
    assert "fixres.models.export" not in imported and "fixres.io.meta" in imported
    from fixres.io import meta
    from fixres.models import export as exporting
    assert exporting.WEIGHTS_NAME == meta.WEIGHTS_NAME == "model.safetensors"  # old imports keep working
    assert exporting.META_NAME == meta.META_NAME == "fixres.json"


def test_numpy_and_tuple_values_in_the_metadata_round_trip_without_a_stale_warning(tmp_path, capsys):
    """Accuracy dicts from evaluation may hold numpy numbers, extras tuples: both copies store plain JSON."""
    import numpy as np
    path = _export(_model(0), tmp_path / "x", test_size=64,
                   accuracy={"top1": np.float32(61.5), "n": np.int64(9)},
                   extra={"adaptation": {"method": "finetune", "parts": ("classifier", "bn")}})
    back = load_model(checkpoint=str(path))
    assert back.meta["export"]["accuracy"] == {"top1": 61.5, "n": 9}
    assert back.meta["export"]["adaptation"]["parts"] == ["classifier", "bn"]
    assert "warning" not in capsys.readouterr().err


def test_onnx_without_the_package_is_skipped_and_said(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    _export(_model(0), tmp_path / "x", test_size=64, onnx=True)
    meta = read_meta_file(tmp_path / "x" / "fixres.json")
    assert meta["onnx"]["written"] is False and "pip install 'fixres[onnx]'" in meta["onnx"]["reason"]
    names = {p.name for p in (tmp_path / "x").iterdir()}
    assert {"fixres.json", "model.safetensors", "USAGE.md", "README.md"} <= names <= {
        "fixres.json", "model.safetensors", "USAGE.md", "README.md", "config.json"}


def test_a_failing_onnx_export_is_one_line_and_leaves_the_old_export(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    old = _export(_model(0), tmp_path / "x", test_size=64)
    before = {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()}

    def broken(*a, **k):
        raise RuntimeError("unsupported operator aten::weird\nlong exporter trace ...")
    monkeypatch.setattr(torch.onnx, "export", broken)
    model = _model(1).train()
    with pytest.raises(FixresError, match=r"^ONNX export failed: unsupported operator aten::weird$"):
        _export(model, tmp_path / "x", test_size=96, onnx=True)
    assert model.training  # the mode it came in with
    assert {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()} == before  # nothing partial, nothing lost
    assert load_model(checkpoint=str(old)).meta["export"]["test_size"] == 64


def _front_matter(text: str) -> dict:
    yaml = pytest.importorskip("yaml")
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_every_export_has_a_model_card_the_hub_reads(tmp_path):
    from fixres.models.card import CardFacts
    accuracy = {"top1": 91.25, "top1_se": 1.4, "n": 400, "test_size": 64,
                "top1_rule_text": "two-fold cross-selection on the validation photos"}
    _export(_model(0), tmp_path / "x", test_size=64, accuracy=accuracy,
            card=CardFacts(data="/photos/val", command="fixres fix --data /photos", license="apache-2.0"))
    text = (tmp_path / "x" / "README.md").read_text()
    front = _front_matter(text)
    assert front["license"] == "apache-2.0" and front["pipeline_tag"] == "image-classification"
    assert "fixres" in front["tags"] and front["library_name"] in ("timm", "pytorch")
    assert front["library_name"] == ("timm" if (tmp_path / "x" / "config.json").is_file() else "pytorch")
    assert "fixed at 64 px" in text and "Trained at 32 px" in text
    assert "91.2 %" in text and "± 1.4" in text and "400 photos of `/photos/val`" in text
    assert "two-fold cross-selection" in text and "fixres fix --data /photos" in text
    assert "resize" in text and "crop ratio 0.875" in text


def test_a_card_without_facts_says_what_it_does_not_know(tmp_path):
    _export(_model(0), tmp_path / "y", test_size=48, accuracy={"top1": 50.0, "n": 100})
    text = (tmp_path / "y" / "README.md").read_text()
    assert _front_matter(text)["license"] == "unknown"
    assert "± 5.0 (binomial standard error)" in text  # computed from top-1 and n
    assert "nothing was chosen on these photos" in text and "How it was made" not in text
    _export(_model(0), tmp_path / "z", test_size=48)
    assert "Not measured" in (tmp_path / "z" / "README.md").read_text()
    # a training run's validation: one figure per size, the exported size's is the one quoted
    _export(_model(0), tmp_path / "t", test_size=48, accuracy={"top1": {"32": 40.0, "48": 60.0}, "n": 10})
    assert "Top-1 **60.0 %** ± 15.5" in (tmp_path / "t" / "README.md").read_text()


def test_a_name_that_is_not_plain_yaml_stays_a_string(tmp_path):
    from fixres.models.card import front_matter
    front = _front_matter(front_matter(library="timm", license="cc-by-4.0: see: #1", tags=["a: b", "- c"]) + "\n")
    assert front["license"] == "cc-by-4.0: see: #1" and front["tags"] == ["a: b", "- c"]
