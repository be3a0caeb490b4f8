"""CLIP score, LAION aesthetic head and the Bradley–Terry image reward model, on tiny random models built here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mmalign.core.config import RecipeError
from mmalign.core.data import DataError, read_rows, rows_from_records
from mmalign.core.errors import ModelError
from mmalign.core.reward import score
from mmalign.evaluation.sequence import PairwiseAccuracy
from mmalign.run import build_reward, build_run
from mmalign.train.supervised import RewardModelAlgorithm, RewardModelConfig
from mmalign.vision.clip_rewards import (
    AestheticMLP,
    AestheticScore,
    CLIPScore,
    load_aesthetic_head,
    load_open_clip,
    save_open_clip,
)
from mmalign.vision.image_reward_model import ImageRewardModel, ImageScorerConfig

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["a photo of a cat", "a red square", "the digit seven"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A random tiny open_clip model saved as a local directory (config JSON + safetensors)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-clip")
    save_open_clip(open_clip.model.CLIP(**TINY_CLIP), TINY_CLIP, path)
    return path


def uint8_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC → [-1, 1] BCHW, the policy's decode convention."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def open_clip_reference(
    clip_dir: Path, prompts: list[str], arr: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image and text embeddings the way open_clip's own README computes them (PIL preprocessing)."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.fromarray(a)) for a in arr])
        image = model.encode_image(pixels)
        text = model.encode_text(tokenizer(prompts))
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------- CLIP score


def test_clip_score_equals_open_clip_computation(clip_dir):
    reward = build_reward({"name": "clip_score", "model": str(clip_dir)}, {})
    assert isinstance(reward, CLIPScore) and reward.differentiable
    for h, w, tol in ((32, 32, 1e-4), (40, 56, 0.1)):  # no resize: exact; resize: torch vs PIL bicubic
        arr = uint8_images(len(PROMPTS), h, w)
        image, text = open_clip_reference(clip_dir, PROMPTS, arr)
        expected = 100 * (image * text).sum(-1)
        got = score(reward, PROMPTS, to_tensor(arr))
        assert torch.allclose(got, expected, atol=tol), (h, w, got, expected)
    pre = reward.preprocess(to_tensor(uint8_images(1, 40, 56)))
    assert pre.shape == (1, 3, 32, 32)


def test_clip_score_gradient_reaches_the_image(clip_dir):
    reward = CLIPScore(*load_open_clip(str(clip_dir)), scale=2.5)
    images = to_tensor(uint8_images(2, 48, 48)).requires_grad_()
    values = reward(PROMPTS[:2], images)
    values.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.model.parameters())
    # one gradient-ascent step on the pixels raises the score (the reward is usable by ReFL-style methods)
    with torch.no_grad():
        after = reward(PROMPTS[:2], images + 0.05 * images.grad.sign())
    assert (after > values.detach()).all()


def test_clip_model_reloads_to_the_same_scores(clip_dir, tmp_path):
    first = CLIPScore(*load_open_clip(str(clip_dir)))
    save_open_clip(first.model, TINY_CLIP, tmp_path / "copy")
    second = CLIPScore(*load_open_clip(str(tmp_path / "copy")))
    images = to_tensor(uint8_images(3, 32, 32, seed=1))
    assert torch.equal(first(PROMPTS, images), second(PROMPTS, images))
    # the built-in-name route: an architecture open_clip knows by name plus a `pretrained` weights file
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mmalign-tiny-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "configs")
    third = CLIPScore.from_pretrained(
        "mmalign-tiny-test", str(tmp_path / "copy" / "open_clip_model.safetensors")
    )
    assert torch.equal(first(PROMPTS, images), third(PROMPTS, images))


# --------------------------------------------------------------------------------------------- aesthetic


def random_head(path: Path, width: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in AestheticMLP(width).state_dict().items()}
    save_file(state, str(path))
    return state


def test_aesthetic_head_equals_hand_computed_mlp(clip_dir, tmp_path):
    state = random_head(tmp_path / "head.safetensors")
    reward = build_reward(
        {"name": "aesthetic", "head": str(tmp_path / "head.safetensors"), "model": str(clip_dir)}, {}
    )
    assert isinstance(reward, AestheticScore) and reward.differentiable
    arr = uint8_images(3, 32, 32, seed=2)
    image, _ = open_clip_reference(clip_dir, PROMPTS, arr)
    x = image
    for i in (0, 2, 4, 6, 7):  # linear layers, no activations; dropout is off at inference
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    got = score(reward, PROMPTS, to_tensor(arr))
    assert torch.allclose(got, x.squeeze(-1), atol=1e-4)
    # a second formulation: the five layers collapse into one affine map
    weight, bias = torch.eye(16), torch.zeros(16)
    for i in (0, 2, 4, 6, 7):
        w, b = state[f"layers.{i}.weight"].double(), state[f"layers.{i}.bias"].double()
        weight, bias = w @ weight.double(), w @ bias.double() + b
    assert torch.allclose(got.double(), (image.double() @ weight.T + bias).squeeze(-1), atol=1e-4)
    images = to_tensor(arr).requires_grad_()
    reward(PROMPTS, images).sum().backward()
    assert images.grad.abs().sum() > 0


def test_linear_aesthetic_head_and_reload(clip_dir, tmp_path):
    torch.manual_seed(1)
    w, b = torch.randn(1, 16), torch.randn(1)
    save_file({"weight": w, "bias": b}, str(tmp_path / "v1.safetensors"))
    net, _ = load_open_clip(str(clip_dir))
    reward = AestheticScore(net, load_aesthetic_head(tmp_path / "v1.safetensors"))
    arr = uint8_images(2, 32, 32, seed=3)
    image, _ = open_clip_reference(clip_dir, PROMPTS[:2], arr)
    got = reward(PROMPTS[:2], to_tensor(arr))
    assert torch.allclose(got, (image @ w.T + b).squeeze(-1), atol=1e-4)
    random_head(tmp_path / "mlp.safetensors", seed=4)
    a = AestheticScore.from_pretrained(
        str(tmp_path / "mlp.safetensors"), model=str(clip_dir), pretrained=None
    )
    b2 = AestheticScore.from_pretrained(
        str(tmp_path / "mlp.safetensors"), model=str(clip_dir), pretrained=None
    )
    assert torch.equal(a(PROMPTS[:2], to_tensor(arr)), b2(PROMPTS[:2], to_tensor(arr)))


def test_clip_reward_bad_inputs(clip_dir, tmp_path):
    with pytest.raises(ModelError, match=r"reward 'aesthetic'.*missing\.safetensors"):  # named, no trace
        build_reward(
            {"name": "aesthetic", "head": str(tmp_path / "missing.safetensors"), "model": str(clip_dir)}, {}
        )
    (tmp_path / "head.pth").write_bytes(b"not opened")
    with pytest.raises(ValueError, match=r"(?s)safetensors only.*weights_only=True"):
        load_aesthetic_head(tmp_path / "head.pth")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match="unknown aesthetic head layout"):
        load_aesthetic_head(tmp_path / "odd.safetensors")
    random_head(tmp_path / "wide.safetensors", width=24)
    with pytest.raises(ValueError, match="24-dim embeddings but the CLIP model gives 16"):
        AestheticScore.from_pretrained(str(tmp_path / "wide.safetensors"), model=str(clip_dir))
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_open_clip(str(tmp_path / "no-such-dir"))
    with pytest.raises(FileNotFoundError, match=r"open_clip_config\.json"):
        load_open_clip(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_open_clip("ViT-B-32", str(tmp_path / "clip.safetensors"))
    reward = CLIPScore(*load_open_clip(str(clip_dir)))
    with pytest.raises(ValueError, match=r"\[batch, 3, H, W\].*\(2, 32, 32\)"):
        reward(PROMPTS[:2], torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        reward(PROMPTS[:2], torch.zeros(3, 3, 32, 32))
    with pytest.raises(ValueError, match="prompt 0 must be a string"):
        reward([["a"]], torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="scale must be a positive"):
        CLIPScore(reward.model, reward.tokenizer, scale=0)


# --------------------------------------------------------------------------- Bradley–Terry reward model


def write_pairs(root: Path, name: str, n: int, seed: int) -> Path:
    """Pairs whose preference depends on the prompt: 'bright' prefers the brighter image, 'dark' the darker one."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        want = "bright" if i % 2 == 0 else "dark"
        levels = sorted(rng.uniform(0.1, 0.9, size=2))
        pair = {}
        for tag, level in zip(("hi", "lo"), (levels[1], levels[0]), strict=True):
            pixels = np.clip(level + 0.15 * rng.standard_normal((16, 16, 3)), 0, 1)
            file = f"images/{name}_{i:03d}_{tag}.png"
            Image.fromarray((pixels * 255).astype(np.uint8)).save(root / file)
            pair[tag] = file
        w, lo = (pair["hi"], pair["lo"]) if want == "bright" else (pair["lo"], pair["hi"])
        rows.append({"prompt": f"a {want} picture", "image_w": w, "image_l": lo})
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bradley_terry_loss_matches_hand_computation(tmp_path):
    rows = read_rows(write_pairs(tmp_path, "train", 4, seed=0))
    torch.manual_seed(0)
    model = ImageRewardModel.create(ImageScorerConfig(channels=[8], hidden=16, prompt_buckets=32))
    algo = RewardModelAlgorithm(model, rows, RewardModelConfig())
    losses, metrics = algo.loss(algo.train_examples)
    for i, ex in enumerate(algo.train_examples):
        with torch.no_grad():
            r_w = model.module(ex["image_w"][None], [ex["prompt"]]).item()
            r_l = model.module(ex["image_l"][None], [ex["prompt"]]).item()
        assert losses[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-(r_w - r_l)))), abs=1e-5)
    assert set(metrics) == {"accuracy", "margin"}


