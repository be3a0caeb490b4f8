"""PickScore (transformers CLIPModel) and HPSv2 (open_clip ViT + HPS weights) on tiny random models built here: the
reward equals each library's own computation, and its gradient reaches the pixels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from mmalign import plugins
from mmalign.core.config import RecipeError
from mmalign.core.registry import REWARDS
from mmalign.run import build_reward
from mmalign.vision.clip_rewards import (
    HPS_TO_SAFETENSORS,
    HFClipPreprocess,
    HPSv2Score,
    LongestEdgePreprocess,
    PickScore,
)
from mmalign.zoo.tokenizer import char_tokenizer

plugins.load()
PROMPTS = ["a photo of a cat", "a red square", "the digit seven"]


def uint8_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC → [-1, 1] BCHW, the policy's decode convention."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_both_rewards_are_registered_as_differentiable_image_rewards():
    for name in ("pickscore", "hpsv2"):
        assert REWARDS[name].differentiable and REWARDS[name].outputs == "image"


# --------------------------------------------------------------------------------------------- PickScore


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory) -> Path:
    """A random tiny CLIPModel with a CLIP image processor and a character tokenizer, saved as one directory."""
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 40,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
        logit_scale_init_value=3.0,
    )
    path = tmp_path_factory.mktemp("tiny-pickscore")
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def pickscore_reference(path: Path, prompts: list[str], arr: np.ndarray) -> torch.Tensor:
    """PickScore the way its README computes it: processor on PIL images, unit features, exp(logit_scale)·cos."""
    model, processor = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(a) for a in arr], return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(
            **processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        )
        image = getattr(image, "pooler_output", image)
        text = getattr(text, "pooler_output", text)
        image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * (image * text).sum(-1)


def test_pickscore_equals_the_reference_computation(pickscore_dir):
    reward = build_reward({"name": "pickscore", "model": str(pickscore_dir)}, {})
    assert isinstance(reward, PickScore) and reward.name == "pickscore"
    assert reward.model.logit_scale.exp().item() == pytest.approx(np.exp(3.0))
    for h, w, tol in ((32, 32, 1e-5), (48, 40, 0.05)):  # no resize: exact; resize: torch vs PIL bicubic
        arr = uint8_images(len(PROMPTS), h, w)
        expected = pickscore_reference(pickscore_dir, PROMPTS, arr)
        got = reward(PROMPTS, to_tensor(arr))
        assert got.shape == (3,)
        torch.testing.assert_close(got, expected, rtol=0, atol=tol * np.exp(3.0))


def test_pickscore_preprocess_matches_the_processor_without_resizing(pickscore_dir):
    processor = AutoProcessor.from_pretrained(pickscore_dir)
    arr = uint8_images(2, 32, 32, seed=3)
    expected = processor(images=[Image.fromarray(a) for a in arr], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        HFClipPreprocess(processor.image_processor)(to_tensor(arr)), expected, rtol=0, atol=1e-5
    )


def test_pickscore_gradient_reaches_the_pixels_and_bad_input_is_named(pickscore_dir):
    reward = PickScore.from_pretrained(str(pickscore_dir))
    images = (torch.rand(3, 3, 24, 40) * 2 - 1).requires_grad_()
    reward(PROMPTS, images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="prompt 1 must be a string"):
        reward(["a cat", {"prompt": "x"}], torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[batch, 3, H, W\]"):
        reward(PROMPTS, torch.zeros(3, 1, 32, 32))
    with pytest.raises(FileNotFoundError, match="PickScore model or processor directory not found"):
        PickScore.from_pretrained(str(pickscore_dir / "missing"))


def test_pickscore_defaults_to_the_published_model_and_its_processor():
    import inspect

    defaults = inspect.signature(PickScore.from_pretrained).parameters
    assert defaults["model"].default == "yuvalkirstain/PickScore_v1" and defaults["processor"].default is None


# ------------------------------------------------------------------------------------------------- HPSv2

TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory) -> tuple[str, Path]:
    """A tiny open_clip architecture registered by name (as ViT-H-14 is) and HPS-style weights: a pickled
    {"state_dict": ...} as released, converted to safetensors with the documented command."""
    root = tmp_path_factory.mktemp("tiny-hps")
    name = "mmalign-test-tiny-vit"
    (root / "configs").mkdir()
    (root / "configs" / f"{name}.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(root / "configs")
    torch.manual_seed(1)
    model = open_clip.create_model(name)
    torch.save({"state_dict": model.state_dict()}, root / "HPS_tiny_compressed.pt")
    command = HPS_TO_SAFETENSORS.replace("IN.pt", str(root / "HPS_tiny_compressed.pt")).replace(
        "OUT", str(root / "hps_tiny")
    )
    subprocess.run([sys.executable, "-c", command.split('"')[1]], check=True)
    return name, root / "hps_tiny.safetensors"


def hps_reference(name: str, checkpoint: Path, prompts: list[str], arr: np.ndarray) -> torch.Tensor:
    """The hpsv2 package's computation, written from its description: ToTensor, longer side resized (bicubic) to
    the model's size and padded with black (its ResizeMaxSize), normalised; then diag(image_f @ text_f.T)."""
    model = open_clip.create_model(name, pretrained=str(checkpoint)).eval()
    size = (
        model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    )
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    pixels = []
    for a in arr:
        x = TF.to_tensor(Image.fromarray(a))
        h, w = x.shape[1:]
        scale = size / max(h, w)
        if scale != 1.0:
            new = [round(h * scale), round(w * scale)]
            x = TF.resize(x, new, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            ph, pw = size - new[0], size - new[1]
            x = TF.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        pixels.append(TF.normalize(x, mean, std))
    with torch.no_grad():
        image_features, text_features, _ = model(torch.stack(pixels), open_clip.get_tokenizer(name)(prompts))
    return torch.diagonal(image_features @ text_features.T)


def test_hpsv2_equals_the_hpsv2_computation(hps_checkpoint):
    name, checkpoint = hps_checkpoint
    reward = build_reward({"name": "hpsv2", "checkpoint": str(checkpoint), "model": name}, {})
    assert isinstance(reward, HPSv2Score) and isinstance(reward.preprocess, LongestEdgePreprocess)
    for h, w in (
        (32, 32),
        (48, 24),
        (20, 36),
    ):  # as is; both resized and padded (tensor resizes on both sides)
        arr = uint8_images(len(PROMPTS), h, w, seed=h)
        expected = hps_reference(name, checkpoint, PROMPTS, arr)
        torch.testing.assert_close(reward(PROMPTS, to_tensor(arr)), expected, rtol=0, atol=1e-5)
    assert reward(PROMPTS, to_tensor(uint8_images(3, 32, 32))).abs().max() <= 1  # a cosine, no logit scale


def test_hpsv2_weights_are_the_converted_checkpoint_and_gradient_reaches_pixels(hps_checkpoint):
    name, checkpoint = hps_checkpoint
    reward = HPSv2Score.from_pretrained(str(checkpoint), model=name)
    saved = load_file(str(checkpoint))
    assert all(torch.equal(v, saved[k]) for k, v in reward.model.state_dict().items() if k in saved)
    images = (torch.rand(3, 3, 40, 24) * 2 - 1).requires_grad_()
    reward(PROMPTS, images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_hpsv2_refuses_pickles_and_missing_files_with_the_conversion_command(hps_checkpoint, tmp_path):
    name, checkpoint = hps_checkpoint
    with pytest.raises(ValueError, match=r"(?s)never unpickled.*weights_only=True"):
        HPSv2Score.from_pretrained(str(checkpoint.with_name("HPS_tiny_compressed.pt")), model=name)
    with pytest.raises(FileNotFoundError, match="HPS checkpoint not found"):
        HPSv2Score.from_pretrained(str(tmp_path / "missing.safetensors"), model=name)
    with pytest.raises(RecipeError, match="reward 'hpsv2' needs `checkpoint:`"):
        build_reward("hpsv2", {})
