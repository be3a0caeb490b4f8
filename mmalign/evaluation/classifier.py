"""Small CNN classifiers over [C, H, W] outputs and the reward they give: p(the class the prompt names | output).

The digits worlds judge their generators with them: an image classifier names the digit in a 16×16 RGB image in
[-1, 1] (what a Stable Diffusion VAE decodes), a recogniser names the spoken digit of a standardised log-mel. The
network is smooth (SiLU, average pooling) so its log-probability of the prompted class is a useful differentiable
reward. Weights are stored as safetensors next to a JSON config; nothing is unpickled.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class Classifier(nn.Module, abc.ABC):
    """What every saved classifier offers: logits, log p(label), predictions, penultimate features, save/load.

    A subclass sets `architecture` (the name its `config.json` records; the original `ConvClassifier` records none
    and is read as "conv"), `config_class`, and implements `forward` and `embed`. `Classifier.from_pretrained` (or
    `load_classifier`) builds whichever architecture a directory holds.
    """

    architecture: ClassVar[str]
    config_class: ClassVar[type]

    @abc.abstractmethod
    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features `[batch, dim]` (an embedding for Fréchet distances between output sets)."""

    def log_prob(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(label | input) per input: the differentiable prompt–output agreement reward."""
        return self(images).log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """The most likely class of each input, in chunks so large evaluations fit in memory."""
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
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Classifier:
        """Load a saved classifier of the architecture its config names, in eval mode with frozen weights (inputs
        still get gradients). Called on a subclass, a directory holding another architecture is a ValueError."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a saved classifier directory)")
        raw = json.loads((path / CONFIG_NAME).read_text())
        architecture = raw.get("architecture", ConvClassifier.architecture)
        if architecture not in CLASSIFIERS:
            raise ValueError(
                f"{path}: unknown classifier architecture {architecture!r}; known: {', '.join(sorted(CLASSIFIERS))}"
            )
        model_class = CLASSIFIERS[architecture]
        if not issubclass(model_class, cls):
            raise ValueError(
                f"{path} holds a {architecture!r} classifier ({model_class.__name__}), not a {cls.__name__}; "
                "load it with Classifier.from_pretrained"
            )
        model = model_class(model_class.config_class.from_dict(raw))
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME), device=str(device)))
        return model.to(device).eval().requires_grad_(False)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """A saved classifier of any registered architecture (what rewards and world builders load)."""
    return Classifier.from_pretrained(path, device)


