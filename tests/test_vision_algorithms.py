"""Every diffusion algorithm improves its own reward on a tiny random pipeline.

The fixture's VAE is random, so decoded pixels are a scrambled function of the latents and no reward on them is
learnable in a few steps; these tests swap `decode` for the identity so the reward (the mean of the sampled
latents) depends directly on what the UNet controls. The real decoder path is covered by test_diffusion_policy.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.core.data import read_rows, rows_from_records
from mmalign.core.params import LoraSpec
from mmalign.evaluation.diffusion import DiffusionEvaluator
from mmalign.train.diffusion_pg import DiffusionPGConfig, DiffusionPolicyGradient
from mmalign.train.trainer import TrainConfig, Trainer
from mmalign.vision.diffusion_policy import DiffusionImagePolicy
from mmalign.zoo.tiny_pipelines import tiny_sd_pipeline

# each fits the tiny text encoder's 24 tokens: a longer prompt is an error now, where it was silently cut (this one
# was "a drawing of the number 3", which the encoder saw as these words)
PROMPTS = ["a handwritten seven", "the digit one", "a drawing of the number", "the number 5"]


class Brightness:
    """Mean value of the output: a reward a tiny model can learn within a few updates."""

    name = "brightness"
    differentiable = True

    def __call__(self, prompts, images):
        return images.float().mean(dim=(1, 2, 3))


class LatentOutputPolicy(DiffusionImagePolicy):
    """The policy with an identity decoder: outputs are the sampled latents."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd-algos")
    tiny_sd_pipeline().save_pretrained(path)
    return path


def _policy(pipeline_dir) -> DiffusionImagePolicy:
    torch.manual_seed(0)
    return LatentOutputPolicy.from_pretrained(
        str(pipeline_dir), lora=LoraSpec(r=4, alpha=8), num_steps=4, guidance_scale=1.0
    )


def _mean_reward(policy, n=16) -> float:
    traj = policy.sample(
        [PROMPTS[i % 4] for i in range(n)], generator=torch.Generator().manual_seed(123), record=False
    )
    return Brightness()(None, policy.decode(traj.final)).mean().item()


@pytest.mark.parametrize(
    "name, extra",
    [
        ("ddpo", {}),
        ("ddpo-sf", {"loss_type": "reinforce"}),
        ("dpok", {"kl_coef": 0.01}),
        ("dlpo", {"diffusion_loss_coef": 0.1}),
    ],
)
def test_diffusion_policy_gradient_raises_its_reward(pipeline_dir, tmp_path, name, extra):
    policy = _policy(pipeline_dir)
    before = _mean_reward(policy)
    rows = rows_from_records([{"prompt": p} for p in PROMPTS])
    cfg = DiffusionPGConfig(clip_range=0.2, advantage="reinforce", **extra)
    algo = DiffusionPolicyGradient(policy, rows, Brightness(), cfg)
    Trainer(
        policy,
        algo,
        TrainConfig(max_steps=8, batch_size=16, lr=3e-3, progress=False, scheduler="constant"),
        tmp_path / name,
    ).train()
    rollouts = [
        json.loads(line)["rollout/reward"]
        for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        if "rollout/reward" in line
    ]
    after = _mean_reward(policy)
    assert after > before + 0.05, (before, after, rollouts)


class SingleBackward(DiffusionPolicyGradient):
    """The same algorithm with one loss term: the trainer backwards the summed loss once."""

    def loss_terms(self, batch):
        return [lambda: self.loss(batch)]


def test_backward_per_denoising_step_equals_one_backward_of_the_sum(pipeline_dir, tmp_path):
    rows = rows_from_records([{"prompt": p} for p in PROMPTS])
    cfg = DiffusionPGConfig(clip_range=0.2, advantage="reinforce", kl_coef=0.01, diffusion_loss_coef=0.1)
    weights, losses = [], []
    for cls in (DiffusionPolicyGradient, SingleBackward):
        policy = _policy(pipeline_dir)
        Trainer(
            policy,
            cls(policy, rows, Brightness(), cfg),
            TrainConfig(max_steps=2, batch_size=8, grad_accum=2, lr=3e-3, progress=False, ppo_epochs=2),
            tmp_path / cls.__name__,
        ).train()
        weights.append(policy.trainable_state_dict())
        log = (tmp_path / cls.__name__ / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(line)["train/loss"] for line in log if "train/loss" in line])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], atol=1e-6, rtol=1e-5)


