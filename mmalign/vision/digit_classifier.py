"""A small CNN that names the digit in a 16×16 RGB image: the ground truth behind the digits world's rewards.

It reads images in [-1, 1] (what a Stable Diffusion VAE decodes, before the pipeline maps them to [0, 1]) and is
smooth (SiLU, average pooling) so that its log-probability of the prompted digit is a useful differentiable
reward. Weights are stored as safetensors next to a JSON config; nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class DigitClassifierConfig:
    """Shape of the classifier; saved as JSON so a checkpoint rebuilds without code guesses."""

    image_size: int = 16
    in_channels: int = 3
    channels: tuple[int, int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10


class DigitClassifier(nn.Module):
    """Two conv stages and an MLP head: logits over the ten digits for images in [-1, 1]."""

    def __init__(self, config: DigitClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or DigitClassifierConfig()
        c1, c2 = self.config.channels
        self.features = nn.Sequential(
            nn.Conv2d(self.config.in_channels, c1, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
        )
        side = self.config.image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, self.config.hidden),
            nn.SiLU(),
            nn.Linear(self.config.hidden, self.config.num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits `[batch, num_classes]` for images `[batch, C, H, W]` in [-1, 1]."""
        return self.head(self.features(images))

    def log_prob(self, images: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        """log p(digit | image) per image: the differentiable prompt–image agreement reward."""
        return self(images).log_softmax(-1).gather(-1, digits[:, None]).squeeze(-1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """The most likely digit of each image, in chunks so large evaluations fit in memory."""
        return torch.cat([self(chunk).argmax(-1) for chunk in images.split(batch_size)])

    def accuracy(self, images: torch.Tensor, digits: torch.Tensor) -> float:
        """Fraction of images whose predicted digit is the given one."""
        return (self.predict(images) == digits).float().mean().item()

    def save_pretrained(self, path: str | Path) -> None:
        """Write `config.json` and `model.safetensors` into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> DigitClassifier:
        """Load a saved classifier in eval mode with gradients disabled on its weights (inputs still get them)."""
        path = Path(path)
        raw = json.loads((path / CONFIG_NAME).read_text())
        model = cls(DigitClassifierConfig(**{**raw, "channels": tuple(raw["channels"])}))
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME), device=str(device)))
        return model.to(device).eval().requires_grad_(False)


def train_digit_classifier(
    images: torch.Tensor,
    digits: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    noise: float = 0.1,
    config: DigitClassifierConfig | None = None,
    generator: torch.Generator | None = None,
    log: Callable[[str], object] = print,
) -> DigitClassifier:
    """Fit a classifier with light augmentation (±1 px shifts, pixel noise) so it tolerates generated images."""
    model = DigitClassifier(config)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
        x = images[idx].roll(shifts=shift, dims=(2, 3))
        x = x + noise * torch.randn(x.shape, generator=generator)
        loss = F.cross_entropy(model(x), digits[idx])
        loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad()
        if step % 200 == 0 or step == steps - 1:
            log(f"[zoo image] classifier step {step + 1}/{steps} loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)
