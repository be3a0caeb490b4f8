"""SD3, FLUX and SDXL as diffusion policies: equality with the plain pipelines, the diffusers LoRA round trip, the
conditioning dicts, and the named errors a flow model gives for DDPM-only settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from pipeline_fixtures import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline

from mmalign.core.config import RecipeError, to_dataclass
from mmalign.core.flow import FlowMatchSampler
from mmalign.core.params import LoraSpec
from mmalign.vision.flux_policy import FluxModelConfig, FluxPolicy
from mmalign.vision.sd3_policy import SD3ModelConfig, SD3Policy
from mmalign.vision.sdxl_policy import SDXLPolicy

PROMPTS = ["a handwritten seven", "the digit 3"]
FLUX_KW = {"resolution": 16, "max_sequence_length": 8}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Tiny SD3 (no T5), FLUX (guidance-distilled and not) and SDXL pipelines saved as a user's checkpoint is."""
    root = tmp_path_factory.mktemp("flow-policies")
    out = {}
    for name, pipe in [
        ("sd3", tiny_sd3_pipeline()),
        ("flux", tiny_flux_pipeline()),
        ("flux_dev", tiny_flux_pipeline(guidance_embeds=True)),
        ("sdxl", tiny_sdxl_pipeline()),
    ]:
        pipe.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _plain(cls, path):
    absent = {"text_encoder_3": None, "tokenizer_3": None} if cls is StableDiffusion3Pipeline else {}
    pipe = cls.from_pretrained(path, local_files_only=True, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _perturb(policy, scale=0.3):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _ode(policy, seed=0):
    sampler = getattr(policy, "ode_sampler", None)
    return policy.sample(
        PROMPTS, generator=torch.Generator().manual_seed(seed), record=False, sampler=sampler
    ).final


# ------------------------------------------------------------------------ the plain pipelines' samples
@torch.no_grad()
def test_sd3_policy_samples_what_the_pipeline_samples(dirs):
    policy = SD3Policy.from_pretrained(dirs["sd3"], num_steps=4, guidance_scale=3.0)
    pipe = _plain(StableDiffusion3Pipeline, dirs["sd3"])
    out = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    ours = _ode(policy)
    reference = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    images = torch.from_numpy(np.stack([np.asarray(i) for i in out.images]))
    ours_u8 = ((policy.decode(ours) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert (ours_u8.int() - images.int()).abs().max() <= 1
    cond = policy.encode_prompts(PROMPTS)
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds"}
    # 24 CLIP tokens (the two encoders' 16 features side by side) then SD3's default 256 T5 tokens (zeros: no T5)
    assert cond["prompt_embeds"].shape == (2, 24 + 256, 32) and not cond["prompt_embeds"][:, 24:].any()


@torch.no_grad()
@pytest.mark.parametrize("name", ["flux", "flux_dev"])
def test_flux_policy_samples_what_the_pipeline_samples(dirs, name):
    policy = FluxPolicy.from_pretrained(dirs[name], num_steps=4, guidance_scale=3.5, **FLUX_KW)
    pipe = _plain(FluxPipeline, dirs[name])
    reference = pipe(
        PROMPTS,
        height=16,
        width=16,
        num_inference_steps=4,
        guidance_scale=3.5,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    if name == "flux":  # no guidance embedding: the pipeline samples unguided, and so must the policy
        policy.guidance_scale = 1.0
    ours = _ode(policy)
    assert ours.shape == (2, 16, 16)  # packed: (8/2)·(8/2) tokens of 4·4 channels
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(policy.to_state(policy.to_latents(ours)), ours, rtol=0, atol=0)


@torch.no_grad()
def test_sdxl_policy_samples_what_the_pipeline_samples_and_conditions_on_pooled_and_time_ids(dirs):
    policy = SDXLPolicy.from_pretrained(dirs["sdxl"], num_steps=4, eta=0.0, guidance_scale=3.0)
    pipe = _plain(StableDiffusionXLPipeline, dirs["sdxl"])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    reference = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    torch.testing.assert_close(_ode(policy), reference, rtol=0, atol=1e-5)
    cond = policy.encode_prompts(PROMPTS)
    assert cond["text_embeds"].shape == (2, 8) and cond["prompt_embeds"].shape == (2, 24, 32)
    assert cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    negative = policy.negative_conditioning()  # force_zeros_for_empty_prompt: the pipeline's zeros
    assert not negative["prompt_embeds"].any() and not negative["text_embeds"].any()


# ------------------------------------------------------------------------------------ LoRA round trip
@torch.no_grad()
@pytest.mark.parametrize("name", ["sd3", "flux_dev", "sdxl"])
def test_lora_round_trip_reproduces_samples_in_the_plain_pipeline(dirs, tmp_path, name):
    lora = LoraSpec(r=4, alpha=8)  # alpha ≠ r: the saved adapter must carry its scale
    if name == "sd3":
        policy = SD3Policy.from_pretrained(dirs[name], lora=lora, num_steps=3, guidance_scale=3.0)
        pipe, kwargs = _plain(StableDiffusion3Pipeline, dirs[name]), {"guidance_scale": 3.0}
    elif name == "flux_dev":
        policy = FluxPolicy.from_pretrained(dirs[name], lora=lora, num_steps=3, guidance_scale=3.5, **FLUX_KW)
        pipe = _plain(FluxPipeline, dirs[name])
        kwargs = {"guidance_scale": 3.5, "height": 16, "width": 16, "max_sequence_length": 8}
    else:
        policy = SDXLPolicy.from_pretrained(dirs[name], lora=lora, num_steps=3, eta=0.0, guidance_scale=3.0)
        pipe, kwargs = _plain(StableDiffusionXLPipeline, dirs[name]), {"guidance_scale": 3.0}
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    _perturb(policy)
    ours = _ode(policy, seed=3)
    with policy.reference():
        base = _ode(policy, seed=3)
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the samples

    policy.save_pretrained(str(tmp_path / "lora"))
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    theirs = pipe(
        PROMPTS,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        **kwargs,
    ).images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------- pairs and decoding
def test_flow_policies_encode_image_pairs_into_their_state_layout(dirs, tmp_path):
    from PIL import Image

    from mmalign.core.data import read_rows

    for tag in ("w", "l"):
        Image.fromarray(np.full((16, 16, 3), 200 if tag == "w" else 30, np.uint8)).save(
            tmp_path / f"{tag}.png"
        )
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": "a seven", "image_w": "w.png", "image_l": "l.png"})
    )
    row = read_rows(tmp_path / "pairs.jsonl")[0]
    sd3 = SD3Policy.from_pretrained(dirs["sd3"], num_steps=2)
    flux = FluxPolicy.from_pretrained(dirs["flux"], num_steps=2, **FLUX_KW)
    pair = sd3.encode_pair(row)
    assert pair["latents_w"].shape == (4, 8, 8)
    z = sd3.vae.encode(torch.full((1, 3, 16, 16), 200 / 127.5 - 1)).latent_dist.mean
    expected = (z - sd3.vae.config.shift_factor) * sd3.vae.config.scaling_factor
    torch.testing.assert_close(pair["latents_w"], expected[0], rtol=1e-5, atol=1e-5)
    assert flux.encode_pair(row)["latents_l"].shape == (16, 16)
    decoded = sd3.decode(pair["latents_w"][None])
    vae = sd3.vae
    by_hand = vae.decode(pair["latents_w"][None] / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(decoded, by_hand.clamp(-1, 1))


# ------------------------------------------------------------------------------------ named bad inputs
@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"eta": 1.0}, r"model\.eta"),
        ({"sampler": "ddim"}, r"model\.sampler"),
        ({"sde_type": "ddim"}, "DDPM-family"),
        ({"sde_type": "cps"}, "sde_type"),
        ({"sde_window": [8, 12]}, "sde_window"),
        ({"sde_window": [3, 3]}, "sde_window"),
        ({"noise_level": -0.5}, "noise_level"),
        ({"eval_sampler": "sde"}, "eval_sampler"),
    ],
)
def test_ddpm_only_and_out_of_range_settings_are_named(section, match):
    with pytest.raises(RecipeError, match=match):
        to_dataclass(SD3ModelConfig, {"kind": "diffusion_sd3", "num_steps": 10, **section}, "model")


