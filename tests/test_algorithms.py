"""Every algorithm improves what it optimises on the tiny text world, end to end through build_run + Trainer.

The tiny world's 1-layer model generalises weakly to held-out problems in a few steps, so most preference tests
train on 32 pairs and measure those same pairs (the algorithm's own objective), plus held-out checks for DPO and
the reward model where the held-out effect is large enough to be robust.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from mmalign.core.config import RecipeError
from mmalign.run import build_run
from mmalign.train.logging import read_metrics
from mmalign.train.trainer import Trainer


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tiny_world, tmp_path_factory) -> dict[str, str]:
    """Small training files derived from the world: 32 pairs, their unpaired (KTO) form, SFT rows."""
    out = tmp_path_factory.mktemp("algorithm-data")
    pairs = _read_jsonl(tiny_world / "train_pairs.jsonl")[:32]
    prompts = _read_jsonl(tiny_world / "train_prompts.jsonl")[:32]
    kto = []
    for row in pairs[:16]:
        kto.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        kto.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return {
        "pairs": _write_jsonl(out / "pairs.jsonl", pairs),
        "pairs16": _write_jsonl(out / "pairs16.jsonl", pairs[:16]),
        "kto": _write_jsonl(out / "kto.jsonl", kto),
        "sft": _write_jsonl(out / "sft.jsonl", [{**r, "completion": r["answer"]} for r in prompts]),
    }


def _recipe(**sections) -> dict:
    recipe = {
        "seed": 0,
        "model": {"name_or_path": "zoo://text-tiny/base", "max_length": 24, "max_new_tokens": 4},
        "data": {},
        "algorithm": {},
        "eval": {},
        "train": {"max_steps": 12, "batch_size": 16, "lr": 3e-3, "progress": False},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe[name], **values} if isinstance(values, dict) else values
    return recipe


def _train(recipe: dict, run_dir: Path, before_hook=None):
    policy, algorithm, cfg, evaluator, _ = build_run(recipe)
    extra = before_hook(policy, algorithm) if before_hook else None
    summary = Trainer(policy, algorithm, cfg, run_dir, evaluator=evaluator).train()
    return summary, policy, algorithm, extra


@torch.no_grad()
def _own_loss(algorithm) -> float:
    """Mean loss of the algorithm on all its training examples (controller state left untouched)."""
    state = copy.deepcopy(algorithm.state_dict())
    module = algorithm.policy.module
    was = module.training
    module.eval()
    losses, _ = algorithm.loss(algorithm.train_examples)
    module.train(was)
    algorithm.load_state_dict(state)
    return losses.mean().item()


PREFERENCE_CASES = [
    {"name": "dpo", "beta": 0.5},
    {"name": "ipo", "beta": 0.5},
    {"name": "hinge", "beta": 0.5},
    {"name": "simpo", "beta": 2.0, "gamma": 0.5},
    {"name": "orpo"},
    {"name": "cpo"},
    {"name": "rdpo", "beta": 0.5, "alpha": 0.1},
    {"name": "odpo", "beta": 0.5, "alpha": 1.0},
    {"name": "fdpo", "divergence": "reverse_kl"},
    {"name": "fdpo", "divergence": "forward_kl"},
    {"name": "fdpo", "divergence": "js"},
    {"name": "fdpo", "divergence": "alpha", "alpha": 0.5},
    {"name": "dpop", "beta": 0.5, "lam": 1.0},
    {"name": "beta_dpo", "beta": 0.5, "alpha": 0.5},
    {"name": "mallows", "beta": 0.5},
    {"name": "rainbow", "beta": 0.5, "mallows": True, "length_normalize": True},
    {"name": "preference", "loss": "robust", "beta": 0.5, "label_smoothing": 0.1},
    {"name": "preference", "loss": "bco_pair", "beta": 0.5},
    {"name": "preference", "loss": "sppo_hard", "beta": 0.5},
    {"name": "preference", "loss": "nca_pair", "beta": 0.5},
    {"name": "preference", "loss": "apo_zero", "beta": 0.5},
    {"name": "preference", "loss": "apo_down", "beta": 0.5},
    {"name": "preference", "loss": "exo_pair", "beta": 0.5},
    {"name": "preference", "loss": "aot", "beta": 0.5},
    {"name": "preference", "loss": "aot_unpaired", "beta": 0.5},
    # τ > 0.1: with the paper's τ = 0.05 the gradient at π_θ = π_ref first pushes the margins down, towards the
    # loss's local minimum near βh ≈ −0.1 (test_preference_registry::test_discopop_is_non_convex_around_a_zero_margin)
    {"name": "preference", "loss": "discopop", "beta": 0.5, "tau": 0.5},
]


@pytest.mark.parametrize(
    "algo",
    PREFERENCE_CASES,
    ids=[c.get("loss", c["name"]) + "-" + c.get("divergence", "") for c in PREFERENCE_CASES],
)
def test_preference_algorithm_improves_its_pairs(algo, data, tmp_path):
    recipe = _recipe(
        data={"train": data["pairs"]},
        algorithm=algo,
        eval={"pairs": data["pairs"]},
        train={"max_steps": 20, "lr": 1e-3},
    )
    summary, _, algorithm, loss_before = _train(recipe, tmp_path, lambda p, a: _own_loss(a))
    before, after = summary["before"], summary["after"]
    assert summary["steps"] == 20
    assert after["preference_accuracy"] >= before["preference_accuracy"] + 0.15, (before, after)
    assert after["logp_margin"] >= before["logp_margin"] + 0.25, (before, after)
    assert _own_loss(algorithm) < loss_before - 1e-3


def test_trl_loss_type_selects_the_loss_or_is_named(data):
    def build(algorithm: dict):
        return build_run(_recipe(data={"train": data["pairs16"]}, algorithm=algorithm))[1]

    algorithm = build({"name": "preference", "loss_type": "ipo"})
    assert (algorithm.config.loss, algorithm.config.length_normalize) == (
        "ipo",
        True,
    )  # trl's IPO is per token
    # `--set algorithm.loss_type=ipo` on a DPO recipe trains IPO, as trl's DPOTrainer does with that loss_type
    assert build({"name": "dpo", "loss_type": "ipo"}).config.loss == "ipo"
    with pytest.raises(
        RecipeError, match=r"algorithm\.loss_type 'ipo'.*disagrees with algorithm\.loss 'hinge'"
    ):
        build({"name": "hinge", "loss_type": "ipo"})
    with pytest.raises(RecipeError, match=r"algorithm\.loss_type must be one of trl's loss types sigmoid"):
        build({"name": "preference", "loss_type": "banana"})


def test_dpo_held_out_accuracy_rises(tiny_world, tmp_path):
    recipe = _recipe(
        data={"train": "zoo://text-tiny/train_pairs.jsonl"},
        algorithm={"name": "dpo", "beta": 0.1},
        eval={"pairs": "zoo://text-tiny/eval_pairs.jsonl"},
        train={"max_steps": 32, "batch_size": 32, "lr": 1e-3},
    )
    summary, *_ = _train(recipe, tmp_path)
    before, after = summary["before"], summary["after"]
    assert before["n_pairs"] == after["n_pairs"] == 64
    assert after["preference_accuracy"] >= before["preference_accuracy"] + 0.04, (before, after)


def test_kto_improves_desirable_over_undesirable(data, tmp_path):
    recipe = _recipe(
        data={"train": data["kto"]}, algorithm={"name": "kto", "beta": 0.5}, eval={"pairs": data["pairs16"]}
    )
    summary, _, algorithm, _ = _train(recipe, tmp_path)
    before, after = summary["before"], summary["after"]
    assert len(algorithm.train_examples) == 32
    assert after["preference_accuracy"] >= before["preference_accuracy"] + 0.2, (before, after)
    assert after["logp_margin"] >= before["logp_margin"] + 0.5, (before, after)
    metrics = read_metrics(tmp_path)
    # implicit rewards separate: desirable up, undesirable down by the end
    assert metrics[-1]["train/rewards/desirable"] > metrics[-1]["train/rewards/undesirable"]


def test_reward_model_held_out_pairwise_accuracy_rises(tiny_world, tmp_path):
    recipe = _recipe(
        model={"kind": "reward_model", "name_or_path": str(tiny_world / "base")},
        data={"train": "zoo://text-tiny/train_pairs.jsonl"},
        algorithm={"name": "reward_model"},
        eval={"pairs": "zoo://text-tiny/eval_pairs.jsonl"},
        train={"max_steps": 30, "lr": 1e-3},
    )
    summary, model, *_ = _train(recipe, tmp_path)
    before, after = summary["before"], summary["after"]
    assert type(model).__name__ == "RewardModel"
    assert after["pairwise_accuracy"] >= before["pairwise_accuracy"] + 0.1, (before, after)
    assert (tmp_path / "final" / "model.safetensors").exists()


def _answer_nll(model, tokenizer, rows: list[dict]) -> float:
    """Token-mean NLL of answers given prompts, from the raw HF forward with -100 labels on the prompt."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["prompt"])["input_ids"]
            answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
            ids = torch.tensor([prompt + answer])
            labels = torch.tensor([[-100] * len(prompt) + answer])
            loss = model(input_ids=ids, labels=labels).loss
            total += loss.item() * len(answer)
            count += len(answer)
    return total / count


