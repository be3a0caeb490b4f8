"""The human-readable part of a run directory: a summary table, training curves and before/after samples."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from mmalign.evaluation.samples import markdown_cell
from mmalign.train.logging import read_metrics


def plot_curves(run_dir: Path, out: Path) -> list[str]:
    """One small panel per logged metric; returns the metric names plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    names = sorted({k for r in rows for k in r if k != "step" and isinstance(r[k], (int, float))})
    names = [n for n in names if not n.endswith(("n_pairs", "n_prompts"))]
    if not names:
        return []
    cols = min(4, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        pts = [(r["step"], r[name]) for r in rows if name in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return names


class SampleSection(Protocol):
    """The modality's part of a report: how samples are stored as files and shown in report.md."""

    def store_samples(
        self, run_dir: Path, tag: str, samples: list[dict[str, Any]]
    ) -> list[dict[str, Any]]: ...

    def sample_lines(self, samples: dict[str, list[dict[str, Any]]]) -> list[str]: ...


class RunReport:
    """Markdown report: summary table, training curves and the modality's before/after samples."""

    def __init__(self, samples: SampleSection | None = None):
        self.samples = samples

    def store_samples(self, run_dir: Path, tag: str, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Make samples JSON-safe (e.g. images saved as files, their paths kept)."""
        return self.samples.store_samples(run_dir, tag, samples) if self.samples else samples

    def write(self, run_dir: Path, summary: dict[str, Any], samples: dict[str, list[dict[str, Any]]]) -> None:
        lines = [
            f"# Run report: {run_dir.name}",
            "",
            f"{summary['steps']} steps in {summary['wall_time_s']} s.",
            "",
        ]
        lines += ["| metric | before | after |", "|---|---|---|"]
        for key in summary["before"]:
            lines.append(
                f"| {key} | {markdown_cell(summary['before'][key])} | {markdown_cell(summary['after'].get(key, ''))} |"
            )
        if plot_curves(run_dir, run_dir / "curves.png"):
            lines += ["", "## Training curves", "", "![curves](curves.png)"]
        if self.samples:
            lines += self.samples.sample_lines(samples)
        (run_dir / "report.md").write_text("\n".join(lines) + "\n")
