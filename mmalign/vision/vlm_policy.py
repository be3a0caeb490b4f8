"""Any transformers LLaVA-style model (image + text in, text out) as a sequence policy.

It is the language-model sequence policy (same LoRA/frozen-copy reference, response masks, per-token log-probs, decoding) with
an image on every example: rows carry an `image` file path (relative paths from the dataset file's directory),
the processor expands the image placeholder into the model's image tokens, and `pixel_values` travel with the
batch. Nothing is truncated: an example whose image tokens plus text exceed `max_length` is an error naming its
row, never a silent cut of image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from mmalign.core.data import Row
from mmalign.core.params import LoraSpec
from mmalign.core.sequence_policy import LanguageModelPolicy
from mmalign.vision.images import load_image

DEFAULT_TEMPLATE = "{image}{prompt}"


class VisionLanguagePolicy(LanguageModelPolicy):
    """A LLaVA-style model and its processor as a `SequencePolicy` over (image, prompt) → response.

    `prompt_template` places the image placeholder and the row's prompt (e.g. "USER: {image}\\n{prompt}
    ASSISTANT:" for LLaVA-1.5). `image_size` (optional) makes any image of another size a data error instead
    of letting the processor resize it; `image_field` names the rows' image column.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        *,
        lora: LoraSpec | None = None,
        max_length: int = 512,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        prompt_template: str = DEFAULT_TEMPLATE,
        image_size: int | None = None,
        image_field: str = "image",
        disable_dropout: bool = True,
    ):
        if "{image}" not in prompt_template or "{prompt}" not in prompt_template:
            raise ValueError(
                f"prompt_template must contain {{image}} and {{prompt}}, got {prompt_template!r}"
            )
        tokenizer = processor.tokenizer
        image_token = getattr(processor, "image_token", None)
        if image_token is None:
            raise ValueError(
                f"{type(processor).__name__} has no image_token; expected a LLaVA-style processor"
            )
        super().__init__(
            model,
            tokenizer,
            lora=lora,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            disable_dropout=disable_dropout,
        )
        self.processor = processor
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.prompt_template = prompt_template
        self.image_size = image_size
        self.image_field = image_field
        self._image_tokens: int | None = None  # learned from the first encoded prompt, then checked on all
        self._prompts: dict[tuple[str, int], dict[str, Any]] = {}  # encoded prompt rows, by (source, line)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        lora: LoraSpec | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> VisionLanguagePolicy:
        """Load a hub id (e.g. llava-hf/llava-1.5-7b-hf) or a local directory with its processor."""
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
        return cls(model, processor, lora=lora, **kwargs)

    def save_pretrained(self, path: str) -> None:
        """Save weights (the LoRA adapter alone when training LoRA) and the processor as safetensors."""
        self.module.save_pretrained(path)
        self.processor.save_pretrained(path)

    # -------------------------------------------------------------------------------------- images
    def load_row_image(self, row: Row, field: str | None = None) -> Image.Image:
        """A row's image as RGB; missing, corrupt, wrong-mode or (with `image_size`) wrong-size is a DataError."""
        field = field or self.image_field
        image = load_image(row, field, Path(row.source).parent)
        if self.image_size is not None and image.size != (self.image_size, self.image_size):
            w, h = image.size
            raise row.error(field, f"image is {w}×{h}, the model expects {self.image_size}×{self.image_size}")
        return image

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The processor's pixel tensor for a list of images, [N, C, H, W]."""
        return self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]

    def corrupt_pixel_values(self, pixels: torch.Tensor, how: str, **options: Any) -> torch.Tensor:
        """Corrupted copies of processed images [N, C, H, W] (mDPO's rejected image): `crop` or `noise`, see
        `mmalign.vision.image_corruption.corrupt`; drawn from torch's global (seeded, checkpointed) generator."""
        from mmalign.vision.image_corruption import corrupt

        return corrupt(pixels, how, **options)

    def encode_image_prompt(self, prompt: str, image: Image.Image) -> tuple[list[int], torch.Tensor]:
        """Prompt ids with the image placeholder expanded into image tokens, and the image's pixel values."""
        text = self.prompt_template.format(image=self.image_token, prompt=prompt)
        out = self.processor(text=[text], images=[image], return_tensors="pt", truncation=False)
        ids = out["input_ids"][0].tolist()
        n_image = ids.count(self.image_token_id)
        if self._image_tokens is None:
            self._image_tokens = n_image
        if n_image == 0 or n_image != self._image_tokens:
            raise ValueError(f"prompt {prompt!r} has {n_image} image tokens, expected {self._image_tokens}")
        return ids, out["pixel_values"][0]

    # ------------------------------------------------------------------------------------ encoding rows
    def _prompt_of(self, row: Row) -> str:
        prompt = row.data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise row.error("prompt", "a vision-language row needs a non-empty string prompt")
        if self.image_token in prompt:
            raise row.error("prompt", f"must not contain the image token {self.image_token!r}; it is added")
        return prompt

    def prompt_of(self, row: Row) -> dict[str, Any]:
        """A prompt row's ids and pixel values (what `generate` takes), encoded once per row."""
        key = (row.source, row.line)
        if key not in self._prompts:
            self._prompts[key] = self.encode_row_prompt(row)
        return self._prompts[key]

    def reward_prompt(self, row: Row) -> dict[str, Any]:
        """Rewards of a VLM's responses see the whole row (its image path and whatever ground truth it holds)."""
        return dict(row.data, _source=row.source)

    def encode_row_prompt(self, row: Row, image_field: str | None = None) -> dict[str, Any]:
        """A row's prompt ids and pixel values (its `image`, or `image_field` e.g. a noisy copy)."""
        ids, pixels = self.encode_image_prompt(self._prompt_of(row), self.load_row_image(row, image_field))
        self.codec._check_length(row, "prompt", len(ids), 0)
        return {"prompt_ids": ids, "pixel_values": pixels}

    def encode_response(self, row: Row, prompt_ids: list[int], field: str) -> list[int]:
        """A response field's ids (ending with eos), checked so prompt + response fits `max_length`."""
        value = row.data.get(field)
        if not isinstance(value, str) or not value.strip():
            raise row.error(field, "expected a non-empty string response")
        ids = self.codec.encode_response(row.data["prompt"], prompt_ids, value)
        self.codec._check_length(row, field, len(prompt_ids), len(ids))
        return ids

    def encode_pair(self, row: Row) -> dict[str, Any]:
        """Tokenise one (image, prompt, chosen, rejected) row; image tokens are never cut."""
        encoded = self.encode_row_prompt(row)
        for field in ("chosen", "rejected"):
            encoded[f"{field}_ids"] = self.encode_response(row, encoded["prompt_ids"], field)
        return encoded

    def encode_completion(self, row: Row, field: str = "completion") -> dict[str, Any]:
        encoded = self.encode_row_prompt(row)
        encoded["response_ids"] = self.encode_response(row, encoded["prompt_ids"], field)
        return encoded

    # ----------------------------------------------------------------------------------------- batching
    def collate(
        self, sequences: Sequence[tuple[list[int], list[int], torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Right-pad (prompt ids, response ids, pixel values) triples into one batch with response masks."""
        batch = self.codec.collate([(p, r) for p, r, _ in sequences])
        batch["pixel_values"] = torch.stack([px for _, _, px in sequences])
        return batch

    def collate_pairs(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Chosen then rejected of every pair, each with its image, in one batch."""
        seqs = [(e["prompt_ids"], e["chosen_ids"], e["pixel_values"]) for e in examples]
        seqs += [(e["prompt_ids"], e["rejected_ids"], e["pixel_values"]) for e in examples]
        return self.collate(seqs)

    def collate_completions(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collate([(e["prompt_ids"], e["response_ids"], e["pixel_values"]) for e in examples])

    def _model_inputs(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        inputs = super()._model_inputs(batch, device)
        dtype = next(self.module.parameters()).dtype
        inputs["pixel_values"] = batch["pixel_values"].to(device=device, dtype=dtype)
        return inputs

    # --------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Any],
        *,
        num_samples: int = 1,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        generator_seed: int | None = None,
    ) -> list[dict[str, Any]]:
        """Decode responses to image prompts: each prompt is `{"prompt_ids", "pixel_values"}` (an encoded row)
        or `{"prompt": str, "image": PIL.Image}`. Samples of one prompt are contiguous."""
        encoded = []
        for p in prompts:
            if "prompt_ids" not in p:
                ids, px = self.encode_image_prompt(p["prompt"], p["image"])
                p = {"prompt_ids": ids, "pixel_values": px}
            encoded += [p] * num_samples
        dtype = next(self.module.parameters()).dtype
        pixels = torch.stack([e["pixel_values"] for e in encoded]).to(dtype)
        return self._generate_from_ids(
            [e["prompt_ids"] for e in encoded],
            {"pixel_values": pixels},
            greedy=greedy,
            max_new_tokens=max_new_tokens,
            generator_seed=generator_seed,
            # an <image> placeholder in a response has no image features: scoring it would fail (and mean nothing)
            suppress_token_ids=[self.image_token_id],
        )
