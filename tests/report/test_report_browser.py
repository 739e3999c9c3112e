"""The HTML report renders in a real headless Chromium: images load, no console errors, a real screenshot.

No Python browser driver is needed: Chromium's own ``--dump-dom`` gives the DOM after the load event
(a probe script injected into a copy of the page writes each image's naturalWidth into it), console
messages are read from ``--enable-logging=stderr`` (the report has no script, so any console line is a
problem), and ``--screenshot`` writes the PNG we check. Skips cleanly where no Chromium is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import fake_run_dir
from PIL import Image

pytestmark = pytest.mark.browser

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
#: Virtual time given to the page to load (data URIs only, so this is ample).
LOAD_BUDGET_MS = 5000
TIMEOUT_S = 90
WINDOW = (1200, 2400)

PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {complete: i.complete, w: i.naturalWidth, h: i.naturalHeight, alt: i.alt};
  });
  var out = document.createElement('pre');
  out.id = 'fixres-probe';
  out.textContent = JSON.stringify({images: imgs, title: document.title,
    pwned: document.body.getAttribute('data-pwned'), dialogs: window.__fixresDialogs || [],
    scripts: document.scripts.length, frames: window.frames.length});
  document.body.appendChild(out);
});
</script>"""


#: Runs before anything of the page: any dialog a payload opens is recorded instead of shown.
GUARD = """<script>
window.__fixresDialogs = [];
['alert', 'confirm', 'prompt', 'print'].forEach(function (name) {
  window[name] = function (msg) { window.__fixresDialogs.push(name + ':' + msg); };
});
</script>"""
#: Scripts on a probed page: GUARD and PROBE, the page itself has none.
PROBE_SCRIPTS = 2


def _browser() -> str | None:
    env = os.environ.get("FIXRES_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in BROWSER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run_browser(browser: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={LOAD_BUDGET_MS}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _probe(browser: str, page: Path, profile: Path) -> tuple[dict, list[str]]:
    """Load ``page`` with the probe injected; return the probe's findings and the console lines."""
    probed = page.with_name(page.stem + ".probe.html")
    text = page.read_text(encoding="utf-8")
    probed.write_text(text.replace("<head>", "<head>" + GUARD, 1).replace("</body>", PROBE + "</body>"),
                      encoding="utf-8")
    proc = _run_browser(browser, probed.as_uri(), profile, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'<pre id="fixres-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, "the page never fired its load event (probe missing from the DOM)"
    import html as _html
    return json.loads(_html.unescape(m.group(1))), _console_lines(proc.stderr)


@pytest.fixture(scope="module")
def browser() -> str:
    path = _browser()
    if path is None:
        pytest.skip("no headless Chromium installed (apt-get install chromium); browser test skipped")
    return path


def test_probe_detects_broken_images_and_console_errors(browser, tmp_path):
    """Negative control: the checks below would fail on a bad page."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><head><title>bad</title></head><body>"
                    "<img alt='broken' src='data:image/png;base64,AAAA'>"
                    "<script>console.error('deliberate error')</script></body></html>", encoding="utf-8")
    found, console = _probe(browser, page, tmp_path / "profile")
    assert [img["w"] for img in found["images"]] == [0]
    assert any("deliberate error" in line for line in console)


def test_report_renders_in_chromium(browser, tmp_path):
    from fixres.job.headline import write_run_report

    run = fake_run_dir(tmp_path / "run")
    summary = write_run_report(run)
    page = Path(summary["html"])
    text = page.read_text(encoding="utf-8")
    # Self-contained: no network, no external CSS or JavaScript.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<script" not in text and "<link" not in text

    found, console = _probe(browser, page, tmp_path / "profile")
    figures = summary["figures"]
    assert len(figures) >= 4  # accuracy curves, grid heatmap, RoC areas, activation CDFs
    assert len(found["images"]) == len(figures)
    for img in found["images"]:
        assert img["complete"] and img["w"] > 100 and img["h"] > 100, img
    assert console == [], console
    assert found["title"].startswith("fixres report")

    shot = tmp_path / "screenshot.png"
    proc = _run_browser(browser, page.as_uri(), tmp_path / "profile", f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    arr = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert arr.shape[:2] == (WINDOW[1], WINDOW[0])
    # A rendered page, not a blank one: many distinct colours (the plots) and real contrast (the text).
    colours = np.unique(arr[::4, ::4].reshape(-1, 3), axis=0)
    assert len(colours) > 200
    assert arr.std() > 20
    keep = os.environ.get("FIXRES_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_report_content_without_a_browser(tmp_path):
    """The page's numbers come from the run's JSON: headline, grid table and cost table."""
    from fixres.job.headline import headline_of, write_run_report

    run = fake_run_dir(tmp_path / "run")
    summary = write_run_report(run)
    head = summary["headline"]
    assert head["train_size"] == 64 and head["test_size"] == 96
    assert head["best_untuned_test_size"] in (80, 96)  # the fake curve peaks at 88
    assert head["top1_fixed"] == pytest.approx(66.0)
    assert head["seconds_total"] == pytest.approx(240.7)
    text = Path(summary["html"]).read_text(encoding="utf-8")
    assert f"{head['top1_at_train_size']:.1f}%" in text and "66.0%" in text
    assert "test \\ train" in text and "Cost (table 7)" in text
    steps = [r["step"] for r in summary["cost"]]
    assert steps[0].startswith("train") and steps[1].startswith("fine-tune") and steps[-1] == "total"
    assert summary["cost"][1]["forward_ms"] == "3.1 ± 0.4"
    assert set(summary["figures"]) == {"accuracy", "grid", "roc", "cdf"}
    assert headline_of({"run": {}, "sweep_before": {"rows": []}}).top1_fixed is None


def test_hostile_report_runs_no_script_in_chromium(browser, tmp_path):
    """A run folder written by someone else (payloads in names, paths, numbers and class names)
    renders in a real browser with no script run, no dialog, no element of the payloads."""
    from helpers.runs import PAYLOADS, hostile_run_dir

    from fixres.job.headline import write_run_report

    summary = write_run_report(hostile_run_dir(tmp_path / "run"))
    page = Path(summary["html"])
    found, console = _probe(browser, page, tmp_path / "profile")
    assert found["pwned"] is None  # no payload's handler or script ran
    assert found["dialogs"] == []
    assert found["scripts"] == PROBE_SCRIPTS and found["frames"] == 0
    assert len(found["images"]) == len(summary["figures"])
    assert all(img["complete"] and img["w"] > 100 for img in found["images"])
    assert console == [], console
    assert PAYLOADS[0] in found["title"]  # the model name is shown as text, whole
