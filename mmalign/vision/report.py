"""Image grids of fixed prompts and seeds, before and after training: the image part of a run report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from mmalign.vision.diffusion_policy import DiffusionImagePolicy


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, scale: int = 4) -> Image.Image:
    """Tile images (upscaled with nearest-neighbour so tiny images stay readable) with an optional label column."""
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    pad = 70 if labels else 0
    grid = Image.new("RGB", (pad + w * max(map(len, rows)), h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        if labels:
            draw.text((4, r * h + h // 2 - 5), labels[r], fill="black")
        for c, img in enumerate(row):
            grid.paste(img.resize((w, h), Image.NEAREST), (pad + c * w, r * h))
    return grid


class ImageSamples:
    """Saves `samples_<tag>.png` (one column per held-out prompt, seed 0) and a before/after grid in report.md."""

    def store_samples(self, run_dir: Path, tag: str, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not samples:
            return []
        images = DiffusionImagePolicy.to_pil(torch.stack([s["image"] for s in samples]))
        image_grid([images]).save(run_dir / f"samples_{tag}.png")
        return [
            {"prompt": s["prompt"], "file": f"samples_{tag}.png", "column": i} for i, s in enumerate(samples)
        ]

    def sample_lines(self, samples: dict[str, list[dict[str, Any]]]) -> list[str]:
        before, after = samples.get("before", []), samples.get("after", [])
        if not before or not after:
            return []
        return [
            "",
            "## Samples (held-out prompts, same seed): before, then after",
            "",
            "Prompts: " + "; ".join(f"{i + 1}. {s['prompt']}" for i, s in enumerate(after)),
            "",
            "![before](samples_before.png)",
            "",
            "![after](samples_after.png)",
        ]
