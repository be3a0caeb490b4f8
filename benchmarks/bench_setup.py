"""Shared, offline inputs of the DPO benchmark: the tiny LLaMA-style model, the preference rows, the data order.

Both sides of the benchmark (mmalign and trl) load the model and rows that `prepare()` writes, so they start from
byte-identical weights and the same strings.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ModelSpec:
    hidden_size: int = 128
    intermediate_size: int = 512
    layers: int = 4
    heads: int = 4
    max_position_embeddings: int = 256
    seed: int = 0


def _working(a: int, b: int) -> tuple[str, str]:
    """Chosen (correct) and rejected (carry dropped, or a one-digit slip) worked answers for a + b."""
    units = a % 10 + b % 10
    carry = units >= 10
    tens = a // 10 + b // 10 + (1 if carry else 0)
    head = f" units {a % 10}+{b % 10}={units}, write {units % 10}"
    if carry:
        chosen = f"{head} carry 1; tens {a // 10}+{b // 10}+1={tens}. So {a}+{b}={a + b}."
        dropped = tens - 1
        wrong = dropped * 10 + units % 10
        rejected = f"{head}; tens {a // 10}+{b // 10}={dropped}. So {a}+{b}={wrong}."
    else:
        chosen = f"{head}; tens {a // 10}+{b // 10}={tens}. So {a}+{b}={a + b}."
        wrong = a + b + (1 if (a + b) % 10 != 9 else -1)
        rejected = f"{head}; tens {a // 10}+{b // 10}={tens}. So {a}+{b}={wrong}."
    return chosen, rejected


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n distinct two-digit addition problems with worked answers (about 20 prompt + 50-70 response chars)."""
    rng = random.Random(seed)
    problems = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rows = []
    for a, b in rng.sample(problems, n):
        chosen, rejected = _working(a, b)
        rows.append({"prompt": f"Q: {a}+{b}=? Show the work. A:", "chosen": chosen, "rejected": rejected})
    return rows


def mmalign_order(n: int, steps: int, batch: int, seed: int = 0) -> list[list[int]]:
    """The row indices mmalign's Trainer feeds at each step (see `Trainer._global_indices`): a seeded
    permutation per epoch, consecutive batches of it, the last partial batch of an epoch dropped."""
    import torch

    per_epoch = n // batch
    out, cache = [], {}
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(cache[epoch][pos * batch : (pos + 1) * batch])
    return out


def prepare(work: Path, spec: ModelSpec, n_pairs: int) -> dict:
    """Write work/model (weights + tokenizer, save_pretrained) and work/rows.json; returns a description."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmalign.zoo.tokenizer import char_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    rows = make_rows(n_pairs, spec.seed)
    (work / "rows.json").write_text(json.dumps(rows))
    return {
        "model": asdict(spec),
        "vocab": len(tok),
        "parameters": sum(p.numel() for p in model.parameters()),
        "pairs": n_pairs,
        "example": rows[0],
    }


# ------------------------------------------------------------------------------------------------- GRPO
def digit_fraction(text: str) -> float:
    """The GRPO benchmark's verifiable reward: the share of a completion's characters that are digits (0 if empty).

    Any function of the decoded text both trainers can call would do; this one varies across samples of an
    untrained model, so advantages, and gradients, are not zero.
    """
    return sum(c.isdigit() for c in text) / len(text) if text else 0.0


def prepare_prompts(work: Path, n: int) -> list[str]:
    """Write work/prompts.jsonl: the prompts of n preference rows (the same problems as the DPO benchmark)."""
    prompts = [r["prompt"] for r in make_rows(n)]
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return prompts