def test_flow_grpo_sde_type_alias_and_flux_defaults():
    assert to_dataclass(SD3ModelConfig, {"sde_type": "sde"}, "model").sde_type == "flow_grpo"
    flux = to_dataclass(FluxModelConfig, {}, "model")
    assert (flux.num_steps, flux.guidance_scale) == (28, 3.5)


def test_a_pipeline_with_a_ddpm_scheduler_is_refused_as_a_flow_model(dirs, tmp_path):
    pipe = _plain(StableDiffusion3Pipeline, dirs["sd3"])
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="DDIMScheduler"):
        SD3Policy(pipe, num_steps=2)


def test_eval_sampler_is_the_ode_on_the_training_grid(dirs):
    policy = SD3Policy.from_pretrained(dirs["sd3"], num_steps=4, sde_type="flow_grpo", sde_window=(0, 3))
    assert isinstance(policy.sampler, FlowMatchSampler) and policy.sampler.sde_window == (0, 3)
    assert [policy.sampler.is_stochastic(i) for i in range(4)] == [True, True, True, False]
    assert not any(policy.eval_sampler.is_stochastic(i) for i in range(4))
    torch.testing.assert_close(policy.eval_sampler.sigmas, policy.sampler.sigmas, rtol=0, atol=0)
    with policy.sampling_with(policy.eval_sampler):
        assert policy.sampler is policy.eval_sampler
    assert policy.sampler.sde_type == "flow_grpo"


def test_a_half_precision_base_trains_float32_lora_weights(dirs):
    """A bf16 transformer (FLUX.1-dev's size forces it) samples and back-propagates; LoRA weights stay float32."""
    policy = SD3Policy.from_pretrained(
        dirs["sd3"], dtype="bfloat16", lora=LoraSpec(r=4, alpha=8), num_steps=2
    )
    assert policy.module.pos_embed.proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    traj = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert traj.final.dtype == torch.float32 and torch.isfinite(traj.logprobs).all()
    x = traj.latents[:, 0]
    policy.predict(x, policy.sampler.timesteps()[0], traj.conditioning).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in policy.trainable_parameters())
