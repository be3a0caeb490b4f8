"""The reward-backprop recipes: every file parses into its algorithm's config, and the SD 1.5 recipe's code path
(LoRA, AlignProp's Gaussian truncation over 50 steps, aesthetic target loss, bf16) trains offline on a tiny
pipeline and a tiny open_clip model saved locally."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from mmalign import plugins
from mmalign.core.config import load_recipe, to_dataclass
from mmalign.core.registry import algorithm_for, model_kind
from mmalign.run import RECIPE_KEYS, build_run
from mmalign.train.reward_backprop import RewardBackpropConfig
from mmalign.train.trainer import TrainConfig, Trainer
from mmalign.vision.clip_rewards import AestheticMLP, save_open_clip
from mmalign.zoo.tiny_pipelines import tiny_sd_pipeline

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [
    "vision/alignprop_digits.yaml",
    "vision/draft_k_digits.yaml",
    "vision/draft_lv_digits.yaml",
    "vision/draft_full_digits.yaml",
    "vision/refl_digits.yaml",
    "vision/refl_pretrain_digits.yaml",
    "vision/sd15_alignprop_aesthetic.yaml",
    "speech/draft_digits.yaml",
    "speech/alignprop_digits.yaml",
    "speech/refl_pretrain_digits.yaml",
]


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_parse_into_their_algorithm(name):
    plugins.load()
    recipe = load_recipe(ROOT / name)
    kind = model_kind(recipe["model"]["kind"])
    to_dataclass(kind.config, recipe["model"], "model")
    spec = algorithm_for(recipe["algorithm"]["name"], kind)
    assert spec.family == "reward_backprop"
    section = {**spec.defaults, **recipe["algorithm"]}
    config = to_dataclass(RewardBackpropConfig, section, "algorithm", ignore=RECIPE_KEYS)
    train = to_dataclass(TrainConfig, recipe["train"], "train")
    assert train.max_grad_norm is not None
    assert config.uses_data == ("targets" in recipe["data"])


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_sd15_alignprop_recipe_trains_on_a_tiny_pipeline(tmp_path):
    torch.manual_seed(0)
    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    save_open_clip(open_clip.model.CLIP(**TINY_CLIP), TINY_CLIP, tmp_path / "clip")
    save_file(
        {k: v.clone() for k, v in AestheticMLP(16).state_dict().items()}, str(tmp_path / "head.safetensors")
    )
    prompts = ["a red circle", "two blue squares"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    reward = {
        "name": "aesthetic",
        "model": str(tmp_path / "clip"),
        "head": str(tmp_path / "head.safetensors"),
    }
    recipe = load_recipe(
        ROOT / "vision/sd15_alignprop_aesthetic.yaml",
        [
            f"model.name_or_path={tmp_path / 'sd'}",
            f"data.prompts={tmp_path / 'prompts.jsonl'}",
            f"eval.prompts={tmp_path / 'prompts.jsonl'}",
            "eval.seeds=1",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.grad_accum=2",
            "train.log_with=[]",
            "train.progress=false",
        ],
    )
    recipe["algorithm"]["reward"] = reward
    recipe["eval"]["rewards"] = [reward]
    run = build_run(recipe)
    assert run.policy.sampler.num_steps == 50 and run.train.mixed_precision == "bf16"
    before = {n: p.clone() for n, p in run.policy.trainable_state_dict().items()}
    out = tmp_path / "run"
    summary = Trainer(
        run.policy, run.algorithm, run.train, out, evaluator=run.evaluator, report=run.report
    ).train()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in log if "train/loss" in m]
    assert len(steps) == 2 and all(m["train/grad_norm"] > 0 for m in steps)
    assert all(1 <= m["rollout/backprop_steps"] <= 50 for m in log if "rollout/backprop_steps" in m)
    moved = max((p - before[n]).abs().max().item() for n, p in run.policy.trainable_state_dict().items())
    assert moved > 0 and "aesthetic" in summary["after"]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").exists()
