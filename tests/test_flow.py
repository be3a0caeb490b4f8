"""Flow-matching sampler and forward process: formulas written out independently, equality with the pipelines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from pipeline_fixtures import saved_and_loaded, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline

from mmalign.core.flow import FlowMatchForwardProcess, FlowMatchSampler, flow_matching_loss
from mmalign.objectives.diffusion import gaussian_logprob

SD3_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
PROMPTS = ["a handwritten seven", "the digit 3"]


def _state(seed: int, shape=(2, 4, 8, 8)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _numpy_logprob(x_next: np.ndarray, mean: np.ndarray, std: float) -> np.ndarray:
    density = -((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return density.reshape(len(density), -1).mean(1)


# ----------------------------------------------------------------------------------------- the SDE steps
@pytest.mark.parametrize("index", [0, 1, 4, 9])
def test_flow_grpo_step_logprob_is_the_written_out_gaussian(index):
    """Flow-GRPO: x' = x + [v + σ_t²/(2σ)(x + (1−σ)v)]Δσ + σ_t·sqrt(−Δσ)·ε, σ_t = a·sqrt(σ/(1−σ)), in float64."""
    sampler = FlowMatchSampler(SD3_CONFIG, 10, sde_type="flow_grpo", noise_level=0.7)
    v, x, eps = _state(index)
    out = sampler.step(v, index, x, eps)

    grid = sampler.sigmas.double().numpy()
    sigma, dsigma = grid[index], grid[index + 1] - grid[index]
    denominator = 1 - (grid[1] if sigma == 1 else sigma)  # Flow-GRPO reads σ_1 where σ = 1
    sigma_t = 0.7 * math.sqrt(sigma / denominator)
    xn, vn, en = x.double().numpy(), v.double().numpy(), eps.double().numpy()
    mean = xn + (vn + sigma_t**2 / (2 * sigma) * (xn + (1 - sigma) * vn)) * dsigma
    std = sigma_t * math.sqrt(-dsigma)
    x_next = mean + std * en

    assert sampler.is_stochastic(index)
    np.testing.assert_allclose(out.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(out.std), std, rtol=1e-6)
    np.testing.assert_allclose(out.prev_sample.numpy(), x_next, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.pred_original_sample.numpy(), xn - sigma * vn, rtol=1e-5, atol=1e-5)
    logp = gaussian_logprob(out.prev_sample, out.mean, out.std)
    assert logp.dtype == torch.float32 and logp.shape == (2,)
    np.testing.assert_allclose(logp.numpy(), _numpy_logprob(x_next, mean, std), rtol=1e-5, atol=1e-5)


def test_flow_grpo_first_step_uses_the_second_grid_value_where_sigma_is_one():
    sampler = FlowMatchSampler(SD3_CONFIG, 4, sde_type="flow_grpo", noise_level=0.5)
    assert float(sampler.sigmas[0]) == 1.0
    expected = 0.5 * math.sqrt(1.0 / (1 - float(sampler.sigmas[1])))
    assert sampler.sde_scale(0) == pytest.approx(expected, rel=1e-12)
    assert math.isfinite(sampler.sde_scale(0))


@pytest.mark.parametrize("index", [0, 3, 9])
def test_dance_grpo_step_is_its_score_form(index):
    """DanceGRPO: mean = x + Δσ·v − ½η²·s·Δσ with s = −(x − (1−σ)x̂₀)/σ², x̂₀ = x − σv; std = η·sqrt(−Δσ)."""
    eta = 0.3
    sampler = FlowMatchSampler(SD3_CONFIG, 10, sde_type="dance_grpo", noise_level=eta)
    v, x, eps = _state(10 + index)
    out = sampler.step(v, index, x, eps)

    grid = sampler.sigmas.double().numpy()
    sigma, dsigma = grid[index], grid[index + 1] - grid[index]
    xn, vn = x.double().numpy(), v.double().numpy()
    x0 = xn - sigma * vn
    score = -(xn - x0 * (1 - sigma)) / sigma**2
    mean = xn + dsigma * vn - 0.5 * eta**2 * score * dsigma
    std = eta * math.sqrt(sigma - grid[index + 1])

    np.testing.assert_allclose(out.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(out.std), std, rtol=1e-6)
    np.testing.assert_allclose(
        out.prev_sample.numpy(), mean + std * eps.double().numpy(), rtol=1e-5, atol=1e-5
    )
    logp = gaussian_logprob(out.prev_sample, out.mean, out.std)
    np.testing.assert_allclose(
        logp.numpy(), _numpy_logprob(out.prev_sample.double().numpy(), mean, std), rtol=1e-5, atol=1e-5
    )


