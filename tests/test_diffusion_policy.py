"""Diffusion policy contracts: the scheduler's own step distribution, ratio 1, Diffusion-DPO, diffusers LoRA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmalign.core.data import DataError, rows_from_records
from mmalign.core.params import LoraSpec
from mmalign.core.sampler import DDPMFamilySampler
from mmalign.train.diffusion_preference import PairDenoisingScores
from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig
from mmalign.vision.diffusion_policy import DiffusionImagePolicy
from mmalign.zoo.tiny_pipelines import tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path)
    return path


def _perturb_lora(policy: DiffusionImagePolicy, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _normal_logprob_mean(x, mean, std) -> torch.Tensor:
    return torch.distributions.Normal(mean, std).log_prob(x).flatten(1).mean(1)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_logprob_is_the_schedulers_gaussian(pipeline_dir, eta):
    policy = DiffusionImagePolicy.from_pretrained(str(pipeline_dir), num_steps=4, eta=eta, guidance_scale=3.0)
    traj = policy.sample(["a handwritten seven", "the digit one"], generator=torch.Generator().manual_seed(0))
    sched = policy.sampler.scheduler
    embeds = traj.conditioning
    for i, t in enumerate(traj.timesteps):
        x, x_next = traj.latents[:, i], traj.next_latents[:, i]
        with torch.no_grad():
            eps = policy.predict(x, t, embeds)
        # DDIM (Song et al. 2021, Eq. 12/16) written out from ᾱ, independently of scheduler.step
        a_t = sched.alphas_cumprod[int(t)]
        prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        mean = a_prev.sqrt() * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
        torch.testing.assert_close(
            traj.logprobs[:, i], _normal_logprob_mean(x_next, mean, sigma), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(traj.means[:, i], mean, atol=1e-5, rtol=1e-5)
        # and the recorded x_{t-1} is exactly what the scheduler's step produces from that noise
        z = (x_next - mean) / sigma
        stepped = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(stepped, x_next, atol=1e-5, rtol=1e-5)


def test_a_trajectory_continued_from_a_recorded_step_ends_where_it_did(pipeline_dir):
    """`sample_trajectory(start=k)` from the recorded x_k, with the noise the full run drew after step k,
    reproduces the full run's steps k… and its final sample."""
    from mmalign.core.sampling import sample_trajectory

    policy = DiffusionImagePolicy.from_pretrained(str(pipeline_dir), num_steps=4, guidance_scale=3.0)
    embeds = policy.encode_prompts(["a handwritten seven", "the digit one"])
    initial = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(0))

    def run(x, generator, start=0):
        predict = lambda x, t: policy.predict(x, t, embeds)  # noqa: E731
        return sample_trajectory(predict, policy.sampler, x, generator=generator, start=start)

    full = run(initial, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):  # the noise of steps 0 and 1
        torch.randn(initial.shape, generator=generator)
    rest = run(full.latents[:, 2], generator, start=2)
    assert rest.timesteps.tolist() == full.timesteps[2:].tolist()
    torch.testing.assert_close(rest.logprobs, full.logprobs[:, 2:])
    torch.testing.assert_close(rest.final, full.final)


def test_ddpm_step_distribution_matches_posterior(pipeline_dir):
    policy = DiffusionImagePolicy.from_pretrained(str(pipeline_dir))
    sampler = DDPMFamilySampler(
        {**policy.pipeline.scheduler.config, "variance_type": "fixed_small"}, "ddpm", 10
    )
    sched = sampler.scheduler
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = sched.timesteps[3]
    step = sampler.step(eps, 3, x)
    mean, std = step.mean, step.std
    a_t, a_prev = sched.alphas_cumprod[int(t)], sched.alphas_cumprod[int(sched.timesteps[4])]
    beta = 1 - a_t / a_prev
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    expected = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x
    torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-5)
    assert float(std) == pytest.approx(math.sqrt((1 - a_prev) / (1 - a_t) * beta), rel=1e-5)


def test_unknown_scheduler_is_a_clear_error(pipeline_dir):
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        DiffusionImagePolicy.from_pretrained(str(pipeline_dir), sampler="euler")


def test_ppo_ratio_is_one_on_the_first_inner_step(pipeline_dir):
    from mmalign.core.data import rows_from_records
    from mmalign.train.diffusion_pg import DiffusionPGConfig, DiffusionPolicyGradient
    from mmalign.vision.rewards import JpegCompressibility

    policy = DiffusionImagePolicy.from_pretrained(str(pipeline_dir), lora=LoraSpec(r=4, alpha=4), num_steps=4)
    _perturb_lora(policy)
    rows = rows_from_records([{"prompt": "a handwritten seven"}, {"prompt": "the digit one"}])
    algo = DiffusionPolicyGradient(
        policy, rows, JpegCompressibility(), DiffusionPGConfig(advantage="reinforce", timestep_fraction=0.5)
    )
    batch, _ = algo.rollout(rows)
    assert len(batch) == 2 and batch["steps"].shape == (2, 2)
    losses, m = algo.loss(batch)
    assert m["ratio_mean"].item() == pytest.approx(1.0, abs=1e-5)
    assert m["clip_fraction"].item() == 0.0
    adv = batch["advantages"]
    torch.testing.assert_close(losses, -adv, atol=1e-5, rtol=1e-5)  # ratio 1 → PPO loss is −A


