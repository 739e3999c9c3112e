"""Robustness under corruptions: the corrupted photos, the corruption table, its verdict, the CLI and the report."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from helpers import fake_run_dir, save_tiny_checkpoint, write_image_folder
from helpers.cli import cli
from PIL import Image

from fixres.choosing import significance
from fixres.choosing.significance import binomial_se, paired_test
from fixres.data import corruptions as C
from fixres.data import transforms
from fixres.data.folders import scan_folder
from fixres.data.loaders import ImageDataset
from fixres.errors import UsageError
from fixres.job.headline import headline_of
from fixres.method import robustness
from fixres.method.evaluate import evaluate
from fixres.models.loading import load_model
from fixres.report import robustness as report_robustness
from fixres.report.page import collect, render_html


def photo(w: int = 96, h: int = 80, seed: int = 0) -> Image.Image:
    """A photo with edges and mid-range values: blocks of colour over a gradient, a little texture."""
    rng = np.random.default_rng(seed)
    x = np.mgrid[0:h, 0:w][1]
    base = 60 + 100 * (x / w)[..., None] * np.ones(3)
    blocks = rng.integers(0, 80, size=(h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    texture = rng.integers(0, 30, size=(h, w, 3))
    return Image.fromarray((base + blocks + texture).clip(0, 255).astype(np.uint8), "RGB")


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def laplacian_energy(a: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian: high-frequency energy."""
    lap = 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]
    return float(np.abs(lap).mean())


# --------------------------------------------------------------------------- the corrupted photos

def test_corruption_set_is_four_corruptions_at_three_severities():
    assert C.CORRUPTIONS == ("gaussian_noise", "gaussian_blur", "jpeg", "brightness_contrast")
    assert C.SEVERITIES == (1, 2, 3)
    pairs = C.corruption_set()
    assert len(pairs) == 12 and pairs[0] == ("gaussian_noise", 1) and pairs[-1] == ("brightness_contrast", 3)
    assert C.corruption_set(["jpeg"], [2]) == [("jpeg", 2)]


def test_noise_is_deterministic_per_seed_index_and_severity():
    img = photo()
    a = px(C.Corruption("gaussian_noise", 2, seed=0)(img, 5))
    assert np.array_equal(a, px(C.Corruption("gaussian_noise", 2, seed=0)(img, 5)))
    for other in (C.Corruption("gaussian_noise", 2, seed=1)(img, 5), C.Corruption("gaussian_noise", 2, seed=0)(img, 6)):
        assert np.abs(a - px(other)).mean() > 1.0  # another seed or photo: other noise
    assert C.noise_seed(0, 5, "gaussian_noise", 2) == C.noise_seed(0, 5, "gaussian_noise", 2)
    assert C.noise_seed(0, 5, "gaussian_noise", 2) != C.noise_seed(0, 5, "gaussian_noise", 3)


@pytest.mark.parametrize("name", [c for c in C.CORRUPTIONS if c != "gaussian_noise"])
def test_the_other_corruptions_are_deterministic(name):
    img = photo()
    assert np.array_equal(px(C.Corruption(name, 3, seed=0)(img, 0)), px(C.Corruption(name, 3, seed=7)(img, 9)))


def _statistic(name: str, clean: np.ndarray, out: np.ndarray) -> float:
    """A number that grows with the corruption's strength."""
    if name == "gaussian_noise":
        return float((out - clean).std())
    if name == "gaussian_blur":
        return -laplacian_energy(out.mean(2))
    if name == "jpeg":
        return float(np.abs(out - clean).mean())
    return -float(out.std())


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_severity_is_monotone(name):
    img = photo(160, 120)
    clean = px(img)
    stats = [_statistic(name, clean, clean)] + [_statistic(name, clean, px(C.Corruption(name, s)(img, 3)))
                                                 for s in C.SEVERITIES]
    assert all(a < b for a, b in itertools.pairwise(stats)), stats
    if name == "gaussian_noise":  # std of the added noise, in grey levels: 0.04, 0.08, 0.16 of 255 (little clipping)
        assert stats[1:] == pytest.approx([10.2, 20.4, 40.8], rel=0.12)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