@dataclass
class ConvClassifierConfig:
    """Shape of the classifier; saved as JSON so a checkpoint rebuilds without code guesses."""

    image_size: int = 16
    in_channels: int = 3
    channels: tuple[int, int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ConvClassifierConfig:
        raw = {k: v for k, v in raw.items() if k != "architecture"}
        return cls(**{**raw, "channels": tuple(raw["channels"])})


class ConvClassifier(Classifier):
    """Two conv stages and an MLP head: logits over the classes for inputs `[B, C, H, W]`."""

    architecture = "conv"
    config_class = ConvClassifierConfig

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

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head[:-1](self.features(inputs))


@dataclass
class ColumnConvClassifierConfig:
    """Shape of a `ColumnConvClassifier`; `architecture` names the class in the saved `config.json`."""

    architecture: str = "column_conv"
    height: int = 16
    in_channels: int = 3
    channels: tuple[int, int] = (64, 64)
    kernel_size: int = 5
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.architecture != "column_conv":
            raise ValueError(f"architecture must be 'column_conv', got {self.architecture!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ColumnConvClassifierConfig:
        return cls(**{**raw, "channels": tuple(raw["channels"])})


class ColumnConvClassifier(Classifier):
    """An independent judge for the 2-D `ConvClassifier`: 1-D convolutions along the last axis of `[B, C, H, W]`.

    Every column (all channels × rows of one x position; for a log-mel, one frame with every mel band) is a
    feature vector; two 1-D conv stages (GELU, max pooling) slide along the columns and the head reads their
    mean and max over positions. For spoken digits this is the usual keyword-spotting layout (frequency bands as
    channels, convolution over time); on images it scans columns. A different inductive bias, activation,
    pooling and readout from `ConvClassifier`, so an output that fools one need not fool the other.
    """

    architecture = "column_conv"
    config_class = ColumnConvClassifierConfig

    def __init__(self, config: ColumnConvClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ColumnConvClassifierConfig()
        c1, c2 = self.config.channels
        k = self.config.kernel_size
        self.columns = nn.Sequential(
            nn.Conv1d(self.config.in_channels * self.config.height, c1, k, padding=k // 2),
            nn.GELU(),
            nn.MaxPool1d(2),
            nn.Conv1d(c1, c2, k, padding=k // 2),
            nn.GELU(),
        )
        self.head = nn.Linear(2 * c2, self.config.num_classes)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        z = self.columns(inputs.flatten(1, 2))
        return torch.cat([z.mean(-1), z.amax(-1)], -1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits `[batch, num_classes]` for inputs `[batch, C, H, W]` (H = `config.height`)."""
        return self.head(self.embed(inputs))


# architecture name (as saved in config.json) → class
CLASSIFIERS: dict[str, type[Classifier]] = {
    ConvClassifier.architecture: ConvClassifier,
    ColumnConvClassifier.architecture: ColumnConvClassifier,
}
_BY_CONFIG = {c.config_class: c for c in CLASSIFIERS.values()}


def new_classifier(config: Any = None) -> Classifier:
    """A fresh classifier of the architecture `config` describes (None: the default `ConvClassifier`)."""
    if config is None:
        return ConvClassifier()
    if type(config) not in _BY_CONFIG:
        raise TypeError(f"no classifier architecture takes a {type(config).__name__}")
    return _BY_CONFIG[type(config)](config)


def train_classifier(
    images: torch.Tensor,
    digits: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    noise: float = 0.1,
    config: Any = None,
    generator: torch.Generator | None = None,
    log: Callable[[str], object] = print,
    log_prefix: str = "[zoo image] classifier",
) -> Classifier:
    """Fit a classifier with light augmentation (±1 px shifts, pixel noise) so it tolerates generated images.

    `config` picks the architecture (`ConvClassifierConfig`, `ColumnConvClassifierConfig`; None = the default
    `ConvClassifier`); every random draw comes from `generator`, the initial weights from torch's global seed.
    """
    model = new_classifier(config)
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
            log(f"{log_prefix} step {step + 1}/{steps} loss {loss.item():.4f}")
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
        classifier: Classifier,
        *,
        name: str = "classifier",
        log_prob: bool = False,
        label_of: Callable[[str], int] = digit_of,
    ):
        self.classifier, self.name, self.log_prob, self.label_of = classifier, name, log_prob, label_of

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> PromptedClassReward:
        return cls(load_classifier(path), **kwargs)

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
    def classes(self, outputs: torch.Tensor) -> torch.Tensor:
        """The class the classifier reads in each output (its argmax)."""
        return self.classifier.to(outputs.device)(outputs.float()).argmax(-1)

    @torch.no_grad()
    def agreement(self, prompts: Sequence[str], outputs: torch.Tensor) -> torch.Tensor:
        return (self.classes(outputs) == self.labels(prompts).to(outputs.device)).float()

    @torch.no_grad()
    def features(self, outputs: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (an embedding for Fréchet distances between output sets)."""
        return self.classifier.embed(outputs.float())


def judge_builder(name: str, example: str) -> Callable[[dict[str, Any], Any], PromptedClassReward]:
    """The reward builder of an independent judge classifier registered as `name` (`path:` its directory, e.g.
    `example`): one for every world whose judge is a saved classifier."""

    def build(options: dict[str, Any], context: Any) -> PromptedClassReward:
        from mmalign.core.config import RecipeError
        from mmalign.core.paths import resolve

        if "path" not in options:
            raise RecipeError(f"reward {name!r} needs `path:` (a judge classifier directory, e.g. {example})")
        return PromptedClassReward.from_pretrained(resolve(options.pop("path")), **{"name": name, **options})

    return build
