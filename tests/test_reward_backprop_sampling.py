"""The differentiable sampling loop of reward backprop (`mmalign.core.sampling.sample_with_gradients`).

Gradients are checked against finite differences and hand-unrolled chains on toy denoisers (float64 where the
sampler computes in the input's dtype), and against plain backprop on the tiny Stable Diffusion pipeline.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mmalign.core.flow import FlowMatchForwardProcess, FlowMatchSampler
from mmalign.core.params import LoraSpec
from mmalign.core.sampler import DDPMFamilySampler, DDPMForwardProcess
from mmalign.core.sampling import GradientWindow, sample_trajectory, sample_with_gradients
from mmalign.train.reward_backprop import last_step_renoise
from mmalign.vision.diffusion_policy import DiffusionImagePolicy
from mmalign.zoo.tiny_pipelines import sd_ddim_scheduler, tiny_sd_pipeline

SHAPE = (2, 1, 2, 2)


def ddim_config() -> dict:
    return dict(sd_ddim_scheduler().config)


class ToyDenoiser(torch.nn.Module):
    """ε(x, t) = tanh(W·x + t/1000·b) · s_i, with one scale s_i per sampler step (to see which steps get gradient)."""

    def __init__(self, timesteps: torch.Tensor, dtype: torch.dtype = torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        d = SHAPE[1] * SHAPE[2] * SHAPE[3]
        self.weight = torch.nn.Parameter(0.5 * torch.randn(d, d, generator=g, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.randn(d, generator=g, dtype=dtype))
        self.scales = torch.nn.Parameter(torch.ones(len(timesteps), dtype=dtype))
        self.timesteps = [float(t) for t in timesteps]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        index = self.timesteps.index(float(t))
        flat = x.flatten(1) @ self.weight.T + float(t) / 1000 * self.bias
        return (torch.tanh(flat) * self.scales[index]).view_as(x)


def reward(x: torch.Tensor) -> torch.Tensor:
    return (torch.sin(3 * x) + x**2).flatten(1).sum(1)


def noise(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype)


def chain_reward(net, sampler, window, generator_seed=2) -> torch.Tensor:
    sample = sample_with_gradients(
        net, sampler, noise(), window, generator=torch.Generator().manual_seed(generator_seed)
    )
    return reward(sample.outputs[0]).sum()


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["ddim-deterministic", "ddim-eta1"])
def test_gradient_through_a_two_step_chain_equals_finite_differences(eta):
    sampler = DDPMFamilySampler(ddim_config(), "ddim", num_steps=2, eta=eta)
    net = ToyDenoiser(sampler.timesteps())
    window = GradientWindow(start=0, checkpoint=False)
    chain_reward(net, sampler, window).backward()
    h = 1e-6
    for param, index in [(net.weight, (0, 1)), (net.weight, (3, 2)), (net.bias, (1,)), (net.scales, (0,))]:
        with torch.no_grad():
            param[index] += h
            up = chain_reward(net, sampler, window).item()
            param[index] -= 2 * h
            down = chain_reward(net, sampler, window).item()
            param[index] += h
        assert param.grad[index].item() == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-8)


def test_gradient_equals_a_hand_unrolled_flow_matching_chain():
    """The same loop on the flow-matching sampler (Euler ODE): x_{i+1} = x_i + (σ_{i+1} − σ_i)·v(x_i)."""
    sampler = FlowMatchSampler(dict(FlowMatchEulerDiscreteScheduler().config), num_steps=3)
    net = ToyDenoiser(sampler.timesteps(), dtype=torch.float32)
    x0 = noise(torch.float32)
    out = sample_with_gradients(net, sampler, x0, GradientWindow(start=0)).outputs[0]
    grads = torch.autograd.grad(reward(out).sum(), list(net.parameters()))
    x, sigmas = x0, sampler.sigmas
    for i, t in enumerate(sampler.timesteps()):
        x = x + (sigmas[i + 1] - sigmas[i]) * net(x, t)
    torch.testing.assert_close(out, x)
    for ours, by_hand in zip(
        grads, torch.autograd.grad(reward(x).sum(), list(net.parameters())), strict=True
    ):
        torch.testing.assert_close(ours, by_hand)


@pytest.mark.parametrize("start", [0, 2, 3])
def test_steps_outside_the_window_receive_no_gradient(start):
    sampler = DDPMFamilySampler(ddim_config(), "ddim", num_steps=4, eta=0.0)
    net = ToyDenoiser(sampler.timesteps())
    chain_reward(net, sampler, GradientWindow(start=start)).backward()
    grads = net.scales.grad
    assert (grads[:start] == 0).all(), grads
    assert (grads[start:] != 0).all(), grads


def test_refl_window_trains_one_step_and_returns_the_schedulers_pred_original_sample():
    sampler = DDPMFamilySampler(ddim_config(), "ddim", num_steps=4, eta=1.0)
    net = ToyDenoiser(sampler.timesteps())
    sample = sample_with_gradients(
        net, sampler, noise(), GradientWindow(start=2, end=3), generator=torch.Generator().manual_seed(2)
    )
    reward(sample.outputs[0]).sum().backward()
    assert (net.scales.grad[[0, 1, 3]] == 0).all() and net.scales.grad[2] != 0, net.scales.grad
    # x̂₀ of step 2 from its recorded input, straight from the diffusers scheduler
    traj = sample_trajectory(net, sampler, noise(), generator=torch.Generator().manual_seed(2))
    x2, t2 = traj.latents[:, 2], sampler.timesteps()[2]
    with torch.no_grad():
        expected = sampler.scheduler.step(net(x2, t2), t2, x2, eta=1.0).pred_original_sample
    torch.testing.assert_close(sample.outputs[0].detach(), expected)
    torch.testing.assert_close(sample.steps[0].sample, x2)


def test_the_differentiable_chain_draws_the_same_sample_as_the_no_grad_loop():
    sampler = DDPMFamilySampler(ddim_config(), "ddim", num_steps=4, eta=1.0)
    net = ToyDenoiser(sampler.timesteps())
    traj = sample_trajectory(net, sampler, noise(), generator=torch.Generator().manual_seed(5), record=False)
    for start in (0, 1, 3):
        sample = sample_with_gradients(
            net, sampler, noise(), GradientWindow(start=start), generator=torch.Generator().manual_seed(5)
        )
        torch.testing.assert_close(sample.outputs[0].detach(), traj.final)
        assert [s.index for s in sample.steps] == list(range(start, 4))


def test_repeats_rerun_the_last_step_from_the_renoised_final_sample():
    """DRaFT-LV: output j > 0 is the last step from forward(final, ε_j), ε_j drawn after the chain's noise."""
    sampler = DDPMFamilySampler(ddim_config(), "ddim", num_steps=3, eta=0.0)
    process = DDPMForwardProcess(ddim_config())
    net = ToyDenoiser(sampler.timesteps())
    t_last = sampler.timesteps()[-1]

    def renoise(clean, eps):
        return process.add_noise(clean, eps, t_last.expand(len(clean)))

    window = GradientWindow(start=2, repeats=3, renoise=renoise)
    sample = sample_with_gradients(net, sampler, noise(), window, generator=torch.Generator().manual_seed(9))
    assert len(sample.outputs) == 3
    final = sample.outputs[0].detach()
    g = torch.Generator().manual_seed(9)  # η = 0: the chain draws no noise, so the repeats' ε come first
    for out in sample.outputs[1:]:
        x_in = renoise(final, torch.randn(SHAPE, generator=g, dtype=torch.float64))
        with torch.no_grad():
            expected = sampler.step(net(x_in, t_last), 2, x_in).prev_sample
        torch.testing.assert_close(out.detach(), expected)
    assert not torch.allclose(sample.outputs[1], sample.outputs[2])


