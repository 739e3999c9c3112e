"""Fake run folders of ``fixres fix`` for the report's tests (no training needed): one with plausible step results,
and a hostile one whose text fields hold HTML payloads."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fixres.io.atomic import write_json

TEST_SIZES = [48, 64, 80, 96, 128, 160]


def _rows(peak_size: int, peak: float) -> list[dict]:
    rows = []
    for s in TEST_SIZES:
        top1 = peak - 0.004 * (s - peak_size) ** 2
        rows.append({"test_size": s, "crop_ratio": 0.875, "top1": top1, "top1_std": 1.2, "top5": min(100, top1 + 20),
                     "top5_std": 0.8, "loss": 1.0, "n": 500})
    return rows


def fake_run_dir(root: Path) -> Path:
    """Write the JSON a ``fixres fix`` run leaves behind, with made-up but consistent numbers."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "run.json", {"model": "fixres_tiny_resnet", "train_size": 64, "test_size": 96,
                                   "data": str(root / "data"), "started": "2026-01-01 12:00",
                                   "timings": {"data": 12.0, "train": 150.0, "analyze": 0.5, "sweep_before": 20.0,
                                               "finetune": 30.0, "sweep_after": 20.0, "stats": 8.0, "export": 0.2}})
    write_json(root / "analyze.json", {"train_size": 64, "crop_ratio": 0.875, "ratio": 0.8, "recommended_test_size": 96,
                                       "image_sizes": [[320, 240], [240, 320], [356, 200], [256, 256]],
                                       "monte_carlo": {"mean": 0.77}})
    write_json(root / "sweep_before.json", {"rows": _rows(88, 60.0), "n_images": 500, "skipped": []})
    write_json(root / "sweep_after.json", {"rows": _rows(96, 66.0), "n_images": 500, "skipped": []})
    write_json(root / "train.json", {"epochs": [{"epoch": e + 1} for e in range(20)], "train_size": 64,
                                     "hparams": {"batch_size": 64, "augment": "train"}, "forward_ms": 12.5,
                                     "backward_ms": 25.1, "wall_s": 150.0})
    write_json(root / "finetune.json", {"test_size": 96, "parts": ["classifier", "bn"], "augment": "test", "epochs": 5,
                                        "batch_size": 64, "cache": {"used": True},
                                        "timing": {"ms_per_batch_forward": {"mean": 3.1, "std": 0.4},
                                                   "ms_per_batch_backward": {"mean": 1.2, "std": 0.1}}})
    xs = [i / 20 for i in range(61)]
    stats = {}
    for state, shift in (("before", 0.0), ("after", 0.3)):
        stats[state] = {"sizes": {str(s): {"x": xs,
                                           "cdf": [1 - math.exp(-(x + 0.05) * (1 + shift) * s / 64) for x in xs],
                                           "zeros": 0.1 * 64 / s, "above_2": 0.02}
                                  for s in (64, 96, 128)}}
    write_json(root / "stats.json", stats)
    write_json(root / "grid.json", {"train_sizes": [64, 96, 128], "test_sizes": TEST_SIZES,
                                    "top1": [[r["top1"] - 2 * j for j in range(3)] for r in _rows(88, 60.0)],
                                    "top1_std": [[1.0] * 3 for _ in TEST_SIZES]})
    write_json(root / "export.json", {"path": str(root / "export" / "model.safetensors")})
    return root


#: Payloads a hostile run folder holds: a script, attribute breakers with event handlers, quotes.
PAYLOADS = ("<script>document.body.setAttribute('data-pwned','script')</script>",
            "\"><img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">",
            "'><svg onload=alert(1)>",
            "</code></p><iframe srcdoc='<script>alert(2)</script>'></iframe>")


def _payload(i: int) -> str:
    return PAYLOADS[i % len(PAYLOADS)]


def update_json(file: Path, **fields) -> None:
    """Set ``fields`` in the JSON object that ``file`` holds."""
    data = json.loads(file.read_text())
    data.update(fields)
    write_json(file, data)


def hostile_run_dir(root: Path) -> Path:
    """A plausible run folder whose text fields, class names and some numeric fields hold HTML payloads."""
    run = fake_run_dir(root)
    update_json(run / "run.json", model=_payload(0), data=_payload(1), started=_payload(2),
                timings={"data": 12.0, _payload(3): 1.0, "train": 150.0})
    write_json(run / "data.json", {"root": _payload(1), "manifest": {"classes": [_payload(i) for i in range(4)]}})
    update_json(run / "analyze.json", ratio=_payload(2), monte_carlo={"mean": _payload(0)})
    grid = json.loads((run / "grid.json").read_text())
    update_json(run / "grid.json", train_sizes=[_payload(1), *grid["train_sizes"][1:]], source=_payload(3))
    update_json(run / "finetune.json", parts=[_payload(0), "bn"], augment=_payload(1))
    update_json(run / "train.json", hparams={"batch_size": _payload(2), "augment": _payload(3)})
    update_json(run / "export.json", path=_payload(2))
    update_json(run / "sweep_before.json", n_images=_payload(1),
                skipped=[{"path": f"val/{_payload(i)}/x.jpg", "reason": _payload(i + 1)} for i in range(4)])
    return run
