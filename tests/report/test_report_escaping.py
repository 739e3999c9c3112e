"""The report is safe to open whoever wrote the run folder.

Every value from the run's JSON (names, paths, numbers that are not numbers, class names) is escaped
by the template; ``report/`` is never followed through a symbolic link; the page is valid UTF-8 even
when file names are not; class names that a spreadsheet would run as formulas are neutralised in
``per_class.csv``.
"""

from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers.runs import PAYLOADS, fake_run_dir, hostile_run_dir, update_json

from fixres.errors import UsageError
from fixres.io.atomic import write_json


class _Elements(HTMLParser):
    """Every element and attribute the browser would build from the page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(name, value or "") for name, value in attrs]

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Elements:
    p = _Elements()
    p.feed(page)
    p.close()
    return p


def test_hostile_run_folder_renders_with_every_value_escaped(tmp_path):
    from fixres.job.headline import write_run_report
    summary = write_run_report(hostile_run_dir(tmp_path / "run"))
    page = Path(summary["html"]).read_text(encoding="utf-8")
    found = parse(page)
    # No element the page did not build itself: no script, svg, iframe, and no event-handler attribute.
    assert not {"script", "svg", "iframe"} & set(found.tags)
    assert [n for n, _ in found.attrs if n.startswith("on")] == []
    assert found.tags.count("img") == len(summary["figures"])
    sources = [v for n, v in found.attrs if n == "src"]
    assert len(sources) == len(summary["figures"]) and all(v.startswith("data:image/png;base64,") for v in sources)
    import base64

    from PIL import Image
    for v in sources:  # each figure is a complete PNG of a real plot, not just a data: prefix
        with Image.open(io.BytesIO(base64.b64decode(v.split(",", 1)[1], validate=True))) as im:
            im.load()
            assert im.format == "PNG" and min(im.size) > 100
    # The payloads are shown as text (escaped), not dropped: the reader sees what the folder holds.
    text = "".join(found.text)
    for payload in PAYLOADS:
        assert payload in text
    for raw in ("<script", "<img src=x", "<svg", "<iframe", "onerror=\"document"):
        assert raw not in page


@pytest.mark.parametrize("field", ["ratio", "monte_carlo", "grid_sizes"])
def test_numeric_fields_holding_markup_are_escaped(tmp_path, field):
    """The fields the old page wrote raw: the analysis ratio, the Monte Carlo mean, the grid sizes."""
    from fixres.job.headline import write_run_report
    run = fake_run_dir(tmp_path / "run")
    if field == "ratio":
        update_json(run / "analyze.json", ratio=PAYLOADS[1])
    elif field == "monte_carlo":
        update_json(run / "analyze.json", monte_carlo={"mean": PAYLOADS[1]})
    else:
        grid = json.loads((run / "grid.json").read_text())
        update_json(run / "grid.json", test_sizes=[PAYLOADS[1], *grid["test_sizes"][1:]])
    page = Path(write_run_report(run)["html"]).read_text(encoding="utf-8")
    assert "<img src=x" not in page and [n for n, _ in parse(page).attrs if n.startswith("on")] == []


# --------------------------------------------------------------------------- the report folder

def test_report_refuses_a_symlinked_report_folder(tmp_path, capsys):
    from helpers.cli import assert_one_line_error, cli

    from fixres.job.headline import write_run_report
    run = fake_run_dir(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "report").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UsageError, match="symbolic link"):
        write_run_report(run)
    code, out, err = cli(capsys, "report", run)
    assert code == 2
    assert_one_line_error(err, "symbolic link")
    assert list(elsewhere.iterdir()) == []  # nothing written through the link
    assert (run / "report").is_symlink()


def test_report_is_valid_utf8_with_undecodable_file_names(tmp_path):
    from fixres.job.headline import write_run_report
    run = fake_run_dir(tmp_path / "run")
    bad_name = b"val/caf\xe9/\xff\xfe.jpg".decode("utf-8", "surrogateescape")  # a Latin-1 file name on Linux
    update_json(run / "sweep_before.json", skipped=[{"path": bad_name, "reason": "cannot identify image file"}])
    raw = Path(write_run_report(run)["html"]).read_bytes()
    text = raw.decode("utf-8")  # strict: raises on the raw \xff bytes the old page held
    assert "val/caf\\xe9/\\xff\\xfe.jpg" in text


# --------------------------------------------------------------------------- spreadsheet formulas

FORMULAS = ["=HYPERLINK(\"http://evil\",\"x\")", "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]


def test_per_class_csv_neutralises_formula_class_names():
    from fixres.cli.eval import per_class_csv, rows_csv
    names = FORMULAS + ["daisy", "rose-1"]
    n = len(names)
    result = {"per_class": {"classes": names, "n": [3] * n, "top1": {"224": [50.0] * n}}}
    rows = list(csv.reader(io.StringIO(per_class_csv(result), newline="")))
    assert rows[0] == ["class_index", "class", "n", "top1_224"]
    cells = [r[1] for r in rows[1:]]
    assert cells[:len(FORMULAS)] == ["'" + f for f in FORMULAS]
    assert cells[len(FORMULAS):] == ["daisy", "rose-1"]  # ordinary names untouched
    assert [r[3] for r in rows[1:]] == ["50.0"] * n  # numbers stay numbers
    row = {"test_size": 224, "crop_ratio": 0.875, "resize": 256, "ten_crop": False, "top1": -1.5, "top1_std": 0.1,
           "top5": 90.0, "top5_std": 0.2, "loss": 1.0, "n": 10, "correct": 5}
    assert rows_csv({"rows": [row]}).splitlines()[1].split(",")[4] == "-1.5"  # a negative number is not text
    from fixres.io.csvtext import safe_cell
    assert safe_cell("\r=1") == "'\r=1" and safe_cell(-1.5) == -1.5 and safe_cell("a=b") == "a=b"


def test_fields_that_should_be_numbers_never_stop_the_report(tmp_path):
    """Text where numbers belong (sizes, accuracies, timings, CDF points, photo sizes) is shown escaped or
    left out of the figures, never a traceback; matplotlib's "$...$" maths never sees it either."""
    from fixres.job.headline import write_run_report
    run = fake_run_dir(tmp_path / "run")
    hostile = "$\\frac{<b>}{" + PAYLOADS[1]
    update_json(run / "run.json", train_size=hostile, timings={"train": hostile, "data": 3.0})
    rows = json.loads((run / "sweep_before.json").read_text())["rows"]
    rows[0]["test_size"], rows[1]["top1"] = hostile, hostile
    update_json(run / "sweep_before.json", rows=rows)
    grid = json.loads((run / "grid.json").read_text())
    grid["top1"][0][0] = hostile
    update_json(run / "grid.json", top1=grid["top1"])
    stats = json.loads((run / "stats.json").read_text())
    stats["before"]["sizes"]["64"]["x"][3] = hostile
    stats["after"]["sizes"][hostile] = stats["after"]["sizes"]["64"]
    write_json(run / "stats.json", stats)
    update_json(run / "analyze.json", image_sizes=[[hostile, 3]], crop_ratio=hostile)
    summary = write_run_report(run)
    page = Path(summary["html"]).read_text(encoding="utf-8")
    assert "<img src=x" not in page and [n for n, _ in parse(page).attrs if n.startswith("on")] == []
    assert hostile in "".join(parse(page).text)  # shown as text where it was a value
    assert set(summary["figures"]) == {"accuracy", "cdf"}  # the broken grid and photo sizes are left out
    assert summary["headline"]["seconds_total"] == pytest.approx(3.0)