def test_step_is_differentiable_with_the_drift_coefficient_of_the_velocity():
    """∂mean/∂v = (1 + σ_t²(1 − σ)/(2σ))·Δσ elementwise: a policy gradient flows through the model output."""
    sampler = FlowMatchSampler(SD3_CONFIG, 6, sde_type="flow_grpo", noise_level=0.8)
    v, x, _ = _state(3, shape=(1, 3))
    v.requires_grad_(True)
    sampler.step(v, 2, x, None).mean.sum().backward()
    sigma, dsigma = float(sampler.sigmas[2]), float(sampler.sigmas[3] - sampler.sigmas[2])
    coefficient = (1 + sampler.sde_scale(2) ** 2 * (1 - sigma) / (2 * sigma)) * dsigma
    torch.testing.assert_close(v.grad, torch.full_like(v, coefficient))


def test_step_computes_in_float32_from_bfloat16_inputs():
    sampler = FlowMatchSampler(SD3_CONFIG, 4, sde_type="flow_grpo")
    v, x, eps = _state(4)
    out = sampler.step(v.bfloat16(), 1, x.bfloat16(), eps)
    assert out.mean.dtype == out.prev_sample.dtype == out.std.dtype == torch.float32
    assert gaussian_logprob(out.prev_sample, out.mean, out.std).dtype == torch.float32


@pytest.mark.parametrize(("sde_type", "noise_level"), [("flow_grpo", 0.7), ("dance_grpo", 0.3)])
def test_sde_keeps_the_marginals_of_the_flow(sde_type, noise_level):
    """On Gaussian data x₀ ~ N(0, s²) the exact velocity is v(x, σ) = (σ − (1 − σ)s²)/((1 − σ)²s² + σ²)·x;
    both SDEs driven by it end with variance s², as the ODE does (a wrong drift correction would not)."""
    s2 = 0.25
    sampler = FlowMatchSampler({**SD3_CONFIG, "shift": 1.0}, 200, sde_type=sde_type, noise_level=noise_level)
    g = torch.Generator().manual_seed(0)
    x = sampler.initial_noise((40000, 1), g, "cpu", torch.float32)
    for i in range(sampler.num_steps):
        sigma = float(sampler.sigmas[i])
        v = (sigma - (1 - sigma) * s2) / ((1 - sigma) ** 2 * s2 + sigma**2) * x
        x = sampler.step(v, i, x, torch.randn(x.shape, generator=g)).prev_sample
    assert float(x.var()) == pytest.approx(s2, rel=0.05)


# --------------------------------------------------------------------------------------- SDE windows
def test_window_makes_only_its_steps_stochastic_and_the_rest_euler():
    sampler = FlowMatchSampler(SD3_CONFIG, 6, sde_type="flow_grpo", sde_window=(2, 4))
    ode = FlowMatchSampler(SD3_CONFIG, 6)
    assert [sampler.is_stochastic(i) for i in range(6)] == [False, False, True, True, False, False]
    v, x, eps = _state(5)
    for i in range(6):
        out, euler = sampler.step(v, i, x, eps), ode.step(v, i, x, eps)
        if i in (2, 3):
            assert float(out.std) > 0 and not torch.equal(out.prev_sample, euler.prev_sample)
        else:
            assert float(out.std) == 0.0
            assert torch.equal(out.prev_sample, euler.prev_sample)
            assert torch.equal(out.mean, x + (sampler.sigmas[i + 1] - sampler.sigmas[i]) * v)
    moved = sampler.with_window((0, 1))
    assert [moved.is_stochastic(i) for i in range(6)] == [True, False, False, False, False, False]
    assert sampler.sde_window == (2, 4)  # the original is unchanged