@pytest.mark.parametrize("size", [(96, 80), (37, 53), (3, 2)])
def test_output_keeps_size_and_mode(name, size):
    img = photo(*size)
    out = C.Corruption(name, 3)(img, 0)
    assert out.size == img.size and out.mode == "RGB"
    grey = C.Corruption(name, 1)(img.convert("L"), 0)
    assert grey.size == img.size and grey.mode == "RGB"


def test_blur_sigma_follows_the_short_side():
    assert C.blur_sigma(224, 1.5) == pytest.approx(1.5)
    assert C.blur_sigma(448, 1.5) == pytest.approx(3.0)
    assert C.blur_kernel(3.0, 448) == 19 and C.blur_kernel(3.0, 4) == 7  # 3 sigmas each side; capped by the photo
    big, small = photo(224, 224, seed=3), photo(224, 224, seed=3).resize((112, 112), Image.BILINEAR)
    # The same blur relative to the content: blurring then halving is close to halving then blurring.
    a = px(C.Corruption("gaussian_blur", 3)(big, 0).resize((112, 112), Image.BILINEAR))
    b = px(C.Corruption("gaussian_blur", 3)(small, 0))
    assert np.abs(a - b)[8:-8, 8:-8].mean() < 3.0


@pytest.mark.parametrize("name,severity,phrase", [("fog", 1, "gaussian_noise, gaussian_blur, jpeg"),
                                                  ("jpeg", 4, "1, 2, 3"), ("jpeg", 0, "1, 2, 3"),
                                                  ("jpeg", True, "1, 2, 3")])
def test_bad_name_or_severity_is_a_one_line_usage_error(name, severity, phrase):
    with pytest.raises(UsageError) as exc:
        C.Corruption(name, severity)
    assert phrase in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(UsageError):
        C.corruption_set([name], [severity])


# --------------------------------------------------------------------------- the data set and the subset

def test_dataset_corrupts_the_full_size_photo(tmp_path):
    """With a corruption the photo is decoded at full size even where a reduced decode would apply."""
    folder = tmp_path / "big" / "c"
    folder.mkdir(parents=True)
    photo(256, 256).save(folder / "a.jpg", quality=90)
    index = scan_folder(tmp_path / "big")
    cfg = load_model(model="fixres_tiny_resnet", num_classes=3, train_size=32).data_config
    seen = []

    def corrupt(img, i):
        seen.append((img.size, i))
        return C.Corruption("jpeg", 3)(img, i)
    plain_transform = transforms.test_transform(transforms.geometry_for(32, cfg, cfg.crop_ratio), cfg)
    ds = ImageDataset(index.samples, plain_transform, corrupt=corrupt)
    x, _, _ = ds[0]
    assert seen == [((256, 256), 0)] and x.shape == (3, 32, 32)
    plain = ImageDataset(index.samples, plain_transform)[0][0]
    assert (x - plain).abs().mean() > 0.01  # the corruption reached the tensor


def test_at_index_keys_the_corruption_on_the_whole_data_set():
    img, c = photo(), C.Corruption("gaussian_noise", 1, seed=3)
    assert np.array_equal(px(robustness.AtIndex(c, [5, 9])(img, 1)), px(c(img, 9)))


def test_stratified_subset():
    labels = [0] * 10 + [1] * 6 + [2] * 4
    sub = robustness.stratified_subset(labels, 10, seed=0)
    assert sub == sorted(sub) and len(set(sub)) == 10
    assert [sum(labels[i] == c for i in sub) for c in range(3)] == [5, 3, 2]
    assert robustness.stratified_subset(labels, 10, seed=0) == sub
    assert robustness.stratified_subset(labels, 10, seed=1) != sub
    assert robustness.stratified_subset(labels, 7, seed=0).__len__() == 7
    assert robustness.stratified_subset(labels, None) == list(range(20))
    assert robustness.stratified_subset(labels, 50) == list(range(20))
    with pytest.raises(UsageError):
        robustness.stratified_subset(labels, 0)


# --------------------------------------------------------------------------- the paired test

