"""Real digit images for the image world: ReFL's pretraining data, and the held-out denoising loss on real data.

    python vision/real_digits.py write DIR
        DIR/train_targets.jsonl: the world's 1438 training-split digits as 16×16 PNGs, each with one training-template
        prompt of its digit (`data.targets` of vision/refl_pretrain_digits.yaml); DIR/heldout_targets.jsonl: the
        359 held-out digits with held-out-template prompts.
    python vision/real_digits.py denoising-loss DIR MODEL [MODEL ...]
        The mean ε-prediction error of each model (the world's base, or a run's `final/` pipeline) on the held-out
        digits with their prompts, at the same (noise, t) draws for every model (as the speech evaluator's
        `heldout_denoising_loss`): lower = it still models real digits.

The images and the split are the world builder's own (scikit-learn's digits, `split_indices` with the world's seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

import mmalign.zoo.registry  # noqa: F401  (registers the zoo:// scheme that `resolve` reads)
from mmalign.core.data import read_rows, write_jsonl
from mmalign.core.paths import resolve
from mmalign.objectives.diffusion import denoising_error
from mmalign.vision.diffusion_policy import DiffusionImagePolicy
from mmalign.zoo.image_world import (
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    ImageWorldSpec,
    load_digit_images,
    prompt_for,
    split_indices,
)


def write(out: Path) -> None:
    images, digits = load_digit_images()
    train, held_out = split_indices(len(images), ImageWorldSpec())
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name, indices, templates in (
        ("train", train, TRAIN_TEMPLATES),
        ("heldout", held_out, EVAL_TEMPLATES),
    ):
        rows = []
        for j, i in enumerate(indices.tolist()):
            pixels = ((images[i] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            file = f"images/{name}_{i:04d}.png"
            Image.fromarray(pixels).save(out / file)
            rows.append({"prompt": prompt_for(templates[j % len(templates)], int(digits[i])), "image": file})
        write_jsonl(out / f"{name}_targets.jsonl", rows)
        print(f"{out / f'{name}_targets.jsonl'}: {len(rows)} images")


@torch.no_grad()
def denoising_loss(policy: DiffusionImagePolicy, rows, draws: int = 4, batch_size: int = 128) -> float:
    """Mean ‖ε − ε_θ(x_t, t, c)‖² over the rows × `draws` fixed (noise, t) draws, unguided."""
    latents = torch.stack([policy.encode_target(row)["latents"] for row in rows])
    prompts = [row.data["prompt"] for row in rows]
    process, g = policy.forward_process, torch.Generator().manual_seed(1234)
    total, count = 0.0, 0
    for _ in range(draws):
        noise = torch.randn(latents.shape, generator=g)
        t = process.sample_timesteps(len(latents), generator=g)
        for s in range(0, len(latents), batch_size):
            clean, eps, tt = latents[s : s + batch_size], noise[s : s + batch_size], t[s : s + batch_size]
            cond = policy.encode_prompts(prompts[s : s + batch_size])
            output = policy.predict(
                process.add_noise(clean, eps, tt), process.model_timestep(tt), cond, guidance=1.0
            )
            loss = denoising_error(output, process.target(clean, eps, tt))
            total, count = total + loss.sum().item(), count + len(loss)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("write").add_argument("dir", type=Path)
    measure = commands.add_parser("denoising-loss")
    measure.add_argument("dir", type=Path)
    measure.add_argument("models", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "write":
        write(args.dir)
        return
    rows = read_rows(args.dir / "heldout_targets.jsonl")
    out = {}
    for model in args.models:
        out[model] = denoising_loss(DiffusionImagePolicy.from_pretrained(resolve(model)), rows)
        print(f"{model}: {out[model]:.5f}", flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
