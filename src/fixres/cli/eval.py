"""``fixres eval``: evaluate a classifier at one test size and crop ratio (top-1, top-5, loss, per class).

Also the CLI edge shared with ``fixres sweep``: the typed ``EvalConfig`` built from the flags,
``run_evaluation`` (model + data + ``fixres.method.evaluate.evaluate``), the result files and the table.
``--corruptions`` also measures the model on corrupted copies of the photos
(``fixres.method.robustness.corruption_table``) and writes ``corruptions.json`` beside ``eval.json``.
Under ``torchrun`` every rank evaluates its shard; only rank 0 writes files and prints.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import Any

from fixres.cli.args import (
    add_model_args,
    add_runtime_args,
    image_size,
    int_list,
    model_spec,
    positive_int,
    seed,
    warn_stride,
)
from fixres.config import DEFAULT_FOLDS, default_out
from fixres.io.evaluation import EvalResult

CORRUPTIONS_JSON = "corruptions.json"
#: What a run writes to --out: all of one run's, or, when it fails, all as they were (``cli.app``).
RESULT_FILES = ("eval.json", "eval.csv", "per_class.csv", CORRUPTIONS_JSON)
#: 10-crop testing feeds ten crops per image and view: keep the default batch's memory the same.
TEN_CROP_BATCH_DIVISOR = 8


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``eval`` and ``sweep``: data, ensembles, 10-crop, folds, train size."""
    p.add_argument("--data", required=True, metavar="DIR",
                   help="ImageFolder tree (DIR/CLASS/IMAGE) or a root holding val/; WebDataset shards"
                        " ('DIR/val-{000..009}.tar', or a folder of train-*.tar and val-*.tar); or "
                        "hf:PATH, a Hugging Face dataset on disk")
    p.add_argument("--val-count", type=positive_int, default=None, metavar="N",
                   help="the number of photos the data must hold (ImageNet val: 50000): a missing shard or folder "
                        "is an error, not a smaller denominator")
    p.add_argument("--stream", action="store_true",
                   help="read WebDataset shards front to back, split by shard over processes and loader workers, "
                        "with no index of the photos (implied by 'pipe:CMD', e.g. 'pipe:aws s3 cp "
                        "s3://B/val-{000..063}.tar -'); class names in .cls need --class-map")
    p.add_argument("--ensemble", type=int_list, action="append", default=None, metavar="S1,S2",
                   help="also evaluate the averaged softmax over these test sizes (section 5.1); repeatable")
    p.add_argument("--ten-crop", action="store_true", help="10-crop testing (4 corners + centre, and mirrors)")
    p.add_argument("--folds", type=positive_int, default=DEFAULT_FOLDS,
                   help="folds for the leave-one-fold-out std (section 5; default 10)")
    p.add_argument("--train-size", type=image_size, default=None,
                   help="the model's train size (default: from its data config)")
    p.add_argument("--no-per-class", action="store_true", help="leave per-class accuracy out of the results")
    p.add_argument("--full-decode", action="store_true",
                   help="decode every JPEG at full size (default: only as large as each test size needs, "
                        "faster at low sizes; the inputs then differ from a full decode by about 1-2 grey levels)")
    p.add_argument("--calibrate-on", default=None, metavar="DIR",
                   help="labelled held-out images (DIR/CLASS/IMAGE, not the evaluated ones) to fit temperature "
                        "scaling on, per view: adds temperature, nll_scaled and ece_scaled to each row (top-1 is "
                        "unchanged)")