def test_paired_test_moved_and_exact_past_a_thousand_disagreements():
    assert paired_test is significance.paired_test and binomial_se is significance.binomial_se
    res = significance.paired_test([True] * 700 + [False] * 600, [False] * 700 + [True] * 600)
    assert res["only_a"] == 700 and res["only_b"] == 600
    assert 0.004 < res["p"] < 0.008  # normal approximation: z = 100 / sqrt(1300) = 2.77, p = 0.0056
    assert significance.paired_test([True] * 3000, [False] * 3000)["p"] == 0.0


# --------------------------------------------------------------------------- the table

@pytest.fixture(scope="module")
def table_setup(tmp_path_factory):
    """Two tiny models (seeds 0 and 1) on 3 classes x 4 photos, and their corruption table."""
    torch.set_num_threads(1)
    root = write_image_folder(tmp_path_factory.mktemp("rob") / "data")
    torch.manual_seed(0)
    a = load_model(model="fixres_tiny_resnet", num_classes=3, train_size=32)
    torch.manual_seed(1)
    b = load_model(model="fixres_tiny_resnet", num_classes=3, train_size=32)
    index = scan_folder(root)
    columns = {"a at 32px": (a.model, 32), "a at 48px": (a.model, 48), "b at 32px": (b.model, 32)}
    result = robustness.corruption_table(columns, index, a.data_config, workers=0, progress=False,
                                         pairs=[("a at 48px", "a at 32px"), ("b at 32px", "a at 32px")])
    return {"index": index, "cfg": a.data_config, "a": a.model, "b": b.model, "columns": columns,
            "result": result}


def test_corruption_table_shape(table_setup):
    res = table_setup["result"]
    assert res["columns"] == ["a at 32px", "a at 48px", "b at 32px"]
    assert res["test_sizes"] == {"a at 32px": 32, "a at 48px": 48, "b at 32px": 32}
    assert len(res["rows"]) == 13 and res["rows"][0]["corruption"] == "clean" and res["rows"][0]["severity"] == 0
    assert [(r["corruption"], r["severity"]) for r in res["rows"][1:]] == C.corruption_set()
    assert all(r["n"] == 12 for r in res["rows"]) and res["n_images"] == 12 and res["n_samples"] == 12
    assert [m["corruption"] for m in res["mean"]] == ["clean", *C.CORRUPTIONS]
    assert res["parameters"]["jpeg"] == {"1": 30, "2": 15, "3": 7}
    for m in res["mean"][1:]:
        mine = [r for r in res["rows"] if r["corruption"] == m["corruption"]]
        assert m["a at 32px"] == pytest.approx(sum(r["a at 32px"] for r in mine) / 3)
    for r in res["rows"]:  # a top-1 on 12 photos is a multiple of 1/12
        assert all(round(r[c] * 12 / 100, 6) == round(r[c] * 12 / 100) for c in res["columns"])
    json.dumps(res)  # JSON-ready


def test_clean_row_is_a_plain_evaluate(table_setup):
    s = table_setup
    for model, name_32, sizes in ((s["a"], "a at 32px", [32, 48]), (s["b"], "b at 32px", [32])):
        plain = evaluate(model, s["index"], s["cfg"], test_sizes=sizes, workers=0, progress=False, per_class=False)
        assert s["result"]["rows"][0][name_32] == pytest.approx(plain.rows[0].top1)
    plain48 = evaluate(s["a"], s["index"], s["cfg"], test_sizes=[48], workers=0, progress=False, per_class=False,
                       reduced_decode=False)
    assert s["result"]["rows"][0]["a at 48px"] == pytest.approx(plain48.rows[0].top1)


def test_a_corrupted_row_is_evaluate_with_that_corruption(table_setup):
    s = table_setup
    corrupt = robustness.AtIndex(C.Corruption("gaussian_blur", 3, seed=0), range(12))
    res = evaluate(s["a"], s["index"], s["cfg"], test_sizes=[32], workers=0, progress=False, per_class=False,
                   corrupt=corrupt)
    row = next(r for r in s["result"]["rows"] if (r["corruption"], r["severity"]) == ("gaussian_blur", 3))
    assert row["a at 32px"] == pytest.approx(res.rows[0].top1)