def _write_pair_dataset(tmp_path, n=2, size=16, bad: str | None = None):
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        for side in ("w", "l"):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / f"{i}_{side}.png")
        records.append({"prompt": f"the digit {i}", "image_w": f"{i}_w.png", "image_l": f"{i}_l.png"})
    if bad == "missing":
        records[1]["image_l"] = "nope.png"
    if bad == "corrupt":
        (tmp_path / "1_l.png").write_bytes(b"not a png")
    (tmp_path / "pairs.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in records) + "\n")
    return tmp_path / "pairs.jsonl"


def test_diffusion_dpo_loss_matches_an_independent_computation(pipeline_dir, tmp_path):
    from mmalign.core.data import read_rows

    policy = DiffusionImagePolicy.from_pretrained(str(pipeline_dir), lora=LoraSpec(r=4, alpha=4))
    _perturb_lora(policy)
    rows = read_rows(_write_pair_dataset(tmp_path))
    beta = 50.0
    scorer = PairDenoisingScores(policy)
    algo = PreferenceAlgorithm(scorer, rows, PreferenceConfig(loss="dpo", beta=beta))
    torch.manual_seed(3)
    losses, _ = algo.loss(algo.train_examples)

    torch.manual_seed(3)
    batch = scorer.collate_pairs(algo.train_examples)
    noisy = policy.forward_process.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
    unet, emb = policy.module, batch["conditioning"]["prompt_embeds"]
    with torch.no_grad():
        err = (
            (unet(noisy, batch["timesteps"], encoder_hidden_states=emb).sample - batch["noise"]) ** 2
        ).mean((1, 2, 3))
        unet.disable_adapters()
        ref = (
            (unet(noisy, batch["timesteps"], encoder_hidden_states=emb).sample - batch["noise"]) ** 2
        ).mean((1, 2, 3))
        unet.enable_adapters()
    n = len(rows)
    model_diff = err[:n] - err[n:]
    ref_diff = ref[:n] - ref[n:]
    expected = -F.logsigmoid(-0.5 * beta * (model_diff - ref_diff))  # Wallace et al. 2023, Eq. 14
    torch.testing.assert_close(losses.detach(), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model_diff, ref_diff)  # the LoRA perturbation made policy ≠ reference


@pytest.mark.parametrize(
    "bad, match", [("missing", "image file not found"), ("corrupt", "cannot read image")]
)
def test_bad_image_pairs_name_row_and_field(pipeline_dir, tmp_path, bad, match):
    from mmalign.core.data import read_rows

    policy = DiffusionImagePolicy.from_pretrained(str(pipeline_dir))
    rows = read_rows(_write_pair_dataset(tmp_path, bad=bad))
    with pytest.raises(DataError, match=match) as err:
        PreferenceAlgorithm(PairDenoisingScores(policy), rows, PreferenceConfig())
    assert err.value.line == 2 and err.value.field == "image_l"


def test_wrong_image_size_is_an_error(pipeline_dir, tmp_path):
    policy = DiffusionImagePolicy.from_pretrained(str(pipeline_dir))
    rows = rows_from_records(
        [{"prompt": "x", "image_w": str(_img(tmp_path, 32)), "image_l": str(_img(tmp_path, 16))}]
    )
    with pytest.raises(DataError, match="32×32"):
        policy.encode_pair(rows[0])


def _img(tmp_path, size):
    path = tmp_path / f"img{size}.png"
    Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_lora_loads_into_plain_diffusers_pipeline_and_reproduces_samples(pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    policy = DiffusionImagePolicy.from_pretrained(
        str(pipeline_dir), lora=LoraSpec(r=4, alpha=4), num_steps=4, eta=1.0, guidance_scale=3.0
    )
    _perturb_lora(policy, scale=0.2)
    ours = policy.decode(
        policy.sample(["a handwritten seven"], generator=torch.Generator().manual_seed(5)).final
    )
    with policy.reference():
        base = policy.decode(
            policy.sample(["a handwritten seven"], generator=torch.Generator().manual_seed(5)).final
        )
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapter changes the samples

    policy.save_pretrained(str(tmp_path / "lora"))
    pipe = StableDiffusionPipeline.from_pretrained(
        str(pipeline_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(tmp_path / "lora"))
    out = pipe(
        "a handwritten seven",
        num_inference_steps=4,
        eta=1.0,
        guidance_scale=3.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(5),
    ).images
    torch.testing.assert_close(out * 2 - 1, ours, atol=2e-4, rtol=1e-3)
