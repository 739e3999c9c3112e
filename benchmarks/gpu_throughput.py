"""GPU throughput: images/s of eval and training, the loader alone and end to end.

For each eval size (default 128, 224, 384) and train size (default 128, 224) on one device:
  * loader alone: fixres's DataLoader (reduced JPEG decode, pinned batches on CUDA) including the
    non-blocking host-to-device copy, no network: the rate the loader can feed;
  * end to end: ``fixres.sweep`` (what ``fixres eval`` runs: inference precision, channels_last), and a training loop
    (SGD, the training precision of ``engine.precision_for``, fp16 with a GradScaler);
  * JPEG decode alone: PIL on the CPU (fixres's path) vs ``torchvision.io.decode_jpeg`` batched on the
    GPU (nvjpeg), full size, to tell whether GPU decoding would pay on this machine.
The first batch of every measurement is an untimed warm-up (cudnn autotuning, worker start).

On a machine without CUDA it prints "no CUDA: skipped" and exits 0 (``--device cpu`` runs the same
logic on the CPU, for a dry run; its numbers mean nothing). Called by ``benchmarks/gpu_smoke.sh``.

    .venv/bin/python benchmarks/gpu_throughput.py --data DIR [--model resnet50] [--images 512]

Internal: fixres.runtime.engine - the training loop and the host-to-device copies run at fixres's own
precisions and memory format (``precision_for``, ``inference_precision``, ``prepare``, ``to_device``,
``autocast``), which the public API applies only inside its commands. End to end evaluation goes through the
public ``fixres.sweep``; fixres's loader and its transforms ("loader alone") come from benchmarks/_common.py.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import (
    ImageDataset,
    MultiView,
    default_workers,
    geometry_for,
    make_loader,
    pin_memory_for,
    split_index,
    test_transform,
    train_transform,
)

import fixres
from fixres.runtime import engine

SKIP_LINE = "gpu_throughput: no CUDA: skipped"
#: Batches timed after the untimed warm-up batch (at most; fewer when the data runs out).
WARMUP_BATCHES = 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(loader, device: torch.device, step) -> float:
    """images/s of ``step(batch)`` over ``loader``, the first batch untimed."""
    n, start = 0, None
    for k, batch in enumerate(loader):
        if batch.inputs is None:
            continue
        step(batch)
        if k + 1 == WARMUP_BATCHES:
            _sync(device)
            start = time.perf_counter()
        elif start is not None:
            n += len(batch)
    _sync(device)
    return n / (time.perf_counter() - start) if start is not None and n else float("nan")


def _loader(samples, transform, args, device, *, shuffle: bool):
    return make_loader(ImageDataset(samples, transform), batch_size=args.batch_size, shuffle=shuffle,
                       workers=args.workers, pin_memory=pin_memory_for(device), drop_last=shuffle)


def eval_rates(bundle, samples, args, device) -> list[dict]:
    rows = []
    precision = engine.inference_precision(device)
    for size in args.eval_sizes:
        cfg = bundle.data_config
        t = MultiView([test_transform(geometry_for(size, cfg), cfg)])
        alone = _rate(_loader(samples, t, args, device, shuffle=False), device,
                      lambda b: engine.to_device(b.inputs[0], device, precision))
        kw = dict(batch_size=args.batch_size, device=str(device), workers=args.workers, progress=False)
        fixres.sweep(bundle, samples[: args.batch_size], [size], **kw)  # warm-up at this size
        res = fixres.sweep(bundle, samples, [size], **kw).to_json()
        rows.append({"what": "eval", "size": size, "loader_alone": alone, "end_to_end": res["images_per_s"],
                     "top1": res["rows"][0]["top1"], "precision": res["precision"]})
    return rows


def train_rates(bundle, samples, args, device) -> list[dict]:
    rows = []
    precision = engine.precision_for(device)
    model = engine.prepare(bundle.model, device, precision)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(batch):
        x = engine.to_device(batch.inputs, device, precision)
        y = batch.labels.to(device, non_blocking=True)
        with engine.autocast(device, precision):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    model.train()
    for size in args.train_sizes:
        t = train_transform(train_size=size, cfg=bundle.data_config, color_jitter=True)
        alone = _rate(_loader(samples, t, args, device, shuffle=True), device,
                      lambda b: engine.to_device(b.inputs, device, precision))
        e2e = _rate(_loader(samples, t, args, device, shuffle=True), device, step)
        rows.append({"what": "train", "size": size, "loader_alone": alone, "end_to_end": e2e,
                     "precision": precision.describe()})
    return rows


def decode_rates(samples, args, device) -> dict:
    """Full-size JPEG decode alone: PIL on the CPU (one process) vs torchvision's batched decode on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    paths = [p for p, _ in samples if p.lower().endswith((".jpg", ".jpeg"))]
    photos = ImageDataset([(p, 0) for p in paths], lambda img: img, reduced_decode=False)  # full-size decode
    start = time.perf_counter()
    for i in range(len(photos)):
        photos[i]
    cpu = len(paths) / (time.perf_counter() - start)
    data = [read_file(p) for p in paths]
    decode_jpeg(data[: args.batch_size], mode=ImageReadMode.RGB, device=device)  # warm-up (nvjpeg init)
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(data), args.batch_size):
        decode_jpeg(data[i:i + args.batch_size], mode=ImageReadMode.RGB, device=device)
    _sync(device)
    return {"jpegs": len(paths), "cpu_pil_per_process": cpu,
            f"decode_jpeg_{device.type}": len(paths) / (time.perf_counter() - start)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="ImageFolder root (its val/ and train/ splits if present)")
    ap.add_argument("--model", default="resnet50", help="random init: nothing is downloaded")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--eval-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[128, 224, 384])
    ap.add_argument("--train-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[128, 224])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(SKIP_LINE)
        return 0
    args.workers = default_workers() if args.workers is None else args.workers
    val = split_index(args.data, "val")
    train = split_index(args.data, "train")
    bundle = fixres.load(args.model, num_classes=len(train.classes), random_init=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: numbers mean nothing)"
    print(f"gpu_throughput: {name}, {args.model}, batch {args.batch_size}, {args.workers} workers")
    rows = eval_rates(bundle, val.samples[: args.images], args, device)
    rows += train_rates(bundle, train.samples[: args.images], args, device)
    for r in rows:
        print(f"gpu_throughput: {r['what']:<5} {r['size']:>4}  loader alone {r['loader_alone']:9.1f} images/s   "
              f"end to end {r['end_to_end']:9.1f} images/s   {r['precision']}")
    dec = decode_rates(val.samples[: args.images], args, device)
    other = f"decode_jpeg_{device.type}"
    print(f"gpu_throughput: full-size JPEG decode of {dec['jpegs']} photos: PIL (CPU, 1 process) "
          f"{dec['cpu_pil_per_process']:.1f} images/s, torchvision decode_jpeg on {device.type} (batched) "
          f"{dec[other]:.1f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