def test_paired_counts_are_consistent(table_setup):
    res = table_setup["result"]
    assert [(t["a"], t["b"]) for t in res["paired"][:2]] == [("a at 48px", "a at 32px"), ("b at 32px", "a at 32px")]
    assert len(res["paired"]) == 2 * 5  # two pairs x (clean + four corruptions)
    assert res["correction"] == "holm"
    means = {m["corruption"]: m for m in res["mean"]}
    for t in res["paired"]:
        trials = 12 if t["corruption"] == "clean" else 36  # every (image, severity) pair
        assert t["n"] == 12 and t["n_trials"] == trials  # the photo is the unit
        assert t["only_a"] + t["only_b"] <= 12
        assert t["difference"] == pytest.approx(means[t["corruption"]][t["a"]] - means[t["corruption"]][t["b"]])
        assert t["p"] == significance.sign_p(t["only_a"], t["only_b"])
        assert t["p"] <= t["p_holm"] <= 1.0
    corrupted = [t for t in res["paired"] if t["corruption"] != "clean"]
    assert [t["p_holm"] for t in corrupted] == significance.holm([t["p"] for t in corrupted])
    assert all(t["p_holm"] == t["p"] for t in res["paired"] if t["corruption"] == "clean")
    # Two different random models disagree somewhere on 36 corrupted photos.
    assert any(t["only_a"] + t["only_b"] > 0 for t in res["paired"] if t["b"] == "a at 32px" and t["a"] == "b at 32px")


def test_severities_of_one_photo_are_one_unit_of_evidence():
    """Six photos a gets right at all three severities and b wrong, two the other way round: 18 vs 6 (image,
    severity) pairs look beyond noise (p 0.02) when counted as independent; as 6 vs 2 photos they are not."""
    idx = np.arange(10)
    a_hits = np.array([True] * 6 + [False] * 2 + [True] * 2)
    b_hits = np.array([False] * 6 + [True] * 2 + [True] * 2)
    outcomes = {("jpeg", s): {"A": (idx, a_hits), "B": (idx, b_hits)} for s in (1, 2, 3)}
    t = robustness._paired("jpeg", "A", "B", outcomes)
    pooled = significance.paired_test(np.tile(a_hits, 3).tolist(), np.tile(b_hits, 3).tolist())
    assert pooled["p"] < 0.05  # what an outcome-level test claims
    assert (t["n"], t["n_trials"], t["only_a"], t["only_b"]) == (10, 30, 6, 2)
    assert t["p"] == pytest.approx(0.2890625) and t["p"] > 0.05
    assert t["difference"] == pytest.approx(40.0)


def test_a_photo_right_more_often_counts_once_and_ties_carry_nothing():
    t = significance.clustered_sign_test([3, 2, 1, 0, 2], [0, 2, 2, 0, 1])
    assert (t["only_a"], t["only_b"]) == (2, 1) and t["p"] == 1.0


def test_holm_step_down():
    assert significance.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert significance.holm([0.2, 0.001]) == pytest.approx([0.2, 0.002])
    assert significance.holm([]) == []


def test_each_model_is_evaluated_once_per_condition(table_setup, monkeypatch):
    calls = []
    real = robustness.evaluate

    def counting(model, *args, **kw):
        calls.append((id(model), tuple(kw["test_sizes"]), kw["corrupt"] is None))
        return real(model, *args, **kw)
    monkeypatch.setattr(robustness, "evaluate", counting)
    s = table_setup
    res = robustness.corruption_table(s["columns"], s["index"], s["cfg"], workers=0, progress=False,
                                      corruptions=["jpeg"], severities=[1, 3], max_images=6, seed=2)
    assert len(calls) == 2 * 3  # two models x (clean, jpeg 1, jpeg 3)
    assert calls[0] == (id(s["a"]), (32, 48), True) and calls[1] == (id(s["b"]), (32,), True)
    assert res["n_images"] == 6 and res["n_samples"] == 12 and res["max_images"] == 6
    assert [(r["corruption"], r["severity"]) for r in res["rows"]] == [("clean", 0), ("jpeg", 1), ("jpeg", 3)]
    # The default pairs: the first column against each other one.
    assert [(t["a"], t["b"]) for t in res["paired"]] == [("a at 32px", "a at 48px"), ("a at 32px", "b at 32px")] * 2