def test_bradley_terry_training_raises_heldout_accuracy(tmp_path):
    from mmalign.train.trainer import Trainer

    train, held_out = write_pairs(tmp_path, "train", 64, seed=0), write_pairs(tmp_path, "eval", 32, seed=1)
    recipe = {
        "seed": 0,
        "model": {"kind": "image_reward_model", "network": {"channels": [8, 16], "hidden": 32}},
        "data": {"train": str(train)},
        "algorithm": {"name": "reward_model"},
        "eval": {"pairs": str(held_out)},
        "train": {"max_steps": 40, "batch_size": 16, "lr": 3e-3, "progress": False},
    }
    policy, algorithm, cfg, evaluator, report = build_run(recipe)
    summary = Trainer(policy, algorithm, cfg, tmp_path / "run", evaluator=evaluator, report=report).train()
    before, after = summary["before"]["pairwise_accuracy"], summary["after"]["pairwise_accuracy"]
    assert after >= 0.9 and after > before + 0.2, (before, after)
    # saved as safetensors + JSON, reloaded as a frozen differentiable reward with the same scores
    final = tmp_path / "run" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    reward = build_reward({"name": "image_reward_model", "path": str(final)}, {})
    assert reward.differentiable and not any(p.requires_grad for p in reward.module.parameters())
    assert PairwiseAccuracy(read_rows(held_out)).evaluate(reward)["pairwise_accuracy"] == after
    batch = policy.collate_pairs(evaluator._encoded[:4])
    policy.module.eval()
    with torch.no_grad():
        expected = policy.scores(batch)
    images = batch["images"].clone().requires_grad_()
    got = score(reward, batch["prompts"], images)
    assert torch.allclose(got, expected, atol=1e-6)
    got.sum().backward()
    assert images.grad.abs().sum() > 0


