"""Image rewards: JPEG (in)compressibility, DDPO's rule-based rewards (classifier rewards: mmalign.evaluation)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from mmalign.evaluation.classifier import PromptedClassReward


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size of each image as a JPEG file, in kB."""
    sizes = []
    for img in _to_pil(images):
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


class JpegCompressibility:
    """−(JPEG size in kB): smaller files score higher (DDPO, Black et al. 2023)."""

    differentiable = False
    name = "jpeg_compressibility"

    def __call__(self, prompts: Sequence[Any], images: torch.Tensor) -> torch.Tensor:
        return -jpeg_kilobytes(images)


class JpegIncompressibility:
    """+(JPEG size in kB): more detailed images score higher (DDPO, Black et al. 2023)."""

    differentiable = False
    name = "jpeg_incompressibility"

    def __call__(self, prompts: Sequence[Any], images: torch.Tensor) -> torch.Tensor:
        return jpeg_kilobytes(images)


class DigitAgreement(PromptedClassReward):
    """p(prompted digit | image) under the digits world's classifier: differentiable prompt–image agreement.

    `agreement()` is the hard version (classifier argmax equals the prompted digit), reported in evaluation.
    """

    def __init__(self, classifier, **kwargs: Any):
        super().__init__(classifier, **{"name": "digit_classifier", **kwargs})
