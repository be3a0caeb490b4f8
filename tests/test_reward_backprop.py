"""Reward backprop (AlignProp, DRaFT-K, DRaFT-LV, ReFL) on the tiny Stable Diffusion pipeline, end to end.

As in test_vision_algorithms.py the decoder is the identity (the fixture's VAE is random), so a reward on the
outputs is a reward on what the UNet controls; the VAE path is covered by test_reward_backprop_sampling.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.core.config import RecipeError
from mmalign.core.data import rows_from_records
from mmalign.core.params import LoraSpec
from mmalign.core.registry import ALGORITHMS, MODEL_KINDS, why_not
from mmalign.core.reward import RewardError
from mmalign.train import checkpoint as ckpt
from mmalign.train.diffusion_pg import data_denoising_loss
from mmalign.train.reward_backprop import RewardBackprop, RewardBackpropConfig
from mmalign.train.trainer import TrainConfig, Trainer
from mmalign.vision.diffusion_policy import DiffusionImagePolicy
from mmalign.vision.rewards import JpegCompressibility
from mmalign.zoo.tiny_pipelines import tiny_sd_pipeline

PROMPTS = ["a handwritten seven", "the digit one", "a drawing of a 3", "the number 5"]
ROWS = rows_from_records([{"prompt": p} for p in PROMPTS])


class Brightness:
    """Mean value of the output: a differentiable reward a tiny model learns in a few updates."""

    name = "brightness"
    differentiable = True

    def __call__(self, prompts, images):
        return images.float().mean(dim=(1, 2, 3))


class LatentOutputPolicy(DiffusionImagePolicy):
    """The policy with an identity decoder, and real outputs read from the rows (for ReFL's J_pre)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def encode_target(self, row):
        value = float(row.data["level"])
        return {"prompt": row.data["prompt"], "latents": torch.full(self.sample_shape, value)}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd-rbp")
    tiny_sd_pipeline().save_pretrained(path)
    return path


def _policy(pipeline_dir, num_steps=4, eta=0.0, guidance=1.0) -> LatentOutputPolicy:
    torch.manual_seed(0)
    return LatentOutputPolicy.from_pretrained(
        str(pipeline_dir), lora=LoraSpec(r=4, alpha=8), num_steps=num_steps, eta=eta, guidance_scale=guidance
    )


def _mean_reward(policy, n=16) -> float:
    traj = policy.sample(
        [PROMPTS[i % 4] for i in range(n)], generator=torch.Generator().manual_seed(123), record=False
    )
    return Brightness()(None, policy.decode(traj.final)).mean().item()


def _train(policy, algo, out, steps=6, **train) -> list[dict]:
    config = TrainConfig(
        **{
            "max_steps": steps,
            "batch_size": 8,
            "lr": 3e-3,
            "progress": False,
            "scheduler": "constant",
            **train,
        }
    )
    Trainer(policy, algo, config, out).train()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "name, settings",
    [
        ("draft-1", {}),
        ("draft-full", {"backprop_steps": None, "checkpointing": True}),
        ("draft-lv", {"last_step_repeats": 2}),
        ("alignprop", {"truncation": "uniform"}),
        ("alignprop-gaussian", {"truncation": "gaussian", "truncation_mean": 2.5, "truncation_std": 1.0}),
        ("refl", {"truncation": "refl", "loss": "refl", "loss_options": {"threshold": 5.0, "scale": 1.0}}),
        ("draft-plus", {"backprop_steps": 2, "kl_coef": 0.1}),
    ],
)
def test_every_variant_raises_its_reward(pipeline_dir, tmp_path, name, settings):
    policy = _policy(pipeline_dir)
    before = _mean_reward(policy)
    algo = RewardBackprop(policy, ROWS, Brightness(), RewardBackpropConfig(**settings))
    log = _train(policy, algo, tmp_path / name)
    after = _mean_reward(policy)
    assert after > before + 0.05, (before, after)
    steps = [m for m in log if "train/reward" in m]
    assert len(steps) == 6 and all(m["train/grad_norm"] > 0 for m in steps)
    if "kl_coef" in settings:
        assert steps[0]["train/kl"] == pytest.approx(0.0, abs=1e-10) and steps[-1]["train/kl"] > 0