def add_parser(sub, parents):
    p = sub.add_parser("eval", parents=parents, help="evaluate a classifier at one test size and crop ratio",
                       description="Top-1, top-5, loss and per-class accuracy at one test size and crop ratio, "
                                   "± the binomial standard error (the leave-one-fold-out std of section 5 is "
                                   "kept in eval.json as top1_std). Writes eval.json, eval.csv "
                                   f"and per_class.csv to --out (default {default_out('eval')}).")
    p.add_argument("--test-size", type=image_size, default=None,
                   help="test size (default: the size a fixres export was fixed for, else the model's train size)")
    add_eval_args(p)
    p.add_argument("--latency-on", choices=("torch", "onnxruntime"), default="torch",
                   help="onnxruntime: also time the model at the test size in ONNX Runtime on this CPU (exported to "
                        "ONNX), beside eager PyTorch, at batch 1 and batch N (pip install 'fixres[onnxruntime]')")
    g = p.add_argument_group("robustness under corruptions")
    g.add_argument("--corruptions", action="store_true",
                   help="also evaluate on corrupted copies of the photos (gaussian_noise, gaussian_blur, jpeg, "
                        "brightness_contrast at severities 1-3, made on the fly, centre crop at the test size); "
                        f"prints the table and writes {CORRUPTIONS_JSON}")
    g.add_argument("--corruption-images", type=positive_int, default=None, metavar="N",
                   help="with --corruptions: a seeded, class-stratified subset of N photos (default: all)")
    g.add_argument("--corruption-seed", type=seed, default=0, metavar="SEED",
                   help="seed of the noise and of the subset (default 0): the same seed gives the same photos")
    add_model_args(p)
    add_runtime_args(p, batch_default=64, batch_note="; 8 with --ten-crop")
    return p


@dataclass(frozen=True)
class EvalConfig:
    """Everything one evaluation run needs, typed (built from argparse here, at the CLI edge)."""

    data: str
    model: str | None = None
    checkpoint: str | None = None
    weights: str | None = None
    pretrained: bool = False
    random_init: bool = False  # a bare --model is refused unless asked
    ema: bool = False
    strict: bool = False
    num_classes: int | None = None
    class_map: str | None = None
    test_sizes: tuple[int, ...] | None = None   # None: the model's train size
    crop_ratios: tuple[float, ...] | None = None  # None: the model's crop ratio
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    train_size: int | None = None
    ensembles: tuple[tuple[int, ...], ...] = ()
    ten_crop: bool = False
    folds: int = 10
    per_class: bool = True
    calibrate_on: str | None = None
    reduced_decode: bool = True  # JPEGs decoded only as large as each view needs (--full-decode: off)
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    amp: bool = True
    quiet: bool = False
    seed: int = 0  # seeds the random initialisation of --random-init (same seed, same numbers)
    val_count: int | None = None  # the photos the data must hold (--val-count)
    stream: bool = False  # shards read front to back, not indexed (--stream, or a pipe: value)
    extra: dict = field(default_factory=dict)


def config_from_args(args, *, test_sizes, crop_ratios) -> EvalConfig:
    from fixres.data.streams import is_stream
    return EvalConfig(
        data=args.data, model=args.model, checkpoint=args.checkpoint, weights=args.weights,
        pretrained=args.pretrained, random_init=model_spec(args).random_init, ema=args.ema, strict=args.strict,
        num_classes=args.num_classes, class_map=args.class_map,
        test_sizes=tuple(test_sizes) if test_sizes else None,
        crop_ratios=tuple(crop_ratios) if crop_ratios else None,
        interpolation=args.interpolation, mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None, train_size=args.train_size,
        ensembles=tuple(tuple(e) for e in (args.ensemble or ())), ten_crop=args.ten_crop, folds=args.folds,
        per_class=not args.no_per_class, calibrate_on=args.calibrate_on, reduced_decode=not args.full_decode,
        device=args.device, batch_size=args.batch_size, workers=args.workers,
        amp=not args.no_amp, quiet=args.quiet, seed=args.seed, val_count=args.val_count,
        stream=args.stream or is_stream(args.data))


@dataclass
class Loaded:
    """What an evaluation works on: the model bundle, its data config, the indexed photos, and how to run."""

    bundle: Any
    data_cfg: Any
    index: Any
    num_classes: int | None
    test_sizes: list[int]
    crop_ratios: list[float]
    env: Any
    precision: Any
    batch_size: int
    show: bool


