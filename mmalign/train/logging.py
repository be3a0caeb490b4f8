"""metrics.jsonl on disk plus any accelerate trackers (TensorBoard, W&B) the recipe asks for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator


class MetricsLogger:
    """Append one JSON object per logged step to `metrics.jsonl` (main process only)."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, trackers: list[str]):
        self.accelerator = accelerator
        self.path = run_dir / "metrics.jsonl"
        self.trackers = bool(trackers)
        if self.trackers:
            accelerator.init_trackers(run_dir.name)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process or not metrics:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.trackers:
            self.accelerator.log(metrics, step=step)

    def close(self) -> None:
        if self.trackers:
            self.accelerator.end_training()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of a run's metrics.jsonl; on resume, the rows of a step logged twice keep the latest."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows: dict[tuple[int, tuple[str, ...]], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[(row["step"], tuple(sorted(row)))] = row
    return sorted(rows.values(), key=lambda r: r["step"])
