"""trl-shaped recipes: trl's names where the meaning is mmalign's (aliases), epochs and warm-up ratios computed,
gradient checkpointing that leaves losses and gradients unchanged, and RPO's NLL anchor for DPO."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmalign.core.config import RecipeError, apply_overrides
from mmalign.core.data import rows_from_records
from mmalign.core.params import LoraSpec
from mmalign.run import build_run, plan
from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig
from mmalign.train.trainer import TrainConfig, Trainer


# ------------------------------------------------------------------------------------------ trl names
def test_trl_training_arguments_are_aliases_of_mmalign_keys(tiny_recipe):
    train = {
        "learning_rate": 3e-3,
        "gradient_accumulation_steps": 2,
        "lr_scheduler_type": "cosine",
        "logging_steps": 5,
        "save_steps": 7,
        "save_total_limit": 3,
        "batch_size": 8,
        "max_steps": 10,
    }
    cfg = plan({**tiny_recipe, "train": train}).train
    assert (cfg.lr, cfg.grad_accum, cfg.scheduler) == (3e-3, 2, "cosine")
    assert (cfg.log_every, cfg.save_every, cfg.keep_checkpoints) == (5, 7, 3)
    same = plan({**tiny_recipe, "train": {**train, "lr": 3e-3}}).train  # both names, one value: fine
    assert same.lr == 3e-3


@pytest.mark.parametrize(
    "key, says",
    [
        ("per_device_train_batch_size", "train.batch_size, which is the global batch"),
        ("adam_beta1", "train.adam_betas: [beta1, beta2]"),
        ("bf16", "train.mixed_precision: bf16"),
        ("report_to", "train.log_with"),
    ],
)
def test_trl_names_with_another_meaning_say_the_mmalign_key(tiny_recipe, key, says):
    with pytest.raises(RecipeError, match=f"train.{key} is trl's name; mmalign's is") as err:
        plan(apply_overrides(tiny_recipe, [f"train.{key}=1"]))
    assert says in str(err.value)


# ------------------------------------------------------------------------------------------- epochs
def test_num_train_epochs_gives_the_steps_that_draw_every_example_that_often(tiny_recipe):
    n = len(plan(tiny_recipe).rows["pairs"])
    for epochs, batch in ((2, 8), (0.5, 8), (3, 12)):
        recipe = apply_overrides(tiny_recipe, ["train.max_steps=null", f"train.num_train_epochs={epochs}"])
        recipe = apply_overrides(recipe, [f"train.batch_size={batch}"])
        steps = plan(recipe).train.max_steps
        assert steps == math.ceil(epochs * n / batch)
    # the trainer's data order then draws each example exactly E times when E·n fills whole batches
    cfg = TrainConfig(num_train_epochs=2, batch_size=8, seed=3).for_data(n)
    trainer = Trainer.__new__(Trainer)
    trainer.config = cfg
    drawn = Counter(i for step in range(cfg.max_steps) for i in trainer._global_indices(n, step, 8))
    assert n * 2 % 8 == 0 and set(drawn.values()) == {2} and len(drawn) == n


def test_num_train_epochs_of_an_online_method_counts_prompts_per_rollout():
    # 4 samples per prompt in a batch of 8 → 2 prompts per rollout, each rollout trained on for 3 steps
    cfg = TrainConfig(num_train_epochs=1.5, batch_size=8, ppo_epochs=3).for_data(
        10, online=True, samples_per_prompt=4
    )
    assert cfg.max_steps == math.ceil(1.5 * 10 / 2) * 3
    explicit = TrainConfig(num_train_epochs=1, batch_size=8, rollout_prompts=5).for_data(10, online=True)
    assert explicit.max_steps == 2


def test_warmup_ratio_rounds_up_like_transformers():
    assert TrainConfig(max_steps=50, warmup_ratio=0.1).warmup() == 5
    assert TrainConfig(max_steps=15, warmup_ratio=0.1).warmup() == 2  # ⌈1.5⌉
    assert TrainConfig(max_steps=15, warmup_steps=4).warmup() == 4
    with pytest.raises(ValueError, match=r"warmup_ratio must be in \[0, 1\]"):
        TrainConfig(warmup_ratio=1.5)


def test_epochs_and_warmup_ratio_drive_a_real_run(tiny_recipe, tmp_path):
    recipe = apply_overrides(
        tiny_recipe,
        [
            "train.max_steps=null",
            "train.num_train_epochs=0.125",  # 256 pairs × 1/8 = 32 examples = 4 batches of 8
            "train.warmup_ratio=0.5",
            "train.scheduler=constant_with_warmup",
            "train.save_every=0",
            "eval.prompts=null",
            "eval.rewards=[]",
        ],
    )
    policy, algorithm, cfg, _, _ = build_run(recipe)
    assert cfg.max_steps == 4
    summary = Trainer(policy, algorithm, cfg, tmp_path / "run").train()
    assert summary["steps"] == 4
    lrs = [
        json.loads(line)["train/lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    base = cfg.lr
    assert lrs == pytest.approx([base * 0.5, base, base, base])  # 2 warm-up steps: ⌈0.5 × 4⌉


# ---------------------------------------------------------------------------------- trl data names
def test_dataset_name_and_splits_become_the_data_and_eval_sources(tiny_recipe, tmp_path):
    from datasets import Dataset, DatasetDict

    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(6)]
    DatasetDict({"train": Dataset.from_list(pairs[:4]), "test": Dataset.from_list(pairs[4:])}).save_to_disk(
        tmp_path / "ds"
    )
    recipe = {**tiny_recipe, "data": {"dataset_name": str(tmp_path / "ds"), "dataset_test_split": "test"}}
    recipe["eval"] = {}
    p = plan(recipe)
    assert [r.data["prompt"] for r in p.rows["pairs"]] == ["0+1=", "1+1=", "2+1=", "3+1="]
    assert [r.data["prompt"] for r in p.eval_pairs] == ["4+1=", "5+1="]
    with pytest.raises(RecipeError, match=r"give data\.train or data\.dataset_name, not both"):
        plan({**tiny_recipe, "data": {**tiny_recipe["data"], "dataset_name": str(tmp_path / "ds")}})
    with pytest.raises(RecipeError, match=r"needs data\.dataset_name"):
        plan({**tiny_recipe, "data": {"dataset_train_split": "train"}})


def test_dataset_name_feeds_the_prompts_of_an_online_method(tiny_recipe, tiny_world):
    recipe = {
        **tiny_recipe,
        "data": {"dataset_name": str(tiny_world / "train_prompts.jsonl")},
        "algorithm": {"name": "rloo", "reward": "answer_match"},
    }
    assert len(plan(recipe).rows["prompts"]) > 0


# ------------------------------------------------------------------------------------ RPO (rpo_alpha)
def _pairs(n: int = 4, equal: bool = False) -> list:
    answers = ["12", "5", "107", "64"] if not equal else ["12", "50", "10", "64"]
    rows = [{"prompt": f"{i}+{i}=", "chosen": answers[i], "rejected": "9" * (i + 1)} for i in range(n)]
    return rows_from_records(rows)


def _policy(tiny_world):
    from mmalign.text.policy import CausalLMPolicy

    torch.manual_seed(0)
    return CausalLMPolicy.from_pretrained(
        str(tiny_world / "base"), lora=LoraSpec(r=4, alpha=8), max_length=24
    )


def _chosen_nll_by_loop(policy, rows) -> torch.Tensor:
    """−mean over the chosen response's tokens of log π(token | prefix), pair by pair, from raw logits."""
    out = []
    for row in rows:
        e = policy.encode_pair(row)
        ids = torch.tensor([e["prompt_ids"] + e["chosen_ids"]])
        logits = policy.module(input_ids=ids).logits[0].float()
        start = len(e["prompt_ids"])
        logps = [logits[t - 1].log_softmax(-1)[ids[0, t]] for t in range(start, ids.shape[1])]
        out.append(-torch.stack(logps).mean())
    return torch.stack(out)


