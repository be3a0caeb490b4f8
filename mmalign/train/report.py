"""The human-readable part of a run directory: a summary table, training curves and before/after samples."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from mmalign.evaluation.samples import markdown_cell
from mmalign.train.logging import read_metrics


def smooth(values: list[float], window: int) -> list[float]:
    """Debiased exponential moving average with the span of a `window`-point rolling mean (β = 1 − 2/(window+1)).

    Debiasing (dividing by 1 − β^t, as TensorBoard does) keeps the first points from being pulled to zero.
    """
    beta = 1.0 - 2.0 / (max(window, 1) + 1)
    out, avg = [], 0.0
    for t, value in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * value
        out.append(avg / (1 - beta**t))
    return out


def held_out_series(
    rows: list[dict[str, Any]], summary: dict[str, Any] | None
) -> dict[str, list[tuple[int, float]]]:
    """Each held-out metric over training: the starting model's value at step 0 (summary `before`), the periodic
    `eval/*` rows, and the trained model's value at the last step (summary `after`)."""
    series: dict[str, dict[int, float]] = {}
    summary = summary or {}
    for key, value in (summary.get("before") or {}).items():
        if _plottable(value):
            series.setdefault(key, {})[0] = float(value)
    for row in rows:
        for key, value in row.items():
            if key.startswith("eval/") and _plottable(value):
                series.setdefault(key[len("eval/") :], {})[row["step"]] = float(value)
    for key, value in (summary.get("after") or {}).items():
        if _plottable(value):
            series.setdefault(key, {})[int(summary.get("steps", 0))] = float(value)
    skip = ("n_pairs", "n_prompts", "n_images", "n_samples", "_se")
    return {k: sorted(v.items()) for k, v in sorted(series.items()) if not k.endswith(skip)}


def _plottable(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_curves(run_dir: Path, out: Path, summary: dict[str, Any] | None = None) -> list[str]:
    """Training metrics (raw, faint, behind their moving average) and every held-out metric over training, from
    the starting model (step 0) to the trained one; returns the panel titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = sorted({k for r in rows for k in r if k.startswith("train/") and _plottable(r[k])})
    held_out = held_out_series(rows, summary)
    panels: list[tuple[str, str | None, list[tuple[int, float]]]]
    panels = [(f"held-out: {k}", None, pts) for k, pts in held_out.items()]
    panels += [(k, k, [(r["step"], r[k]) for r in rows if _plottable(r.get(k))]) for k in train]
    if not panels:
        return []
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    width, height = 3.2 * cols, 2.4 * nrows
    fig, axes = plt.subplots(nrows, cols, figsize=(width, height), squeeze=False)
    # fixed margins in inches: tight_layout measured every tick label and took most of a short run's report time
    fig.subplots_adjust(
        left=0.75 / width,
        right=1 - 0.2 / width,
        bottom=0.3 / height,
        top=1 - 0.3 / height,
        wspace=0.45,
        hspace=0.5,
    )
    for ax, (title, name, pts) in zip(axes.flat, panels, strict=False):
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        if name is None:  # held-out: few points, each one a measurement
            ax.plot(steps, values, marker="o", color="tab:green")
            for step, value, tag in ((steps[0], values[0], "before"), (steps[-1], values[-1], "after")):
                ax.annotate(
                    f"{tag} {value:.3g}", (step, value), fontsize=6, textcoords="offset points", xytext=(2, 4)
                )
        else:
            window = max(1, len(values) // 15)
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(values, window), color="tab:blue", linewidth=1.4)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.locator_params(nbins=4)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [title for title, *_ in panels]


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
        if plot_curves(run_dir, run_dir / "curves.png", summary):
            lines += [
                "",
                "## Training curves",
                "",
                "Held-out metrics from the starting model (step 0) to the trained one; training metrics raw (faint) "
                "and smoothed.",
                "",
                "![curves](curves.png)",
            ]
        if self.samples:
            lines += self.samples.sample_lines(samples)
        (run_dir / "report.md").write_text("\n".join(lines) + "\n")