def test_ode_sampler_is_deterministic_everywhere():
    sampler = FlowMatchSampler(SD3_CONFIG, 3)
    v, x, eps = _state(6)
    assert not any(sampler.is_stochastic(i) for i in range(3))
    assert torch.equal(sampler.step(v, 1, x, eps).prev_sample, sampler.step(v, 1, x, None).prev_sample)


def test_shared_initial_noise_per_group():
    sampler = FlowMatchSampler(SD3_CONFIG, 2)
    noise = sampler.initial_noise(
        (6, 4, 2, 2), torch.Generator().manual_seed(1), "cpu", torch.float32, group_size=3
    )
    assert torch.equal(noise[0], noise[2]) and torch.equal(noise[3], noise[5])
    assert not torch.equal(noise[0], noise[3])
    torch.testing.assert_close(
        noise[::3], torch.randn((2, 4, 2, 2), generator=torch.Generator().manual_seed(1))
    )


# ------------------------------------------------------------------------------ bad inputs are named
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_level": -0.1, "sde_type": "flow_grpo"}, "noise_level"),
        ({"noise_level": float("nan"), "sde_type": "flow_grpo"}, "noise_level"),
        ({"sde_window": (3, 2), "sde_type": "flow_grpo"}, "sde_window"),
        ({"sde_window": (0, 7), "sde_type": "flow_grpo"}, "sde_window"),
        ({"sde_window": (-1, 2), "sde_type": "flow_grpo"}, "sde_window"),
        ({"sde_type": "cps"}, "sde_type"),
        ({"layout": "sdxl"}, "layout"),
        ({"layout": "flux"}, "image_seq_len"),
    ],
)
def test_bad_sampler_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowMatchSampler(SD3_CONFIG, 6, **kwargs)


def test_window_outside_the_steps_is_named_when_moved():
    with pytest.raises(ValueError, match="sde_window"):
        FlowMatchSampler(SD3_CONFIG, 6, sde_type="flow_grpo").with_window((5, 8))
    with pytest.raises(IndexError, match="step index 6"):
        FlowMatchSampler(SD3_CONFIG, 6).is_stochastic(6)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({**DDIMScheduler().config, "_class_name": "DDIMScheduler"}, "DDIMScheduler"),
        (dict(DDIMScheduler().config), "beta_start"),
        ({**SD3_CONFIG, "stochastic_sampling": True}, "stochastic_sampling"),
        ({**SD3_CONFIG, "invert_sigmas": True}, "invert_sigmas"),
    ],
)
def test_unsupported_schedulers_are_named(config, match):
    with pytest.raises(ValueError, match=match):
        FlowMatchSampler(config, 4)
    with pytest.raises(ValueError, match=match):
        FlowMatchForwardProcess(config)


def test_group_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="group_size"):
        FlowMatchSampler(SD3_CONFIG, 2).initial_noise((4, 1), None, "cpu", torch.float32, group_size=3)


def test_bad_forward_process_settings_are_named():
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowMatchForwardProcess(SD3_CONFIG, timestep_sampling="mode")
    with pytest.raises(ValueError, match="logit_std"):
        FlowMatchForwardProcess(SD3_CONFIG, logit_std=0.0)


