"""Small CNN classifiers over [C, H, W] outputs and the reward they give: p(the class the prompt names | output).

The digits worlds judge their generators with them: an image classifier names the digit in a 16×16 RGB image in
[-1, 1] (what a Stable Diffusion VAE decodes), a recogniser names the spoken digit of a standardised log-mel. The
network is smooth (SiLU, average pooling) so its log-probability of the prompted class is a useful differentiable
reward. Weights are stored as safetensors next to a JSON config; nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ConvClassifierConfig:
    """Shape of the classifier; saved as JSON so a checkpoint rebuilds without code guesses."""

    image_size: int = 16
    in_channels: int = 3
    channels: tuple[int, int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10


class ConvClassifier(nn.Module):
    """Two conv stages and an MLP head: logits over the classes for inputs `[B, C, H, W]`."""

    def __init__(self, config: ConvClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ConvClassifierConfig()
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

    def log_prob(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(label | input) per input: the differentiable prompt–output agreement reward."""
        return self(images).log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """The most likely digit of each image, in chunks so large evaluations fit in memory."""
        return torch.cat([self(chunk).argmax(-1) for chunk in images.split(batch_size)])

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of inputs whose predicted class is the given one."""
        return (self.predict(images) == labels).float().mean().item()

    def save_pretrained(self, path: str | Path) -> None:
        """Write `config.json` and `model.safetensors` into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> ConvClassifier:
        """Load a saved classifier in eval mode with gradients disabled on its weights (inputs still get them)."""
        path = Path(path)
        raw = json.loads((path / CONFIG_NAME).read_text())
        model = cls(ConvClassifierConfig(**{**raw, "channels": tuple(raw["channels"])}))
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME), device=str(device)))
        return model.to(device).eval().requires_grad_(False)


def train_classifier(
    images: torch.Tensor,
    digits: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    noise: float = 0.1,
    config: ConvClassifierConfig | None = None,
    generator: torch.Generator | None = None,
    log: Callable[[str], object] = print,
) -> ConvClassifier:
    """Fit a classifier with light augmentation (±1 px shifts, pixel noise) so it tolerates generated images."""
    model = ConvClassifier(config)
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


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b")


def digit_of(prompt: str) -> int:
    """The digit a digits-world prompt asks for, written as a word ("seven") or a numeral ("7")."""
    found = {m if m.isdigit() else str(DIGIT_WORDS.index(m)) for m in DIGIT_PATTERN.findall(prompt.lower())}
    if len(found) != 1:
        raise ValueError(f"expected exactly one digit in prompt {prompt!r}, found {sorted(found) or 'none'}")
    return int(found.pop())


def require_digit_prompts(rows: Sequence[Any]) -> None:
    """Fail on the first row whose prompt does not name exactly one digit (what a prompted-class reward scores),
    naming its row and field (rows are `mmalign.core.data.Row`s)."""
    for row in rows:
        prompt = row.data.get("prompt")
        try:
            digit_of(prompt if isinstance(prompt, str) else "")
        except ValueError as err:
            raise row.error(
                "prompt", f"{err}; this reward scores the digit a prompt names (zero…nine or 0–9)"
            ) from None


class PromptedClassReward:
    """p(the class the prompt names | output) under a classifier: a differentiable prompt–output agreement reward.

    `label_of(prompt)` reads the class index from a prompt (the digits worlds' `digit_of` by default);
    `agreement()` is the hard version (classifier argmax equals the prompted class), reported in evaluation.
    `log_prob=True` rewards log p instead of p.
    """

    differentiable = True

    def __init__(
        self,
        classifier: ConvClassifier,
        *,
        name: str = "classifier",
        log_prob: bool = False,
        label_of: Callable[[str], int] = digit_of,
    ):
        self.classifier, self.name, self.log_prob, self.label_of = classifier, name, log_prob, label_of

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> PromptedClassReward:
        return cls(ConvClassifier.from_pretrained(path), **kwargs)

    def labels(self, prompts: Sequence[str]) -> torch.Tensor:
        """The class each prompt names (a prompt naming none or several is a ValueError)."""
        return torch.tensor([self.label_of(p) for p in prompts])

    def __call__(self, prompts: Sequence[str], outputs: torch.Tensor) -> torch.Tensor:
        labels = self.labels(prompts).to(outputs.device)
        logp = self.classifier.to(outputs.device).log_prob(outputs.float(), labels)
        return logp if self.log_prob else logp.exp()

    @torch.no_grad()
    def readings(self, prompts: Sequence[str], outputs: torch.Tensor) -> list[str]:
        """What the classifier sees in each output, for a report: its most likely class and p(prompted class)."""
        labels = self.labels(prompts).to(outputs.device)
        probs = self.classifier.to(outputs.device)(outputs.float()).softmax(-1)
        return [
            f"reads {int(p.argmax())}, p={float(p[y]):.2f}"
            for p, y in zip(probs, labels.tolist(), strict=True)
        ]

    @torch.no_grad()
    def agreement(self, prompts: Sequence[str], outputs: torch.Tensor) -> torch.Tensor:
        labels = self.labels(prompts).to(outputs.device)
        return (self.classifier.to(outputs.device)(outputs.float()).argmax(-1) == labels).float()

    @torch.no_grad()
    def features(self, outputs: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (an embedding for Fréchet distances between output sets)."""
        return self.classifier.head[:-1](self.classifier.features(outputs.float()))
