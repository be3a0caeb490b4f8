"""Offline image preference pairs for Diffusion-DPO, made from the digits world's own base model.

For each training prompt the base model draws `samples_per_prompt` images; the digit classifier ranks them and the
best and worst become (image_w, image_l) when their scores differ by at least `min_gap` — the same recipe as
Pick-a-Pic-style datasets (generated images ranked by a judge), with a judge that has ground truth. Held-out pairs
(`eval_pairs.jsonl`) are drawn the same way on the world's held-out prompt templates, for judging reward models.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmalign.core.data import read_rows, write_jsonl
from mmalign.zoo.reproducible import build_threads


@dataclass
class ImagePairsSpec:
    """How many pairs to draw, from which image world (its fingerprint is part of this world's: a rebuilt base
    world rebuilds the pairs)."""

    base_world: str = "image"
    samples_per_prompt: int = 6
    repeats: int = 32  # passes over the training prompts (different seeds)
    min_gap: float = 0.2
    seed: int = 0
    eval_repeats: int = 8  # passes over the held-out prompts for eval_pairs.jsonl

    @classmethod
    def tiny(cls) -> ImagePairsSpec:
        return cls(samples_per_prompt=2, repeats=1, min_gap=0.0, eval_repeats=1)


@build_threads()
def build_image_pairs(
    out_dir: str | Path, spec: ImagePairsSpec | None = None, log=print, world: str | None = None
) -> Path:
    """Write PNG pairs, `train_pairs.jsonl` and held-out `eval_pairs.jsonl` (prompt, image_w, image_l, scores)
    drawn from `world` (default `spec.base_world`), on `BUILD_THREADS` torch threads (bit-identical builds)."""
    from mmalign.evaluation.classifier import PromptedClassReward
    from mmalign.vision.diffusion_policy import DiffusionImagePolicy
    from mmalign.zoo import registry

    spec = spec or ImagePairsSpec()
    world = world or spec.base_world
    source = registry.build(world, log=log)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    policy = DiffusionImagePolicy.from_pretrained(
        str(source / "base"), num_steps=10, eta=1.0, guidance_scale=3.0
    )
    judge = PromptedClassReward.from_pretrained(str(source / "classifier"), name="digit_classifier")
    generator = torch.Generator().manual_seed(spec.seed)
    counts = {}
    for split, repeats in (("train", spec.repeats), ("eval", spec.eval_repeats)):
        prompts = [r.data["prompt"] for r in read_rows(source / f"{split}_prompts.jsonl")]
        rows = _draw_pairs(policy, judge, prompts, repeats, spec, generator, out, split, log)
        write_jsonl(out / f"{split}_pairs.jsonl", rows)
        counts[f"{split}_pairs"] = len(rows)
    (out / "world.json").write_text(
        json.dumps({"world": "image-pairs", "source": world, **asdict(spec), **counts}, indent=2)
    )
    return out


def _draw_pairs(policy, judge, prompts, repeats, spec, generator, out: Path, split: str, log) -> list[dict]:
    """Sample `samples_per_prompt` images per prompt `repeats` times; keep each prompt's best and worst."""
    rows, k = [], spec.samples_per_prompt
    prefix = "" if split == "train" else f"{split}_"
    for rep in range(repeats):
        batch = [p for p in prompts for _ in range(k)]
        images = policy.decode(policy.sample(batch, generator=generator, record=False).final)
        scores = judge(batch, images).view(len(prompts), k)
        pil = policy.to_pil(images)
        for i, prompt in enumerate(prompts):
            best, worst = int(scores[i].argmax()), int(scores[i].argmin())
            if scores[i, best] - scores[i, worst] < spec.min_gap or best == worst:
                continue
            names = []
            for tag, j in (("w", best), ("l", worst)):
                name = f"images/{prefix}{rep:02d}_{i:03d}_{tag}.png"
                pil[i * k + j].save(out / name)
                names.append(name)
            rows.append(
                {
                    "prompt": prompt,
                    "image_w": names[0],
                    "image_l": names[1],
                    "score_chosen": round(float(scores[i, best]), 4),
                    "score_rejected": round(float(scores[i, worst]), 4),
                }
            )
        log(f"[zoo image-pairs] {split} pass {rep + 1}/{repeats}: {len(rows)} pairs")
    if not rows:
        raise RuntimeError(f"no {split} pair had a score gap ≥ min_gap; lower ImagePairsSpec.min_gap")
    return rows
