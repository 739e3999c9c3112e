"""The README's code blocks run as written, or say what they need that a test machine lacks.

A ``python`` block runs (all of them in order, in one namespace, on a small generated data set). A
``bash`` block runs too (``make`` targets as a dry run), unless its first line says ``# needs ...``
(real data, the package registry): then every ``fixres`` command in it must still parse with the CLI's
own parser, so a renamed or removed flag fails here.
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import torch
from helpers import REPO, write_image_folder

from fixres.cli.app import build_parser, main

README = REPO / "README.md"
#: First-line markers of blocks that cannot run on a test machine.
NEEDS = ("# needs real data", "# needs the package registry")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def fixres_argv(command: str) -> list[str] | None:
    """The arguments after ``fixres`` (or ``torchrun ... -m fixres``), None for other programs."""
    words = shlex.split(command)
    if words[0] == "fixres":
        return words[1:]
    if words[0] == "torchrun" and "-m" in words and words[words.index("-m") + 1] == "fixres":
        return words[words.index("-m") + 2:]
    return None


def test_readme_has_python_and_bash_blocks():
    assert len(blocks("python")) >= 2 and len(blocks("bash")) >= 4


def test_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    write_image_folder(tmp_path / "data" / "train", per_class=6, seed=1)
    write_image_folder(tmp_path / "data" / "val", per_class=4, seed=2)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "readme"}
    for i, block in enumerate(blocks("python")):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102 - our README
    out = capsys.readouterr().out.splitlines()
    # From Python: eq. 5, a sweep, a fine-tune, an export that reloads and scores what the fixed model scored
    assert out[0] == "0.808, test at 160"
    assert re.fullmatch(r"top-1 at 64 px: [\d.]+ -> [\d.]+", out[2])
    assert (tmp_path / "fixed" / "model.safetensors").is_file() and (tmp_path / "fixed" / "fixres.json").is_file()
    assert float(out[3]) == pytest.approx(float(out[2].split("->")[1]), abs=0.05)  # printed to 0.1 above
    # Serving: plain timm reads the fixed pre-processing, and the torchvision transform gives what timm gives
    assert out[-2] == "[3, 64, 64] 0.95 bicubic"  # plain timm reads the fixed pre-processing
    assert out[-1] == "64 True"


@pytest.mark.parametrize("block", [b for b in blocks("bash") if not b.startswith(NEEDS)])
def test_runnable_bash_blocks_run(block, capsys):
    for command in commands(block):
        words = shlex.split(command)
        if words[0] == "make":
            res = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True)
            assert res.returncode == 0, f"{command}: {res.stderr}"
        else:
            argv = fixres_argv(command)
            assert argv is not None, f"unmarked block runs a program the test does not know: {command}"
            assert main([*argv, "-q"]) == 0, command


@pytest.mark.parametrize("block", [b for b in blocks("bash") if b.startswith(NEEDS)])
def test_marked_bash_blocks_parse(block):
    parser = build_parser()
    for command in commands(block):
        argv = fixres_argv(command)
        if argv is not None:
            parser.parse_args(argv)  # argparse exits (a failure here) on an unknown flag or a bad value


def test_marked_block_check_catches_a_bad_flag():
    with pytest.raises(SystemExit):
        build_parser().parse_args(fixres_argv("fixres eval --no-such-flag 3"))
