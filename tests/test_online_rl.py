"""Online RLHF for sequence policies on the tiny text world: every estimator and loss variant against an explicit
loop, DAPO's dynamic sampling, seed 003's pair rules and iterative DPO, PPO's value function, exact resume."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from mmalign.core.config import RecipeError
from mmalign.core.types import Batch
from mmalign.run import build_run, plan
from mmalign.train.logging import read_metrics
from mmalign.train.online import (
    PolicyGradientConfig,
    dynamic_sampling_weights,
    model_inputs,
    select_pairs,
)
from mmalign.train.trainer import Trainer


class Recorder:
    """Wraps a reward and keeps the values it returned (the tests recompute advantages from them)."""

    def __init__(self, reward):
        self.reward, self.name, self.differentiable, self.values = reward, "recorded", False, []

    def __call__(self, prompts, outputs):
        values = self.reward(prompts, outputs)
        self.values.append(values.clone())
        return values


class FirstDigit:
    """Reward = the first digit of the answer / 9 (graded, so groups rarely tie); 0 without a digit."""

    name, differentiable = "first_digit", False

    def __call__(self, prompts, outputs):
        return torch.tensor([int(o["text"][0]) / 9 if o["text"][:1].isdigit() else 0.0 for o in outputs])


def _recipe(algorithm: dict, **train) -> dict:
    return {
        "seed": 0,
        "model": {"name_or_path": "zoo://text-tiny/base", "lora": {"r": 4, "alpha": 8}, "max_length": 24},
        "data": {"prompts": "zoo://text-tiny/train_prompts.jsonl"},
        "algorithm": {"reward": {"name": "regex", "pattern": "^1"}, **algorithm},
        "eval": {},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "progress": False, **train},
    }


def _rollout(algorithm, n_prompts: int, reward=None):
    algorithm.reward = Recorder(reward or algorithm.reward)
    torch.manual_seed(1)
    batch, metrics = algorithm.rollout(algorithm.prompts[:n_prompts])
    return batch, metrics, algorithm.reward.values[-1].float()


# ------------------------------------------------------------------------------------------------ pair rules
def test_select_pairs_rules_by_hand():
    rewards = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 1.0, 0.0]])
    chosen, rejected = select_pairs(rewards, "max_min")
    assert chosen.tolist() == [1, 0, 1]  # first of equal maxima
    assert rejected.tolist() == [3, 3, 3]  # last of equal minima
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        c, r = select_pairs(rewards, "max_random", g)
        assert c.tolist() == [1, 0, 1] and (r != c).all()
        seen.add(r[2].item())
    assert seen == {0, 2, 3}  # every rival of the best is drawn
    for _ in range(200):
        c, r = select_pairs(rewards, "random", g)
        assert (c != r).all()
        assert (rewards.gather(1, c[:, None]) >= rewards.gather(1, r[:, None])).all()
    with pytest.raises(ValueError, match="pair_rule"):
        select_pairs(rewards, "best")


def _sample(text: str, ids: list[int]) -> dict:
    return {"prompt_ids": [5, 6], "response_ids": ids, "text": text}


def test_online_dpo_length_penalty_and_identical_responses(tiny_world):
    run = build_run(_recipe({"name": "online_dpo", "samples_per_prompt": 4, "length_penalty": 0.1}))
    algorithm = run.algorithm
    samples = [_sample("12345", [1, 2, 3]), _sample("12", [1]), _sample("1", [2]), _sample("123", [3, 3])]
    samples += [_sample("7", [7])] * 4  # one response four times (a noisy reward scores it differently)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5])
    batch, metrics = algorithm._pairs(["a", "b"], samples, rewards)
    # r − 0.1·chars: [0.5, 0.8, −0.1, −0.3] → "12" over "123"; the second prompt pairs "7" with itself
    chosen = batch["inputs.input_ids"][:, 0]
    rejected = batch["inputs.input_ids"][:, 1]
    assert chosen[0, 2:3].tolist() == [1] and rejected[0, 2:4].tolist() == [3, 3]
    assert chosen[1, 2].item() == rejected[1, 2].item() == 7
    assert batch["weight"].tolist() == [1.0, 0.0]  # the same response twice carries no preference
    assert metrics["rollout/tie_fraction"] == 0.5
    assert "ref_scores" in batch and batch["ref_scores"].shape == (2, 2)
    algorithm.config.length_penalty = 0.0
    batch, _ = algorithm._pairs(["a", "b"], samples, rewards)
    assert batch["inputs.input_ids"][0, 0, 2:5].tolist() == [1, 2, 3]  # without the penalty the longest wins


# ------------------------------------------------------------------------------------- policy gradient
def _by_hand_advantages(rewards: list[float], k: int, estimator: str) -> list[float]:
    out = []
    for start in range(0, len(rewards), k):
        group = rewards[start : start + k]
        mean = statistics.mean(group)
        for r in group:
            if estimator == "rloo":
                out.append(r - (sum(group) - r) / (k - 1))
            elif estimator == "grpo":
                out.append((r - mean) / (statistics.stdev(group) + 1e-4))
            elif estimator == "dr_grpo":
                out.append(r - mean)
            else:
                raise AssertionError(estimator)
    return out


PG_CASES = {
    "grpo": {"name": "grpo", "beta": 0.1},
    "rloo": {"name": "rloo", "epsilon": 0.1, "epsilon_high": 0.3},
    "dr_grpo": {"name": "dr_grpo"},
    "dapo": {"name": "dapo", "beta": 0.05},
    "gspo": {"name": "gspo", "epsilon": 0.02, "epsilon_high": 0.03},
    "bnpo": {"name": "grpo", "loss_type": "bnpo", "mask_truncated_completions": True},
}


@pytest.mark.parametrize("case", list(PG_CASES))
def test_policy_gradient_loss_matches_an_explicit_loop(tiny_world, case):
    cfg = PG_CASES[case]
    run = build_run(_recipe({**cfg, "samples_per_prompt": 4}))
    algorithm, c = run.algorithm, run.algorithm.config
    batch, metrics, rewards = _rollout(algorithm, 4, FirstDigit())
    assert batch["old_logps"].shape == batch["mask"].shape and batch["old_logps"].dim() == 2
    torch.manual_seed(2)
    batch.fields["old_logps"] = (
        batch["old_logps"] + 0.2 * torch.randn_like(batch["old_logps"]) * batch["mask"]
    )
    losses, _ = algorithm.loss(batch)

    with torch.no_grad():
        lp = algorithm.policy.sequence_logprobs(model_inputs(batch)).token_logps
    estimator = {"grpo": "grpo", "rloo": "rloo", "dr_grpo": "dr_grpo", "dapo": "grpo", "gspo": "grpo"}
    adv = _by_hand_advantages(rewards.tolist(), 4, estimator.get(case, "grpo"))
    groups = rewards.view(-1, 4)
    keep = [bool(groups[i // 4].max() > groups[i // 4].min()) or not c.dynamic_sampling for i in range(16)]
    eos = algorithm.policy.tokenizer.eos_token_id
    per_sample, token_counts = [], []
    for i in range(16):
        tokens = [t for t in range(lp.shape[1]) if batch["mask"][i, t] > 0]
        if c.mask_truncated_completions:
            ids = batch["inputs.input_ids"][i]
            assert (
                batch["mask"][i].sum() == 0
                or ids[int(batch["inputs.response_mask"][i].nonzero().max())] == eos
            )
        log_ratios = [(lp[i, t] - batch["old_logps"][i, t]).item() for t in tokens]
        seq_ratio = math.exp(sum(log_ratios) / len(tokens)) if tokens else 1.0
        terms = []
        for j, t in enumerate(tokens):
            ratio = seq_ratio if c.importance_sampling_level == "sequence" else math.exp(log_ratios[j])
            lo, hi = 1 - c.epsilon, 1 + (c.epsilon_high or c.epsilon)
            term = max(-adv[i] * ratio, -adv[i] * min(max(ratio, lo), hi))
            if c.beta:
                d = (batch["ref_logps"][i, t] - lp[i, t]).item()
                term += c.beta * (math.exp(d) - d - 1)
            terms.append(term)
        per_sample.append(terms)
        token_counts.append(len(tokens))
    kept = [i for i in range(16) if keep[i]]
    if c.loss_type == "grpo":
        value = sum(sum(t) / max(len(t), 1) for i, t in enumerate(per_sample) if keep[i]) / max(len(kept), 1)
    elif c.loss_type == "dr_grpo":
        value = sum(sum(t) for i, t in enumerate(per_sample) if keep[i]) / (
            len(kept) * algorithm.max_new_tokens
        )
    else:  # dapo, and bnpo over this whole batch: the token mean of kept samples
        value = sum(sum(t) for i, t in enumerate(per_sample) if keep[i]) / sum(token_counts[i] for i in kept)
    assert losses.shape == (16,)
    assert losses.mean().item() == pytest.approx(value, rel=1e-4, abs=1e-6)
    assert metrics["rollout/kept_fraction"] == pytest.approx(sum(keep) / 16)


def test_micro_batches_average_to_the_whole_rollout(tiny_world):
    """Slicing the rollout Batch (the trainer's micro-batches) leaves the loss's global mean unchanged."""
    run = build_run(_recipe({"name": "dapo", "samples_per_prompt": 4}))
    batch, _, _ = _rollout(run.algorithm, 4, FirstDigit())
    whole = run.algorithm.loss(batch)[0].mean()
    parts = [run.algorithm.loss(batch[i : i + 4])[0].mean() for i in range(0, 16, 4)]
    assert torch.stack(parts).mean().item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", ["grpo", "gspo"])
def test_one_update_per_rollout_skips_the_old_forward_with_the_same_loss_and_gradients(tiny_world, name):
    """With one optimizer step per rollout the rollout holds no old log-probs (no forward) and the loss equals the
    one against old log-probs from a separate forward, gradients included."""
    run = build_run(_recipe({"name": name, "samples_per_prompt": 4}))
    algorithm = run.algorithm
    results = []
    for updates in (None, 1):
        algorithm.updates_per_rollout = updates
        batch, _, _ = _rollout(algorithm, 4, FirstDigit())
        assert ("old_logps" in batch) == (updates is None)
        algorithm.policy.module.zero_grad()
        losses, _ = algorithm.loss(batch)
        losses.mean().backward()
        grads = [p.grad.clone() for p in algorithm.policy.trainable_parameters()]
        results.append((losses.detach(), grads, batch["mask"]))
    (loss_a, grads_a, mask_a), (loss_b, grads_b, mask_b) = results
    assert torch.equal(mask_a, mask_b)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert any(g.abs().max() > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_the_trainer_tells_the_algorithm_its_updates_per_rollout(tiny_world, tmp_path):
    run = build_run(_recipe({"name": "grpo", "samples_per_prompt": 4}, max_steps=2, ppo_epochs=2))
    Trainer(run.policy, run.algorithm, run.train, tmp_path).train()
    assert run.algorithm.updates_per_rollout == 2


def test_dynamic_sampling_weights_by_hand():
    keep = torch.tensor([True, True, False, False, True, True])
    assert dynamic_sampling_weights(keep).tolist() == [1.5, 1.5, 0, 0, 1.5, 1.5]
    assert dynamic_sampling_weights(torch.zeros(4, dtype=torch.bool)).tolist() == [0, 0, 0, 0]


def test_dynamic_sampling_zeroes_tied_groups_in_a_rollout(tiny_world):
    run = build_run(_recipe({"name": "dapo", "samples_per_prompt": 4}))

    def half_tied(prompts, outputs):  # group 0 and 2 all 1.0, groups 1 and 3 graded
        graded = FirstDigit()(prompts, outputs)
        graded[torch.tensor([g in (0, 2) for g in range(4)]).repeat_interleave(4)] = 1.0
        graded[4] = 2.0  # make sure group 1 varies
        return graded

    batch, metrics, _ = _rollout(run.algorithm, 4, half_tied)
    assert metrics["rollout/kept_fraction"] <= 0.5
    assert (batch["weight"][0:4] == 0).all() and (batch["weight"][8:12] == 0).all()
    assert (batch["weight"][4:8] == 1).all()
    kept_tokens = sum(batch["mask"][i].sum().item() for i in range(16) if batch["weight"][i] > 0)
    assert batch["tokens_per_sample"][0].item() == pytest.approx(kept_tokens / 16)


def test_trl_names_and_presets():
    assert PolicyGradientConfig(advantage="grpo", scale_rewards="none").advantage == "dr_grpo"
    assert PolicyGradientConfig(advantage="grpo", scale_rewards="batch").advantage == "batch"
    assert PolicyGradientConfig(num_generations=6).samples_per_prompt == 6
    assert PolicyGradientConfig().samples_per_prompt == 4
    with pytest.raises(ValueError, match="num_generations"):
        PolicyGradientConfig(num_generations=6, samples_per_prompt=4)
    assert PolicyGradientConfig(kl_coef=0.04).beta == 0.04
    with pytest.raises(ValueError, match="scale_rewards"):
        PolicyGradientConfig(advantage="rloo", scale_rewards="group")
    with pytest.raises(ValueError, match="loss_type"):
        PolicyGradientConfig(loss_type="token")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        PolicyGradientConfig(importance_sampling_level="step")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dr_grpo", {"advantage": "dr_grpo", "loss_type": "dr_grpo"}),
        ("dapo", {"loss_type": "dapo", "epsilon_high": 0.28, "dynamic_sampling": True}),
        ("gspo", {"importance_sampling_level": "sequence", "epsilon": 3e-4}),
    ],
)
def test_presets_are_defaults_a_recipe_overrides(tiny_world, name, expected):
    config = plan(_recipe({"name": name})).algorithm
    assert {k: getattr(config, k) for k in expected} == expected
    assert plan(_recipe({"name": name, "epsilon": 0.5})).algorithm.epsilon == 0.5
    with pytest.raises(RecipeError, match="algorithm: epsilon must be > 0"):
        plan(_recipe({"name": name, "epsilon": -1}))


# ---------------------------------------------------------------------------------------------------- PPO
def test_ppo_advantages_and_returns_match_an_explicit_gae_loop(tiny_world):
    run = build_run(_recipe({"name": "ppo", "samples_per_prompt": 2, "kl_coef": 0.1, "lam": 0.9}))
    algorithm = run.algorithm
    with torch.no_grad():  # values away from 0, so the GAE recursion uses them
        algorithm.policy.module.value_head.bias.fill_(0.3)
        algorithm.policy.module.value_head.weight.normal_(0, 0.05)
    batch, _, scores = _rollout(algorithm, 4, FirstDigit())
    mask = batch["mask"]
    with torch.no_grad(), algorithm.policy.reference():
        ref = algorithm.policy.sequence_logprobs(model_inputs(batch)).token_logps
    raw, returns = [], []
    for i in range(len(batch)):
        tokens = [t for t in range(mask.shape[1]) if mask[i, t] > 0]
        values = [batch["old_values"][i, t].item() for t in tokens]
        rewards = [-0.1 * (batch["old_logps"][i, t] - ref[i, t]).item() for t in tokens]
        rewards[-1] += scores[i].item()
        running, adv = 0.0, [0.0] * len(tokens)
        for j in reversed(range(len(tokens))):
            next_value = values[j + 1] if j + 1 < len(tokens) else 0.0
            running = rewards[j] + next_value - values[j] + 0.9 * running
            adv[j] = running
        raw += adv
        returns += [a + v for a, v in zip(adv, values, strict=True)]
    mean, std = statistics.mean(raw), statistics.stdev(raw)
    on = mask > 0
    assert batch["advantages"][on].tolist() == pytest.approx(
        [(a - mean) / std for a in raw], rel=1e-4, abs=1e-5
    )
    assert batch["returns"][on].tolist() == pytest.approx(returns, rel=1e-5, abs=1e-6)
    assert (batch["advantages"][~on] == 0).all()


def _metric_rows(run_dir) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "step" and not k.startswith("time")}
        for r in read_metrics(run_dir)
    ]


def test_ppo_value_head_trains_checkpoints_and_resumes_exactly(tiny_world, tmp_path):
    recipe = _recipe({"name": "ppo", "samples_per_prompt": 2}, max_steps=4, save_every=2, ppo_epochs=2)
    run = build_run(recipe)
    head = run.policy.module.value_head
    assert any(p is head.weight for p in run.policy.trainable_parameters())
    Trainer(run.policy, run.algorithm, run.train, tmp_path / "whole").train()
    assert head.weight.abs().sum() > 0  # trained away from its zero initialisation
    from mmalign.train.checkpoint import load_state

    saved = load_state(tmp_path / "whole" / "checkpoints" / "step-00000004", "policy")
    assert torch.equal(saved["value_head.weight"], head.weight.detach())

    first = build_run({**recipe, "train": {**recipe["train"], "max_steps": 2}})
    Trainer(first.policy, first.algorithm, first.train, tmp_path / "resumed").train()
    second = build_run(recipe)
    Trainer(second.policy, second.algorithm, second.train, tmp_path / "resumed").train()
    whole, resumed = _metric_rows(tmp_path / "whole"), _metric_rows(tmp_path / "resumed")
    assert len(whole) == len(resumed) == 4
    for a, b in zip(whole, resumed, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    assert "train/value_loss" in whole[-1] and "train/value_clip_fraction" in whole[-1]


def test_ppo_separate_value_model_full_fine_tuning(tiny_world, tmp_path):
    from mmalign.core.paths import resolve

    recipe = _recipe({"name": "ppo", "samples_per_prompt": 2, "value_model": resolve("zoo://text-tiny/base")})
    recipe["model"].pop("lora")
    run = build_run(recipe)
    value_params = {id(p) for p in run.policy.module.value_model.parameters()}
    trainable = {id(p) for p in run.policy.trainable_parameters()}
    assert value_params <= trainable
    before = next(run.policy.module.value_model.parameters()).detach().clone()
    Trainer(run.policy, run.algorithm, run.train, tmp_path / "run").train()
    assert not torch.equal(before, next(run.policy.module.value_model.parameters()))
    from safetensors.torch import load_file

    final = load_file(str(next((tmp_path / "run" / "final").glob("*.safetensors"))))
    assert not any(name.startswith(("value_head", "value_model")) for name in final)


# ------------------------------------------------------------------------------------------ iterative DPO
def _iterative(reference: str, **train) -> dict:
    return _recipe(
        {
            "name": "iterative_dpo",
            "samples_per_prompt": 2,
            "prompts_per_iteration": 8,
            "reference": reference,
            "preference": {"beta": 0.5},
        },
        **{"batch_size": 8, "max_steps": 6, "save_every": 1, **train},
    )


def test_iterative_dpo_samples_from_the_iteration_start_with_its_reference(tiny_world):
    run = build_run(_iterative("previous"))
    algorithm, policy = run.algorithm, run.policy
    algorithm.setup()
    rows = algorithm.prompts[:4]
    pairs, metrics = algorithm.rollout(rows)  # iteration 0's first rollout: snapshot of the current weights
    assert metrics["rollout/iteration"] == 0 and algorithm.rollouts == 1
    snapshot = {k: v.clone() for k, v in algorithm.snapshot.items()}
    with torch.no_grad():  # a training step's worth of change
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = policy.trainable_state_dict()
    torch.manual_seed(3)
    pairs, metrics = algorithm.rollout(rows)  # second rollout of iteration 0: sampled and scored by π_t
    assert metrics["rollout/iteration"] == 0
    after = policy.trainable_state_dict()
    assert all(torch.equal(after[k], moved[k]) for k in after)  # the current weights are put back exactly
    policy.load_trainable_state_dict(snapshot)
    inputs = {k: v.transpose(0, 1).reshape(-1, *v.shape[2:]) for k, v in model_inputs(pairs).items()}
    chosen, rejected = algorithm._sequence_scores(inputs, len(pairs))
    assert pairs["ref_scores"][:, 0].tolist() == pytest.approx(chosen.tolist(), abs=1e-5)
    assert pairs["ref_scores"][:, 1].tolist() == pytest.approx(rejected.tolist(), abs=1e-5)
    policy.load_trainable_state_dict(after)
    _, metrics = algorithm.rollout(rows)
    assert metrics["rollout/iteration"] == 1  # 8 prompts per iteration, 4 per rollout
    assert not all(torch.equal(algorithm.snapshot[k], snapshot[k]) for k in snapshot)


@pytest.mark.parametrize("reference", ["fixed", "previous"])
def test_iterative_dpo_resumes_exactly_in_the_middle_of_an_iteration(tiny_world, tmp_path, reference):
    whole = build_run(_iterative(reference))
    Trainer(whole.policy, whole.algorithm, whole.train, tmp_path / "whole").train()
    first = build_run(_iterative(reference, max_steps=3))  # stops after iteration 1's first rollout
    Trainer(first.policy, first.algorithm, first.train, tmp_path / "resumed").train()
    second = build_run(_iterative(reference))
    Trainer(second.policy, second.algorithm, second.train, tmp_path / "resumed").train()
    a, b = _metric_rows(tmp_path / "whole"), _metric_rows(tmp_path / "resumed")
    key = "train/rollout/iteration" if "train/rollout/iteration" in a[0] else "rollout/iteration"
    assert [r[key] for r in a] == [0, 0, 1, 1, 2, 2]
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-7)


def test_iterative_dpo_checks_its_iterations(tiny_world, tmp_path):
    with pytest.raises(RecipeError, match="algorithm: reference must be"):
        plan(_iterative("last"))
    run = build_run(_iterative("fixed", batch_size=6, max_steps=1))  # 3 prompts per rollout
    with pytest.raises(ValueError, match="prompts_per_iteration"):
        Trainer(run.policy, run.algorithm, run.train, tmp_path).train()
    recipe = _iterative("fixed", max_steps=5)
    recipe["algorithm"]["iterations"] = 2
    run = build_run(recipe)
    with pytest.raises(ValueError, match="iterations"):
        Trainer(run.policy, run.algorithm, run.train, tmp_path / "long").train()


# --------------------------------------------------------------------------------------------------- VLM
@pytest.fixture(scope="module")
def vlm_tiny(mmalign_home):
    from filelock import FileLock

    from mmalign.zoo import registry

    with FileLock(str(mmalign_home) + ".vlm.lock"):
        return registry.build("vlm-tiny", log=lambda *_: None)


VLM_CASES = {
    "online_dpo": {"samples_per_prompt": 2},
    "iterative_dpo": {"samples_per_prompt": 2, "prompts_per_iteration": 4, "reference": "previous"},
    "grpo": {"samples_per_prompt": 2, "beta": 0.1},
    "dapo": {"samples_per_prompt": 2},
    "ppo": {"samples_per_prompt": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VLM_CASES))
def test_online_algorithms_run_on_the_vlm(vlm_tiny, tmp_path, name):
    from mmalign import plugins
    from mmalign.core.registry import MODEL_KINDS

    plugins.load()
    tiny = MODEL_KINDS["vlm"].tiny()
    recipe = {
        "seed": 0,
        "model": tiny["model"],
        "data": {"prompts": "zoo://vlm-tiny/eval_describe.jsonl"},  # image + prompt + the facts rewards check
        "algorithm": {"name": name, "reward": tiny["reward"], **VLM_CASES[name]},
        "eval": {},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "progress": False},
    }
    run = build_run(recipe)
    batch, _ = run.algorithm.rollout(run.algorithm.prompts[:2])
    assert isinstance(batch, Batch) and batch["inputs.pixel_values"].shape[0] == len(batch)
    Trainer(run.policy, run.algorithm, run.train, tmp_path).train()
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) for r in rows)


def test_an_unknown_key_in_online_dpos_preference_section_is_named_before_loading(tiny_world):
    from mmalign import plugins
    from mmalign.core.config import RecipeError
    from mmalign.core.registry import MODEL_KINDS
    from mmalign.run import plan

    plugins.load()
    tiny = MODEL_KINDS["causal_lm"].tiny()
    recipe = {
        "model": tiny["model"],
        "data": {"prompts": tiny["data"]["prompts"]},
        "algorithm": {"name": "online_dpo", "reward": tiny["reward"], "preference": {"betta": 0.1}},
        "train": {"max_steps": 2},
    }
    with pytest.raises(RecipeError, match=r"algorithm\.preference.*betta"):
        plan(recipe)


def test_a_rollout_without_prompts_is_refused_before_loading(tiny_world):
    from mmalign import plugins
    from mmalign.core.config import RecipeError
    from mmalign.core.registry import MODEL_KINDS
    from mmalign.run import plan

    plugins.load()
    tiny = MODEL_KINDS["causal_lm"].tiny()
    recipe = {
        "model": tiny["model"],
        "data": {"prompts": tiny["data"]["prompts"]},
        "algorithm": {"name": "grpo", "reward": tiny["reward"], "samples_per_prompt": 8},
        "train": {"max_steps": 2, "batch_size": 4},
    }
    with pytest.raises(
        RecipeError, match=r"train.batch_size \(4\) is smaller than algorithm.samples_per_prompt \(8\)"
    ):
        plan(recipe)


def test_reinforce_baseline_is_the_mean_over_every_process(tiny_world, monkeypatch):
    """N processes = 1 process: rank 0 of 2 subtracts the mean reward of both ranks' samples, not its own."""
    import mmalign.train.distributed as distributed
    import mmalign.train.online as online

    run = build_run(_recipe({"name": "reinforce"}))
    algorithm = run.algorithm
    other_rank = torch.full((4,), 0.75)  # rewards the other process drew
    monkeypatch.setattr(distributed, "process_info", lambda: (0, 2))
    monkeypatch.setattr(
        online,
        "gather_all",
        lambda v: torch.cat([v, other_rank.to(v.dtype) if v.dtype.is_floating_point else v]),
    )
    batch, _, rewards = _rollout(algorithm, 4, FirstDigit())
    everyone = torch.cat([rewards, other_rank])
    assert torch.allclose(batch["advantages"].float(), rewards - everyone.mean(), atol=1e-6)
    assert not torch.allclose(rewards - everyone.mean(), rewards - rewards.mean())