def test_image_reward_model_bad_inputs(tmp_path):
    model = ImageRewardModel.create(ImageScorerConfig(channels=[8], hidden=16))
    with pytest.raises(ValueError, match="images are 32×32, the model scores 16×16"):
        model(["a"], torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[batch, 3, H, W\]"):
        model(["a"], torch.zeros(1, 1, 16, 16))
    write_pairs(tmp_path, "ok", 2, seed=0)
    rows = rows_from_records(
        [{"prompt": "a dark picture", "image_w": "images/ok_000_hi.png", "image_l": "nope.png"}],
        source=str(tmp_path / "pairs.jsonl"),
    )
    with pytest.raises(DataError, match=r"row 1, field 'image_l': image file not found"):
        model.encode_pair(rows[0])
    bad = rows_from_records([{"prompt": "p", "image_w": "a.png", "image_l": "a.png"}])
    with pytest.raises(DataError, match=r"field 'image_l'.*same file"):
        model.encode_pair(bad[0])
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    small = rows_from_records(
        [{"prompt": "p", "image_w": "small.png", "image_l": "images/ok_000_lo.png"}],
        source=str(tmp_path / "pairs.jsonl"),
    )
    with pytest.raises(DataError, match="field 'image_w': image is 8×8, the model expects 16×16"):
        model.encode_pair(small[0])
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ImageRewardModel.from_pretrained(tmp_path)
    recipe = {
        "model": {"kind": "image_reward_model", "network": {"channels": [8, 16], "image_size": 10}},
        "data": {"train": str(tmp_path / "ok.jsonl")},
        "algorithm": {"name": "reward_model"},
    }
    with pytest.raises(RecipeError, match=r"image_size 10 must divide by 2\^2"):
        build_run(recipe)
    recipe["model"]["network"] = {"channels": [8]}
    recipe["algorithm"]["name"] = "dpo"
    with pytest.raises(
        RecipeError,
        match=r"algorithm 'dpo' does not fit model.kind 'image_reward_model'.*Algorithms for image_reward_model: reward_model",
    ):
        build_run(recipe)
