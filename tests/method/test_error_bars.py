"""Error bars: the ± every CLI, the API, the figures and the report show is the binomial standard error of the
accuracy; the leave-one-fold-out std of section 5 (fold std) stays in the JSON as ``top1_std``."""

from __future__ import annotations

import json

import pytest
import torch

from fixres.choosing.significance import binomial_se

#: An accuracy where the two differ by a factor of three: 80 % on 1,000 photos, SE 1.26, fold std about 0.4.
ROW = {"test_size": 224, "crop_ratio": 0.875, "resize": 256, "ten_crop": False, "top1": 80.0, "top1_se": 1.26,
       "top1_std": 0.41, "top5": 95.0, "top5_se": 0.69, "top5_std": 0.17, "loss": 0.8, "nll": 0.8, "ece": 3.0,
       "n": 1000, "correct": 800, "correct5": 950}


def _cli(argv, capsys):
    from fixres.cli.app import main
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _tiny_args(folder, out) -> list[str]:
    return ["--data", str(folder), "--model", "fixres_tiny_resnet", "--random-init", "--num-classes", "3",
            "--train-size", "32", "--workers", "0", "--out", str(out)]


def test_eval_json_carries_the_binomial_se_beside_the_fold_std(image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    code, stdout, stderr = _cli(["eval", *_tiny_args(image_folder, tmp_path / "e"), "--test-size", "32", "--json",
                                 "-q"], capsys)
    assert code == 0, stderr
    row = json.loads(stdout)["rows"][0]
    assert row["top1_se"] == pytest.approx(binomial_se(row["top1"], row["n"]))
    assert row["top5_se"] == pytest.approx(binomial_se(row["top5"], row["n"]))
    assert "top1_std" in row  # the paper's figure, under its own name
    saved = json.loads((tmp_path / "e" / "eval.json").read_text())["rows"][0]
    assert saved["top1_se"] == row["top1_se"]
    header = (tmp_path / "e" / "eval.csv").read_text().splitlines()[0].split(",")
    assert "top1_se" in header and "top1_std" in header


def test_eval_terminal_table_shows_the_se_and_says_so(image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    code, stdout, stderr = _cli(["eval", *_tiny_args(image_folder, tmp_path / "e"), "--test-size", "32"], capsys)
    assert code == 0, stderr
    row = json.loads((tmp_path / "e" / "eval.json").read_text())["rows"][0]
    assert f"{row['top1_se']:.2f}" != f"{row['top1_std']:.2f}"  # the premise: the two differ here
    assert f"{row['top1']:.2f} ± {row['top1_se']:<5.2f}" in stdout
    assert f"± {row['top1_std']:.2f}" not in stdout
    assert "± binomial standard error" in stdout and "± fold std" not in stdout


def test_format_table_puts_the_se_after_the_plus_minus():
    from fixres.cli.eval import format_table
    result = {"model": "m", "n_images": 1000, "data": "d", "skipped": [], "precision": "fp32", "images_per_s": 1.0,
              "seconds": 1.0, "rows": [ROW], "ensembles": [{**ROW, "test_sizes": [224, 288]}]}
    text = format_table(result)
    assert text.count("80.00 ± 1.26") == 2 and "95.00 ± 0.69" in text
    assert "0.41" not in text and "0.17" not in text
    assert "top-1 % (± SE)" in text and "± binomial standard error" in text


def test_sweep_json_and_summary_line_carry_the_se(image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    code, stdout, stderr = _cli(["sweep", *_tiny_args(image_folder, tmp_path / "s"), "--test-sizes", "32,48",
                                 "--no-plot", "--json", "-q"], capsys)
    assert code == 0, stderr
    res = json.loads(stdout)
    for row in res["rows"]:
        assert row["top1_se"] == pytest.approx(binomial_se(row["top1"], row["n"]))
    best = next(r for r in res["rows"] if r["test_size"] == res["best"]["test_size"])
    assert res["best"]["top1_se"] == best["top1_se"] and res["best"]["top1_std"] == best["top1_std"]


def _errorbars(monkeypatch) -> list:
    """Record the ``yerr`` of every ``Axes.errorbar`` call."""
    from matplotlib.axes import Axes
    seen: list = []
    original = Axes.errorbar

    def record(self, x, y, yerr=None, **kw):
        seen.append(None if yerr is None else [float(v) for v in yerr])
        return original(self, x, y, yerr=yerr, **kw)
    monkeypatch.setattr(Axes, "errorbar", record)
    return seen


def test_sweep_figure_draws_the_se(tmp_path, monkeypatch):
    from fixres.report import plots
    seen = _errorbars(monkeypatch)
    rows = [ROW, {**ROW, "test_size": 288, "top1": 82.0, "top1_se": 1.21, "top1_std": 0.3},
            # a row from an older file: its SE from top-1 and n, never its fold std
            {"test_size": 320, "top1": 50.0, "top1_std": 0.2, "n": 100}]
    ens = {**ROW, "test_sizes": [224, 288], "top1_se": 1.1}
    plots.plot_accuracy_vs_size({"m": rows}, tmp_path / "a.png", ensembles=[ens])
    assert seen == [[1.26, 1.21, pytest.approx(5.0)], [1.1]]


def test_report_draws_and_captions_the_se(tmp_path, monkeypatch):
    from helpers import fake_run_dir

    from fixres.job.headline import write_run_report
    from fixres.report import page, plots
    run = fake_run_dir(tmp_path / "run")
    curves_seen: list = []
    original = plots.plot_accuracy_curves

    def record(curves, path, **kw):
        curves_seen.extend(curves)
        return original(curves, path, **kw)
    monkeypatch.setattr(plots, "plot_accuracy_curves", record)
    seen = _errorbars(monkeypatch)
    out = write_run_report(run)
    before = json.loads((run / "sweep_before.json").read_text())["rows"]
    assert curves_seen and curves_seen[0]["top1_se"] == pytest.approx(
        [binomial_se(r["top1"], r["n"]) for r in before])
    assert all(1.2 not in bars for bars in seen if bars)  # the fake rows' fold std is 1.2 everywhere
    html = (run / "report" / "index.html").read_text()
    assert "Error bars: ± binomial standard error." in html and "Error bars: fold std" not in html
    assert "± is the binomial standard error" in html
    head = json.loads((run / "report" / "report.json").read_text())["headline"]
    at_t = next(r for r in before if r["test_size"] == 64)
    assert head["top1_at_train_size_se"] == pytest.approx(binomial_se(at_t["top1"], 500))
    assert head["top1_at_train_size_std"] == 1.2
    assert f"± {page._num_text(head['top1_at_train_size_se'])}" in html
    assert out


def test_api_size_result_exposes_the_se():
    from fixres.api import SizeResult
    r = SizeResult.from_row(ROW)
    assert r.top1_se == 1.26 and r.top1_std == 0.41
    assert "± 1.3 (SE)" in repr(r)
    old = SizeResult.from_row({"test_size": 64, "top1": 50.0, "top1_std": 0.2, "n": 100})
    assert old.top1_se == pytest.approx(5.0)