def refuse_non_finite_outputs(model, size: int) -> None:
    """Weights holding NaN or infinity (loaded with a warning, without --strict) give no numbers: one line naming
    the first layer whose output is not finite, before any photo is read (not NaN rows and numpy warnings)."""
    import torch

    from fixres.errors import UsageError
    from fixres.io.checkpoint import non_finite_tensors
    from fixres.models.hooks import first_non_finite_output
    bad = non_finite_tensors(model.state_dict())
    if not bad:
        return
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, 3, size, size).normal_(generator=torch.Generator().manual_seed(0))
        layer = first_non_finite_output(model, x)
    except Exception:  # noqa: BLE001 - a probe that cannot run leaves the judgement to the evaluation itself
        layer = None
    finally:
        model.train(was_training)
    if layer is not None:
        raise UsageError(f"the model's outputs are not numbers: {layer} is the first layer whose output holds NaN "
                         f"or infinity (the weights hold it: {bad[0]}{' and more' if len(bad) > 1 else ''}); "
                         "use another checkpoint (--strict refuses such weights when loading)")


def refuse_count(cfg: EvalConfig, held: int) -> None:
    """One line when the data held other than ``--val-count`` photos (a shard or folder missing, or one too many)."""
    from fixres.errors import UsageError
    if cfg.val_count is not None and held != cfg.val_count:
        raise UsageError(f"--val-count {cfg.val_count}: {cfg.data} holds {held} photos (a shard or folder "
                         f"{'missing' if held < cfg.val_count else 'too many'}?)")


