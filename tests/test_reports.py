"""Reports people look at: smoothed training curves over the raw ones, held-out metrics from before to after,
labelled before/after image grids, and trackers that get the hyperparameters with the before/after metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.core.config import apply_overrides
from mmalign.run import build_run
from mmalign.train.report import RunReport, held_out_series, plot_curves, smooth
from mmalign.train.trainer import Trainer


def test_smooth_is_the_debiased_exponential_average():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40).tolist()
    window = 5
    beta = 1 - 2 / (window + 1)
    # debiased EMA = average of the points so far, weighted β^(age)
    expected = [
        sum(beta ** (t - i) * x[i] for i in range(t + 1)) / sum(beta ** (t - i) for i in range(t + 1))
        for t in range(len(x))
    ]
    assert smooth(x, window) == pytest.approx(expected)
    assert smooth([3.0] * 7, 4) == pytest.approx([3.0] * 7)  # no pull towards zero at the start
    assert smooth(x, 1) == pytest.approx(x)


def test_held_out_series_runs_from_before_to_after():
    rows = [
        {"step": 1, "train/loss": 0.7},
        {"step": 5, "eval/reward": 0.4, "eval/n_pairs": 8},
        {"step": 10, "eval/reward": 0.6, "eval/reward_agreement_gain_se": 0.01},
    ]
    summary = {"steps": 12, "before": {"reward": 0.3, "n_pairs": 8}, "after": {"reward": 0.7}}
    series = held_out_series(rows, summary)
    assert series == {"reward": [(0, 0.3), (5, 0.4), (10, 0.6), (12, 0.7)]}


def test_curves_show_training_and_held_out_panels(tmp_path):
    rows = [{"step": s, "train/loss": 1 / s, "train/lr": 1e-3} for s in range(1, 31)]
    rows[9]["eval/accuracy"] = 0.6
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"steps": 30, "wall_time_s": 1.0, "before": {"accuracy": 0.5}, "after": {"accuracy": 0.8}}
    titles = plot_curves(tmp_path, tmp_path / "curves.png", summary)
    assert titles == ["held-out: accuracy", "train/loss", "train/lr"]
    assert Image.open(tmp_path / "curves.png").size[0] > 0
    RunReport().write(tmp_path, summary, {})
    report = (tmp_path / "report.md").read_text()
    assert "| accuracy | 0.5 | 0.8 |" in report and "![curves](curves.png)" in report


class _Reading:
    """A stand-in reward that says which column/seed it read, to check every label lands under its image."""

    name = "judge"

    def readings(self, prompts, images):
        return [f"{p[:3]}@{float(img.mean()):+.2f}" for p, img in zip(prompts, images, strict=True)]


def test_image_report_is_a_labelled_before_after_grid(tmp_path):
    from mmalign.vision.report import CELL, ImageSamples

    prompts = ["a one", "a two", "a handwritten seven drawn with a thick pen"]
    samples = [
        {"prompt": p, "seed": s, "image": torch.full((3, 16, 16), (s - 1) / 2)}
        for s in range(2)
        for p in prompts
    ]
    report = ImageSamples([_Reading()])
    before = report.store_samples(tmp_path, "before", samples)
    after = report.store_samples(tmp_path, "after", samples)
    assert [(r["prompt"], r["seed"]) for r in after] == [(s["prompt"], s["seed"]) for s in samples]
    assert after[0]["reading"] == "a o@-0.50" and after[-1]["reading"] == "a h@+0.00"
    grid = Image.open(tmp_path / "samples_after.png")
    assert grid.width >= 3 * CELL and grid.height >= 2 * CELL  # three prompt columns, two seed rows
    both = Image.open(tmp_path / "samples_before_after.png")
    assert both.height > 2 * grid.height - 1 and both.width == grid.width
    # seed 0 images are dark (−0.5 → 64), seed 1 mid-grey: the first image cell is dark in the grid
    pixel = np.asarray(grid.convert("L"))[grid.height // 4, 80]
    assert pixel < 100
    lines = report.sample_lines({"before": before, "after": after})
    assert "![before and after](samples_before_after.png)" in lines and any("judge reads" in x for x in lines)


def test_classifier_readings_name_the_class_it_sees():
    from mmalign.evaluation.classifier import ConvClassifier, ConvClassifierConfig, PromptedClassReward

    torch.manual_seed(0)
    reward = PromptedClassReward(ConvClassifier(ConvClassifierConfig(image_size=16)))
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    prompts = ["a seven", "a one", "a 4"]
    readings = reward.readings(prompts, images)
    predicted = reward.classifier.predict(images).tolist()
    probs = reward(prompts, images).tolist()
    assert readings == [f"reads {c}, p={p:.2f}" for c, p in zip(predicted, probs, strict=True)]


def test_tensorboard_gets_hyperparameters_and_before_after_and_wandb_is_never_imported(
    tiny_recipe, tmp_path, monkeypatch
):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # a `wandb` on the path that records being imported: only a recipe naming it may import it
    fake = tmp_path / "fake"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    recipe = apply_overrides(
        tiny_recipe,
        [
            "train.max_steps=2",
            "train.save_every=0",
            "eval.prompts=null",
            "eval.rewards=[]",
            "train.log_with=[tensorboard]",
        ],
    )
    policy, algorithm, cfg, evaluator, report = build_run(recipe)
    build_run(apply_overrides(recipe, ["train.log_with=[wandb]"]))  # checked as installed, not imported
    run = tmp_path / "run"
    summary = Trainer(
        policy,
        algorithm,
        cfg,
        run,
        evaluator=evaluator,
        report=report,
        hparams={"algorithm.beta": 0.5, "x": [1]},
    ).train()
    assert not (tmp_path / "imported").exists() and "wandb" not in sys.modules

    (main_dir,) = [p.parent for p in run.rglob("events.out.tfevents.*") if "hparams" not in str(p)]
    scalars = EventAccumulator(str(main_dir))
    scalars.Reload()
    points = [(e.step, e.value) for e in scalars.Scalars("eval/preference_accuracy")]
    assert points == [
        (0, pytest.approx(summary["before"]["preference_accuracy"])),
        (2, pytest.approx(summary["after"]["preference_accuracy"])),
    ]
    (hparams_dir,) = {p.parent for p in run.rglob("events.out.tfevents.*") if "hparams" in str(p)}
    table = EventAccumulator(str(hparams_dir))
    table.Reload()
    assert set(table.Tags()["scalars"]) >= {"before/preference_accuracy", "after/preference_accuracy"}
    plugin = table.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    assert b"algorithm.beta" in plugin and b"[1]" in plugin  # a list is written as its string
    assert Path(run / "report.md").exists()
