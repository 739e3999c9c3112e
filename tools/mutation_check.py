"""Mutation check: plant small, plausible one-line bugs, one at a time, and run the tests that
claim to guard that code. A mutant that no test notices ("survived") marks a gap in the suite.

Each mutant names a file, an exact snippet that must occur exactly once in it, its replacement, and the
test selection to run. The tree is copied once into a temporary folder (tracked and untracked files,
not the virtual environment); each mutant is applied to a fresh copy of its one file there, and pytest
runs with that copy's ``src`` first on ``sys.path`` (subprocesses inherit it through PYTHONPATH), so the
working tree is never touched. A snippet that no longer matches the code is reported as "stale", and
counts as a failure of this check: the list must follow the code.

    .venv/bin/python tools/mutation_check.py [--only NAME ...] [--list]

Exit status 0 when every mutant was killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: The repository root: this file lives in tools/.
REPO = Path(__file__).resolve().parents[1]

#: Wall-clock limit of one mutant's test run (a mutant that hangs the suite counts as killed by timeout).
MUTANT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    path: str  # relative to the repository root
    find: str
    replace: str
    tests: tuple[str, ...]
    why: str


MUTANTS: tuple[Mutant, ...] = ()  # filled below, next to the code they mutate


def _register(*mutants: Mutant) -> None:
    global MUTANTS
    MUTANTS = MUTANTS + mutants


# --------------------------------------------------------------------------- the list
# One line each: a plausible slip, in the code that decides a number or guards a promise.

# Training step, resume, fine-tuning modes, locks.
TL = "tests/method/test_loop.py"
TF = "tests/method/test_finetune.py"
TT = "tests/method/test_train.py"
_register(
    Mutant("loop-local-normalisation", "training step", "src/fixres/method/loop.py",
           "loss = self.loss_fn(logits.float(), y) / n_global", "loss = self.loss_fn(logits.float(), y) / n_local",
           (TL,), "each rank's mean loss instead of the global batch's"),
    Mutant("loop-no-gradient-sum", "training step", "src/fixres/method/loop.py",
           "            sum_gradients(self.params, self.env)", "            pass",
           (TL,), "ranks step on their own gradients"),
    Mutant("loop-step-without-images", "training step", "src/fixres/method/loop.py",
           "        if n_global == 0:\n            return StepResult()",
           "        if False:\n            return StepResult()",
           (TL,), "a global step with no image anywhere still steps (weight decay, momentum)"),
    Mutant("loop-unsynchronised-clock", "timing", "src/fixres/method/loop.py",
           "    synchronize(device)\n    return clock()", "    return clock()",
           (TL + "::test_every_clock_read_follows_a_device_synchronise",), "GPU timings of kernel launches "),
    Mutant("loop-bn-unweighted", "training step", "src/fixres/method/loop.py",
           "summed = dist.all_reduce_sum(buf.double() * float(weight), env)",
           "summed = dist.all_reduce_sum(buf.double(), env)",
           (TL,), "a rank that saw no image pulls the averaged BN statistics to stale values"),
    Mutant("resume-check-off", "resume", "src/fixres/method/loop.py",
           "    if diff:\n        what =", "    if False:\n        what =",
           (TF + "::test_resume_refuses_other_pre_processing_and_world_size",), "resume with other settings "),
    Mutant("finetune-epoch-modes", "fine-tuning modes", "src/fixres/method/finetuning.py",
           "    s, env = t.settings, t.env\n    _set_modes(t.model, t.sel)\n", "    s, env = t.settings, t.env\n",
           (TF + "::test_epoch_eval_keeps_the_adapted_batch_norm_in_train_mode_every_epoch",),
           "epoch 2 runs with the adapted BN in eval mode after epoch_eval"),
    Mutant("finetune-scaler-not-restored", "resume", "src/fixres/method/finetuning.py",
           "        t.stepper.scaler.load_state_dict(state.scaler)", "        pass",
           (TF + "::test_fp16_loss_scale_is_restored_on_resume",), "fp16 loss scale restarts on resume"),
    Mutant("finetune-before-after-load", "resume", "src/fixres/method/finetuning.py",
           "    if t.before is None and evaluate_before and t.val_samples:",
           "    if state is not None:\n"
           "        loop.load_weights(t.model, state.weights, t.state_path, complete=False)\n"
           "    if t.before is None and evaluate_before and t.val_samples:",
           (TF + "::test_resume_measures_before_on_the_untouched_model",),
           "'before' measured on a half-adapted model "),
    Mutant("train-epoch-length-n", "training recipe", "src/fixres/method/trainrecipe.py",
           "return PAPER_LEN_FACTOR if repeats > 1 else 1.0", "return 1.0",
           (TT + "::test_paper_epoch_length_is_the_default_only_with_repeated_augmentation",
            TT + "::test_cli_train_validates_at_train_and_recommended_size_and_exports"), "N-sample epochs "),
    Mutant("train-cosine-resume", "resume", "src/fixres/method/train.py",
           'keys = RESUME_KEYS + (("epochs",) if run.hparams["schedule"] == "cosine" else ())', "keys = RESUME_KEYS",
           (TT + "::test_cosine_resume_with_another_epoch_count_is_refused",), "a cosine resumed with another length"),
    Mutant("train-batch-zero", "arguments", "src/fixres/method/train.py",
           "if batch_size <= 0 or batch_size % env.world_size:", "if batch_size % env.world_size:",
           (TT + "::test_train_refuses_bad_arguments_before_writing",), "batch size 0 accepted"),
    Mutant("lock-shared", "output folder", "src/fixres/io/lock.py",
           "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)",
           ("tests/io/test_lock.py",), "two runs both hold the output folder "),
    Mutant("lock-rank1-too", "output folder", "src/fixres/io/lock.py",
           'return int(os.environ.get("RANK", "0")) == 0', "return True",
           ("tests/io/test_lock.py::test_only_rank_zero_of_a_torchrun_job_takes_the_lock",),
           "rank 1 locks its own job out"),
)

# Fine-tuning modes: which modules adapt, which stay frozen (section 5: bn-stats, fc, ...).
_register(
    Mutant("finetune-stats-not-train", "fine-tuning modes", "src/fixres/method/tunerecipe.py",
           "    for name in sel.stats:\n        model.get_submodule(name).train()",
           "    for name in sel.stats:\n        model.get_submodule(name).eval()",
           (TF + "::test_frozen_bit_identical_and_bn_stats_only_where_asked",), "bn-stats never re-estimated"),
    Mutant("finetune-frozen-in-train", "fine-tuning modes", "src/fixres/method/tunerecipe.py",
           '    """Frozen modules in eval mode (and no gradient); adapted batch-norms in train mode."""\n'
           '    model.eval()',
           '    """Frozen modules in eval mode (and no gradient); adapted batch-norms in train mode."""\n'
           '    model.train()',
           (TF + "::test_frozen_bit_identical_and_bn_stats_only_where_asked",), "frozen BNs drift during fine-tuning"),
)

# Analysis: eq. (5) and the recommended test size (section 4.1).
TA = "tests/method/test_analysis.py"
_register(
    Mutant("analysis-F-mean-sigma", "analysis", "src/fixres/method/analysis.py",
           "(s_hi ** 3 - s_lo ** 3) / (s_hi ** 2 - s_lo ** 2)", "(s_hi ** 2 - s_lo ** 2) / (s_hi - s_lo)",
           (TA,), "F as if sigma (not sigma^2) were uniform"),
    Mutant("analysis-ratio-ignores-crop", "analysis", "src/fixres/method/analysis.py",
           "return scale_factor_F(scale) * resize_for(test_size, crop_ratio) / train_size",
           "return scale_factor_F(scale) * test_size / train_size",
           (TA,), "eq. (5) with the crop instead of the resize"),
    Mutant("analysis-alpha-inverted", "analysis", "src/fixres/method/analysis.py",
           "    alpha = 1.0 / e\n", "    alpha = e\n",
           (TA,), "recommended size scaled the wrong way"),
    Mutant("analysis-stride-floor", "analysis", "src/fixres/method/analysis.py",
           '"test_size": round_to_stride(exact, stride)}', '"test_size": int(exact) // stride * stride}',
           (TA,), "recommended size truncated instead of rounded to the stride"),
)

# Transforms: the one resize rule, the centre crop, interpolation, the paper's train DA.
TTR, TP = "tests/data/test_transforms.py", "tests/data/test_properties.py"
_register(
    Mutant("transforms-resize-is-crop", "transforms", "src/fixres/data/transforms.py",
           "        v2.Resize(resize_for(test_size, crop_ratio), interpolation=interpolation_mode(cfg.interpolation),\n"
           "                  antialias=True),\n        v2.CenterCrop(test_size),",
           "        v2.Resize(test_size, interpolation=interpolation_mode(cfg.interpolation),\n"
           "                  antialias=True),\n        v2.CenterCrop(test_size),",
           (TTR, TP), "test DA ignores the crop ratio (resize_for not used)"),
    Mutant("transforms-crop-corner", "transforms", "src/fixres/data/transforms.py",
           "        v2.CenterCrop(test_size),", "        v2.RandomCrop(test_size),",
           (TTR, TP), "test DA crops anywhere, not the centre"),
    Mutant("transforms-da2-top", "transforms", "src/fixres/data/transforms.py",
           "top = int(round((h - self.size) / 2.0))", "top = 0",
           (TTR, TP), "DA2's crop at the top, not centred vertically"),
    Mutant("transforms-interpolation-ignored", "transforms", "src/fixres/data/transforms.py",
           "        v2.Resize(resize_for(test_size, crop_ratio), interpolation=interpolation_mode(cfg.interpolation),\n"
           "                  antialias=True),\n        v2.CenterCrop(test_size),",
           "        v2.Resize(resize_for(test_size, crop_ratio), interpolation=InterpolationMode.BILINEAR,\n"
           "                  antialias=True),\n        v2.CenterCrop(test_size),",
           (TTR,), "test DA always bilinear whatever the model's data config says"),
    Mutant("transforms-no-paper-jitter", "transforms", "src/fixres/data/transforms.py",
           "PAPER_COLOR_JITTER = True", "PAPER_COLOR_JITTER = False",
           (TTR,), "train DA without the paper's colour jitter"),
    Mutant("transforms-control-no-jitter", "transforms", "src/fixres/data/transforms.py",
           "    ] + _flip_jitter_normalized(cfg, color_jitter))", "    ] + _flip_jitter_normalized(cfg, False))",
           (TTR,), "the appendix-D control ignores --color-jitter"),
)

# Evaluation: per-image outcomes, their order after the distributed gather, the fold std (section 5).
TE, TDE = "tests/method/test_evaluate.py", "tests/method/test_distributed_eval.py"
_register(
    Mutant("eval-gather-not-reordered", "evaluation", "src/fixres/method/evaluate.py",
           'return merged.reordered(np.argsort(merged.idx, kind="stable"))', "return merged",
           (TDE + "::test_gathered_results_are_put_back_in_single_process_order",),
           "interleaved ranks' order changes the fold std"),
    Mutant("eval-ties-optimistic", "evaluation", "src/fixres/method/evaluate.py",
           "rank = (logits > true).sum(1) + ((logits == true) & lower_index).sum(1)",
           "rank = (logits > true).sum(1)",
           (TE + "::test_scores_break_ties_like_argmax_and_refuse_nan",),
           "a tie counts as a hit (constant logits 100 %)"),
    Mutant("eval-nonfinite-counted", "evaluation", "src/fixres/method/evaluate.py",
           "rank = torch.where(torch.isfinite(logits).all(1), rank, logits.shape[1])", "rank = rank",
           (TE + "::test_scores_break_ties_like_argmax_and_refuse_nan",), "a NaN row can count as right"),
    Mutant("eval-fold-std-ddof", "evaluation", "src/fixres/method/evaluate.py",
           "return float(np.std(accs) * PERCENT)", "return float(np.std(accs, ddof=1) * PERCENT)",
           (TE + "::test_fold_std_matches_its_definition",), "sample instead of population std of the folds"),
    Mutant("eval-fold-contiguous", "evaluation", "src/fixres/method/evaluate.py",
           "fold_of = np.arange(n) % k", "fold_of = np.arange(n) * k // n",
           (TE + "::test_fold_std_matches_its_definition",), "contiguous folds instead of i % folds"),
)

# Checkpoint safety: weights_only loading, and exactly one extra allowed type.
TCS, TEC = "tests/io/test_checkpoints_security.py", "tests/io/test_ecosystem_checkpoints.py"
_register(
    Mutant("ckpt-weights-only-off", "checkpoint safety", "src/fixres/io/checkpoint.py",
           'return torch.load(str(path), map_location="cpu", weights_only=True)',
           'return torch.load(str(path), map_location="cpu", weights_only=False)',
           (TCS,), "a checkpoint can run code when loaded"),
    Mutant("ckpt-allowlist-wider", "checkpoint safety", "src/fixres/io/checkpoint.py",
           "SAFE_GLOBALS = (argparse.Namespace,)", "SAFE_GLOBALS = (argparse.Namespace, getattr)",
           (TEC,), "the allowlist holds more than argparse.Namespace"),
    Mutant("ckpt-allowlist-leaks", "checkpoint safety", "src/fixres/io/checkpoint.py",
           "        with torch.serialization.safe_globals(list(SAFE_GLOBALS)), warnings.catch_warnings():",
           "        torch.serialization.add_safe_globals(list(SAFE_GLOBALS))\n        with warnings.catch_warnings():",
           (TEC + "::test_namespace_is_the_only_extra_type",), "the allowlist leaks into torch's global list"),
    Mutant("ckpt-no-namespace", "checkpoint safety", "src/fixres/io/checkpoint.py",
           "SAFE_GLOBALS = (argparse.Namespace,)", "SAFE_GLOBALS = ()",
           (TEC,), "timm / torchvision training checkpoints refused"),
)

# Export: the weights and fixres.json appear together; the header carries the metadata.
TX = "tests/models/test_export_meta.py"
_register(
    Mutant("export-published-before-complete", "export", "src/fixres/models/export.py",
           "        write_text(staging / USAGE_NAME, usage_text(meta, cfg, timm_ready=timm_config is not None))\n"
           "        swap_in(staging, out_dir, EXPORT_FILES)",
           "        swap_in(staging, out_dir, EXPORT_FILES)\n"
           "        write_text(out_dir / USAGE_NAME, usage_text(meta, cfg, timm_ready=timm_config is not None))",
           ("tests/io/test_reliability_files.py::test_a_failed_export_leaves_the_previous_export_whole",),
           "a failed export leaves half of a new export in place of the old one"),
    Mutant("export-no-header", "export", "src/fixres/models/export.py",
           "metadata=header_metadata(meta))", "metadata=None)",
           (TX,), "the weights file alone does not say what it is"),
)

# Report: escaping by construction, CSV formulas, the report/ symlink.
TR = "tests/report/test_report_escaping.py"
_register(
    Mutant("report-no-autoescape", "report", "src/fixres/report/html.py",
           "Environment(autoescape=True,", "Environment(autoescape=False,",
           (TR,), "values from run files reach the page raw (script injection)"),
    Mutant("report-csv-formula", "report", "src/fixres/io/csvtext.py",
           'FORMULA_STARTS = ("=", "+", "-", "@", "\\t", "\\r")', 'FORMULA_STARTS = ("=",)',
           (TR + "::test_per_class_csv_neutralises_formula_class_names",), "+, -, @ cells run as formulas"),
    Mutant("report-follows-symlink", "report", "src/fixres/report/page.py",
           "    if out.is_symlink():", "    if False:",
           (TR + "::test_report_refuses_a_symlinked_report_folder",), "the report written through a link"),
)

# The class-set rule and the non-finite flag parsers.
TC, TFL = "tests/data/test_class_sets.py", "tests/cli/test_flags.py"
_register(
    Mutant("data-val-own-classes", "class sets", "src/fixres/data/folders.py",
           "index = scan_folder(root, class_map=classes, num_classes=num_classes, warn=warn)",
           "index = scan_folder(root, num_classes=num_classes, warn=warn)",
           (TC,), "val indexed by its own sorted folders: wrong class per photo"),
    Mutant("data-unknown-val-class", "class sets", "src/fixres/data/folders.py",
           "        if unknown:\n            shown", "        if False:\n            shown",
           (TC,), "a val class the model never learned is scored silently"),
    Mutant("flags-inf-accepted", "arguments", "src/fixres/cli/args.py",
           '    if not math.isfinite(v):\n        raise argparse.ArgumentTypeError(f"must be a finite number, got',
           '    if False:\n        raise argparse.ArgumentTypeError(f"must be a finite number, got',
           (TFL,), "--lr inf, --mean nan accepted"),
    Mutant("flags-crop-ratio-inf", "arguments", "src/fixres/cli/args.py",
           "        if not math.isfinite(v):\n"
           "            raise argparse.ArgumentTypeError(f\"must be a finite number in (0, 1]",
           "        if False:\n            raise argparse.ArgumentTypeError(f\"must be a finite number in (0, 1]",
           (TFL,), "--crop-ratio inf accepted"),
    Mutant("flags-rgb-nan", "arguments", "src/fixres/cli/args.py",
           "    for v in values:\n        _finite(v, text)", "    for v in values:\n        pass",
           (TFL,), "--mean nan,0,0 accepted: 0 % and loss nan"),
)


def copy_tree(dest: Path) -> Path:
    """Tracked and untracked (not ignored) files of the repository, as CI's clean clone would hold them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def run_mutant(m: Mutant, tree: Path) -> dict:
    target = tree / m.path
    original = target.read_text(encoding="utf-8")
    count = original.count(m.find)
    if count != 1:
        return {"name": m.name, "status": "stale", "detail": f"snippet found {count} times in {m.path}"}
    target.write_text(original.replace(m.find, m.replace), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                             cwd=tree, env=env, capture_output=True, text=True, timeout=MUTANT_TIMEOUT_S)
        status = ("survived" if res.returncode == 0
                  else ("killed" if res.returncode == 1 else f"error rc={res.returncode}"))
        tail = (res.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        status, tail = "killed", f"timeout after {MUTANT_TIMEOUT_S} s"
    finally:
        target.write_text(original, encoding="utf-8")
    return {"name": m.name, "status": status, "detail": tail, "seconds": round(time.perf_counter() - t0, 1)}


def baseline(tree: Path, tests: list[str]) -> bool:
    """The selected tests must pass on the unmutated copy, or a 'kill' would mean nothing."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=tree,
                         env=env, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout[-3000:], file=sys.stderr)
    return res.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="run only these mutants (by name)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated tree")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.area:17s} {m.path}: {m.why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="fixres-mutants-") as tmp:
        tree = copy_tree(Path(tmp))
        all_tests = sorted({t for m in chosen for t in m.tests})
        if not args.no_baseline and not baseline(tree, all_tests):
            print("the selected tests fail on the unmutated tree: fix that first", file=sys.stderr)
            return 2
        rows = []
        for m in chosen:
            row = run_mutant(m, tree)
            rows.append(row)
            print(f"{row['status']:9s} {m.name:32s} {m.area:17s} {row.get('seconds', 0):6.1f} s  {row['detail']}",
                  flush=True)
    killed = sum(r["status"] == "killed" for r in rows)
    print(f"\n{killed} of {len(rows)} mutants killed; survived or stale: "
          f"{', '.join(r['name'] for r in rows if r['status'] != 'killed') or 'none'}")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
