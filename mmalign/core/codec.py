"""Tokenisation shared by every text-out model (policies, reward models): prompts, responses, padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mmalign.core.data import Row, require_text

Prompt = str | list[dict[str, str]]


class TextCodec:
    """Turns rows into token ids and ids into padded batches with response masks.

    Plain-string prompts are tokenised as-is; conversational prompts (lists of role/content messages) go through
    the tokenizer's chat template. Responses end with eos. Nothing is ever truncated: an example longer than
    `max_length` is an error naming its row.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 512):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; responses need one to end")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer, self.max_length = tokenizer, max_length

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt; conversations get the chat template with the generation prompt."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return self._chat_ids(prompt, add_generation_prompt=True)

    def encode_response(self, prompt: Prompt, prompt_ids: list[int], response: Prompt) -> list[int]:
        """Token ids of a response, ending with eos (or the chat template's own end of turn)."""
        if isinstance(response, str):
            return self.tokenizer(response, add_special_tokens=False)["input_ids"] + [
                self.tokenizer.eos_token_id
            ]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        full = self._chat_ids(list(prompt) + list(response), add_generation_prompt=False)
        if full[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template renders the prompt differently once a response follows it")
        return full[len(prompt_ids) :]

    def _chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise ValueError("conversational data needs a tokenizer with a chat template")
        # typed as the union over every option; with tokenize=True: token ids, or an encoding holding them
        ids: Any = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def encode_pair(self, row: Row) -> dict[str, Any]:
        """Tokenise one preference row; too-long examples are an error naming the row, never a silent cut."""
        prompt_ids = self.encode_prompt(row.data["prompt"])
        encoded: dict[str, Any] = {"prompt_ids": prompt_ids}
        for field in ("chosen", "rejected"):
            ids = self.encode_response(row.data["prompt"], prompt_ids, row.data[field])
            self._check_length(row, field, len(prompt_ids), len(ids))
            encoded[f"{field}_ids"] = ids
        return encoded

    def encode_completion(self, row: Row, field: str = "completion") -> dict[str, Any]:
        """Tokenise prompt + one completion (SFT, KTO, reward-model scoring); a missing field is named."""
        prompt_ids = self.encode_prompt(row.data["prompt"])
        ids = self.encode_response(row.data["prompt"], prompt_ids, require_text(row, field, response=True))
        self._check_length(row, field, len(prompt_ids), len(ids))
        return {"prompt_ids": prompt_ids, "response_ids": ids}

    def _check_length(self, row: Row, field: str, n_prompt: int, n_response: int) -> None:
        if n_prompt + n_response > self.max_length:
            what = "prompt" if n_prompt >= self.max_length else f"prompt + {field}"
            raise row.error(
                "prompt" if what == "prompt" else field,
                f"{what} is {n_prompt + n_response if what != 'prompt' else n_prompt} tokens, over max_length="
                f"{self.max_length} (raise max_length or shorten the example; nothing is truncated)",
            )

    # ---------------------------------------------------------------------------------------- batching
    def collate(self, sequences: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-pad (prompt, response) id pairs into input_ids, attention_mask and response_mask."""
        width = max(len(p) + len(r) for p, r in sequences)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        response = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, (p, r) in enumerate(sequences):
            n = len(p) + len(r)
            input_ids[i, :n] = torch.tensor(p + r)
            attention[i, :n] = 1
            response[i, len(p) : n] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response}

    def collate_pairs(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Chosen and rejected of every pair in one batch (chosen first) for a single forward pass."""
        seqs = [(e["prompt_ids"], e["chosen_ids"]) for e in examples]
        seqs += [(e["prompt_ids"], e["rejected_ids"]) for e in examples]
        return self.collate(seqs)

    def collate_completions(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Prompt + response sequences in one batch."""
        return self.collate([(e["prompt_ids"], e["response_ids"]) for e in examples])

    def collate_pairs_packed(
        self, examples: Sequence[dict[str, Any]], *, share_prompt: bool, padding_free: bool
    ) -> dict[str, torch.Tensor]:
        """Pairs laid out so the network computes no prompt twice (`share_prompt`) or no padding (`padding_free`).

        A *document* is what one causal attention pattern covers. With `share_prompt` a pair is one document,
        prompt + chosen + rejected: the rejected tokens take the positions that follow the prompt and see the
        prompt but not the chosen tokens, which is what a forward of prompt + rejected computes, with the prompt run
        once. Without it, prompt + chosen and prompt + rejected are two documents. With `padding_free` every
        document of the batch goes into one row, position ids restarting per document; otherwise each document is
        a row and rows are right-padded.

        Returns input_ids and position_ids (rows × width); who may attend to whom, for the policy to turn into an
        attention mask: `document_ids` (the document of each token, -1 on padding) and `branch_ids` (0 on tokens
        every later token of their document sees, 1 / 2 on chosen / rejected tokens, which see only their own
        branch and 0); and where the log-probs are read: `score_positions[s, k]` is the flat position
        (row × width + column) whose logits predict token k of response s (the n chosen responses first, then the
        n rejected, as in `collate_pairs`), `score_targets` that token and `score_mask` 1 on real tokens.
        """
        n = len(examples)
        documents: list[tuple[list[int], list[int], list[int], list[tuple[int, list[int], list[int]]]]] = []
        for i, e in enumerate(examples):
            prompt, chosen, rejected = e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]
            if not prompt:
                raise ValueError(
                    "share_prompt / padding_free need at least one prompt token per pair (the first response "
                    "token is predicted from the prompt's last)"
                )
            p = len(prompt)
            if share_prompt:
                start = p + len(chosen)  # where the rejected tokens begin in the document
                documents.append(
                    (
                        prompt + chosen + rejected,
                        [*range(start), *range(p, p + len(rejected))],
                        [0] * p + [1] * len(chosen) + [2] * len(rejected),
                        [
                            (i, [p - 1 + k for k in range(len(chosen))], chosen),
                            (n + i, [p - 1] + [start + k - 1 for k in range(1, len(rejected))], rejected),
                        ],
                    )
                )
            else:
                for s, response in ((i, chosen), (n + i, rejected)):
                    length = p + len(response)
                    sources = [p - 1 + k for k in range(len(response))]
                    documents.append(
                        (prompt + response, list(range(length)), [0] * length, [(s, sources, response)])
                    )
        rows = [documents] if padding_free else [[d] for d in documents]
        width = max(sum(len(d[0]) for d in row) for row in rows)
        longest = max(len(r) for e in examples for r in (e["chosen_ids"], e["rejected_ids"]))
        pad = self.tokenizer.pad_token_id
        # plain lists, one tensor per field at the end: this runs every step, so no per-sequence tensors
        ids, positions, document_ids, branch_ids = [], [], [], []
        score_positions, score_targets = [[0] * longest] * (2 * n), [[pad] * longest] * (2 * n)
        score_lengths = [0] * (2 * n)
        document = 0
        for r, row in enumerate(rows):
            row_ids: list[int] = []
            row_positions, row_documents, row_branches = [], [], []
            for tokens, token_positions, branches, responses in row:
                offset = r * width + len(row_ids)
                for s, sources, response in responses:
                    k = len(response)
                    score_positions[s] = [offset + q for q in sources] + [0] * (longest - k)
                    score_targets[s] = response + [pad] * (longest - k)
                    score_lengths[s] = k
                row_ids += tokens
                row_positions += token_positions
                row_documents += [document] * len(tokens)
                row_branches += branches
                document += 1
            fill = width - len(row_ids)
            ids.append(row_ids + [pad] * fill)
            positions.append(row_positions + [0] * fill)
            document_ids.append(row_documents + [-1] * fill)
            branch_ids.append(row_branches + [0] * fill)
        score_mask = torch.arange(longest) < torch.tensor(score_lengths).unsqueeze(-1)
        return {
            "input_ids": torch.tensor(ids),
            "position_ids": torch.tensor(positions),
            "document_ids": torch.tensor(document_ids),
            "branch_ids": torch.tensor(branch_ids),
            "score_positions": torch.tensor(score_positions),
            "score_targets": torch.tensor(score_targets),
            "score_mask": score_mask.long(),
        }