def _grads(policy, algo, batch) -> dict[str, torch.Tensor]:
    policy.module.zero_grad(set_to_none=True)
    losses, _ = algo.loss(batch)
    losses.mean().backward()
    return {n: p.grad.clone() for n, p in policy.module.named_parameters() if p.requires_grad}


def _moved_policy(pipeline_dir, **kwargs) -> LatentOutputPolicy:
    policy = _policy(pipeline_dir, **kwargs)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return policy


def test_draft_lv_with_one_repeat_equals_draft_1(pipeline_dir):
    policy = _moved_policy(pipeline_dir)
    draft1 = RewardBackprop(policy, ROWS, Brightness(), RewardBackpropConfig(backprop_steps=1))
    lv1 = RewardBackprop(
        policy, ROWS, Brightness(), RewardBackpropConfig(last_step_repeats=1, backprop_steps=1)
    )
    lv2 = RewardBackprop(
        policy, ROWS, Brightness(), RewardBackpropConfig(last_step_repeats=2, backprop_steps=1)
    )
    torch.manual_seed(3)
    batch, _ = draft1.rollout(ROWS)
    reference = _grads(policy, draft1, batch)
    for name, value in _grads(policy, lv1, batch).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)
    moved = _grads(policy, lv2, batch)  # the second input is a fresh re-noising: another gradient
    assert any(not torch.allclose(moved[n], reference[n]) for n in reference)


def test_kl_is_the_sum_of_step_kls_to_the_reference(pipeline_dir):
    """DRaFT+: Σ over the gradient steps of gaussian_kl(μ_θ, μ_ref, σ), σ = 1 for deterministic DDIM steps."""
    for eta in (0.0, 1.0):
        policy = _moved_policy(pipeline_dir, eta=eta)
        algo = RewardBackprop(policy, ROWS, Brightness(), RewardBackpropConfig(backprop_steps=2, kl_coef=1.0))
        torch.manual_seed(4)
        batch, _ = algo.rollout(ROWS)
        torch.manual_seed(5)
        _, metrics = algo.loss(batch)
        # by hand: the last two steps of the same chain, the policy's and the reference's means at its samples
        torch.manual_seed(5)
        cond = {"prompt_embeds": batch["cond.prompt_embeds"]}
        sampler, x, expected = policy.sampler, batch["noise"], torch.zeros(len(batch))
        with torch.no_grad():
            for i, t in enumerate(sampler.timesteps()):
                noise = torch.randn(x.shape) if sampler.is_stochastic(i) else None
                out = sampler.step(policy.predict(x, t, cond), i, x, noise)
                if i >= 2:
                    with policy.reference():
                        ref = sampler.step(policy.predict(x, t, cond), i, x)
                    std = out.std if eta > 0 else 1.0
                    expected += ((out.mean - ref.mean) ** 2 / (2 * std**2)).flatten(1).mean(1)
                x = out.prev_sample
        assert metrics["kl"].item() == pytest.approx(expected.mean().item(), rel=1e-4) and expected.mean() > 0


