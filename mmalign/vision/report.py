"""Labelled image grids of fixed prompts and seeds, before and after training: the image part of a run report.

Each grid has one column per held-out prompt (the prompt written under the column) and one row per seed; under
every image is what the first reward reads in it (a classifier's class and p(prompted class), or the reward's
value). `samples_before_after.png` stacks the starting model's grid over the trained model's, same noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from mmalign.core.reward import score
from mmalign.vision.diffusion_policy import DiffusionImagePolicy

CELL = 112  # pixels per image side in a grid (tiny images are upscaled with nearest-neighbour)
LINE = 13  # pixels per line of text


def _font() -> Any:
    try:
        return ImageFont.load_default(size=10)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any, max_lines: int = 3) -> list[str]:
    """Words of `text` in lines no wider than `width` pixels (the last line cut with … if there are more)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], lines[max_lines - 1] + " …"]
    return lines


def labelled_grid(
    images: list[list[Image.Image]],
    readings: list[list[str]],
    prompts: list[str],
    row_labels: list[str],
    title: str,
) -> Image.Image:
    """`images[seed][prompt]` as a grid with a title, a label per row, the reading under every image and each
    prompt under its column."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w, col_w = 56, CELL + 8
    prompt_lines = [_wrap(probe, p, col_w - 4, font) for p in prompts]
    prompt_h = LINE * max(map(len, prompt_lines)) + 6
    row_h = CELL + LINE + 6
    width = label_w + col_w * len(prompts)
    height = LINE + 8 + row_h * len(images) + prompt_h
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), title, fill="black", font=font)
    top = LINE + 8
    for r, (row, row_readings) in enumerate(zip(images, readings, strict=True)):
        y = top + r * row_h
        draw.text((4, y + CELL // 2 - 5), row_labels[r], fill="black", font=font)
        for c, (img, reading) in enumerate(zip(row, row_readings, strict=True)):
            x = label_w + c * col_w + 4
            grid.paste(img.convert("RGB").resize((CELL, CELL), Image.NEAREST), (x, y))
            draw.text((x, y + CELL + 2), reading, fill="dimgray", font=font)
    y = top + row_h * len(images)
    for c, lines in enumerate(prompt_lines):
        for i, line in enumerate(lines):
            draw.text((label_w + c * col_w + 4, y + i * LINE), line, fill="black", font=font)
    return grid


def stack(top: Image.Image, bottom: Image.Image, gap: int = 10) -> Image.Image:
    """One image above the other (the before grid over the after grid)."""
    out = Image.new("RGB", (max(top.width, bottom.width), top.height + gap + bottom.height), "white")
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height + gap))
    return out


def readings(reward: Any, prompts: Sequence[str], images: torch.Tensor) -> list[str]:
    """What a reward reads in each image: its own `readings` if it has them, else its value."""
    if hasattr(reward, "readings"):
        return list(reward.readings(list(prompts), images))
    with torch.no_grad():
        values = score(reward, list(prompts), images).float().tolist()
    return [f"{reward.name} {v:.3g}" for v in values]


class ImageSamples:
    """Saves `samples_<tag>.png` (held-out prompts × seeds, each image labelled with the first reward's reading) and,
    once both exist, `samples_before_after.png`; report.md shows the comparison."""

    def __init__(self, rewards: Sequence[Any] = ()):
        self.rewards = list(rewards)

    def store_samples(self, run_dir: Path, tag: str, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not samples:
            return []
        tensors = torch.stack([s["image"] for s in samples])
        prompts = [s["prompt"] for s in samples]
        read = readings(self.rewards[0], prompts, tensors) if self.rewards else [""] * len(samples)
        images = DiffusionImagePolicy.to_pil(tensors)
        seeds = sorted({s.get("seed", 0) for s in samples})
        columns = list(dict.fromkeys(prompts))
        cell = {(s.get("seed", 0), s["prompt"]): i for i, s in enumerate(samples)}
        grid = labelled_grid(
            [[images[cell[seed, p]] for p in columns] for seed in seeds],
            [[read[cell[seed, p]] for p in columns] for seed in seeds],
            columns,
            [f"seed {seed}" for seed in seeds],
            "before training (base model)"
            if tag == "before"
            else f"{tag} training"
            if tag == "after"
            else tag,
        )
        grid.save(run_dir / f"samples_{tag}.png")
        if tag == "after" and (run_dir / "samples_before.png").exists():
            with Image.open(run_dir / "samples_before.png") as before:
                stack(before.convert("RGB"), grid).save(run_dir / "samples_before_after.png")
        return [
            {"prompt": s["prompt"], "seed": s.get("seed", 0), "reading": r, "file": f"samples_{tag}.png"}
            for s, r in zip(samples, read, strict=True)
        ]

    def sample_lines(self, samples: dict[str, list[dict[str, Any]]]) -> list[str]:
        before, after = samples.get("before", []), samples.get("after", [])
        if not before or not after:
            return []
        what = f" (under each image: what {self.rewards[0].name} reads)" if self.rewards else ""
        return [
            "",
            f"## Samples: held-out prompts × seeds, the same noise before and after training{what}",
            "",
            "![before and after](samples_before_after.png)",
        ]