# ------------------------------------------------------------------------ equality with the pipelines
def _drive_sd3(pipe, sampler: FlowMatchSampler, guidance: float, seed: int) -> torch.Tensor:
    """The pipeline's own denoising loop, with `sampler` doing the steps."""
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=True
    )
    embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
    size = pipe.transformer.config.sample_size
    x = sampler.initial_noise((2, 4, size, size), torch.Generator().manual_seed(seed), "cpu", torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    for i, t in enumerate(sampler.timesteps("cpu")):
        both = pipe.transformer(
            hidden_states=torch.cat([x, x]),
            timestep=t.expand(4),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        uncond, cond = both.chunk(2)
        noise = torch.randn(x.shape, generator=g) if sampler.is_stochastic(i) else None
        x = sampler.step(uncond + guidance * (cond - uncond), i, x, noise).prev_sample
    return x


@torch.no_grad()
def test_sd3_ode_and_zero_noise_sdes_equal_the_pipeline(tmp_path):
    pipe = saved_and_loaded(tiny_sd3_pipeline(), tmp_path / "sd3")
    reference = pipe(
        PROMPTS,
        num_inference_steps=5,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    config = pipe.scheduler.config
    ode = FlowMatchSampler(config, 5)
    torch.testing.assert_close(ode.sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(_drive_sd3(pipe, ode, 3.0, 0), reference, rtol=0, atol=1e-6)
    for sde_type in ("flow_grpo", "dance_grpo"):
        quiet = FlowMatchSampler(config, 5, sde_type=sde_type, noise_level=0.0)
        assert not any(quiet.is_stochastic(i) for i in range(5))
        torch.testing.assert_close(_drive_sd3(pipe, quiet, 3.0, 0), reference, rtol=0, atol=1e-6)
    noisy = _drive_sd3(pipe, FlowMatchSampler(config, 5, sde_type="flow_grpo", noise_level=0.7), 3.0, 0)
    assert (noisy - reference).abs().max() > 1e-2


@torch.no_grad()
def test_sd3_grid_with_dynamic_shifting_follows_the_pipeline(tmp_path):
    pipe = tiny_sd3_pipeline()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    pipe.set_progress_bar_config(disable=True)
    pipe(PROMPTS[:1], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent")
    seq_len = (pipe.transformer.config.sample_size // pipe.transformer.config.patch_size) ** 2
    sampler = FlowMatchSampler(pipe.scheduler.config, 4, image_seq_len=seq_len)
    torch.testing.assert_close(sampler.sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
    assert not torch.allclose(sampler.sigmas, FlowMatchSampler({**SD3_CONFIG, "shift": 1.0}, 4).sigmas)


@torch.no_grad()
@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_flux_ode_equals_the_pipeline(tmp_path, guidance_embeds):
    """Packed latents, the FLUX σ grid (linspace(1, 1/N, N) shifted by μ of the packed length), timestep/1000."""
    pipe = saved_and_loaded(tiny_flux_pipeline(guidance_embeds=guidance_embeds), tmp_path / "flux")
    steps, guidance = 4, 3.5
    reference = pipe(
        PROMPTS,
        height=16,
        width=16,
        num_inference_steps=steps,
        guidance_scale=guidance,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=8)
    noise_shape = (2, 4, 8, 8)
    image_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    sampler = FlowMatchSampler(pipe.scheduler.config, steps, layout="flux", image_seq_len=16)
    torch.testing.assert_close(sampler.sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
    noise = sampler.initial_noise(noise_shape, torch.Generator().manual_seed(0), "cpu", torch.float32)
    x = FluxPipeline._pack_latents(noise, 2, 4, 8, 8)
    guidance_input = torch.full((2,), guidance) if guidance_embeds else None
    for i, t in enumerate(sampler.timesteps("cpu")):
        v = pipe.transformer(
            hidden_states=x,
            timestep=t.expand(2) / 1000,
            guidance=guidance_input,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        x = sampler.step(v, i, x, None).prev_sample
    torch.testing.assert_close(x, reference, rtol=0, atol=1e-6)


@torch.no_grad()
def test_every_tiny_pipeline_loads_with_its_own_class_and_generates(tmp_path):
    cases = [
        (tiny_sd3_pipeline(), {"guidance_scale": 3.0}),
        (tiny_sd3_pipeline(t5=True), {"guidance_scale": 3.0, "max_sequence_length": 8}),
        (tiny_flux_pipeline(), {"height": 16, "width": 16, "max_sequence_length": 8}),
        (tiny_sdxl_pipeline(), {"guidance_scale": 3.0}),
    ]
    for k, (pipe, kwargs) in enumerate(cases):
        loaded = saved_and_loaded(pipe, tmp_path / str(k))
        assert type(loaded) is type(pipe)
        images = loaded(PROMPTS, num_inference_steps=2, output_type="pt", **kwargs).images
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


# ------------------------------------------------------------------------------- the forward process
def test_flow_matching_loss_is_the_written_out_velocity_regression():
    process = FlowMatchForwardProcess(SD3_CONFIG)
    clean, noise, _ = _state(7, shape=(3, 2, 2, 2))
    sigma = torch.tensor([0.1, 0.5, 0.9])
    weight = torch.randn(2, 2, generator=torch.Generator().manual_seed(8))

    def predict(x, timestep):  # a linear velocity model that also reads the timestep
        return torch.einsum("oc,bchw->bohw", weight, x) + timestep.view(-1, 1, 1, 1) / 1000

    loss = flow_matching_loss(predict, process, clean, noise, sigma)

    c, n, s, w = (
        clean.double().numpy(),
        noise.double().numpy(),
        sigma.double().numpy(),
        weight.double().numpy(),
    )
    expected = []
    for b in range(3):
        x_t = (1 - s[b]) * c[b] + s[b] * n[b]
        output = np.einsum("oc,chw->ohw", w, x_t) + s[b]  # σ·1000 / 1000
        expected.append(((output - (n[b] - c[b])) ** 2).mean())
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    assert loss.dtype == torch.float32


def test_flow_matching_loss_falls_when_a_model_fits_the_velocity():
    """Gradient steps on the loss move an affine velocity model toward ε − x₀: held-out loss at fixed (ε, σ) falls."""
    process = FlowMatchForwardProcess(SD3_CONFIG, timestep_sampling="uniform")
    g = torch.Generator().manual_seed(9)
    weight, bias = torch.zeros(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)
    optim = torch.optim.SGD([weight, bias], lr=0.2)

    def predict(x, timestep):
        return x @ weight.T + bias

    def batch(n):  # data near (1, 1): the mean velocity is −1 per dimension
        return (
            torch.randn(n, 2, generator=g) * 0.1 + 1.0,
            torch.randn(n, 2, generator=g),
            process.sample_timesteps(n, g),
        )

    held_out = batch(512)
    before = flow_matching_loss(predict, process, *held_out).mean().item()
    for _ in range(100):
        loss = flow_matching_loss(predict, process, *batch(64)).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    after = flow_matching_loss(predict, process, *held_out).mean().item()
    assert after < 0.7 * before


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform"])
def test_training_sigmas_follow_the_sd3_training_script(scheme):
    """u from diffusers' density, index ⌊u·1000⌋ into the scheduler's training timesteps, σ = timestep/1000."""
    process = FlowMatchForwardProcess(SD3_CONFIG, timestep_sampling=scheme)
    sigmas = process.sample_timesteps(512, torch.Generator().manual_seed(3))

    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_CONFIG)
    u = compute_density_for_timestep_sampling(
        "logit_normal" if scheme == "logit_normal" else "none",
        512,
        logit_mean=0.0,
        logit_std=1.0,
        generator=torch.Generator().manual_seed(3),
    )
    timesteps = scheduler.timesteps[(u * 1000).long()]
    torch.testing.assert_close(sigmas, timesteps / 1000)
    torch.testing.assert_close(process.model_timestep(sigmas), timesteps)
    # shift 3 moves training toward noise: the median σ is shift·½/(1 + (shift − 1)·½) = 0.75
    assert float(sigmas.median()) == pytest.approx(0.75, abs=0.06)
