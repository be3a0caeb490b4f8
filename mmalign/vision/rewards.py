"""Image rewards: JPEG (in)compressibility (DDPO's rewards) and prompt agreement of a digit classifier."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image


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


class DigitAgreement:
    """p(prompted digit | image) under the digits world's classifier: differentiable prompt–image agreement.

    `agreement()` is the hard version (classifier argmax equals the prompted digit), reported in evaluation.
    """

    differentiable = True
    name = "digit_classifier"

    def __init__(self, classifier: torch.nn.Module, *, log_prob: bool = False):
        self.classifier, self.log_prob = classifier, log_prob

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> DigitAgreement:
        from mmalign.vision.digit_classifier import DigitClassifier

        return cls(DigitClassifier.from_pretrained(path), **kwargs)

    @staticmethod
    def _digits(prompts: Sequence[str]) -> torch.Tensor:
        from mmalign.zoo.image_world import digit_of

        return torch.tensor([digit_of(p) for p in prompts])

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        digits = self._digits(prompts).to(images.device)
        logp = self.classifier.to(images.device).log_prob(images.float(), digits)
        return logp if self.log_prob else logp.exp()

    @torch.no_grad()
    def agreement(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        digits = self._digits(prompts).to(images.device)
        return (self.classifier.to(images.device)(images.float()).argmax(-1) == digits).float()
