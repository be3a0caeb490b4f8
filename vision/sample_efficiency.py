"""Held-out agreement against reward-scored samples, for runs of any diffusion method (DDPO vs reward backprop).

    python vision/sample_efficiency.py runs/ddpo runs/alignprop runs/draft-k ... -o sample_efficiency.png \
        [--metric eval/digit_judge_agreement]

Each run directory gives its resolved `recipe.yaml`, `before.json` (step 0) and the `eval/<metric>` rows of its
`metrics.jsonl` (recipes with `train.eval_every`) and `summary.json` (the end). The x axis counts the samples the
training reward scored: a policy-gradient rollout scores `batch_size` samples once every `ppo_epochs` steps; a
reward-backprop step scores `batch_size` × `last_step_repeats` (DRaFT-LV scores every repeat). The table printed
to stdout has the same points.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def samples_per_step(recipe: dict) -> float:
    """Reward-scored samples per optimizer step of the run a recipe describes."""
    train, algorithm = recipe.get("train") or {}, recipe.get("algorithm") or {}
    batch = train.get("batch_size", 32)
    if algorithm.get("name") in ("alignprop", "draft", "draft_lv", "refl"):
        repeats = algorithm.get("last_step_repeats", 2 if algorithm["name"] == "draft_lv" else 1)
        return batch * repeats
    return batch / train.get("ppo_epochs", 1)


def curve(run: Path, metric: str) -> tuple[str, list[tuple[float, float]], float]:
    """(label, [(samples, metric)], training seconds without held-out evaluation) of one run directory."""
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    per_step = samples_per_step(recipe)
    key = metric.removeprefix("eval/")
    points = [(0.0, json.loads((run / "before.json").read_text())["metrics"][key])]
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if metric in row:
            points.append((row["step"] * per_step, row[metric]))
    summary = json.loads((run / "summary.json").read_text())
    points.append((summary["steps"] * per_step, summary["after"][key]))
    return run.name, sorted(set(points)), summary.get("train_time_s", summary["wall_time_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("-o", "--out", type=Path, default=Path("sample_efficiency.png"))
    parser.add_argument("--metric", default="eval/digit_judge_agreement")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    print(f"| run | reward-scored samples → {args.metric} | train s |\n| --- | --- | ---: |")
    for run in args.runs:
        label, points, wall = curve(run, args.metric)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
        print(f"| {label} | {', '.join(f'{x:.0f}: {y:.3f}' for x, y in points)} | {wall:.0f} |")
    ax.set_xscale("symlog", linthresh=64)
    ax.set_xlabel("reward-scored samples")
    ax.set_ylabel(args.metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
