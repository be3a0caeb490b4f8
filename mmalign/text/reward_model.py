"""Bradley–Terry reward models on transformers sequence classifiers: trained here, usable as a `Reward`."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from mmalign.core.codec import Prompt, TextCodec
from mmalign.core.data import Row
from mmalign.core.params import TrainableModule


class RewardModel(TrainableModule):
    """A sequence classifier with one output, scored at the last real token of prompt + response.

    The score is read at the last attended position from the head applied to the final hidden states, so
    tokenizers whose pad token equals eos are handled correctly. Implements `Reward` (non-differentiable) and
    the parts of the policy protocol the trainer needs to train it.
    """

    differentiable = False

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 512,
        name: str = "reward_model",
    ):
        self.codec = TextCodec(tokenizer, max_length)
        self.module = model
        self.model: torch.nn.Module = model
        self.tokenizer = tokenizer
        self.name = name

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, trust_remote_code: bool = False, **kwargs: Any
    ) -> RewardModel:
        """Load a reward model (or initialise a fresh one-output head on a causal-LM checkpoint)."""
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, trust_remote_code=trust_remote_code
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer, **kwargs)

    # -------------------------------------------------------------------------------- policy protocol
    def reference(self):
        return nullcontext()

    def attach(self, model: torch.nn.Module) -> None:
        self.model = model

    def move_frozen_to(self, device: torch.device | str) -> None:
        """A reward model being trained has no frozen parts."""

    def save_pretrained(self, path: str) -> None:
        self.module.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    # ----------------------------------------------------------------------------------------- scoring
    def encode_pair(self, row: Row) -> dict[str, Any]:
        return self.codec.encode_pair(row)

    def collate_pairs(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.codec.collate_pairs(examples)

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One scalar per sequence, read at its last attended token."""
        device = next(self.module.parameters()).device
        attention = batch["attention_mask"].to(device)
        base = self.module.base_model if hasattr(self.module, "base_model") else self.module
        hidden = base(input_ids=batch["input_ids"].to(device), attention_mask=attention).last_hidden_state
        head = getattr(self.module, "score", None) or getattr(self.module, "classifier", None)
        if head is None:
            raise TypeError(f"{type(self.module).__name__} has no `score` or `classifier` head")
        last = attention.sum(-1) - 1
        return head(hidden[torch.arange(hidden.shape[0], device=device), last]).squeeze(-1).float()

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Prompt], outputs: Sequence[Any]) -> torch.Tensor:
        seqs = []
        for prompt, out in zip(prompts, outputs, strict=True):
            response = out["text"] if isinstance(out, dict) else out
            p = self.codec.encode_prompt(prompt)
            seqs.append((p, self.codec.encode_response(prompt, p, response)))
        return self.scores(self.codec.collate(seqs)).cpu()
