"""Diffusion algorithms on flow-matching policies (Flow-GRPO and its windowed Fast variant, DiffusionNFT,
Diffusion-DPO) and on SDXL (DDPO, Diffusion-DPO), on tiny pipelines.

As in test_vision_algorithms.py, the tiny VAEs are random, so policies here decode to their latents and the reward
is the latents' mean, which the transformer controls directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_fixtures import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline

from mmalign.core.data import read_rows, rows_from_records
from mmalign.core.flow import FlowMatchForwardProcess
from mmalign.core.params import LoraSpec
from mmalign.objectives.diffusion import gaussian_logprob
from mmalign.train.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from mmalign.train.diffusion_pg import DiffusionPGConfig, DiffusionPolicyGradient
from mmalign.train.diffusion_preference import PairDenoisingScores
from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig
from mmalign.train.trainer import TrainConfig, Trainer
from mmalign.vision.diffusion_policy import DiffusionImagePolicy
from mmalign.vision.flux_policy import FluxPolicy
from mmalign.vision.sd3_policy import SD3Policy
from mmalign.vision.sdxl_policy import SDXLPolicy
from mmalign.zoo.tiny_pipelines import tiny_sd_pipeline

PROMPTS = ["a handwritten seven", "the digit one", "a drawing of the number", "the number 5"]
ROWS = rows_from_records([{"prompt": p} for p in PROMPTS])


class Brightness:
    name = "brightness"
    differentiable = True

    def __call__(self, prompts, outputs):
        return outputs.float().flatten(1).mean(1)


class LatentSD3(SD3Policy):
    def decode(self, latents):
        return latents


class LatentFlux(FluxPolicy):
    def decode(self, latents):
        return latents


class LatentSDXL(SDXLPolicy):
    def decode(self, latents):
        return latents


class LatentSD(DiffusionImagePolicy):
    def decode(self, latents):
        return latents


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-algos")
    for name, pipe in [
        ("sd3", tiny_sd3_pipeline()),
        ("flux", tiny_flux_pipeline(guidance_embeds=True)),
        ("sdxl", tiny_sdxl_pipeline()),
        ("sd", tiny_sd_pipeline()),
    ]:
        pipe.save_pretrained(root / name)
    return {name: str(root / name) for name in ("sd3", "flux", "sdxl", "sd")}


def _sd3(dirs, **kwargs):
    torch.manual_seed(0)
    settings = {"num_steps": 4, "guidance_scale": 1.0, "sde_type": "flow_grpo", "noise_level": 0.7, **kwargs}
    return LatentSD3.from_pretrained(dirs["sd3"], lora=LoraSpec(r=4, alpha=8), **settings)


def _mean_reward(policy, n=16, sampler=None) -> float:
    prompts = [PROMPTS[i % 4] for i in range(n)]
    final = policy.sample(
        prompts, generator=torch.Generator().manual_seed(123), record=False, sampler=sampler
    ).final
    return Brightness()(None, policy.decode(final)).mean().item()


def _train(policy, algorithm, tmp_path, steps=8, batch=16, lr=3e-3, **train):
    Trainer(
        policy,
        algorithm,
        TrainConfig(max_steps=steps, batch_size=batch, lr=lr, progress=False, scheduler="constant", **train),
        tmp_path,
    ).train()


# ---------------------------------------------------------------------------------------- Flow-GRPO
def test_flow_grpo_rescoring_at_the_sampling_weights_reproduces_the_recorded_logprobs(dirs):
    policy = _sd3(dirs)
    cfg = DiffusionPGConfig(
        advantage="grpo", samples_per_prompt=2, kl_coef=0.04, train_step_range=(0.0, 0.75)
    )
    algo = DiffusionPolicyGradient(policy, ROWS[:2], Brightness(), cfg)
    batch, _ = algo.rollout(ROWS[:2])
    assert batch["steps"][0].tolist() == [0, 1, 2]  # Flow-GRPO trains all but the last step
    for j, index in enumerate(batch["steps"][0].tolist()):
        x, cond = batch["latents"][:, j], algo._conditioning(batch)
        t = policy.sampler.timesteps()[index]
        step = policy.sampler.step(policy.predict(x, t, cond), index, x)
        logp = gaussian_logprob(batch["next_latents"][:, j], step.mean, step.std)
        torch.testing.assert_close(logp, batch["old_logprobs"][:, j], rtol=0, atol=1e-5)
    _, metrics = algo.loss(batch)
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-8)  # LoRA B = 0: the policy is the base


def test_flow_grpo_fast_windows_are_recorded_and_rescored_with_their_step_types(dirs):
    policy = _sd3(dirs, num_steps=6)
    cfg = DiffusionPGConfig(
        advantage="grpo", samples_per_prompt=2, sde_window_size=2, sde_window_range=(0, 4), same_latent=True
    )
    algo = DiffusionPolicyGradient(policy, ROWS[:2], Brightness(), cfg)
    torch.manual_seed(3)
    windows = set()
    for _ in range(6):
        batch, _ = algo.rollout(ROWS[:2])
        start, end = batch["sde_window"][0].tolist()
        windows.add(start)
        assert end - start == 2 and 0 <= start <= 2
        assert batch["steps"][0].tolist() == [start, start + 1]  # only the window's steps draw noise
        # the samples of a prompt share their initial noise; the window's SDE noise tells them apart
        first = batch["latents"][:, 0]
        torch.testing.assert_close(first[0], first[1], rtol=0, atol=0)
        assert not torch.equal(batch["final"][0], batch["final"][1])
        # re-scoring uses the rollout's window: the same step with the all-SDE sampler is another Gaussian
        j, index = 0, start
        x, cond = batch["latents"][:, j], algo._conditioning(batch)
        windowed = policy.sampler.with_window((start, end))
        output = policy.predict(x, windowed.timesteps()[index], cond)
        logp = gaussian_logprob(batch["next_latents"][:, j], *_gaussian(windowed, output, index, x))
        torch.testing.assert_close(logp, batch["old_logprobs"][:, j], rtol=0, atol=1e-5)
    assert len(windows) > 1  # the window moves between rollouts
    losses, metrics = algo.loss(batch)
    assert torch.isfinite(losses).all() and metrics["clip_fraction"].item() == 0.0


def _gaussian(sampler, output, index, x):
    step = sampler.step(output, index, x)
    return step.mean, step.std


def test_flow_grpo_raises_its_reward_on_a_tiny_sd3(dirs, tmp_path):
    policy = _sd3(dirs)
    before = _mean_reward(policy, sampler=policy.ode_sampler)
    cfg = DiffusionPGConfig(
        advantage="grpo", samples_per_prompt=4, clip_range=0.2, train_step_range=(0.0, 0.75)
    )
    _train(policy, DiffusionPolicyGradient(policy, ROWS, Brightness(), cfg), tmp_path)
    after = _mean_reward(policy, sampler=policy.ode_sampler)
    assert after > before + 0.05, (before, after)


def test_grpo_runs_on_flux_packed_latents(dirs):
    torch.manual_seed(0)
    policy = LatentFlux.from_pretrained(
        dirs["flux"], lora=LoraSpec(r=4, alpha=8), num_steps=3, resolution=16, max_sequence_length=8
    )
    cfg = DiffusionPGConfig(advantage="grpo", samples_per_prompt=2, sde_window_size=1, same_latent=True)
    batch, _ = DiffusionPolicyGradient(policy, ROWS[:2], Brightness(), cfg).rollout(ROWS[:2])
    assert batch["latents"].shape[2:] == (16, 16) and batch["final"].shape == (4, 16, 16)
    losses, _ = DiffusionPolicyGradient(policy, ROWS[:2], Brightness(), cfg).loss(batch)
    losses.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


@pytest.mark.parametrize(
    ("model", "cfg", "match"),
    [
        ({"sde_type": "ode"}, {}, "no stochastic step"),
        ({"sde_type": "ode"}, {"sde_window_size": 2}, "SDE"),
        ({}, {"sde_window_size": 2, "sde_window_range": (2, 6)}, "runs past"),
        ({}, {"sde_window_size": 1, "train_step_range": (0.0, 0.5)}, "train_step_range"),
        ({}, {"diffusion_loss_coef": 0.1}, "diffusion_loss_on: data"),
    ],
)
def test_bad_flow_settings_are_named_before_training(dirs, model, cfg, match):
    policy = _sd3(dirs, **model)
    with pytest.raises(ValueError, match=match):
        DiffusionPolicyGradient(policy, ROWS, Brightness(), DiffusionPGConfig(**cfg))


def test_bad_window_settings_are_named_by_the_config():
    with pytest.raises(ValueError, match="sde_window_range"):
        DiffusionPGConfig(sde_window_size=3, sde_window_range=(0, 2))
    with pytest.raises(ValueError, match="sde_window_size"):
        DiffusionPGConfig(sde_window_range=(0, 2))
    with pytest.raises(ValueError, match="same_latent"):
        DiffusionPGConfig(same_latent=True)


# -------------------------------------------------------------------------------------- DiffusionNFT
def test_nft_rollout_records_forward_process_draws_and_the_old_prediction(dirs):
    policy = _sd3(dirs, sde_type="ode")
    cfg = DiffusionNFTConfig(samples_per_prompt=4, timesteps_per_sample=3)
    algo = DiffusionNFT(policy, ROWS[:2], Brightness(), cfg)
    torch.manual_seed(0)
    batch, metrics = algo.rollout(ROWS[:2])
    assert batch["noisy"].shape == (8, 3, 4, 8, 8) and batch["timesteps"].shape == (8, 3)
    assert 0 < metrics["rollout/positive_share"] < 1
    # the recorded optimality: group-normalised rewards through r = ½ + ½·clip(A/5, −1, 1)
    rewards = Brightness()(None, batch_final(batch, policy)).view(2, 4)
    a = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(batch["optimality"], (0.5 + 0.5 * (a / 5).clamp(-1, 1)).flatten())
    # old outputs are the policy's unguided predictions at the recorded (x_t, t)
    x_t, t = batch["noisy"][:, 0], batch["timesteps"][:, 0]
    process = policy.forward_process
    cond = {k[5:]: v for k, v in batch.fields.items() if k.startswith("cond.")}
    with torch.no_grad():
        again = policy.predict(x_t, process.model_timestep(t), cond, guidance=1.0)
    torch.testing.assert_close(again, batch["old_outputs"][:, 0], rtol=0, atol=1e-5)
    # the forward process inverts: the noise implied by (x_t, x₀) is the ε that made x_t
    x0 = batch_final(batch, policy)
    eps = batch["targets"][:, 0] + x0
    torch.testing.assert_close(process.implied_noise(x_t, x0, t), eps, rtol=1e-4, atol=1e-4)


def batch_final(batch, policy):
    """The clean samples of a rollout, recovered from a recorded draw: x₀ = x_t − σ·v_target."""
    x_t, t, target = batch["noisy"][:, 0], batch["timesteps"][:, 0], batch["targets"][:, 0]
    # x_t = (1 − σ)x₀ + σε and v = ε − x₀  ⇒  x₀ = x_t − σ·v
    return x_t - t.view(-1, 1, 1, 1) * target


@pytest.mark.parametrize("family", ["flow", "ddpm"])
def test_nft_raises_its_reward_on_flow_and_ddpm_policies(dirs, tmp_path, family):
    torch.manual_seed(0)
    if family == "flow":
        policy = _sd3(dirs, sde_type="ode")
    else:
        policy = LatentSD.from_pretrained(
            dirs["sd"], lora=LoraSpec(r=4, alpha=8), num_steps=4, eta=0.0, guidance_scale=1.0
        )
    before = _mean_reward(policy)
    cfg = DiffusionNFTConfig(samples_per_prompt=4, timesteps_per_sample=2, beta=1.0, kl_coef=0.01)
    _train(policy, DiffusionNFT(policy, ROWS, Brightness(), cfg), tmp_path)
    after = _mean_reward(policy)
    assert after > before + 0.05, (before, after)


def test_nft_soft_updated_old_policy_samples_and_resumes(dirs, tmp_path):
    policy = _sd3(dirs, sde_type="ode")
    cfg = DiffusionNFTConfig(
        samples_per_prompt=2, timesteps_per_sample=1, old_decay_rate=0.25, old_decay_max=0.5
    )
    algo = DiffusionNFT(policy, ROWS[:2], Brightness(), cfg)
    algo.rollout(ROWS[:2])
    first = {k: v.clone() for k, v in algo.old_weights.items()}
    torch.testing.assert_close(first, policy.trainable_state_dict())  # rollout 0: θ_old = θ
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(1.0)
    current = policy.trainable_state_dict()
    algo.rollout(ROWS[:2])  # rollout 1: η = 0.25
    for name, value in algo.old_weights.items():
        torch.testing.assert_close(value, 0.25 * first[name] + 0.75 * current[name])
    torch.testing.assert_close(policy.trainable_state_dict(), current)  # the trained weights are back
    state = algo.state_dict()
    other = DiffusionNFT(policy, ROWS[:2], Brightness(), cfg)
    other.load_state_dict(state)
    assert other.rollouts == 2 and other._decay() == 0.5
    torch.testing.assert_close(other.old_weights, algo.old_weights)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples_per_prompt": 1}, "samples_per_prompt"),
        ({"advantage": "per_prompt"}, "advantage"),
        ({"beta": 0.0}, "beta"),
        ({"rollout_guidance": 0.5}, "rollout_guidance"),
        ({"old_decay_max": 1.0}, "old_decay"),
    ],
)
def test_bad_nft_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionNFTConfig(**kwargs)


# -------------------------------------------------------------------------------- Diffusion-DPO on flows
def _pairs(tmp_path, size=16, n=8):
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        for tag, level in (("w", 200), ("l", 40)):
            arr = np.clip(rng.normal(level, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / f"{i}{tag}.png")
        records.append({"prompt": PROMPTS[i % 4], "image_w": f"{i}w.png", "image_l": f"{i}l.png"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_rows(tmp_path / "pairs.jsonl")


def test_diffusion_dpo_surrogate_on_a_flow_is_minus_half_the_flow_matching_loss(dirs, tmp_path):
    policy = _sd3(dirs)
    scores = PairDenoisingScores(policy)
    batch = scores.collate_pairs([policy.encode_pair(r) for r in _pairs(tmp_path, n=2)])
    assert isinstance(policy.forward_process, FlowMatchForwardProcess)
    assert torch.equal(batch["timesteps"][:2], batch["timesteps"][2:])  # a pair shares (ε, σ)
    logp = scores.sequence_logprobs(batch).token_logps[:, 0]
    x0, eps, sigma = batch["latents"], batch["noise"], batch["timesteps"]
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        v = policy.predict(x_t, sigma * 1000, batch["conditioning"], guidance=1.0)
    torch.testing.assert_close(logp, -0.5 * ((v - (eps - x0)) ** 2).flatten(1).mean(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd3", "sdxl"])
def test_diffusion_dpo_learns_the_preference_on_sd3_and_sdxl(dirs, tmp_path, kind):
    torch.manual_seed(0)
    if kind == "sd3":
        policy = _sd3(dirs)
    else:
        policy = LatentSDXL.from_pretrained(dirs["sdxl"], lora=LoraSpec(r=4, alpha=8), num_steps=4)
    algo = PreferenceAlgorithm(
        PairDenoisingScores(policy), _pairs(tmp_path), PreferenceConfig(loss="dpo", beta=500)
    )

    def margin() -> float:
        torch.manual_seed(7)
        with torch.no_grad():
            return float(
                np.mean([algo.loss(algo.train_examples)[1]["rewards/margin"].item() for _ in range(4)])
            )

    start = margin()
    _train(policy, algo, tmp_path / "run", steps=15, batch=8)
    assert margin() > start + 0.05


def test_ddpo_raises_its_reward_on_a_tiny_sdxl(dirs, tmp_path):
    torch.manual_seed(0)
    policy = LatentSDXL.from_pretrained(
        dirs["sdxl"], lora=LoraSpec(r=4, alpha=8), num_steps=4, eta=1.0, guidance_scale=1.0
    )
    before = _mean_reward(policy)
    cfg = DiffusionPGConfig(clip_range=0.2, advantage="reinforce")
    _train(policy, DiffusionPolicyGradient(policy, ROWS, Brightness(), cfg), tmp_path, lr=3e-2)
    after = _mean_reward(policy)
    assert after > before + 0.03, (before, after)  # the tiny SDXL's per-sample reward spread is 0.05


# ------------------------------------------------------------------------ the recipe path on image-flow-tiny
@pytest.fixture(scope="module")
def flow_tiny(mmalign_home):
    from filelock import FileLock

    from mmalign.zoo import registry

    with FileLock(str(mmalign_home) + ".lock"):
        return registry.build("image-flow-tiny", log=lambda *_: None)


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("grpo", {"samples_per_prompt": 2, "sde_window_size": 1, "same_latent": True, "kl_coef": 0.04}),
        ("diffusion_nft", {"samples_per_prompt": 2, "timesteps_per_sample": 1}),
        ("online_diffusion_dpo", {"samples_per_prompt": 2}),
    ],
)
def test_flow_methods_run_through_the_recipe_path_and_evaluate_with_the_ode(flow_tiny, tmp_path, name, extra):
    from mmalign import plugins
    from mmalign.core.registry import MODEL_KINDS
    from mmalign.run import build_run

    plugins.load()
    tiny = MODEL_KINDS["diffusion_sd3"].tiny()
    recipe = {
        "model": tiny["model"],
        "data": {"prompts": tiny["data"]["prompts"]},
        "algorithm": {"name": name, "reward": tiny["reward"], **extra},
        "eval": tiny["eval"],
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-4, "progress": False},
    }
    policy, algorithm, train, evaluator, report = build_run(recipe)
    assert policy.sampler.sde_type == "flow_grpo" and policy.eval_sampler.sde_type == "ode"
    before = evaluator.evaluate(policy)
    assert "kl_to_base" not in before and before["win_rate_vs_base"] == 0.5  # the ODE: no path KL
    assert evaluator.evaluate(policy) == before  # the ODE from fixed seeds is deterministic
    summary = Trainer(policy, algorithm, train, tmp_path / name, evaluator=evaluator, report=report).train()
    assert summary["steps"] == 2 and (tmp_path / name / "final").exists()
    assert policy.sampler.sde_type == "flow_grpo"  # evaluation swapped the sampler back
