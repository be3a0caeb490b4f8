"""The offline digits world: a tiny build loads as a Stable Diffusion pipeline, and its classifier is a usable reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmalign.core.data import read_rows
from mmalign.evaluation.classifier import ConvClassifier
from mmalign.zoo.image_world import (
    EVAL_TEMPLATES,
    MAX_PROMPT_TOKENS,
    TRAIN_TEMPLATES,
    ImageWorldSpec,
    build_image_world,
    digit_of,
    load_digit_images,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_image_world(
        tmp_path_factory.mktemp("image-world"), ImageWorldSpec.tiny(), log=lambda *_: None
    )


def test_digit_images_are_rgb_16x16_in_range():
    images, digits = load_digit_images()
    assert images.shape == (1797, 3, 16, 16) and digits.shape == (1797,)
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images[:, 0], images[:, 2])


def test_pipeline_loads_offline_and_generates_16x16(world):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(world / "base", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.tokenizer.model_max_length == MAX_PROMPT_TOKENS
    out = pipe(
        ["a handwritten seven", "the digit 3"],
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    assert out.images.shape == (2, 3, 16, 16)
    latents = pipe(["a handwritten seven"], num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)
    assert pipe.vae.config.scaling_factor == json.loads((world / "world.json").read_text())["scaling_factor"]


def test_classifier_round_trip_is_exact(tmp_path):
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    model = ConvClassifier().eval()
    model.save_pretrained(tmp_path)
    assert torch.equal(ConvClassifier.from_pretrained(tmp_path)(images), model(images))


def test_classifier_gradient_reaches_the_image(world):
    classifier = ConvClassifier.from_pretrained(world / "classifier")
    images = (torch.rand(3, 3, 16, 16) * 2 - 1).requires_grad_()
    log_prob = classifier.log_prob(images, torch.tensor([7, 0, 3]))
    assert log_prob.shape == (3,) and (log_prob <= 0).all()
    log_prob.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_prompt_files_parse_and_match_digit_of(world):
    for name, templates in [("train_prompts.jsonl", TRAIN_TEMPLATES), ("eval_prompts.jsonl", EVAL_TEMPLATES)]:
        rows = [row.data for row in read_rows(world / name)]
        assert len(rows) == 10 * len(templates)
        assert sorted(row["digit"] for row in rows) == sorted(list(range(10)) * len(templates))
        assert all(digit_of(row["prompt"]) == row["digit"] for row in rows)
    world_json = json.loads((world / "world.json").read_text())
    assert {"base_agreement", "classifier_accuracy", "timings"} <= world_json.keys()
    assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)


@pytest.mark.parametrize(
    ("prompt", "digit"),
    [
        ("a handwritten seven", 7),
        ("The digit Zero", 0),
        ("a drawing of the number 7", 7),
        ("a sketch of a one", 1),
    ],
)
def test_digit_of(prompt, digit):
    assert digit_of(prompt) == digit


@pytest.mark.parametrize("prompt", ["a handwritten cat", "one or two", "someone"])
def test_digit_of_rejects_prompts_without_exactly_one_digit(prompt):
    with pytest.raises(ValueError):
        digit_of(prompt)
