"""Corrupted copies of a VLM's processed images: the rejected image of mDPO's conditional preference.

Both corruptions act on the processor's pixel tensors [N, C, H, W] and keep their shape, so a corrupted image
goes through the model exactly like the real one. A crop followed by a bilinear resize commutes with the
processor's per-channel normalisation, so cropping processed pixels equals cropping the image itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CORRUPTIONS = ("crop", "noise")


def random_crop(
    pixels: torch.Tensor, max_area: float = 0.2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each image replaced by a random crop covering at most `max_area` of it, resized back to full size.

    mDPO (Wang et al., 2024, §3) builds its rejected image by cropping less than 20% of the original. The
    crop's area share is uniform in (0, max_area], its aspect ratio uniform in [1/2, 2] (clipped to the image),
    its position uniform; at least one pixel per side.
    """
    if not 0 < max_area <= 1:
        raise ValueError(f"max_area must be in (0, 1], got {max_area}")
    n, _, height, width = pixels.shape
    out = torch.empty_like(pixels)
    draws = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    for i in range(n):
        area = max_area * (1 - draws[i, 0].item())  # (0, max_area]
        aspect = 2 ** (2 * draws[i, 1].item() - 1)  # [1/2, 2]
        h = min(height, max(1, round((area * height * width / aspect) ** 0.5)))
        w = min(width, max(1, round((area * height * width * aspect) ** 0.5)))
        top = min(height - h, int(draws[i, 2].item() * (height - h + 1)))
        left = min(width - w, int(draws[i, 3].item() * (width - w + 1)))
        crop = pixels[i : i + 1, :, top : top + h, left : left + w]
        out[i : i + 1] = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
    return out


def diffusion_noise(
    pixels: torch.Tensor, step: int, generator: torch.Generator | None = None, num_steps: int = 1000
) -> torch.Tensor:
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) on processed pixels, DDPM's linear β schedule (1e-4 → 0.02).

    POVID's noisy image (Zhou et al., 2024), here as mDPO's rejected image. For a processor that maps pixels to
    [−1, 1] (the digits world's) this is the forward process of `vlm_builders.diffusion_noise` before clamping.
    """
    if not 0 <= step < num_steps:
        raise ValueError(f"noise step must be in [0, {num_steps}), got {step}")
    betas = torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)[step].item()
    noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float64).to(pixels)
    return alpha_bar**0.5 * pixels + (1 - alpha_bar) ** 0.5 * noise


def corrupt(
    pixels: torch.Tensor,
    how: str,
    *,
    max_area: float = 0.2,
    noise_step: int = 500,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`how` = crop (`random_crop` with `max_area`) or noise (`diffusion_noise` at `noise_step`)."""
    if how == "crop":
        return random_crop(pixels, max_area, generator)
    if how == "noise":
        return diffusion_noise(pixels, noise_step, generator)
    raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {how!r}")