def test_refl_pretraining_loss_is_dlpos_data_loss_on_the_targets(pipeline_dir):
    policy = _moved_policy(pipeline_dir)
    targets = rows_from_records([{"prompt": p, "level": 0.1 * i} for i, p in enumerate(PROMPTS)])
    cfg = RewardBackpropConfig(truncation="refl", loss="refl", pretrain_loss_coef=2.0)
    algo = RewardBackprop(policy, ROWS, Brightness(), cfg, targets=targets)
    torch.manual_seed(0)
    batch, _ = algo.rollout(ROWS)
    assert [float(t.flatten()[0]) for t in batch["targets"]] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    terms = algo.loss_terms(batch)
    assert len(terms) == 2
    torch.manual_seed(7)
    losses, metrics = terms[1]()
    torch.manual_seed(7)
    expected = data_denoising_loss(policy, batch["targets"], {"prompt_embeds": batch["cond.prompt_embeds"]})
    torch.testing.assert_close(losses, 2.0 * expected)
    assert metrics["pretrain_loss"].item() == pytest.approx(expected.mean().item())
    with pytest.raises(ValueError, match=r"needs real outputs of the prompts in data\.targets"):
        RewardBackprop(policy, ROWS, Brightness(), cfg)
    with pytest.raises(ValueError, match=r"data\.targets is only read by ReFL's pretraining loss"):
        RewardBackprop(policy, ROWS, Brightness(), RewardBackpropConfig(), targets=targets)
    from mmalign.core.data import DataError

    with pytest.raises(DataError, match=r"no real output for this prompt in data\.targets"):
        RewardBackprop(policy, ROWS, Brightness(), cfg, targets=targets[:2])


def test_truncation_points_are_drawn_as_the_papers_draw_them(pipeline_dir):
    policy = _policy(pipeline_dir, num_steps=10)

    def starts(**settings):
        algo = RewardBackprop(policy, ROWS, Brightness(), RewardBackpropConfig(**settings))
        torch.manual_seed(0)
        return [algo.draw_start() for _ in range(400)]

    assert set(starts()) == {9} and set(starts(backprop_steps=None)) == {0}
    assert set(starts(backprop_steps=4)) == {6}
    assert set(starts(truncation="uniform")) == set(range(10))  # K ~ U{1..10}
    assert set(starts(truncation="uniform", truncation_range=[3, 5])) == {3, 4, 5}
    assert set(starts(truncation="refl")) == {8, 9}  # ⌈0.75·10⌉..9, ImageReward's 30..39 of 40
    gauss = starts(truncation="gaussian")  # floor(N(8.4, 1)), redrawn outside 0..9
    assert set(gauss) <= set(range(10)) and 7.3 < sum(gauss) / len(gauss) < 8.0


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"backprop_steps": 5}, r"backprop_steps \(K = 5\) is larger than the sampler's 4 steps"),
        ({"truncation": "uniform", "truncation_range": [0, 4]}, "reaches past the sampler's last step"),
        ({"truncation": "gaussian", "truncation_mean": 7.0}, "truncation_mean must lie in"),
        (
            {"truncation": "uniform", "truncation_std": 1.0},
            "truncation_mean/std are for truncation: gaussian",
        ),
    ],
)
def test_settings_that_do_not_fit_the_sampler_are_named(pipeline_dir, settings, match):
    with pytest.raises(ValueError, match=match):
        RewardBackprop(_policy(pipeline_dir), ROWS, Brightness(), RewardBackpropConfig(**settings))


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"truncation": "last_k"}, "truncation must be one of"),
        ({"backprop_steps": 0}, "backprop_steps must be >= 1"),
        ({"truncation_range": [3, 1]}, "truncation_range"),
        ({"last_step_repeats": 0}, "last_step_repeats"),
        ({"truncation": "refl", "last_step_repeats": 2}, "truncation: refl stops before it"),
        ({"loss": "draft"}, "loss must be one of"),
        ({"loss": "target"}, "needs option target"),
        ({"loss": "refl", "loss_options": {"phi": 2}}, "has no option phi"),
        ({"kl_coef": -1.0}, "kl_coef"),
    ],
)
def test_bad_config_values_are_named(settings, match):
    with pytest.raises(ValueError, match=match):
        RewardBackpropConfig(**settings)