def test_online_diffusion_dpo_learns_its_own_preferences(pipeline_dir, tmp_path):
    """On its own ranked samples the implicit-reward margin grows. (Whether samples then score higher needs a
    model that is a trained denoiser, which this random UNet is not: that is measured on the digits world.)"""
    from mmalign.train.online_diffusion import OnlineDiffusionDPO, OnlineDPOConfig

    policy = _policy(pipeline_dir)
    rows = rows_from_records([{"prompt": p} for p in PROMPTS])
    algo = OnlineDiffusionDPO(
        policy, rows, Brightness(), OnlineDPOConfig(preference={"loss": "dpo", "beta": 500})
    )
    torch.manual_seed(0)
    pairs, _ = algo.rollout(rows * 4)

    def margin() -> float:
        torch.manual_seed(7)
        with torch.no_grad():
            return float(np.mean([algo.loss(pairs)[1]["rewards/margin"].item() for _ in range(4)]))

    start = margin()
    Trainer(
        policy,
        algo,
        TrainConfig(max_steps=6, batch_size=32, lr=3e-3, progress=False, scheduler="constant"),
        tmp_path / "odpo",
    ).train()
    assert margin() > start + 0.05


def test_best_and_worst_of_k_by_hand():
    from mmalign.train.online import OnlineDPOConfig, select_pairs

    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.3, 0.3, 0.3], [0.5, 0.5, 0.2, 0.2]])
    chosen, rejected = select_pairs(rewards)  # the first of equal maxima over the last of equal minima
    assert chosen.tolist() == [1, 0, 0] and rejected.tolist() == [0, 3, 3]
    with pytest.raises(ValueError, match="samples_per_prompt"):
        OnlineDPOConfig(samples_per_prompt=1)


def test_online_diffusion_dpo_pairs_the_best_and_worst_of_k(pipeline_dir):
    from mmalign.train.online_diffusion import OnlineDiffusionDPO, OnlineDPOConfig

    policy, reward = _policy(pipeline_dir), Brightness()
    rows = rows_from_records([{"prompt": p} for p in PROMPTS])
    algo = OnlineDiffusionDPO(policy, rows, reward, OnlineDPOConfig(samples_per_prompt=4))
    torch.manual_seed(0)
    pairs, metrics = algo.rollout(rows)
    torch.manual_seed(0)  # the same draw, all four samples per prompt
    final = policy.sample([p for p in PROMPTS for _ in range(4)], record=False).final
    groups = reward(None, policy.decode(final)).view(4, 4)
    assert len(pairs) == 4 and metrics["rollout/reward"] == pytest.approx(groups.mean().item())
    for pair, group in zip(pairs, groups, strict=True):
        torch.testing.assert_close(reward(None, policy.decode(pair["latents_w"][None]))[0], group.max())
        torch.testing.assert_close(reward(None, policy.decode(pair["latents_l"][None]))[0], group.min())