def load_evaluation(cfg: EvalConfig, *, label: str = "eval") -> Loaded:
    """Load the model and index the data (call ``dist.shutdown()`` afterwards)."""
    from fixres.config import DEFAULT_BATCH_SIZE
    from fixres.data.folders import read_class_map
    from fixres.data.streams import open_stream
    from fixres.errors import UsageError
    from fixres.method.inputs import class_names_for, index_split
    from fixres.method.loop import seed_everything
    from fixres.models.loading import ModelSpec, num_outputs
    from fixres.runtime import dist
    from fixres.runtime.engine import inference_precision
    from fixres.runtime.progress import status

    env = dist.init(cfg.device)
    if cfg.mean is not None and len(cfg.mean) != 3 or cfg.std is not None and len(cfg.std) != 3:
        raise UsageError("--mean and --std need three values each, e.g. 0.5,0.5,0.5")
    seed_everything(cfg.seed)  # a random initialisation (and a new head) follows --seed, not the clock
    bundle = ModelSpec(model=cfg.model, checkpoint=cfg.checkpoint, weights=cfg.weights, pretrained=cfg.pretrained,
                       random_init=cfg.random_init, num_classes=cfg.num_classes, train_size=cfg.train_size,
                       ema=cfg.ema, strict=cfg.strict).load()
    data_cfg = bundle.data_config.with_overrides(interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std,
                                                 crop_ratio=cfg.crop_ratios[0] if cfg.crop_ratios else None)
    n_out = num_outputs(bundle.model)
    # Known model classes (a class map, or an export's own): val folders are mapped onto them by name.
    classes = class_names_for(bundle, data_cfg, read_class_map(cfg.class_map) if cfg.class_map else None)
    if cfg.stream:
        index = open_stream(cfg.data, classes=classes, num_classes=n_out)
    else:
        index = index_split(cfg.data, "val", classes=classes, num_classes=n_out)
    if not cfg.stream:  # indexed photos are counted before any is read; streamed ones once all are
        refuse_count(cfg, len(index))
    # Sorted folder names are only meaningful when they are exactly the model's classes.
    num_classes = index.num_classes if index.source == "sorted folders" else None
    # A fixres export was fixed for its test size: that, not its train size, is where it should be evaluated.
    # Likewise torchvision weights are evaluated at their own crop (ResNet-50 V2: trained at 176, tested at 224).
    test_sizes = list(cfg.test_sizes or (bundle.test_size,))
    crop_ratios = list(cfg.crop_ratios or (data_cfg.crop_ratio,))
    refuse_non_finite_outputs(bundle.model, test_sizes[0])
    show = env.is_main and not cfg.quiet
    warned = set()
    for size in test_sizes + [s for e in cfg.ensembles for s in e]:
        if size not in warned and env.is_main:
            warn_stride(size, data_cfg.stride, "test size", quiet=cfg.quiet)
            warned.add(size)
    precision = inference_precision(env.device, cfg.amp)
    batch_size = cfg.batch_size or (max(1, DEFAULT_BATCH_SIZE // TEN_CROP_BATCH_DIVISOR) if cfg.ten_crop
                                    else DEFAULT_BATCH_SIZE)
    photos = f"{len(index.shards)} streamed shard(s)" if cfg.stream else f"{len(index)} images"
    status(f"fixres {label}: {bundle.name} ({bundle.source}) on {photos} in {index.root} "
           f"[{index.source}], {precision.describe()}, {env.world_size} process(es)", enabled=show)
    return Loaded(bundle, data_cfg, index, num_classes, test_sizes, crop_ratios, env, precision, batch_size, show)


def run_evaluation(cfg: EvalConfig, *, label: str = "eval", loaded: Loaded | None = None):
    """Load the model and data (unless ``loaded``), evaluate, and return (result, env). Call ``dist.shutdown()``
    afterwards."""
    from fixres.method.evaluate import evaluate
    from fixres.method.streaming import evaluate_stream
    from fixres.models.loading import num_outputs

    ld = loaded or load_evaluation(cfg, label=label)
    bundle, data_cfg, index = ld.bundle, ld.data_cfg, ld.index
    eval_kw = dict(test_sizes=ld.test_sizes, crop_ratios=ld.crop_ratios, batch_size=ld.batch_size, env=ld.env,
                   precision=ld.precision, workers=cfg.workers, ensembles=cfg.ensembles, ten_crop=cfg.ten_crop,
                   folds=cfg.folds, progress=ld.show, num_classes=ld.num_classes, reduced_decode=cfg.reduced_decode)
    result = (evaluate_stream if cfg.stream else evaluate)(bundle.model, index, data_cfg, per_class=cfg.per_class,
                                                          keep_log_probs=bool(cfg.calibrate_on), **eval_kw)
    refuse_count(cfg, result.n_samples)
    if cfg.calibrate_on:
        result = _temperature_scaled(result, bundle.model, data_cfg, cfg.calibrate_on, index,
                                     num_outputs(bundle.model), eval_kw)
    result = {
        "command": label,
        "model": bundle.name, "model_source": bundle.source,
        **({"weights": cfg.weights} if cfg.weights else {}),
        **({"checkpoint": cfg.checkpoint} if cfg.checkpoint else {}),
        "data": str(index.root), "class_index": index.source, "num_classes": index.num_classes,
        "reduced_decode": cfg.reduced_decode, "train_size": data_cfg.train_size,
        "data_config": {k: v for k, v in data_cfg.to_dict().items() if k != "class_names"},
        **result.to_json(),
    }
    return result, ld.env


def run_corruptions(ld: Loaded, *, images: int | None, seed: int, workers: int | None) -> dict:
    """The model at each test size under every corruption and severity (``corruption_table``), one column per size."""
    from fixres.method.robustness import corruption_table
    columns = {f"{ld.bundle.name} at {size}px": (ld.bundle.model, size) for size in ld.test_sizes}
    return corruption_table(columns, ld.index, ld.data_cfg, seed=seed, max_images=images, batch_size=ld.batch_size,
                            env=ld.env, precision=ld.precision, workers=workers, progress=ld.show,
                            num_classes=ld.num_classes)


def _temperature_scaled(result: EvalResult, model, data_cfg, folder: str, index, n_out: int,
                        eval_kw: dict) -> EvalResult:
    """Fit a temperature per view on the held-out ``folder`` (its classes mapped onto the evaluated ones by name)."""
    from fixres.errors import UsageError
    from fixres.method.evaluate import evaluate, temperature_scale
    from fixres.method.inputs import index_folder
    if index.source.startswith("class numbers"):  # shards or rows labelled by number alone
        raise UsageError("--calibrate-on matches the held-out folder's class folders by name, and the data numbers "
                         "its classes: name them with --class-map FILE")
    held_index = index_folder(folder, classes=list(index.classes), num_classes=n_out)
    held = evaluate(model, held_index, data_cfg, per_class=False, keep_log_probs=True, **eval_kw)
    scaled = temperature_scale(result, held)
    return replace(scaled, temperature_fitted_on=replace(scaled.temperature_fitted_on, data=str(held_index.root)))


def rows_csv(result: dict) -> str:
    """One CSV line per view and per ensemble."""
    from fixres.io.csvtext import csv_text
    cols = ["test_size", "crop_ratio", "resize", "ten_crop", "top1", "top1_se", "top1_std", "top5", "top5_se",
            "top5_std", "loss", "n", "correct"]
    rows = [[r.get(c) for c in cols] for r in result["rows"]]
    rows += [["+".join(map(str, e["test_sizes"])), "+".join(f"{c:g}" for c in e["crop_ratios"]), "", e["ten_crop"]]
             + [e.get(c) for c in cols[4:]] for e in result.get("ensembles", [])]
    return csv_text(cols, rows)


def per_class_csv(result: dict) -> str:
    """One CSV line per class; class names a spreadsheet would run as formulas are neutralised (fixres.io.csvtext)."""
    from fixres.io.csvtext import csv_text
    pc = result["per_class"]
    keys = list(pc["top1"])
    return csv_text(["class_index", "class", "n"] + [f"top1_{k}" for k in keys],
                    ([c, name, pc["n"][c]] + ["" if pc["top1"][k][c] is None else pc["top1"][k][c] for k in keys]
                     for c, name in enumerate(pc["classes"])))


def _calibration_cells(r: dict, scaled: bool) -> str:
    """NLL (= loss) and ECE, then the temperature-scaled ones when a temperature was fitted."""
    cells = f" {r['loss']:>7.4f} {r.get('ece', float('nan')):>6.2f}"
    if scaled:
        cells += f"  {r['temperature']:>5.2f} {r['nll_scaled']:>7.4f} {r['ece_scaled']:>6.2f}"
    return cells


def format_table(result: dict) -> str:
    """Human-readable result table: top-1, top-5, NLL and ECE (and temperature-scaled NLL, ECE) per view."""
    scaled = "temperature_fitted_on" in result
    lines = [f"{result['model']} on {result['n_images']} images of {result['data']} "
             f"({len(result['skipped'])} skipped), {result['precision']}, "
             f"{result['images_per_s']:.1f} images/s, {result['seconds']:.1f} s",
             f"{'test_size':>9} {'crop':>6} {'resize':>6}  {'top-1 % (± SE)':>21} {'top-5 % (± SE)':>16} {'NLL':>7} "
             f"{'ECE %':>6}" + (f"  {'T':>5} {'NLL@T':>7} {'ECE@T':>6}" if scaled else "")]
    for r in result["rows"]:
        lines.append(f"{r['test_size']:>9} {r['crop_ratio']:>6.3f} {r['resize']:>6}  {r['top1']:>12.2f} ± "
                     f"{r['top1_se']:<5.2f}  {r['top5']:>8.2f} ± {r['top5_se']:<5.2f}"
                     + _calibration_cells(r, scaled)
                     + ("  (10-crop)" if r["ten_crop"] else ""))
    for e in result["ensembles"]:
        name = "+".join(map(str, e["test_sizes"]))
        lines.append(f"{name:>9} {'ens.':>6} {'':>6}  {e['top1']:>12.2f} ± {e['top1_se']:<5.2f}  "
                     f"{e['top5']:>8.2f} ± {e['top5_se']:<5.2f}" + _calibration_cells(e, scaled))
    # The fold std of section 5 measures far less than the sampling noise: it stays in the files, not as the ±.
    lines.append("± binomial standard error (the fold std of section 5 is top1_std in the JSON); "
                 "NLL: mean cross-entropy; ECE: expected calibration error, 15 bins of top-1 confidence"
                 + (f"; T: temperature fitted on {result['temperature_fitted_on']['n_images']} held-out images "
                    f"({result['temperature_fitted_on'].get('data', '')}), top-1 unchanged" if scaled else ""))
    if result["skipped"]:
        s = result["skipped"][0]
        lines.append(f"skipped {len(result['skipped'])} unreadable file(s), e.g. {s['path']}: {s['reason']}")
    return "\n".join(lines)


def write_results(result: dict, out_dir, stem: str) -> dict:
    """Write STEM.json, STEM.csv (and per_class.csv) atomically; return their paths."""
    from pathlib import Path

    from fixres.io.atomic import write_json, write_text
    out = Path(out_dir)
    files = {"json": str(out / f"{stem}.json"), "csv": str(out / f"{stem}.csv")}
    if "per_class" in result:
        files["per_class_csv"] = str(out / "per_class.csv")
        write_text(files["per_class_csv"], per_class_csv(result))
    write_text(files["csv"], rows_csv(result))
    write_json(files["json"], {**result, "files": files})
    return files


def runtime_latency(ld: Loaded) -> dict:
    """{test size: ms per image at batch 1 and N} in ONNX Runtime on this CPU, PyTorch's beside them."""
    from fixres.models.onnxrt import ONNXRUNTIME, costs_on
    costs = costs_on(ld.bundle.model.eval(), sorted({int(s) for s in ld.test_sizes}), runtime=ONNXRUNTIME,
                     device=ld.env.device, precision=ld.precision)
    return {str(s): row for s, row in costs.items()}


def run(args):
    from pathlib import Path

    from fixres.io.atomic import write_json
    from fixres.report.robustness import format_corruption_table
    from fixres.runtime import dist

    cfg = config_from_args(args, test_sizes=[args.test_size] if args.test_size else None,
                           crop_ratios=[args.crop_ratio] if args.crop_ratio else None)
    try:
        if cfg.stream and args.corruptions:
            from fixres.errors import UsageError
            raise UsageError("--corruptions draws its photos by position: it needs the shards indexed "
                             "(leave out --stream; a pipe: value cannot be indexed)")
        loaded = load_evaluation(cfg, label="eval")
        result, env = run_evaluation(cfg, label="eval", loaded=loaded)
        robust = (run_corruptions(loaded, images=args.corruption_images, seed=args.corruption_seed,
                                  workers=cfg.workers) if args.corruptions else None)
        if not env.is_main:
            return None
        if args.latency_on == "onnxruntime":
            result["latency"] = runtime_latency(loaded)
        out = args.out or default_out("eval")
        if robust is not None:
            path = str(Path(out) / CORRUPTIONS_JSON)
            write_json(path, robust)
            result["corruptions"] = {"file": path, "n_images": robust["n_images"], "seed": robust["seed"],
                                     "mean": robust["mean"]}
        result["files"] = write_results(result, out, "eval")
        text = format_table(result) + f"\nresults: {result['files']['json']}"
        if robust is not None:
            text += "\n\n" + format_corruption_table(robust) + f"\ncorruptions: {result['corruptions']['file']}"
        if "latency" in result:
            text += "\n" + "\n".join(f"latency at {s} px: {row['ms']:.2f} ms/image in {row['latency_on']}, "
                                     f"{row['ms_torch']:.2f} in PyTorch (batch 1; batch {row['batch']}: "
                                     f"{row['ms_batch']:.2f} and {row['ms_batch_torch']:.2f})"
                                     for s, row in result["latency"].items())
        result.pop("per_class", None)  # one number per class and view: in the files, not on stdout
        return result, text
    finally:
        dist.shutdown()
