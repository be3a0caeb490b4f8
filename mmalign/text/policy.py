"""Any transformers causal LM as a sequence policy (hub id or local directory; LoRA or full fine-tuning)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmalign.core.params import LoraSpec
from mmalign.core.sequence_policy import LanguageModelPolicy

__all__ = ["CausalLMPolicy", "LoraSpec"]


class CausalLMPolicy(LanguageModelPolicy):
    """A causal LM whose prompts are strings or conversations (rendered with the tokenizer's chat template)."""

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        lora: LoraSpec | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> CausalLMPolicy:
        """Load a hub id or a local directory (safetensors weights; remote code off unless asked for)."""
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
        return cls(model, tokenizer, lora=lora, **kwargs)
