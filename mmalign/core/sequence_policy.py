"""The modality-free part of every sequence policy: a transformers language model with LoRA or a frozen copy as its
reference, per-token log-probs of response tokens, and decoding from prompt ids.

Adapters (text LLMs, vision-language models) subclass `LanguageModelPolicy` and say how a row's prompt becomes
ids and model inputs; the objective math lives in the algorithms.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmalign.core.codec import Prompt, TextCodec
from mmalign.core.data import Row
from mmalign.core.params import LoraSpec, TrainableModule, check_lora_targets
from mmalign.core.types import SequenceLogProbs

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import GenerationMixin

    class GenerativeModel(PreTrainedModel, GenerationMixin):
        """What every sequence policy's network is: a transformers model that generates (a causal LM, a VLM)."""


class LanguageModelPolicy(TrainableModule):
    """A transformers language model and its tokenizer as a `SequencePolicy`.

    The reference is the same network with the LoRA adapter disabled when training LoRA (no second copy in
    memory), or a frozen deep copy for full fine-tuning. Plain-string prompts are tokenised as-is; conversational
    prompts (lists of role/content messages) go through the tokenizer's chat template.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        lora: LoraSpec | None = None,
        max_length: int = 512,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        disable_dropout: bool = True,
    ):
        self.codec = TextCodec(tokenizer, max_length)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.lora = lora
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            check_lora_targets(model, lora.target_modules)
            config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            )
            network: GenerativeModel | PeftModel = get_peft_model(model, config)
            self._reference_model: torch.nn.Module | None = None
        else:
            network = cast("GenerativeModel", model)  # typed as transformers' base class for callers
            self._reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        if disable_dropout:
            _disable_dropout(network)
            if self._reference_model is not None:
                _disable_dropout(self._reference_model)
        # the unwrapped network (peft's wrapper under LoRA); `self.model` may become a DDP wrapper around it
        self.module: GenerativeModel | PeftModel = network
        self.model: torch.nn.Module = network
        self._use_reference = False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass (transformers' non-reentrant checkpointing; same gradients)."""
        options = {"use_reentrant": False}
        get_base_model = getattr(self.module, "get_base_model", None)  # peft's wrapper holds the model
        base = get_base_model() if get_base_model is not None else self.module
        if hasattr(
            base, "activation_checkpointing_enable"
        ):  # transformers' name since 5.x; the old one warns
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)

    @property
    def vocab_size(self) -> int:
        return self.module.get_output_embeddings().weight.shape[0]

    # ----------------------------------------------------------------------------------- Policy protocol
    @contextmanager
    def reference(self) -> Iterator[None]:
        """Forward passes inside this context use the frozen reference model."""
        if self.lora is not None:  # __init__ wrapped the model with peft
            with cast("PeftModel", self.module).disable_adapter():
                yield
        else:
            if self._reference_model is None:
                raise RuntimeError("the reference model was released (reference log-probs were precomputed)")
            self._use_reference = True
            try:
                yield
            finally:
                self._use_reference = False

    def attach(self, model: torch.nn.Module) -> None:
        self.model = model

    def prompt_of(self, row: Row) -> Any:
        return row.data["prompt"]

    def reward_prompt(self, row: Row) -> Any:
        return row.data["prompt"]

    def move_frozen_to(self, device: torch.device | str) -> None:
        """Put the frozen reference copy on the device the trainer placed the model on (a GPU run moves only that)."""
        if self._reference_model is not None:
            self._reference_model.to(device)

    def release_reference(self) -> None:
        """Free the frozen copy once reference log-probs are precomputed."""
        self._reference_model = None

    def save_pretrained(self, path: str) -> None:
        """Save weights (the LoRA adapter alone when training LoRA) and tokenizer as safetensors."""
        self.module.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    # ---------------------------------------------------------------------------- tokenisation (codec)
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return self.codec.encode_prompt(prompt)

    def encode_pair(self, row: Row) -> dict[str, Any]:
        return self.codec.encode_pair(row)

    def encode_completion(self, row: Row, field: str = "completion") -> dict[str, Any]:
        return self.codec.encode_completion(row, field)

    def collate_pairs(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.codec.collate_pairs(examples)

    def collate_completions(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.codec.collate_completions(examples)

    # ------------------------------------------------------------------------------------------ scoring
    def sequence_logprobs(
        self, batch: dict[str, torch.Tensor], *, entropies: bool = False, hidden_states: bool = False
    ) -> SequenceLogProbs:
        """Per-token log-probs of the response tokens (prompt and padding masked to zero); with `hidden_states`,
        also the last layer's hidden state at each position that predicts a token (what a value head reads).

        A batch from `collate_pairs_packed` (it carries `score_positions`) is scored by `_packed_logprobs`.
        """
        if "score_positions" in batch:
            if hidden_states:
                raise ValueError("hidden_states are read from padded batches only, not from packed pairs")
            return self._packed_logprobs(batch, entropies=entropies)
        device = next(self.module.parameters()).device
        input_ids = batch["input_ids"].to(device)
        model = self._scoring_model()
        out = model(**self._model_inputs(batch, device), use_cache=False, output_hidden_states=hidden_states)
        logits = out.logits[:, :-1]
        logits = logits.float()
        targets = input_ids[:, 1:]
        log_norm = torch.logsumexp(logits, dim=-1)
        token_logps = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - log_norm
        mask = batch["response_mask"][:, 1:].to(device).to(token_logps.dtype)
        ent = None
        if entropies:
            probs = torch.softmax(logits, dim=-1)
            ent = (log_norm - (probs * logits).sum(-1)) * mask
        hidden = out.hidden_states[-1][:, :-1] if hidden_states else None
        return SequenceLogProbs(token_logps * mask, mask, ent, hidden)

    def collate_pairs_packed(
        self, examples: Sequence[dict[str, Any]], *, share_prompt: bool, padding_free: bool
    ) -> dict[str, torch.Tensor]:
        """Pairs with the prompt computed once and/or without padding (see `TextCodec.collate_pairs_packed`)."""
        if type(self)._model_inputs is not LanguageModelPolicy._model_inputs:
            raise ValueError(
                f"share_prompt / padding_free pack token ids only; {type(self).__name__} feeds its network more "
                "inputs than token ids"
            )
        return self.codec.collate_pairs_packed(examples, share_prompt=share_prompt, padding_free=padding_free)

    def _packed_logprobs(self, batch: dict[str, torch.Tensor], *, entropies: bool) -> SequenceLogProbs:
        """Log-probs of a packed batch: one forward with a block mask, logits read where each response token is
        predicted. Equal to the padded path's: every token sees exactly the tokens it sees there, at the same
        positions."""
        implementation = getattr(self.module.config, "_attn_implementation", None)
        if implementation not in ("sdpa", "eager"):
            raise ValueError(
                "share_prompt / padding_free give the network a 4-D attention mask, which needs "
                f"attn_implementation 'sdpa' or 'eager'; this model uses {implementation!r}"
            )
        device = next(self.module.parameters()).device
        # torch types a module's attributes as Tensor | Module; an embedding's weight is a tensor
        dtype: torch.dtype = self.module.get_input_embeddings().weight.dtype  # type: ignore[assignment]
        model = self._scoring_model()
        mask = packed_attention_mask(batch["document_ids"].to(device), batch["branch_ids"].to(device), dtype)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            attention_mask=mask,
            use_cache=False,
        ).logits
        logits = logits.flatten(0, 1)[
            batch["score_positions"].to(device)
        ].float()  # (responses, tokens, vocab)
        log_norm = torch.logsumexp(logits, dim=-1)
        targets = batch["score_targets"].to(device)
        token_logps = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - log_norm
        mask = batch["score_mask"].to(device).to(token_logps.dtype)
        ent = None
        if entropies:
            probs = torch.softmax(logits, dim=-1)
            ent = (log_norm - (probs * logits).sum(-1)) * mask
        return SequenceLogProbs(token_logps * mask, mask, ent)

    def _scoring_model(self) -> torch.nn.Module:
        """The network forward passes use: the frozen reference copy inside `reference()`, else the trained one."""
        if not self._use_reference:
            return self.model
        if self._reference_model is None:
            raise RuntimeError("the reference model was released (reference log-probs were precomputed)")
        return self._reference_model

    def _model_inputs(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """The network's inputs for a collated batch (adapters with more inputs, e.g. images, extend this)."""
        return {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
        }

    # --------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        num_samples: int = 1,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        generator_seed: int | None = None,
    ) -> list[dict[str, Any]]:
        """Decode responses with transformers generation; returns prompt/response ids and text per sample.

        Samples of one prompt are contiguous. Sampling draws from torch's global RNG, which the trainer seeds
        and checkpoints, so runs are reproducible.
        """
        once = [self.codec.encode_prompt(p) for p in prompts]  # each prompt tokenised once, not per sample
        encoded = [list(ids) for ids in once for _ in range(num_samples)]
        return self._generate_from_ids(
            encoded, {}, greedy=greedy, max_new_tokens=max_new_tokens, generator_seed=generator_seed
        )

    def _generate_from_ids(
        self,
        encoded: list[list[int]],
        extra_inputs: dict[str, torch.Tensor],
        *,
        greedy: bool,
        max_new_tokens: int | None,
        generator_seed: int | None,
        suppress_token_ids: Sequence[int] = (),
    ) -> list[dict[str, Any]]:
        """Left-pad prompt ids, decode, and cut each response after eos; `extra_inputs` go to the model as is and
        `suppress_token_ids` are never sampled (e.g. a VLM's image placeholder, which a response must not hold)."""
        was_training = self.module.training
        self.module.eval()
        width = max(map(len, encoded))
        pad = self.tokenizer.pad_token_id
        device = next(self.module.parameters()).device
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, e in enumerate(encoded):  # left padding so every prompt ends where generation starts
            ids[i, width - len(e) :] = torch.tensor(e)
            attention[i, width - len(e) :] = 1
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        extra: dict[str, Any] = {k: v.to(device) for k, v in extra_inputs.items()}
        # transformers types GenerationMixin.generate's `self` with a protocol of private attributes (for `ty`)
        out = self.module.generate(  # type: ignore[misc]
            input_ids=ids.to(device),
            attention_mask=attention.to(device),
            **extra,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else self.temperature,
            top_k=None if greedy else 0,
            top_p=None if greedy else 1.0,
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id,
            suppress_tokens=list(suppress_token_ids) or None,
        )
        self.module.train(was_training)
        results = []
        for i, e in enumerate(encoded):
            new = out[i, width:].tolist()
            # generation pads only after eos, so everything up to eos (or all of it) was sampled
            if self.tokenizer.eos_token_id in new:
                new = new[: new.index(self.tokenizer.eos_token_id) + 1]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            results.append({"prompt_ids": e, "response_ids": new, "text": text})
        return results


def packed_attention_mask(
    document_ids: torch.Tensor, branch_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Additive (rows, 1, width, width) mask: a token sees the earlier tokens of its document that are on branch 0
    or on its own branch; padding (document -1) sees only itself, so no softmax row is empty."""
    width = document_ids.shape[1]
    earlier = torch.ones(width, width, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    same_branch = (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    allowed = earlier & same_document & same_branch & (document_ids[:, None, :] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool, device=document_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout so policy and reference score identically at equal weights (as trl does)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)