def _bright_dark_pairs(tmp_path, n=8):
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        for tag, level in (("w", 200), ("l", 40)):
            arr = np.clip(rng.normal(level, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / f"{i}{tag}.png")
        records.append({"prompt": PROMPTS[i % 4], "image_w": f"{i}w.png", "image_l": f"{i}l.png"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_rows(tmp_path / "pairs.jsonl")


def test_offline_diffusion_dpo_learns_the_preference(pipeline_dir, tmp_path):
    from mmalign.train.diffusion_preference import PairDenoisingScores
    from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig

    policy = _policy(pipeline_dir)
    rows = _bright_dark_pairs(tmp_path)
    algo = PreferenceAlgorithm(PairDenoisingScores(policy), rows, PreferenceConfig(loss="dpo", beta=500))

    def margin() -> float:  # mean implicit-reward margin over all pairs, averaged over fixed noise draws
        torch.manual_seed(7)
        with torch.no_grad():
            return float(
                np.mean([algo.loss(algo.train_examples)[1]["rewards/margin"].item() for _ in range(4)])
            )

    start = margin()
    Trainer(
        policy,
        algo,
        TrainConfig(max_steps=15, batch_size=8, lr=3e-3, progress=False, scheduler="constant"),
        tmp_path / "run",
    ).train()
    assert margin() > start + 0.05


class BrightAgreement(Brightness):
    """Brightness with a pass/fail reading (above `threshold`), like the digit classifier's agreement."""

    threshold = 0.0

    def agreement(self, prompts, images):
        return self(prompts, images) > self.threshold


def test_image_evaluator_reports_win_rate_kl_and_paired_gain(pipeline_dir):
    policy, reward = _policy(pipeline_dir), BrightAgreement()
    evaluator = DiffusionEvaluator(rows_from_records([{"prompt": p} for p in PROMPTS]), [reward], seeds=2)
    jobs = evaluator._jobs()
    reward.threshold = evaluator._images(policy, jobs, kl=False)[0].mean(dim=(1, 2, 3)).median().item()
    base = evaluator.evaluate(policy)
    assert base["win_rate_vs_base"] == 0.5 and base["kl_to_base"] == pytest.approx(0.0, abs=1e-8)
    assert base["n_images"] == 8
    assert base["brightness_agreement_gain"] == 0 and base["brightness_agreement_gain_se"] == 0
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    moved = evaluator.evaluate(policy)
    assert moved["kl_to_base"] > 0 and moved["win_rate_vs_base"] != 0.5
    # the paired gain over the same-noise base images, and its standard error, by hand
    ours = reward.agreement(None, evaluator._images(policy, jobs, kl=False)[0]).float()
    with policy.reference():
        theirs = reward.agreement(None, evaluator._images(policy, jobs, kl=False)[0]).float()
    diff = (ours - theirs).tolist()
    mean = sum(diff) / 8
    se = (sum((d - mean) ** 2 for d in diff) / 7) ** 0.5 / 8**0.5
    assert moved["brightness_agreement"] - base["brightness_agreement"] == pytest.approx(mean)
    assert moved["brightness_agreement_gain"] == pytest.approx(mean)
    assert moved["brightness_agreement_gain_se"] == pytest.approx(se) and se > 0


def test_diffusion_dpo_recipe_reads_image_pairs_and_names_bad_rows(pipeline_dir, tmp_path):
    from mmalign.core.data import DataError
    from mmalign.run import build_run

    _bright_dark_pairs(tmp_path)
    recipe = {
        "model": {"kind": "diffusion_image", "name_or_path": str(pipeline_dir), "num_steps": 4},
        "data": {"train": str(tmp_path / "pairs.jsonl")},
        "algorithm": {"name": "diffusion_dpo", "beta": 100},
        "train": {"max_steps": 1, "batch_size": 4},
    }
    _, algorithm, *_ = build_run(recipe)
    assert len(algorithm.train_examples) == 8
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"prompt": PROMPTS[0], "image_w": "0w.png"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl.*line 3.*image_l"):
        build_run(recipe)


def test_train_step_range_keeps_training_off_the_last_low_noise_steps(pipeline_dir):
    policy = _policy(pipeline_dir)  # 4 DDIM steps
    rows = rows_from_records([{"prompt": p} for p in PROMPTS])
    cfg = DiffusionPGConfig(advantage="reinforce", train_step_range=(0.0, 0.5))
    batch, _ = DiffusionPolicyGradient(policy, rows, Brightness(), cfg).rollout(rows)
    assert batch["steps"][0].tolist() == [0, 1]
    # step i of 4 is trained iff lo <= i/4 < hi: (0, 0.2) keeps step 0, (0.3, 0.8) steps 2 and 3
    for step_range, expected in [((0.0, 0.2), [0]), ((0.3, 0.8), [2, 3]), ((0.25, 0.5), [1])]:
        cfg = DiffusionPGConfig(advantage="reinforce", train_step_range=step_range)
        batch, _ = DiffusionPolicyGradient(policy, rows, Brightness(), cfg).rollout(rows)
        assert batch["steps"][0].tolist() == expected, step_range
    with pytest.raises(ValueError, match="train_step_range"):
        DiffusionPGConfig(train_step_range=(0.5, 0.5))


@pytest.mark.parametrize("name", ["ddpo_digits", "dpok_digits", "ddpo_compressibility"])
def test_diffusion_policy_gradient_recipes_parse(name):
    from pathlib import Path

    from mmalign.core.config import load_recipe, to_dataclass
    from mmalign.core.diffusion_policy import DiffusionModelConfig

    recipe = load_recipe(str(Path(__file__).resolve().parents[1] / "vision" / f"{name}.yaml"), [])
    to_dataclass(DiffusionModelConfig, recipe["model"], "model")
    section = {k: v for k, v in recipe["algorithm"].items() if k != "reward"}
    cfg = to_dataclass(DiffusionPGConfig, section, "algorithm")
    TrainConfig(**recipe["train"])
    assert cfg.train_step_range[1] < 1.0


@pytest.mark.parametrize("stop_at", [2, 3], ids=["between-rollouts", "inside-a-rollout"])
def test_ddpo_resume_matches_an_uninterrupted_run(pipeline_dir, tmp_path, stop_at):
    """Per-prompt statistics, the reused rollout of PPO epochs and the RNG all come back from the checkpoint."""
    rows = rows_from_records([{"prompt": p} for p in PROMPTS])
    cfg = DiffusionPGConfig(clip_range=0.2, stat_min_count=2)

    def run(out, max_steps):
        policy = _policy(pipeline_dir)
        train = TrainConfig(
            max_steps=max_steps, batch_size=8, lr=3e-3, progress=False, ppo_epochs=2, save_every=1
        )
        Trainer(policy, DiffusionPolicyGradient(policy, rows, Brightness(), cfg), train, out).train()
        return policy.trainable_state_dict()

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "split", stop_at)
    resumed = run(tmp_path / "split", 4)
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, atol=0, rtol=0)