def test_last_step_renoise_puts_the_final_sample_at_the_last_steps_input_level():
    """Noising the final sample with the noise implied by the chain's own last input gives that input back, for the
    DDPM family (t in scheduler units) and flow matching (t = σ = timestep / 1000)."""

    class Policy:
        def __init__(self, sampler, process):
            self.sampler, self.forward_process = sampler, process

    ddim = DDPMFamilySampler(ddim_config(), "ddim", num_steps=4, eta=0.0)
    net = ToyDenoiser(ddim.timesteps())
    traj = sample_trajectory(net, ddim, noise())
    x_last, final, t = traj.latents[:, -1], traj.final, ddim.timesteps()[-1]
    process = DDPMForwardProcess(ddim_config())
    implied = process.implied_noise(x_last, final, t)
    torch.testing.assert_close(last_step_renoise(Policy(ddim, process))(final, implied), x_last)

    flow = FlowMatchSampler(dict(FlowMatchEulerDiscreteScheduler().config), num_steps=4)
    sigma = flow.sigmas[-2]
    clean, eps = noise(torch.float32), torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    renoised = last_step_renoise(Policy(flow, FlowMatchForwardProcess(dict(flow.scheduler_config))))(
        clean, eps
    )
    torch.testing.assert_close(renoised, (1 - sigma) * clean + sigma * eps)


