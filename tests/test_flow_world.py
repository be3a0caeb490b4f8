"""The flow-matching digits world: an SD3-layout pipeline on the image world's VAE, classifier and prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from filelock import FileLock
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from mmalign.core.data import read_rows
from mmalign.core.flow import FlowMatchSampler
from mmalign.zoo import registry
from mmalign.zoo.flow_world import (
    END_TOKEN,
    MAX_SEQUENCE_LENGTH,
    FlowWorldSpec,
    build_flow_world,
    flow_tokenizer,
    load_pipeline,
)
from mmalign.zoo.image_world import eval_prompts, train_prompts


@pytest.fixture(scope="module")
def worlds(mmalign_home) -> tuple[Path, Path]:
    """(image-flow-tiny, image-tiny) in the session's private MMALIGN_HOME."""
    with FileLock(str(mmalign_home) + ".lock"):
        flow = registry.build("image-flow-tiny", log=lambda *_: None)
    return flow, registry.world_dir("image-tiny")


def test_world_loads_as_sd3_without_t5_and_generates(worlds):
    flow, _ = worlds
    pipe = StableDiffusion3Pipeline.from_pretrained(
        flow / "base", text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    images = pipe(
        ["a handwritten seven", "a sketch of a two"],
        num_inference_steps=2,
        guidance_scale=3.0,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_world_shares_the_image_worlds_vae_classifier_and_prompts(worlds):
    flow, image = worlds
    for sub in ("base/vae/diffusion_pytorch_model.safetensors", "classifier/model.safetensors"):
        ours, theirs = load_file(str(flow / sub)), load_file(str(image / sub))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    vae_config = json.loads((flow / "base/vae/config.json").read_text())
    assert vae_config["shift_factor"] == 0.0
    assert [r.data["prompt"] for r in read_rows(flow / "train_prompts.jsonl")] == train_prompts()
    assert [r.data["prompt"] for r in read_rows(flow / "eval_prompts.jsonl")] == eval_prompts()


def test_world_json_reports_base_agreement_on_both_template_sets(worlds):
    flow, _ = worlds
    world = json.loads((flow / "world.json").read_text())
    for split in ("eval_prompts", "train_prompts"):
        assert 0 <= world["base_agreement"][split]["agreement"] <= 1
        assert world["base_agreement"][split]["n"] > 0
    assert world["judge"] == "judge"  # the image world's independent judge, copied and reported
    assert world["judge_agreement"]["eval_prompts"]["n"] == world["base_agreement"]["eval_prompts"]["n"]
    assert world["max_sequence_length"] == MAX_SEQUENCE_LENGTH
    assert world["timings"]["total_s"] > 0


def test_pooled_text_embedding_reads_the_whole_prompt(worlds):
    """The end token makes CLIP pool after the digit word: prompts that differ only there pool differently."""
    flow, _ = worlds
    tokenizer = flow_tokenizer()
    ids = tokenizer(["a handwritten one", "a handwritten seven"], padding="max_length", return_tensors="pt")
    end = tokenizer.convert_tokens_to_ids(END_TOKEN)
    assert [row.tolist().index(end) for row in ids.input_ids] == [18, 20]
    pipe = load_pipeline(flow / "base")
    with torch.no_grad():
        pooled = pipe.text_encoder(ids.input_ids).text_embeds
    assert not torch.allclose(pooled[0], pooled[1])


@torch.no_grad()
def test_sampler_ode_reproduces_the_worlds_pipeline(worlds):
    flow, _ = worlds
    pipe = load_pipeline(flow / "base")
    prompts = ["the digit four"]
    reference = pipe(
        prompts,
        num_inference_steps=3,
        guidance_scale=1.0,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    sampler = FlowMatchSampler(pipe.scheduler.config, 3)
    x = sampler.initial_noise((1, 4, 8, 8), torch.Generator().manual_seed(0), "cpu", torch.float32)
    for i, t in enumerate(sampler.timesteps()):
        v = pipe.transformer(
            hidden_states=x, timestep=t.expand(1), encoder_hidden_states=embeds, pooled_projections=pooled
        ).sample
        x = sampler.step(v, i, x, None).prev_sample
    torch.testing.assert_close(x, reference, rtol=0, atol=1e-6)


def test_build_does_not_depend_on_the_callers_thread_count(worlds, tmp_path):
    # Both builds run in this process, so they share its CPU code paths: the cached world was built in a process
    # held to AVX2 (zoo.reproducible.BUILD_ENV), whose bits differ from this process's on an AVX-512 CPU.
    threads = torch.get_num_threads()
    builds = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            build_flow_world(tmp_path / str(n), FlowWorldSpec.tiny(), log=lambda *_: None)
            assert torch.get_num_threads() == n  # restored after the build
            name = "base/transformer/diffusion_pytorch_model.safetensors"
            builds[n] = load_file(str(tmp_path / str(n) / name))
    finally:
        torch.set_num_threads(threads)
    assert builds[1].keys() == builds[2].keys()
    assert all(torch.equal(builds[1][k], builds[2][k]) for k in builds[1])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timestep_sampling", "mode"),
        ("patch_size", 3),
        ("prompt_dropout", 1.0),
        ("shift", 0.0),
        ("eval_images", 0),
    ],
)
def test_bad_spec_fields_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        FlowWorldSpec(**{field: value})


def test_registry_knows_both_flow_worlds():
    assert registry.WORLDS["image-flow"][2] == "FlowWorldSpec"
    assert registry.WORLDS["image-flow-tiny"][2] == "FlowWorldSpec.tiny"
    assert registry.fingerprint("image-flow") != registry.fingerprint("image-flow-tiny")