def test_a_non_differentiable_reward_is_refused(pipeline_dir):
    with pytest.raises(ValueError, match="'jpeg_compressibility' is not differentiable"):
        RewardBackprop(_policy(pipeline_dir), ROWS, JpegCompressibility(), RewardBackpropConfig())


def _recipe(pipeline_dir, tmp_path, **algorithm) -> dict:
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {
        "model": {"kind": "diffusion_image", "name_or_path": str(pipeline_dir), "num_steps": 4, "eta": 0.0},
        "data": {"prompts": str(tmp_path / "prompts.jsonl")},
        "algorithm": {"name": "draft", "reward": "jpeg_compressibility", **algorithm},
        "train": {"max_steps": 1, "batch_size": 4},
    }


def test_the_recipe_layer_refuses_a_non_differentiable_reward_before_loading_the_model(tmp_path):
    from mmalign.run import plan

    recipe = _recipe(tmp_path / "no-such-model", tmp_path)
    for name in ("draft", "draft_lv", "alignprop", "refl"):
        recipe["algorithm"]["name"] = name
        with pytest.raises(
            RecipeError, match=rf"algorithm.reward: {name} .*'jpeg_compressibility' is not differ"
        ):
            plan(recipe)
    recipe["algorithm"]["reward"] = {"name": "digit_classifier", "path": "x"}
    recipe["train"]["max_grad_norm"] = None
    with pytest.raises(RecipeError, match=r"train\.max_grad_norm must be set for refl"):
        plan(recipe)
    recipe["train"]["max_grad_norm"] = 1.0
    assert plan(recipe).spec.family == "reward_backprop"
    recipe["algorithm"]["name"] = "ddpo"  # policy gradient takes any reward
    recipe["algorithm"]["reward"] = "jpeg_compressibility"
    assert plan(recipe).spec.name == "ddpo"


def test_registrations_name_the_variants_and_fit_diffusion_policies_only():
    from mmalign import plugins

    plugins.load()
    for name, defaults in [
        ("alignprop", {"truncation": "uniform"}),
        ("draft", {"truncation": "last"}),
        ("draft_lv", {"last_step_repeats": 2}),
        ("refl", {"truncation": "refl", "loss": "refl"}),
    ]:
        spec = ALGORITHMS[name]["diffusion"]
        assert spec.family == "reward_backprop" and spec.config is RewardBackpropConfig
        assert spec.needs == {"differentiable_decode"} and spec.needs_differentiable_reward and spec.online
        assert defaults.items() <= dict(spec.defaults).items()
        assert why_not(name, MODEL_KINDS["diffusion_image"]) is None
        assert "trains diffusion policies" in why_not(name, MODEL_KINDS["causal_lm"])


class NaNAt:
    """Brightness, but NaN for sample 1 from the `at`-th call on, or a wrong shape (`shape=True`)."""

    name, differentiable = "flaky", True

    def __init__(self, at: int, shape: bool = False):
        self.calls, self.at, self.shape = 0, at, shape

    def __call__(self, prompts, images):
        self.calls += 1
        values = images.float().mean(dim=(1, 2, 3))
        if self.calls >= self.at:
            return values[:1] if self.shape else values * torch.tensor([1.0, float("nan"), 1.0, 1.0])
        return values