def test_sft_lowers_nll_of_completions(data, tmp_path):
    from mmalign.zoo.tokenizer import char_tokenizer

    rows = _read_jsonl(Path(data["sft"]))
    tokenizer = char_tokenizer()
    recipe = _recipe(
        data={"train": data["sft"]}, algorithm={"name": "sft"}, train={"max_steps": 30, "lr": 1e-3}
    )
    _, policy, _, nll_before = _train(recipe, tmp_path, lambda p, a: _answer_nll(p.module, tokenizer, rows))
    nll_after = _answer_nll(policy.module, tokenizer, rows)
    assert nll_after < nll_before - 0.15, (nll_before, nll_after)
    logged = [r["train/nll"] for r in read_metrics(tmp_path)]
    assert len(logged) == 30
    assert sum(logged[-5:]) < sum(logged[:5]) - 0.5, logged


ONLINE_CASES = [
    {"name": "online_dpo", "preference": {"beta": 0.5}},
    {"name": "rloo"},
    {"name": "grpo"},
    {"name": "reinforce", "samples_per_prompt": 2},
    {"name": "dr_grpo"},
    {"name": "dapo"},
    {"name": "gspo"},
    {"name": "ppo", "samples_per_prompt": 2, "kl_coef": 0.01},
    {
        "name": "iterative_dpo",
        "samples_per_prompt": 4,
        "prompts_per_iteration": 8,
        "preference": {"beta": 0.5},
    },
]


