"""The method × model matrix, run: every algorithm on every model kind it fits, through the path `mmalign train` takes.

For each fitting cell of the registries, a recipe is assembled from the model kind's tiny recipe (seconds-fast zoo
worlds) and the algorithm's tiny settings, then built with `mmalign.run.build_run` (recipe → checks → model →
algorithm → evaluator), trained for 2 steps and evaluated before and after. A cell that does not fit must say why.
"""

from __future__ import annotations

import json
import math

import pytest

from mmalign import plugins
from mmalign.core.registry import ALGORITHMS, DATA_KEYS, MODEL_KINDS, why_not
from mmalign.methods_table import matrix_markdown

plugins.load()


def _cells() -> list[tuple[str, str]]:
    return [
        (name, kind)
        for name in sorted(ALGORITHMS)
        for kind in sorted(MODEL_KINDS)
        if why_not(name, MODEL_KINDS[kind]) is None
    ]


def _recipe(name: str, kind_name: str) -> dict:
    kind = MODEL_KINDS[kind_name]
    spec = ALGORITHMS[name][kind.policy_kind]
    tiny = kind.tiny()
    algorithm = {"name": name, **dict(spec.tiny)}
    if spec.online:
        algorithm["reward"] = tiny["reward"]
    data = {DATA_KEYS[d]: tiny["data"][d] for d in spec.data}
    if name == "dlpo" and "targets" in tiny["data"]:
        algorithm["diffusion_loss_on"] = "data"
        data["targets"] = tiny["data"]["targets"]
    return {
        "seed": 0,
        "model": tiny["model"],
        "data": data,
        "algorithm": algorithm,
        "eval": tiny["eval"],
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-4, "progress": False, "save_every": 0},
    }


def test_every_cell_that_does_not_fit_says_why():
    table = matrix_markdown(reasons=True)
    for name in ALGORITHMS:
        for kind in MODEL_KINDS.values():
            reason = why_not(name, kind)
            assert reason is None or (reason and f"- {name} × {kind.name}: {reason}" in table)


def test_the_matrix_covers_the_cells_the_issue_names():
    cells = set(_cells())
    for name in ("dpo", "ipo", "kto", "sft", "online_dpo", "rloo", "grpo"):
        assert (name, "causal_lm") in cells and (name, "vlm") in cells, name
    for name in ("ddpo", "dpok", "dlpo", "grpo", "dpo", "diffusion_dpo", "online_diffusion_dpo"):
        assert (name, "diffusion_image") in cells and (name, "diffusion_speech") in cells, name
    assert ("povid", "vlm") in cells and ("povid", "causal_lm") not in cells
    assert ("reward_model", "reward_model") in cells and ("reward_model", "image_reward_model") in cells


@pytest.mark.matrix
@pytest.mark.parametrize("name, kind", _cells(), ids=[f"{n}-{k}" for n, k in _cells()])
def test_cell_trains_through_the_recipe_path(name, kind, mmalign_home, tmp_path, monkeypatch):
    from mmalign.run import build_run
    from mmalign.train import report
    from mmalign.train.trainer import Trainer

    # drawing curves.png took most of a 2-step cell's time; the report's curves are tested in test_reports.py
    monkeypatch.setattr(report, "plot_curves", lambda *args, **kwargs: [])

    if MODEL_KINDS[kind].tiny is None:
        pytest.fail(f"model kind {kind} registers no tiny recipe, so its cells cannot run here")
    recipe = _recipe(name, kind)
    run = build_run(recipe)
    summary = Trainer(
        run.policy, run.algorithm, run.train, tmp_path / "run", evaluator=run.evaluator, report=run.report
    ).train()
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    if run.evaluator is not None:
        assert summary["before"] and set(summary["before"]) == set(summary["after"])
        for judge in recipe["eval"].get("judges", []):  # a judge the recipe names is reported, never dropped
            assert f"{judge['name']}_agreement" in summary["after"], (judge, sorted(summary["after"]))
    assert (tmp_path / "run" / "final").exists() and (tmp_path / "run" / "report.md").exists()
