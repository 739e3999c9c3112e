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
from pathlib import Path

from fixres.io.atomic import write_json
from fixres.job.fingerprint import canonical, changed_keys

STATE_NAME = "state.json"
STATE_VERSION = 2
#: Reasons reported instead of input names.
NOT_RUN = "not run yet"
OLD_STATE = "state written by an older fixres"
OUTPUT_MISSING = "its result file is missing"


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


class RunState:
    """``state.json`` of a run folder; written atomically after every change."""

    def __init__(self, run_dir: Path, *, restart: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STATE_NAME
        state = None
        if self.path.is_file() and not restart:
            try:
                state = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                state = None
        self.old_format = isinstance(state, dict) and state.get("version") != STATE_VERSION
        if not isinstance(state, dict) or self.old_format:
            state = None
        self.ran: list[str] = []  # steps computed in this call
        self.state = state or {"version": STATE_VERSION, "steps": {}, "started": _now()}

    def record(self, step: str) -> dict:
        return self.state["steps"].get(step) or {}

    def stale(self, step: str, key: dict, output: Path | None) -> list[str] | None:
        """None when ``step`` finished with this key (and its output exists); else why it must run."""
        rec = self.record(step)
        if not rec:
            return [OLD_STATE] if self.old_format else [NOT_RUN]
        changed = changed_keys(rec.get("key"), canonical(key))
        if changed:
            return changed
        if not rec.get("done"):
            return [NOT_RUN]
        if output is not None and not output.is_file():
            return [OUTPUT_MISSING]
        return None

    def partial_matches(self, step: str, key: dict) -> bool:
        """True when an unfinished earlier attempt of ``step`` had the same inputs (safe to resume)."""
        rec = self.record(step)
        return bool(rec) and not rec.get("done") and not changed_keys(rec.get("key"), canonical(key))

    def begin(self, step: str, key: dict) -> None:
        self.state["steps"][step] = {"done": False, "key": canonical(key), "started": _now()}
        self.save()

    def finish(self, step: str, key: dict, seconds: float) -> None:
        self.ran.append(step)
        self.state["steps"][step] = {"done": True, "key": canonical(key), "seconds": round(float(seconds), 3),
                                     "finished": _now()}
        self.save()

    def forget(self, step: str) -> None:
        """Drop a step's record (it does not apply to this run)."""
        if self.state["steps"].pop(step, None) is not None:
            self.save()

    def timings(self) -> dict:
        return {k: v["seconds"] for k, v in self.state["steps"].items() if v.get("done")}

    def save(self) -> None:
        write_json(self.path, self.state)