@pytest.mark.parametrize("algo", ONLINE_CASES, ids=[c["name"] for c in ONLINE_CASES])
def test_online_rollout_reward_rises(algo, tiny_world, tmp_path):
    recipe = _recipe(
        data={"prompts": "zoo://text-tiny/train_prompts.jsonl"},
        algorithm={**algo, "reward": {"name": "regex", "pattern": "^1"}},
        train={"max_steps": 20, "batch_size": 16, "lr": 3e-3},
    )
    _train(recipe, tmp_path)
    rows = read_metrics(tmp_path)
    key = "train/rollout/reward" if "train/rollout/reward" in rows[0] else "rollout/reward"
    rewards = [r[key] for r in rows]
    assert len(rewards) == 20
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last >= first + 0.3, rewards


def test_precomputed_reference_gives_the_same_losses(data, tmp_path):
    losses = {}
    for precompute in (False, True):
        recipe = _recipe(
            data={"train": data["pairs"]},
            algorithm={"name": "dpo", "beta": 0.5, "precompute_reference": precompute},
            train={"max_steps": 5, "batch_size": 8},
        )
        run_dir = tmp_path / str(precompute)
        _, policy, algorithm, _ = _train(recipe, run_dir)
        assert (algorithm._ref_cache is not None) == precompute
        assert (policy._reference_model is None) == precompute  # the frozen copy is released
        losses[precompute] = [r["train/loss"] for r in read_metrics(run_dir)]
    assert len(losses[True]) == 5
    assert losses[True][0] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 1: log 2
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True], strict=True)) < 1e-5
    assert len(set(losses[True])) > 1  # training moved the policy, so the comparison is not trivial


def test_mixed_precision_no_can_be_set_from_an_override(tiny_recipe):
    from mmalign.core.config import apply_overrides

    recipe = apply_overrides(tiny_recipe, ["train.mixed_precision=no"])
    _, _, cfg, _, _ = build_run(recipe)
    assert cfg.mixed_precision == "no"