def test_rpo_adds_alpha_times_the_chosen_nll_averaged_over_its_tokens(tiny_world):
    policy, rows = _policy(tiny_world), _pairs()
    plain = PreferenceAlgorithm(policy, rows, PreferenceConfig(beta=0.5))
    rpo = PreferenceAlgorithm(policy, rows, PreferenceConfig(beta=0.5, rpo_alpha=0.7))
    with torch.no_grad():
        l0, _ = plain.loss(plain.train_examples)
        l1, metrics = rpo.loss(rpo.train_examples)
        nll = _chosen_nll_by_loop(policy, rows)
    torch.testing.assert_close((l1 - l0) / 0.7, nll, atol=1e-5, rtol=1e-5)
    assert metrics["nll/chosen"].item() == pytest.approx(nll.mean().item(), abs=1e-5)
    # the anchor pulls towards the chosen responses: one gradient step on it alone raises their likelihood
    loss, _ = rpo.loss(rpo.train_examples)
    params = list(policy.trainable_parameters())
    grads = torch.autograd.grad(((loss - l0.detach()).mean()), params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p -= 0.5 * g
        assert _chosen_nll_by_loop(policy, rows).mean() < nll.mean()


def test_rpo_equals_trls_token_mean_when_chosen_lengths_are_equal(tiny_world):
    policy, rows = _policy(tiny_world), _pairs(equal=True)
    plain = PreferenceAlgorithm(policy, rows, PreferenceConfig(loss_type="sigmoid"))
    rpo = PreferenceAlgorithm(
        policy, rows, PreferenceConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0])
    )
    assert rpo.config.loss == "dpo" and rpo.config.rpo_alpha == 1.0
    with torch.no_grad():
        anchor = (rpo.loss(rpo.train_examples)[0] - plain.loss(plain.train_examples)[0]).mean()
        # trl: cross-entropy over every chosen token of the batch at once
        batch = policy.collate_pairs(rpo.train_examples)
        logits = policy.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        chosen = slice(0, len(rows))
        mask = batch["response_mask"][chosen, 1:].bool()
        targets = batch["input_ids"][chosen, 1:][mask]
        trl = F.cross_entropy(logits[chosen, :-1][mask].float(), targets)
    assert anchor.item() == pytest.approx(trl.item(), abs=1e-5)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"rpo_alpha": -1.0}, "rpo_alpha must be >= 0"),
        ({"loss": "cpo", "rpo_alpha": 1.0}, "already has an NLL term"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [2.0, 1.0]}, "the weight of 'sigmoid' must be 1"),
        ({"loss_type": ["sigmoid", "hinge"]}, "combines one preference loss with trl's 'sft' term"),
        ({"loss_type": "sft"}, "alone is mmalign's algorithm sft"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "1 weights for 2 loss types"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "rpo_alpha": 0.2}, "rpo_alpha is 0.2"),
        ({"loss_weights": [1.0]}, "goes with a list algorithm.loss_type"),
    ],
)
def test_rpo_settings_are_checked(settings, match):
    with pytest.raises(ValueError, match=match):
        PreferenceConfig(**settings)


