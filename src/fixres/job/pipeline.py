"""The main job, ``fixres fix``: analyze -> sweep -> fix at every candidate size -> choose -> statistics -> report.

With a model (``--model/--checkpoint/--weights``) and data (``--data``) it fixes *that* model. With no
arguments it first generates the embedded data set (``fixres.data.synth``) and trains a small built-in CNN
on it at a low train size with RandomResizedCrop, so a newcomer sees the whole method on a laptop CPU.

The job is a table of steps (``STEP_TABLE``): each row names a step's description, its key (what its result
depends on, ``fixres.job.keys``) and its function (``fixres.job.steps``, ``fixres.job.candidates``); the run's
config and shared state are ``fixres.job.context``, the printed plan ``fixres.job.plan``. Every step returns its
result; the pipeline writes it as ``RUN_DIR/<step>.json`` (the schema: ``fixres.io.results``), hands it on in
``FixContext.results``, and records the step in ``state.json`` with its *key*: every input its
result depends on (the settings it reads, the content hash of the checkpoint, a fingerprint of the
data index, and the keys of the steps it reads from). A rerun recomputes exactly the steps whose key
changed, and the steps downstream of them, and says which inputs changed; with nothing changed it
recomputes nothing. A step killed half-way resumes (training and fine-tuning from their checkpoints)
when its inputs are still the same, and starts over otherwise.

  data          generate the embedded data set (or index the user's; validated before anything is written)
  train         train at train_size on the fitting part of the training images (embedded default,
                or a model without weights / with a new head)
  analyze       apparent-size analysis on the data's photo sizes: the recommended test size (section 4.1)
  sweep_before  top-1 (NLL, ECE) at every test size on the validation images, one pass (fold std)
  schedule      fine-tuning rate and epochs chosen on the held-out images from a small grid
  select        every candidate size fixed at its own size (classifier + bn, test DA, cached), scored on
                a held-out part of the *training* images and on val, its cost measured (``fixres.job.candidates``)
  finetune      the chosen candidate (most accurate on the held-out images within the deployment budget;
                ``--label-free``: bn-recalibrate at the recommended size), exported (safetensors + fixres.json)
  sweep_after   the fixed model at every test size
  stats         pooled-activation statistics before and after (figures 3-4, KS distance to T)
  report        HTML report with the figures, JSON summary

The size is never chosen on the validation images the headline reports (``fixres.choosing``); the model
is built once, and every fix works on one copy of it.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fixres.choosing.photos import RULE_CROSS
from fixres.data.corruptions import CORRUPTIONS, SEVERITIES
from fixres.data.layouts import require
from fixres.errors import UsageError
from fixres.io.atomic import plain_json, write_json
from fixres.io.documents import DataInfo, FinetuneInfo, RobustnessTable, StatsInfo, TrainInfo
from fixres.io.results import Analysis, Schedule, Sweep, read_document
from fixres.io.run import FixRun
from fixres.io.served import Candidates, Choice
from fixres.job import candidates, keys, steps
from fixres.job.context import (
    STEPS,
    FixConfig,
    FixContext,
    default_test_sizes,
    stats_sizes_of,
    tunes_schedule,
)
from fixres.job.plan import print_plan
from fixres.job.runstate import NOT_RUN, RunState
from fixres.report.robustness import verdicts
from fixres.runtime import dist, engine
from fixres.runtime import progress as prog

#: Working folders of steps: wiped when the step's inputs changed (their partial state would not fit).
STEP_FOLDERS = {"train": ("train",), "schedule": ("schedule",), "select": (candidates.CANDIDATES_DIR,),
                "finetune": ("finetune", "export")}


# --------------------------------------------------------------------------- step keys (what each result depends on)


# --------------------------------------------------------------------------- the table of steps

@dataclass(frozen=True)
class Step:
    """One step of the job: what it does (for the header line), what its result depends on, how to run it, how to
    read its finished result back when a run resumes, and what it says about its result."""

    name: str
    describe: Callable[[FixContext], str]
    key: Callable[[FixContext], dict]
    run: Callable[[FixContext], Any]
    #: the result of a finished step from its file (default: the document itself)
    resume: Callable[[FixContext, dict], Any] = lambda x, doc: doc
    #: lines said under the step's header about its result
    announce: Callable[[FixContext, Any], list[str]] = lambda x, result: []
    applies: Callable[[FixContext], bool] = lambda x: True
    skipped: str | Callable[[FixContext], str] = ""  # said when the step does not apply
    #: the result when the step does not apply (what later steps read instead)
    skip: Callable[[FixContext], Any] = lambda x: None
    #: the result file, written by the step itself (default: the pipeline writes <name>.json from the result)
    output: str | None = None


def _describe_train(x: FixContext) -> str:
    c = x.config
    da = "RandomResizedCrop" if c.train_augment == "train" else c.train_augment
    return f"{x.bundle.name} at {x.data_config.train_size}px, {c.train_epochs} epochs ({da}), {len(x.fit)} images"


def _describe_select(x: FixContext) -> str:
    if x.holdout:
        where = f"on {len(x.holdout)} {x.chooser_words} (not the validation images)"
    elif x.rule == RULE_CROSS and len(x.candidates) > 1:
        where = (f"by two-fold cross-selection on the {len(x.val_index.samples)} validation photos (each half "
                 "reported by the other's choice)")
    else:
        where = "(nothing to choose)"
    return f"fix at every candidate size {','.join(map(str, x.candidates))}px, choose {where}"


def _describe_schedule(x: FixContext) -> str:
    return (f"fine-tuning rate x{'/'.join(f'{f:g}' for f in candidates.SCHEDULE_LR_FACTORS)} and epochs "
            f"x{'/'.join(map(str, candidates.SCHEDULE_EPOCH_FACTORS))} at {candidates.schedule_size(x)}px, chosen on "
            f"{len(x.holdout)} {x.chooser_words}")




def _describe_finetune(x: FixContext) -> str:
    c = x.config
    if c.label_free:
        return (f"{candidates.LABEL_FREE_METHOD} at {x.choice.test_size}px on unlabeled training images "
                f"({x.choice.reason})")
    return (f"the candidate fixed at {x.choice.test_size}px ({c.parts}, {x.schedule.epochs} epochs, "
            f"{c.augment} DA)" + (", temperature-scaled" if c.temperature_scale else "") + ", exported")


def _describe_robustness(x: FixContext) -> str:
    n = len(x.val_index.samples)
    m = min(n, x.config.robustness_images or n)
    return (f"top-1 under {len(CORRUPTIONS)} corruptions x {len(SEVERITIES)} severities on {m} of the {n} "
            "validation photos, fixed vs untuned")


def _analysis_line(an: Analysis) -> str:
    how = "eq. 5" if an.train_augment == "train" else f"trained with {an.train_augment}"
    sampled = f"; {an.sampled_ratio:.3f} sampled on these photos" if an.sampled_ratio else ""
    return (f"objects look {an.ratio:.3f}x as large at test as in training ({how}{sampled}); recommended test size "
            f"{an.recommended_test_size}px")


def _curve_lines(x: FixContext, sweep: Sweep) -> list[str]:
    return ["top-1: " + ", ".join(f"{r.test_size}px {r.top1:.1f}" for r in sorted(sweep.rows,
                                                                                 key=lambda r: r.test_size))]


def _schedule_lines(x: FixContext, sched: Schedule) -> list[str]:
    return [f"fine-tuning schedule: lr {sched.lr:g}, {sched.epochs} epochs ({sched.how})"]


def _choice_lines(x: FixContext, selected: Candidates) -> list[str]:
    return [f"served: {selected.choice.served}", f"chosen: {selected.choice.chosen_on}"]


def _given_schedule(x: FixContext) -> Schedule:
    return Schedule(lr=x.config.lr, epochs=x.config.finetune_epochs, how=_untuned_schedule_how(x))


def _label_free_choice(x: FixContext) -> Candidates:
    """Label-free: the given size, or the apparent-size recommendation (no labels read to choose it)."""
    c = x.config
    rec = x.results.analyze.recommended_test_size
    how = ("given (--test-size)" if c.test_size else
           "the apparent-size recommendation: it needs no labels, and it is the size at which objects "
           "look as large as in training (section 4.1)")
    return Candidates(None, Choice(test_size=c.test_size or rec, kind=None, method="label-free", reason=how,
                                   chosen_on=how, recommended=rec, n_images=0))


STEP_TABLE: tuple[Step, ...] = (
    Step("data", lambda x: "generating the embedded data set" if x.config.embedded else f"indexing {x.config.data}",
         keys.key_data, steps.run_data, resume=lambda x, doc: DataInfo.from_json(doc)),
    Step("train", _describe_train, keys.key_train, steps.run_train, applies=lambda x: x.needs_training,
         resume=lambda x, doc: TrainInfo.from_json(doc),
         skipped="the model has its weights"),
    Step("analyze", lambda x: "apparent object sizes on this data's photos", keys.key_analyze, steps.run_analyze,
         resume=lambda x, doc: Analysis.from_json(doc), announce=lambda x, an: [_analysis_line(an)]),
    Step("sweep_before", lambda x: f"top-1 at test sizes {','.join(map(str, x.test_sizes))}", keys.key_sweep_before,
         steps.run_sweep_before, resume=lambda x, doc: Sweep.from_json(doc), announce=_curve_lines),
    Step("schedule", _describe_schedule, keys.key_schedule, candidates.run_schedule, applies=tunes_schedule,
         resume=lambda x, doc: Schedule.from_json(doc), announce=_schedule_lines,
         skipped=lambda x: _untuned_schedule_how(x) if x.config.tune_schedule and x.config.lr is None
         else "fine-tuning rate and epochs as given", skip=_given_schedule),
    Step("select", _describe_select, keys.key_select, candidates.run_select, applies=lambda x: not x.config.label_free,
         resume=lambda x, doc: Candidates(doc, candidates.choose_after_fixing(x, doc)), announce=_choice_lines,
         skipped="label-free: the size is the analysis' recommendation", skip=_label_free_choice),
    Step("finetune", _describe_finetune, keys.key_finetune, steps.run_finetune,
         resume=lambda x, doc: FinetuneInfo.from_json(doc)),
    Step("sweep_after", lambda x: "the fixed model at every test size (each size's own fix, read from the candidates "
         "when every size was one)", keys.key_sweep_after, steps.run_sweep_after,
         resume=lambda x, doc: Sweep.from_json(doc), announce=_curve_lines),
    Step("stats", lambda x: f"pooled activations at {','.join(map(str, stats_sizes_of(x)))}px, before and after",
         keys.key_stats, steps.run_stats, resume=lambda x, doc: StatsInfo.from_json(doc)),
    Step("robustness", _describe_robustness, keys.key_robustness, steps.run_robustness,
         applies=lambda x: x.config.robustness, skipped="--no-robustness",
         resume=lambda x, doc: RobustnessTable.from_json(doc),
         announce=lambda x, table: verdicts(table)),
    Step("report", lambda x: "writing the HTML report", keys.key_report, steps.run_report, output="report/report.json",
         resume=steps.resume_report),
)
assert tuple(s.name for s in STEP_TABLE) == STEPS


def _execute(x: FixContext, i: int, step: Step, recomputed: dict) -> None:
    """Run ``step`` when its key changed (or it never finished), else read its result back; say which inputs
    changed. Either way its result joins ``x.results`` for the steps after it."""
    n = len(STEP_TABLE)
    if not step.applies(x):
        x.say(f"[{i}/{n}] {step.name}: skipped ({step.skipped(x) if callable(step.skipped) else step.skipped})")
        x.state.forget(step.name)
        setattr(x.results, step.name, step.skip(x))
        return
    key = step.key(x)
    x.keys[step.name] = key
    output = x.run_dir / (step.output or f"{step.name}.json")
    why = x.state.stale(step.name, key, output)
    document = read_document(output) if why is None else None
    if why is None and document is None:
        why = ["its result file could not be read"]
    if document is not None and not (step.name == "report" and x.state.ran):
        x.say(f"[{i}/{n}] {step.name}: {step.describe(x)} (done)")
        result = step.resume(x, document)
    else:
        result = _recompute(x, i, step, key, why or ["an earlier step was recomputed"], recomputed)
    setattr(x.results, step.name, result)
    for line in step.announce(x, result):
        x.say("  " + line)


def _recompute(x: FixContext, i: int, step: Step, key: dict, why: list[str], recomputed: dict):
    x.say(f"[{i}/{len(STEP_TABLE)}] {step.name}: {step.describe(x)}")
    if why != [NOT_RUN]:
        recomputed[step.name] = why
        plain = len(why) == 1 and " " in why[0]  # a reason, not input names
        x.say(f"  recomputing {step.name}: " + (why[0] if plain else "changed " + ", ".join(why)))
    if not x.state.partial_matches(step.name, key):
        for sub in STEP_FOLDERS.get(step.name, ()):  # a partial state of other inputs must not be resumed
            shutil.rmtree(x.run_dir / sub, ignore_errors=True)
    x.state.begin(step.name, key)
    t0 = time.perf_counter()
    result = step.run(x)
    # The result flows on as it would be read back: a fresh run and a resumed one see the same values.
    document = plain_json(result if isinstance(result, dict) else result.to_json())
    if step.output is None:
        write_json(x.run_dir / f"{step.name}.json", document)
    x.state.finish(step.name, key, time.perf_counter() - t0)
    return step.resume(x, document)


def _untuned_schedule_how(x: FixContext) -> str:
    c = x.config
    if c.lr is not None or not c.tune_schedule:
        return "given"
    if x.rule == RULE_CROSS:
        return ("the paper's default: a schedule tuned on the validation photos would be chosen on the photos "
                "reported (give --select-data to tune it)")
    return "default (no held-out images)"


# --------------------------------------------------------------------------- the job

def run_fix(config: FixConfig) -> FixRun:
    """Run (or resume) the whole method; returns what is served, the headline numbers, where the report is, and
    which steps were recomputed because their inputs changed."""
    t_job = time.perf_counter()
    x = FixContext(config=config, run_dir=Path(config.out),
                   say=lambda msg: prog.status(msg, enabled=config.progress))
    _check_config(config)
    _setup_runtime(x)
    if not config.embedded:  # a refused data set or model leaves no trace in the run folder
        x.index_data(Path(config.data))
        _build_model(x)
        x.assign_choosing_photos()
    _prepare_folder(x)
    recomputed: dict[str, list[str]] = {}
    _execute(x, 1, STEP_TABLE[0], recomputed)
    if config.embedded:
        x.index_data(Path(x.results.data.root))
        _build_model(x)
        x.assign_choosing_photos()
    print_plan(x)  # said only with progress; its probe also serves the select step's own estimate
    try:
        for i, step in enumerate(STEP_TABLE[1:], start=2):
            _execute(x, i, step, recomputed)
    finally:
        x.close_cut_cache()
    write_json(x.run_dir / "run.json", steps.run_info(x, _threads()))  # every step's time, the report's included
    r = x.results
    return FixRun(run_dir=x.run_dir, report=Path(r.report.html), export=x.run_dir / "export",
                  test_size=x.choice.test_size, headline=r.headline, choice=x.choice, recomputed=recomputed,
                  seconds=round(time.perf_counter() - t_job, 1), results=r)


def _threads() -> int:
    return torch.get_num_threads()


def _prepare_folder(x: FixContext) -> None:
    """--restart wipes the step results and working folders; then open (or start) ``state.json``."""
    run_dir = x.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a folder")
    if x.config.restart and run_dir.exists():
        for step in STEPS + ("export", "run"):  # robustness.json is a step's result too
            (run_dir / f"{step}.json").unlink(missing_ok=True)
        for sub in ("train", "finetune", "export", "report"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    x.state = RunState(run_dir, restart=x.config.restart)
    done = [s for s in STEPS if x.state.done(s)]
    if done:
        x.say(f"fixres fix: resuming {run_dir} (done before: {', '.join(done)}; steps whose inputs changed are redone)")


def _setup_runtime(x: FixContext) -> None:
    """Device and precisions (a device that is not there is refused before anything is written)."""
    c = x.config
    x.env = dist.DistEnv(device=dist.resolve_device(c.device))
    x.precision = engine.precision_for(x.env.device, amp=c.amp)
    # every accuracy in the run is measured as `fixres eval` measures it (inference precision)
    x.eval_precision = engine.inference_precision(x.env.device, c.amp)


def _build_model(x: FixContext) -> None:
    """The model, built once; the sizes to sweep follow from its train size and stride."""
    torch.manual_seed(x.config.seed)  # a model built from scratch starts from the same weights every run
    x.load_model()
    c = x.config
    x.swept_sizes = sorted(set(c.test_sizes or default_test_sizes(x.data_config.train_size, step=x.data_config.stride)))










def _check_config(config: FixConfig) -> None:
    if config.augment not in ("test", "test2", "train"):
        raise UsageError(f"unknown fine-tuning augmentation {config.augment!r}; choose test, test2 or train")
    if config.train_augment not in ("train", "control"):
        raise UsageError(f"unknown training augmentation {config.train_augment!r}; choose train or control")
    if config.data is not None:
        require(config.data)
    if config.select_data is not None:
        require(config.select_data, "--select-data folder")
    if config.select_data is not None and config.holdout_untouched:
        raise UsageError("--select-data and --holdout-untouched name two different photo sets to choose on: give one")
    if config.checkpoint is not None and not Path(config.checkpoint).exists():
        raise UsageError(f"checkpoint not found: {config.checkpoint}")
