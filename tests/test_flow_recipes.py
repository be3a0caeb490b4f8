"""The shipped flow recipes (vision/flow_grpo.yaml, flow_grpo_fast.yaml, flow_nft.yaml) through the real recipe path:
the file is read with `load_recipe` and `--set`-style overrides that point its model, prompts and scorers at the
seconds-fast `image-flow-tiny` world and shrink the batch, then `build_run` and the `Trainer` run 2 optimizer
steps. Every other setting (sampler, SDE type and noise level, window, advantages, clipping, KL, lr) is the
recipe's own."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmalign.core.config import load_recipe
from mmalign.core.data import rows_from_records
from mmalign.run import build_run
from mmalign.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
W = "zoo://image-flow-tiny"
TINY = [
    f"model.name_or_path={W}/base",
    f"data.prompts={W}/train_prompts.jsonl",
    f"algorithm.reward={{name: digit_classifier, path: {W}/classifier}}",
    "algorithm.samples_per_prompt=2",
    f"eval.prompts={W}/eval_prompts.jsonl",
    f"eval.rewards=[{{name: digit_classifier, path: {W}/classifier}}]",
    "eval.judges=[{name: digit_judge, path: zoo://image-tiny/judge}]",  # the tiny flow world's judge
    "eval.seeds=1",
    "eval.n_samples=2",
    "train.max_steps=2",
    "train.batch_size=4",
    "train.eval_every=0",
    "train.save_every=0",
    "train.log_with=[]",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def flow_tiny(mmalign_home):
    from filelock import FileLock

    from mmalign.zoo import registry

    with FileLock(str(mmalign_home) + ".lock"):
        return registry.build("image-flow-tiny", log=lambda *_: None)


def _train(recipe_file: str, tmp_path: Path, extra: tuple[str, ...] = ()):
    recipe = load_recipe(ROOT / "vision" / recipe_file, [*TINY, *extra])
    run = build_run(recipe)
    before = {n: p.detach().clone() for n, p in run.policy.trainable_state_dict().items()}
    summary = Trainer(
        run.policy, run.algorithm, run.train, tmp_path, evaluator=run.evaluator, report=run.report
    ).train()
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    moved = max((p - before[n]).abs().max().item() for n, p in run.policy.trainable_state_dict().items())
    return recipe, run, summary, log, moved


def _trained_steps(run) -> list[int]:
    """The sampler steps one more rollout of 2 prompts records for training."""
    rows = rows_from_records([{"prompt": "the digit seven"}, {"prompt": "the digit two"}])
    batch, _ = run.algorithm.rollout(rows)
    return batch["steps"][0].tolist()


def _check_common(recipe, run, summary, log, moved):
    steps = [m for m in log if "train/loss" in m]
    assert summary["steps"] == 2 and len(steps) == 2
    assert all(math.isfinite(m["train/loss"]) and m["train/grad_norm"] > 0 for m in steps)
    assert moved > 0  # 2 optimizer steps at the recipe's lr changed the transformer
    assert (
        run.train.lr == recipe["train"]["lr"] and run.policy.sampler.num_steps == recipe["model"]["num_steps"]
    )
    for when in ("before", "after"):  # the held-out evaluation ran with the classifier and the judge
        assert 0 <= summary[when]["digit_classifier_agreement"] <= 1
        assert 0 <= summary[when]["digit_judge_agreement"] <= 1
    assert run.policy.eval_sampler.sde_type == "ode"


def test_flow_grpo_recipe_trains_on_the_tiny_flow_world(flow_tiny, tmp_path):
    recipe, run, summary, log, moved = _train("flow_grpo.yaml", tmp_path)
    _check_common(recipe, run, summary, log, moved)
    sampler = run.policy.sampler
    assert sampler.sde_type == "flow_grpo" and sampler.noise_level == pytest.approx(0.7)
    assert tuple(run.algorithm.config.train_step_range) == (0.0, 0.5) and run.algorithm.config.kl_coef == 0.04
    steps = [m for m in log if "train/loss" in m]
    assert all(0 <= m["train/clip_fraction"] <= 1 and m["train/kl"] >= 0 for m in steps)
    assert _trained_steps(run) == [0, 1, 2, 3, 4]  # the 5 noisiest of 10 steps


def test_flow_grpo_fast_recipe_trains_only_its_sde_window(flow_tiny, tmp_path):
    recipe, run, summary, log, moved = _train("flow_grpo_fast.yaml", tmp_path)
    _check_common(recipe, run, summary, log, moved)
    assert run.algorithm.config.sde_window_size == 2
    trained = _trained_steps(run)  # the window's 2 consecutive steps, starting at step 0, 1 or 2
    assert len(trained) == 2 and trained[1] == trained[0] + 1 and 0 <= trained[0] <= 2


def test_flow_nft_recipe_trains_cfg_free_on_ode_samples(flow_tiny, tmp_path):
    recipe, run, summary, log, moved = _train("flow_nft.yaml", tmp_path)
    _check_common(recipe, run, summary, log, moved)
    assert run.policy.sampler.sde_type == "ode"  # NFT samples its rollouts with the ODE: no log-probs
    assert torch.isfinite(torch.tensor([m["train/loss"] for m in log if "train/loss" in m])).all()


def test_eval_by_prompt_traces_the_held_out_totals_to_prompts(flow_tiny, capsys):
    """`mmalign eval RECIPE --by-prompt` scores the images `mmalign eval` scores: its rows, weighted by their
    seeds, give the whole-set agreement, and each row's judge readings count its seeds."""
    from mmalign.cli import main

    argv = ["eval", str(ROOT / "vision" / "flow_grpo.yaml"), *(a for s in TINY for a in ("--set", s))]
    argv += ["--set", "eval.seeds=3"]
    capsys.readouterr()
    assert main(argv) == 0
    totals = json.loads(capsys.readouterr().out)
    assert main([*argv, "--by-prompt"]) == 0
    rows = json.loads(capsys.readouterr().out)
    prompts = [
        json.loads(line)["prompt"] for line in (flow_tiny / "eval_prompts.jsonl").read_text().splitlines()
    ]
    assert [r["prompt"] for r in rows] == prompts and all(r["n"] == 3 for r in rows)
    for name in ("digit_classifier", "digit_judge"):
        mean = sum(r[f"{name}_agreement"] for r in rows) / len(rows)
        assert mean == pytest.approx(totals[f"{name}_agreement"])
        assert all(sum(r[f"{name}_reads"].values()) == 3 for r in rows)