def test_bad_columns_and_pairs(table_setup):
    s = table_setup
    with pytest.raises(UsageError, match="unknown column"):
        robustness.corruption_table(s["columns"], s["index"], s["cfg"], pairs=[("a at 32px", "nope")])
    with pytest.raises(UsageError, match="other than"):
        robustness.corruption_table({"n": (s["a"], 32)}, s["index"], s["cfg"])
    with pytest.raises(UsageError, match="unknown corruption"):
        robustness.corruption_table(s["columns"], s["index"], s["cfg"], corruptions=["fog"])


# --------------------------------------------------------------------------- the verdict and the text

def _fake(tests: list[tuple[str, int, int, float]], n_images: int = 300) -> dict:
    """A result with columns F and U and the given (corruption, only_a, only_b, p) tests of F vs U."""
    return {"columns": ["F", "U"], "n_images": n_images, "seed": 0, "severities": [1, 2, 3],
            "rows": [], "mean": [{"corruption": c, "F": 50.0, "U": 50.0} for c, *_ in tests],
            "paired": [{"corruption": c, "a": "F", "b": "U", "n": 900, "only_a": oa, "only_b": ob, "p": p,
                        "difference": (oa - ob) * 100 / 900} for c, oa, ob, p in tests]}


def test_verdict_within_noise():
    res = _fake([("clean", 5, 3, 0.73), ("gaussian_noise", 10, 8, 0.8), ("gaussian_blur", 7, 9, 0.8),
                 ("jpeg", 4, 4, 1.0), ("brightness_contrast", 6, 5, 1.0)])
    text = report_robustness.verdict(res, "F", "U")
    assert text.startswith("F vs U: within noise on 4 of 4 corruptions (paired p >= 0.05)")  # an uncorrected file
    assert "clean photos: +0.2 points, p = 0.730" in text and "300 images" in text
    assert "higher" not in text and "lower" not in text
    assert report_robustness.verdicts(res) == [text]


def test_verdict_names_the_differences_and_their_direction():
    res = _fake([("gaussian_noise", 40, 10, 0.00002), ("gaussian_blur", 7, 9, 0.8), ("jpeg", 5, 20, 0.004),
                 ("brightness_contrast", 6, 5, 1.0)])
    text = report_robustness.verdict(res, "F", "U")
    assert "within noise on 2 of 4 corruptions" in text
    assert "F higher on gaussian_noise (+3.3 points, p < 0.001)" in text
    assert "F lower on jpeg (-1.7 points, p = 0.004)" in text
    assert "not corrected for 4 tests" in text


def test_verdict_reads_the_holm_adjusted_p():
    res = _fake([("gaussian_noise", 40, 10, 0.00002), ("gaussian_blur", 7, 9, 0.8), ("jpeg", 5, 20, 0.02),
                 ("brightness_contrast", 6, 5, 1.0)])
    for t, q in zip(res["paired"], significance.holm([t["p"] for t in res["paired"]])):
        t["p_holm"] = q
    text = report_robustness.verdict(res, "F", "U")
    # jpeg's raw p 0.02 is not below 0.05 once adjusted for the four tests (0.06): within noise.
    assert "within noise on 3 of 4 corruptions (Holm-adjusted paired p >= 0.05)" in text
    assert "F higher on gaussian_noise (+3.3 points, p < 0.001)" in text
    assert "jpeg" not in text and "not corrected" not in text


def test_format_corruption_table(table_setup):
    text = report_robustness.format_corruption_table(table_setup["result"])
    lines = text.splitlines()
    assert "12 images (seed 0)" in lines[0]
    assert lines[1].split()[:2] == ["corruption", "sev"] and "b at 32px" in lines[1]
    clean = table_setup["result"]["rows"][0]
    assert lines[2].split()[:2] == ["clean", "-"] and f"{clean['a at 48px']:.1f}" in lines[2]
    assert sum(line.startswith("jpeg ") for line in lines) == 4  # three severities and the mean
    assert sum(" vs " in line and ": within noise on" in line for line in lines) == 2