def test_trl_ipo_with_sft_keeps_trls_length_normalisation():
    cfg = PreferenceConfig(loss_type=["ipo", "sft"], loss_weights=[1.0, 0.3])
    assert (cfg.loss, cfg.length_normalize, cfg.rpo_alpha) == ("ipo", True, 0.3)


# ---------------------------------------------------------------------------------- gradient checkpointing
def _count_calls(monkeypatch, cls: type) -> list[int]:
    """Count calls of `cls.forward`, patched on the class: a recomputation inside a checkpoint calls it too
    (transformers keeps instance hooks outside its checkpoints)."""
    calls, forward = [0], cls.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counted)
    return calls


def test_gradient_checkpointing_gives_the_same_sequence_loss_and_gradients(tiny_world, monkeypatch):
    rows = _pairs()
    results = []
    for checkpointing in (False, True):
        policy = _policy(tiny_world)
        if checkpointing:
            policy.enable_gradient_checkpointing()
        policy.module.train()
        algorithm = PreferenceAlgorithm(policy, rows, PreferenceConfig(beta=0.5, rpo_alpha=0.5))
        calls = _count_calls(monkeypatch, type(policy.module.get_base_model().model.layers[0].mlp))
        loss, _ = algorithm.loss(algorithm.train_examples)
        before_backward = calls[0]
        loss.mean().backward()
        recomputed = calls[0] - before_backward
        grads = {n: p.grad.clone() for n, p in policy.module.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, recomputed))
    (l0, g0, r0), (l1, g1, r1) = results
    assert r0 == 0 and r1 > 0  # the checkpointed layer really ran again in the backward pass
    torch.testing.assert_close(l0, l1)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_denoising_gradients(monkeypatch):
    from mmalign.vision.diffusion_policy import DiffusionImagePolicy
    from mmalign.zoo.tiny_pipelines import tiny_sd_pipeline

    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    results = []
    for checkpointing in (False, True):
        policy = DiffusionImagePolicy(tiny_sd_pipeline(), lora=LoraSpec(r=2, alpha=2), num_steps=2)
        if checkpointing:
            policy.enable_gradient_checkpointing()
        policy.module.train()
        cond = policy.encode_prompts(["a one", "a two"])
        calls = _count_calls(monkeypatch, type(policy.module.up_blocks[1].resnets[0]))
        loss = (policy.predict(x, t, cond, guidance=1.0) - noise).pow(2).mean()
        forward_calls = calls[0]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.module.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, calls[0] - forward_calls))
    (l0, g0, r0), (l1, g1, r1) = results
    assert r0 == 0 and r1 > 0
    torch.testing.assert_close(l0, l1)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_through_the_trainer_trains_identically(tiny_recipe, tmp_path):
    recipe = apply_overrides(
        tiny_recipe, ["train.max_steps=2", "train.save_every=0", "eval.prompts=null", "eval.rewards=[]"]
    )
    states, losses = [], []
    for name, flag in (("plain", "false"), ("checkpointed", "true")):
        policy, algorithm, cfg, _, _ = build_run(
            apply_overrides(recipe, [f"train.gradient_checkpointing={flag}"])
        )
        Trainer(policy, algorithm, cfg, tmp_path / name).train()
        states.append(policy.trainable_state_dict())
        losses.append(
            [
                json.loads(x)["train/loss"]
                for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
            ]
        )
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], atol=1e-6, rtol=1e-5)
    assert Path(tmp_path / "checkpointed" / "summary.json").exists()
