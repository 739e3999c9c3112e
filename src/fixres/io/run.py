"""A ``fixres fix`` run's results as they flow from step to step (``FixResults``: each step's result as its type,
its JSON file only the serialisation, read back on resume) and what the run returns (``FixRun``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fixres.io.documents import DataInfo, FinetuneInfo, ReportInfo, RobustnessTable, StatsInfo, TrainInfo
from fixres.io.results import STEP_FILES, Analysis, Headline, Schedule, Sweep
from fixres.io.served import Candidates, Choice


@dataclass
class FixResults:
    """Every step's result of one run, filled as the steps run (or, resuming, as their files are read)."""

    data: DataInfo | None = None
    train: TrainInfo | None = None
    analyze: Analysis | None = None
    sweep_before: Sweep | None = None
    schedule: Schedule | None = None
    select: Candidates | None = None
    finetune: FinetuneInfo | None = None
    #: export.json: where the fixed model was written
    export: dict | None = None
    sweep_after: Sweep | None = None
    stats: StatsInfo | None = None
    robustness: RobustnessTable | None = None
    headline: Headline | None = None
    report: ReportInfo | None = None

    def documents(self) -> dict[str, dict]:
        """The step results present, as the JSON documents their files hold, by step name."""
        out = {}
        for name in STEP_FILES:
            value = getattr(self, name, None)
            doc = value if isinstance(value, dict) or value is None else value.to_json()
            if doc is not None:
                out[name] = doc
        return out


@dataclass(frozen=True)
class FixRun:
    """What ``fixres fix`` produced: what is served at which size and why, the headline numbers, where the files
    are, which steps were recomputed because their inputs changed ({step: [changed inputs]}), and every step's
    result."""

    run_dir: Path
    report: Path
    export: Path
    test_size: int
    headline: Headline
    choice: Choice
    recomputed: dict = field(default_factory=dict)
    seconds: float = 0.0
    results: FixResults | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"run_dir": str(self.run_dir), "report": str(self.report), "export": str(self.export),
                "test_size": self.test_size, "headline": self.headline.to_json(), "choice": self.choice.to_json(),
                "recomputed": self.recomputed, "seconds": self.seconds}