class NaNGradient(torch.autograd.Function):
    """The mean of each output, with a NaN gradient (a finite reward whose backward overflows)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.float().mean(dim=(1, 2, 3))

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("nan"))


class NaNGradientReward:
    name, differentiable = "nan_grad", True

    def __call__(self, prompts, images):
        return NaNGradient.apply(images)


@pytest.mark.parametrize(
    "reward, match",
    [
        (NaNAt(3), r"reward 'flaky' returned non-finite values at batch indices \[1\]"),
        (NaNAt(3, shape=True), r"reward 'flaky' returned shape \(1,\), expected \(4,\)"),
        (NaNGradientReward(), r"reward 'nan_grad' has a non-finite gradient w.r.t. its inputs"),
    ],
    ids=["nan-reward", "wrong-shape", "nan-gradient"],
)
def test_bad_rewards_stop_training_at_their_step_and_leave_checkpoints_intact(
    pipeline_dir, tmp_path, reward, match
):
    policy = _policy(pipeline_dir)
    algo = RewardBackprop(policy, ROWS, reward, RewardBackpropConfig())
    before = {n: p.clone() for n, p in policy.trainable_state_dict().items()}
    with pytest.raises(RewardError, match=match):
        _train(policy, algo, tmp_path / "run", steps=4, batch_size=4, save_every=1)
    run = tmp_path / "run"
    saved = sorted((run / "checkpoints").glob("step-*"))
    expected = [] if isinstance(reward, NaNGradientReward) else [1, 2]
    assert saved == [ckpt.checkpoint_dir(run, step) for step in expected]
    for path in saved:  # each verifies against its manifest and holds finite weights
        assert ckpt.checkpoint_problem(path) is None
        ckpt.require_finite(ckpt.load_state(path, "policy"), str(path))
    if not saved:  # the very first update failed: the weights are untouched
        for name, value in policy.trainable_state_dict().items():
            torch.testing.assert_close(value, before[name])


def test_resumed_run_equals_an_uninterrupted_one(pipeline_dir, tmp_path):
    """Noise and truncation points are drawn from the checkpointed RNG, so a resume draws the same chains."""
    cfg = RewardBackpropConfig(truncation="uniform")

    def run(out, steps):
        policy = _policy(pipeline_dir)
        _train(
            policy,
            RewardBackprop(policy, ROWS, Brightness(), cfg),
            out,
            steps=steps,
            batch_size=4,
            save_every=1,
        )
        return policy.trainable_state_dict()

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 4)
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, atol=0, rtol=0)


def test_ppo_epochs_reuse_the_rollouts_draws_with_the_updated_weights(pipeline_dir, tmp_path):
    policy = _policy(pipeline_dir)
    algo = RewardBackprop(policy, ROWS, Brightness(), RewardBackpropConfig())
    batches = []
    loss_terms = algo.loss_terms
    algo.loss_terms = lambda batch: (batches.append(batch["noise"].clone()), loss_terms(batch))[1]
    log = _train(policy, algo, tmp_path / "run", steps=4, batch_size=4, ppo_epochs=2)
    assert torch.equal(batches[0], batches[1]) and torch.equal(batches[2], batches[3])
    assert not torch.equal(batches[1], batches[2])
    rewards = [m["train/reward"] for m in log if "train/reward" in m]
    assert rewards[1] != rewards[0]  # the same noise, resampled under the updated weights


def test_real_images_become_vae_latents_for_the_pretraining_loss(pipeline_dir, tmp_path):
    """Image `data.targets`: validated rows, encoded with the VAE's latent mean × scaling factor."""
    import numpy as np
    from PIL import Image

    from mmalign.core.data import DataError, read_rows
    from mmalign.vision.kinds import validate_image_target_rows

    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "seven.png")
    (tmp_path / "targets.jsonl").write_text(json.dumps({"prompt": PROMPTS[0], "image": "seven.png"}) + "\n")
    rows = validate_image_target_rows(read_rows(tmp_path / "targets.jsonl"))
    policy = DiffusionImagePolicy.from_pretrained(str(pipeline_dir))
    encoded = policy.encode_target(rows[0])
    image = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 127.5 - 1
    with torch.no_grad():
        expected = policy.vae.encode(image).latent_dist.mean[0] * policy.vae.config.scaling_factor
    assert encoded["prompt"] == PROMPTS[0]
    torch.testing.assert_close(encoded["latents"], expected)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": PROMPTS[0], "img": "seven.png"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 1.*image"):
        validate_image_target_rows(read_rows(tmp_path / "bad.jsonl"))