def test_bad_windows_are_named_errors():
    sampler = DDPMFamilySampler(ddim_config(), "ddim", num_steps=3, eta=0.0)
    net = ToyDenoiser(sampler.timesteps())
    for window in (GradientWindow(start=3), GradientWindow(start=1, end=1), GradientWindow(start=0, end=4)):
        with pytest.raises(ValueError, match="gradient window"):
            sample_with_gradients(net, sampler, noise(), window)
    with pytest.raises(ValueError, match="repeats > 1"):
        sample_with_gradients(net, sampler, noise(), GradientWindow(start=2, repeats=2))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        sample_with_gradients(net, sampler, noise(), GradientWindow(start=2, repeats=0))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd-backprop")
    tiny_sd_pipeline().save_pretrained(path)
    return path


def test_checkpointed_and_plain_backprop_give_equal_gradients(pipeline_dir):
    """A real UNet with LoRA and classifier-free guidance, decoded by the VAE: the same gradients either way."""
    torch.manual_seed(0)
    policy = DiffusionImagePolicy.from_pretrained(
        str(pipeline_dir), lora=LoraSpec(r=4, alpha=8), num_steps=3, eta=0.0, guidance_scale=3.0
    )
    with torch.no_grad():  # move off LoRA's zero init so every adapter weight has a gradient
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    cond = policy.encode_prompts(["a handwritten seven", "the digit one"])
    x_T = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(0))
    grads = []
    for use_checkpoint in (False, True):
        sample = sample_with_gradients(
            lambda x, t: policy.predict(x, t, cond),
            policy.sampler,
            x_T,
            GradientWindow(start=0, checkpoint=use_checkpoint),
        )
        policy.decode(sample.outputs[0]).mean().backward()
        grads.append({n: p.grad.clone() for n, p in policy.module.named_parameters() if p.requires_grad})
        policy.module.zero_grad(set_to_none=True)
    assert grads[0] and all(g.abs().sum() > 0 for g in grads[0].values())
    for name, value in grads[0].items():
        torch.testing.assert_close(grads[1][name], value, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "start, repeats, checkpoint, recomputed",
    [(1, 1, True, 2), (1, 1, False, 0), (3, 1, True, 0), (3, 3, True, 2), (0, 1, True, 3)],
)
def test_checkpointing_recomputes_every_gradient_call_but_the_last(start, repeats, checkpoint, recomputed):
    """K = 4 − start gradient steps (+ repeats − 1 DRaFT-LV calls): backward re-runs all of them but the last,
    whose activations backward needs first (as checkpoint_sequential leaves its last segment)."""
    sampler = DDPMFamilySampler(ddim_config(), "ddim", num_steps=4, eta=0.0)
    net, calls = ToyDenoiser(sampler.timesteps()), []
    net.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    process = DDPMForwardProcess(ddim_config())
    t_last = sampler.timesteps()[-1]
    window = GradientWindow(
        start=start,
        checkpoint=checkpoint,
        repeats=repeats,
        renoise=lambda clean, eps: process.add_noise(clean, eps, t_last.expand(len(clean))),
    )
    sample = sample_with_gradients(net, sampler, noise(), window)
    assert calls == [False] * start + [True] * (4 - start + repeats - 1)
    sum(reward(out).sum() for out in sample.outputs).backward()
    assert len(calls) == 4 + repeats - 1 + recomputed
