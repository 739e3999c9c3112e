"""The state of a resumable multi-step job (``state.json``): which steps finished, on which inputs.

Every step is recorded with its *key*: the named inputs its result depends on (settings, content
hashes of the checkpoint and the data index, and the keys of the steps upstream of it). A step is
up to date when it finished with the key it would be computed with now; otherwise ``stale`` names
the inputs that changed, and the caller recomputes it. A step that started but did not finish
keeps its key too, so an interrupted step resumes only when its inputs are still the same.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from fixres.io.atomic import write_json
from fixres.io.schema import dump, parse_or_none
from fixres.job.fingerprint import canonical, changed_keys

STATE_NAME = "state.json"
STATE_VERSION = 2
#: Reasons reported instead of input names.
NOT_RUN = "not run yet"
OLD_STATE = "state written by an older fixres"
OUTPUT_MISSING = "its result file is missing"


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


@dataclass(frozen=True)
class StepRecord:
    """One step's record: whether it finished, the key it ran with, how long it took and when."""

    done: bool = False
    key: object = None
    seconds: float | None = None
    started: str | None = None
    finished: str | None = None


@dataclass(frozen=True)
class StateDocument:
    """``state.json`` as written: its format version, when the run started, every step's record."""

    version: int | None = None
    started: str | None = None
    steps: dict[str, StepRecord] = field(default_factory=dict)


class RunState:
    """``state.json`` of a run folder; written atomically after every change."""

    def __init__(self, run_dir: Path, *, restart: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STATE_NAME
        doc = None
        if self.path.is_file() and not restart:
            try:
                doc = parse_or_none(StateDocument, json.loads(self.path.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError):
                doc = None
        self.old_format = doc is not None and doc.version != STATE_VERSION
        if doc is None or self.old_format:
            doc = StateDocument(version=STATE_VERSION, started=_now())
        self.ran: list[str] = []  # steps computed in this call
        self.started = doc.started
        self.steps: dict[str, StepRecord] = dict(doc.steps)

    def record(self, step: str) -> StepRecord | None:
        return self.steps[step] if step in self.steps else None

    def done(self, step: str) -> bool:
        rec = self.record(step)
        return rec is not None and rec.done

    def stale(self, step: str, key: dict, output: Path | None) -> list[str] | None:
        """None when ``step`` finished with this key (and its output exists); else why it must run."""
        rec = self.record(step)
        if rec is None:
            return [OLD_STATE] if self.old_format else [NOT_RUN]
        changed = changed_keys(rec.key, canonical(key))
        if changed:
            return changed
        if not rec.done:
            return [NOT_RUN]
        if output is not None and not output.is_file():
            return [OUTPUT_MISSING]
        return None

    def partial_matches(self, step: str, key: dict) -> bool:
        """True when an unfinished earlier attempt of ``step`` had the same inputs (safe to resume)."""
        rec = self.record(step)
        return rec is not None and not rec.done and not changed_keys(rec.key, canonical(key))

    def begin(self, step: str, key: dict) -> None:
        self.steps[step] = StepRecord(done=False, key=canonical(key), started=_now())
        self.save()

    def finish(self, step: str, key: dict, seconds: float) -> None:
        self.ran.append(step)
        self.steps[step] = StepRecord(done=True, key=canonical(key), seconds=round(float(seconds), 3),
                                      finished=_now())
        self.save()

    def forget(self, step: str) -> None:
        """Drop a step's record (it does not apply to this run)."""
        if self.steps.pop(step, None) is not None:
            self.save()

    def timings(self) -> dict:
        return {k: v.seconds for k, v in self.steps.items() if v.done}

    def save(self) -> None:
        write_json(self.path, dump(StateDocument(version=STATE_VERSION, started=self.started, steps=self.steps)))
