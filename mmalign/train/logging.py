"""metrics.jsonl on disk plus any accelerate trackers (TensorBoard, W&B) the recipe asks for, and `run.log`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmalign.train.run_dir import RunDirError, atomic_path, log_event

if TYPE_CHECKING:
    from accelerate import Accelerator


class MetricsFileError(RunDirError, ValueError):
    """A line of metrics.jsonl other than the last is not JSON: the file was edited or damaged, not cut by a kill."""


class MetricsLogger:
    """Append one JSON object per logged step to `metrics.jsonl` (main process only)."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, trackers: list[str]):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.trackers = bool(trackers)
        if self.trackers:
            accelerator.init_trackers(run_dir.name)

    def resume_at(self, step: int) -> None:
        """Forget rows after `step` (the steps a resumed run redoes) and a partial last line (a kill mid-write)."""
        if self.accelerator.is_main_process:
            truncate_metrics(self.path, step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process or not metrics:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.trackers:
            self.accelerator.log(metrics, step=step)

    def event(self, message: str) -> None:
        """Say what happened to the run directory: printed once and kept in `run.log`."""
        self.accelerator.print(f"mmalign: {message}")
        if self.accelerator.is_main_process:
            log_event(self.run_dir, message)

    def held_out(self, step: int, metrics: dict[str, float]) -> None:
        """Held-out metrics of the starting (step 0) or final model: trackers only, as `eval/*` points at that step,
        so a tracker's held-out curves begin at the base model and end at the trained one (metrics.jsonl keeps
        them in before.json and summary.json)."""
        if self.trackers and self.accelerator.is_main_process and metrics:
            self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)

    def hyperparameters(
        self, hparams: dict[str, Any], before: dict[str, float], after: dict[str, float]
    ) -> None:
        """The run's settings with its before/after held-out metrics: TensorBoard's HPARAMS table and W&B's
        config and summary. Values that are not numbers, strings or booleans are written as strings."""
        if not (self.trackers and self.accelerator.is_main_process):
            return
        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
        results = {f"before/{k}": v for k, v in before.items()} | {f"after/{k}": v for k, v in after.items()}
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_hparams(flat, results, run_name="hparams")
                tracker.writer.flush()
            elif tracker.name == "wandb":
                tracker.run.config.update(flat, allow_val_change=True)
                tracker.run.summary.update(results)

    def close(self) -> None:
        if self.trackers:
            self.accelerator.end_training()


def _complete_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file; an unfinished last line (a kill mid-write) is dropped, any other bad line is an
    error naming it."""
    *lines, last = path.read_text().split("\n")  # `last` is "" when the file ends with a newline
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise MetricsFileError(
                    f"{path}, line {number}: not a JSON row ({err}); fix or remove that line, or start over with "
                    "train.resume=false"
                ) from None
    with contextlib.suppress(ValueError):  # a last line cut short by a kill: its step is redone on resume
        rows.append(json.loads(last))
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Rewrite `metrics.jsonl` with only its complete rows of steps ≤ `step` (atomically)."""
    if not path.exists():
        return
    keep = [row for row in _complete_rows(path) if row["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of a run's metrics.jsonl; on resume, the rows of a step logged twice keep the latest."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows: dict[tuple[int, tuple[str, ...]], dict[str, Any]] = {}
    for row in _complete_rows(path):
        rows[(row["step"], tuple(sorted(row)))] = row
    return sorted(rows.values(), key=lambda r: r["step"])
