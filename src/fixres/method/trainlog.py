"""A training epoch's record: its row of ``log.jsonl`` and of the saved state's log, and its status line."""

from __future__ import annotations

from dataclasses import dataclass

from fixres.io import schema


@dataclass
class EpochRecord:
    """One epoch's row of ``log.jsonl`` and of the state's log: what it trained, at what speed (ms per batch and
    their std, table 7), and its validation (the ``val_`` fields: top-1 per size, keyed by the size as text)."""
    epoch: int
    step: int = 0
    lr: float | None = None
    train_loss: float | None = None
    train_top1: float | None = None
    images: int = 0
    seconds: float = 0.0
    images_per_s: float | None = None
    forward_ms: float | None = None
    forward_ms_std: float | None = None
    backward_ms: float | None = None
    backward_ms_std: float | None = None
    optimizer_ms: float | None = None
    optimizer_ms_std: float | None = None
    local_batch: int | None = None
    val_top1: dict[str, float] | None = None
    val_top1_train_size: float | None = None
    val_top1_test_size: float | None = None
    val_n: int | None = None

    def to_dict(self) -> dict:
        """The row as written: an epoch that was not validated has no ``val_`` key at all."""
        row = schema.dump(self)
        return row if self.val_top1 is not None else {k: v for k, v in row.items() if not k.startswith("val_")}


def epoch_line(r: EpochRecord | dict, train_size: int, test_size: int) -> str:
    """The status line of an epoch (a row as written reads as an ``EpochRecord``)."""
    def pct(v):
        return "-" if v is None else f"{v:.1f}%"
    r = schema.parse(EpochRecord, r) if isinstance(r, dict) else r
    loss = "-" if r.train_loss is None else f"{r.train_loss:.3f}"
    val = ""
    if r.val_top1_train_size is not None or r.val_top1_test_size is not None:
        val = (f"val top-1 {pct(r.val_top1_train_size)} @{train_size}px, "
               f"{pct(r.val_top1_test_size)} @{test_size}px, ")
    return (f"epoch {r.epoch}: loss {loss}, train top-1 {pct(r.train_top1)}, {val}"
            f"{r.images_per_s or 0:.1f} img/s, fwd {r.forward_ms or 0:.1f} ms + bwd "
            f"{r.backward_ms or 0:.1f} ms per batch")