# --------------------------------------------------------------------------- the CLI

def test_cli_eval_corruptions_writes_corruptions_json(capsys, tmp_path, image_folder):
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "eval", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--data", image_folder,
                            "--workers", "0", "--out", out, "--test-size", "32", "--corruptions")
    assert code == 0, err
    res = json.loads((out / "corruptions.json").read_text())
    assert res["columns"] == ["fixres_tiny_resnet at 32px"] and res["paired"] == []
    assert len([r for r in res["rows"] if r["corruption"] != "clean"]) == 12
    assert {r["corruption"] for r in res["rows"]} == {"clean", *C.CORRUPTIONS}
    ev = json.loads((out / "eval.json").read_text())
    assert ev["corruptions"]["file"] == str(out / "corruptions.json") and len(ev["corruptions"]["mean"]) == 5
    # These small photos need no reduced decode, so the clean row is eval's own top-1.
    assert res["rows"][0]["fixres_tiny_resnet at 32px"] == pytest.approx(ev["rows"][0]["top1"])
    assert "robustness under corruptions: 12 images" in stdout and "corruptions.json" in stdout


def test_cli_eval_corruption_subset(capsys, tmp_path, image_folder):
    ck = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "eval", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--data", image_folder,
                       "--workers", "0", "--out", out, "-q", "--test-size", "32", "--corruptions",
                       "--corruption-images", "6", "--corruption-seed", "4")
    assert code == 0, err
    res = json.loads((out / "corruptions.json").read_text())
    assert res["n_images"] == 6 and res["seed"] == 4 and all(r["n"] == 6 for r in res["rows"])
    code, _, err = cli(capsys, "eval", "--model", "fixres_tiny_resnet", "--checkpoint", ck, "--data", image_folder,
                       "--out", out, "-q", "--corruptions", "--corruption-images", "0")
    assert code == 2 and "--corruption-images" in err


# --------------------------------------------------------------------------- the report

def test_report_shows_robustness_json(tmp_path, table_setup):
    run = fake_run_dir(tmp_path / "run")
    (run / "robustness.json").write_text(json.dumps(table_setup["result"]), encoding="utf-8")
    html = _page(run)
    assert "Robustness under corruptions" in html
    assert "p: a at 48px vs a at 32px" in html and "b at 32px top-1 %" in html
    mean_blur = next(m for m in table_setup["result"]["mean"] if m["corruption"] == "gaussian_blur")
    assert f"{mean_blur['b at 32px']:.1f}" in html
    assert "a at 48px vs a at 32px: within noise on" in html


def test_report_without_or_with_a_broken_robustness_json(tmp_path):
    run = fake_run_dir(tmp_path / "run")
    html = _page(run)
    assert "Robustness under corruptions" not in html and "Cost (table 7)" in html
    for broken in ({"columns": "x", "mean": 3}, [1, 2], {"columns": ["F"], "mean": "x"}):
        (run / "robustness.json").write_text(json.dumps(broken), encoding="utf-8")
        html = _page(run)
        assert "Robustness under corruptions" not in html and "Cost (table 7)" in html
    hostile = {"columns": ["F", 3], "n_images": "<i>n</i>", "mean": [{"corruption": "<b>x</b>", "F": "nan?"}, 7],
               "paired": [{"a": "F", "b": 1, "p": "?"}, {"a": "F", "b": "G", "corruption": "<b>x</b>", "p": None}]}
    (run / "robustness.json").write_text(json.dumps(hostile), encoding="utf-8")
    html = _page(run)
    assert "Robustness under corruptions" in html and "Cost (table 7)" in html
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html and "<i>n</i>" not in html
    assert "F vs G: no paired test under corruptions" in html


def _page(run) -> str:
    documents = collect(run)
    return render_html(documents, {}, headline_of(documents))
