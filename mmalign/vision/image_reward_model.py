"""A Bradley–Terry image reward model: a small prompt-conditioned CNN trained on (prompt, image_w, image_l) pairs.

It plugs into the same `RewardModelAlgorithm` and `PairwiseAccuracy` as the text reward model (it implements
`encode_pair` / `collate_pairs` / `scores` and the trainable-state part of the policy protocol), and once trained
it is a differentiable `Reward` on images in [-1, 1]. The prompt enters as a hashed bag of words, so any prompt text
works without a vocabulary file. Saved as `config.json` + `model.safetensors`; nothing is unpickled.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmalign.core.data import Row, validate_image_pair_rows
from mmalign.core.params import TrainableModule
from mmalign.vision.clip_rewards import check_images

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WORD = re.compile(r"[a-z0-9]+")


@dataclass
class ImageScorerConfig:
    """Shape of the scorer; saved as JSON so a checkpoint rebuilds without code guesses."""

    image_size: int = 16
    channels: list[int] = field(default_factory=lambda: [32, 64])
    hidden: int = 128
    prompt_buckets: int = 1024  # hashed bag-of-words prompt conditioning; 0 scores the image alone

    def __post_init__(self) -> None:
        self.channels = [int(c) for c in self.channels]
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"channels must be a non-empty list of positive sizes, got {self.channels}")
        if self.image_size % 2 ** len(self.channels):
            raise ValueError(
                f"image_size {self.image_size} must divide by 2^{len(self.channels)} (one pooling per stage)"
            )
        if self.hidden <= 0 or self.prompt_buckets < 0:
            raise ValueError("hidden must be positive and prompt_buckets non-negative")


def prompt_buckets(prompt: str, buckets: int) -> list[int]:
    """The prompt's lower-cased words, each hashed twice (salted CRC-32, stable across runs and machines) into
    `buckets` ids, so two words share all their ids only when both hashes collide."""
    words = WORD.findall(prompt.lower())
    return [zlib.crc32(salt + w.encode()) % buckets for w in words for salt in (b"", b"#")]


class ImageScorer(nn.Module):
    """Conv stages (SiLU, average pooling) → image features h; prompt bag → p; MLP on [h, p, h·p] → a scalar."""

    def __init__(self, config: ImageScorerConfig | None = None):
        super().__init__()
        self.config = config or ImageScorerConfig()
        layers: list[nn.Module] = []
        c_in = 3
        for c in self.config.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = self.config.image_size // 2 ** len(self.config.channels)
        h = self.config.hidden
        self.image_proj = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, h), nn.SiLU())
        buckets = self.config.prompt_buckets
        self.prompt_embed = nn.EmbeddingBag(buckets, h, mode="mean") if buckets else None
        self.head = nn.Sequential(nn.Linear(3 * h if buckets else h, h), nn.SiLU(), nn.Linear(h, 1))

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """One score per image `[batch, 3, S, S]` in [-1, 1] for its prompt."""
        h = self.image_proj(self.features(images))
        if self.prompt_embed is None:
            return self.head(h).squeeze(-1)
        ids, offsets = [], []
        for p in prompts:
            offsets.append(len(ids))
            ids += prompt_buckets(p, self.config.prompt_buckets)
        p = self.prompt_embed(
            torch.tensor(ids, dtype=torch.long, device=h.device),
            torch.tensor(offsets, dtype=torch.long, device=h.device),
        )
        return self.head(torch.cat([h, p, h * p], dim=-1)).squeeze(-1)


class ImageRewardModel(TrainableModule):
    """The trainable adapter around an `ImageScorer`: pair encoding for Bradley–Terry training, and `Reward`."""

    differentiable = True

    def __init__(self, scorer: ImageScorer, *, name: str = "image_reward_model"):
        self.module = scorer
        self.model: nn.Module = scorer  # the trainer attaches its prepared (possibly wrapped) module
        self.config = scorer.config
        self.name = name

    @classmethod
    def create(cls, config: ImageScorerConfig | None = None, **kwargs: Any) -> ImageRewardModel:
        """A freshly initialised scorer (seeded by the caller)."""
        return cls(ImageScorer(config), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, trainable: bool = True, **kwargs: Any) -> ImageRewardModel:
        """Load `config.json` + `model.safetensors`; `trainable=False` freezes the weights (use as a reward)."""
        path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path}: no {name} (not a saved image reward model directory)")
        try:
            config = ImageScorerConfig(**json.loads((path / CONFIG_NAME).read_text()))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path / CONFIG_NAME}: invalid image reward model config: {err}") from None
        scorer = ImageScorer(config)
        scorer.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        scorer.requires_grad_(trainable)
        return cls(scorer if trainable else scorer.eval(), **kwargs)

    # ---------------------------------------------------------------------------------- policy protocol
    def reference(self):
        return nullcontext()

    def attach(self, model: nn.Module) -> None:
        self.model = model

    def move_frozen_to(self, device: torch.device | str) -> None:
        """A reward model being trained has no frozen parts."""

    def save_pretrained(self, path: str) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_file(
            {k: v.detach().contiguous() for k, v in self.module.state_dict().items()}, str(out / WEIGHTS_NAME)
        )

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # ------------------------------------------------------------------------------------------ pairs
    def encode_pair(self, row: Row) -> dict[str, Any]:
        """Load a pair's two images (relative paths from the dataset file's directory) at the model's size."""
        from mmalign.vision.images import load_image_tensor

        validate_image_pair_rows([row])
        base = Path(row.source).parent if row.source and not row.source.startswith("<") else Path(".")
        size = self.config.image_size
        return {
            "prompt": row.data["prompt"],
            "image_w": load_image_tensor(row, "image_w", base, size),
            "image_l": load_image_tensor(row, "image_l", base, size),
        }

    def collate_pairs(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Preferred images then rejected ones, each with its prompt."""
        prompts = [e["prompt"] for e in examples]
        images = torch.stack([e["image_w"] for e in examples] + [e["image_l"] for e in examples])
        return {"images": images, "prompts": prompts + prompts}

    def scores(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(batch["images"].to(self.device), batch["prompts"]).float()

    # ----------------------------------------------------------------------------------------- reward
    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        """Scores that keep the graph to the images (a differentiable reward)."""
        check_images(images, len(prompts), f"reward {self.name!r}")
        size = self.config.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"reward {self.name!r}: images are {images.shape[-1]}×{images.shape[-2]}, "
                f"the model scores {size}×{size}"
            )
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"reward {self.name!r}: prompt {i} must be a string, got {type(p).__name__}")
        return self.module.to(images.device)(images.float(), list(prompts)).float()
