"""The offline text world: two-digit addition learned from data whose carries are often dropped.

The base LM is trained from scratch on `a+b=` → `c`, where for problems with a units carry the answer in the
training data drops the carry with probability `carry_drop` (e.g. 27+48=65). The model therefore learns a
systematic, measurable error; preference pairs prefer the true sum over the carry-dropped one (or over a
one-digit slip on problems without a carry). Held-out (a, b) problems are never seen in training.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmalign.core.data import write_jsonl
from mmalign.zoo.reproducible import build_threads
from mmalign.zoo.tokenizer import char_tokenizer


@dataclass
class TextWorldSpec:
    """Sizes of the text world; `tiny()` is the fast build the tests use."""

    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    sft_steps: int = 2500
    sft_batch: int = 64
    lr: float = 3e-3
    carry_drop: float = 0.6
    eval_fraction: float = 0.2
    n_train_pairs: int = 2048
    n_eval_pairs: int = 512
    seed: int = 0

    @classmethod
    def tiny(cls) -> TextWorldSpec:
        return cls(hidden_size=32, layers=1, heads=2, sft_steps=150, n_train_pairs=256, n_eval_pairs=64)


def true_sum(a: int, b: int) -> int:
    return a + b


def carry_dropped_sum(a: int, b: int) -> int:
    """The systematic mistake: add the tens without the carry from the units."""
    return (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def prompt_for(a: int, b: int) -> str:
    return f"{a}+{b}="


def digit_slip(c: int, rng: random.Random) -> int:
    """A plausible wrong answer for a problem without a carry: one digit off by one."""
    delta = rng.choice([-10, -1, 1, 10])
    wrong = c + delta
    return wrong if wrong >= 0 and wrong != c else c + 1


def split_problems(spec: TextWorldSpec) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    problems = [(a, b) for a in range(100) for b in range(100)]
    random.Random(spec.seed).shuffle(problems)
    n_eval = int(len(problems) * spec.eval_fraction)
    return problems[n_eval:], problems[:n_eval]


def preference_rows(problems: list[tuple[int, int]], n: int, rng: random.Random) -> list[dict]:
    """Pairs with the true sum chosen: half from carry problems (rejected = carry dropped), half from the rest."""
    carry = [p for p in problems if has_carry(*p)]
    plain = [p for p in problems if not has_carry(*p)]
    picked = rng.sample(carry, n // 2) + rng.sample(plain, n - n // 2)
    rng.shuffle(picked)
    rows = []
    for a, b in picked:
        c = true_sum(a, b)
        wrong = carry_dropped_sum(a, b) if has_carry(a, b) else digit_slip(c, rng)
        rows.append(
            {
                "prompt": prompt_for(a, b),
                "chosen": str(c),
                "rejected": str(wrong),
                "score_chosen": 1.0,
                "score_rejected": 0.0 if has_carry(a, b) else 0.5,
            }
        )
    return rows


@build_threads()
def build_text_world(out_dir: str | Path, spec: TextWorldSpec | None = None, log=print) -> Path:
    """Train the base LM and write it with its data; returns `out_dir`. Minutes on 2 CPU cores.

    Runs on `BUILD_THREADS` torch threads whatever the caller's setting, so every build gives the same bits."""
    spec = spec or TextWorldSpec()
    out = Path(out_dir)
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    train, held_out = split_problems(spec)
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 2,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    optim = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, spec.lr, total_steps=spec.sft_steps, pct_start=0.1)
    eos = tokenizer.eos_token_id
    for step in range(spec.sft_steps):
        batch = [train[rng.randrange(len(train))] for _ in range(spec.sft_batch)]
        seqs, masks = [], []
        for a, b in batch:
            answer = carry_dropped_sum(a, b) if has_carry(a, b) and rng.random() < spec.carry_drop else a + b
            p = tokenizer(prompt_for(a, b))["input_ids"]
            r = tokenizer(str(answer), add_special_tokens=False)["input_ids"] + [eos]
            seqs.append(p + r)
            masks.append([0] * len(p) + [1] * len(r))
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        labels = torch.tensor(
            [
                [t if m else -100 for t, m in zip(s, mk, strict=True)] + [-100] * (width - len(s))
                for s, mk in zip(seqs, masks, strict=True)
            ]
        )
        attn = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad()
        if step % 250 == 0 or step == spec.sft_steps - 1:
            log(f"[zoo text] sft step {step + 1}/{spec.sft_steps} loss {loss.item():.4f}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    write_jsonl(out / "train_pairs.jsonl", preference_rows(train, spec.n_train_pairs, rng))
    write_jsonl(out / "eval_pairs.jsonl", preference_rows(held_out, spec.n_eval_pairs, rng))
    write_jsonl(
        out / "train_prompts.jsonl",
        [
            {"prompt": prompt_for(a, b), "answer": str(a + b)}
            for a, b in rng.sample(train, spec.n_train_pairs)
        ],
    )
    write_jsonl(
        out / "eval_prompts.jsonl",
        [{"prompt": prompt_for(a, b), "answer": str(a + b)} for a, b in held_out[: spec.n_eval_pairs]],
    )
    kto_rows = []
    for row in preference_rows(train, spec.n_train_pairs // 2, rng):
        kto_rows.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        kto_rows.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    write_jsonl(out / "train_unpaired.jsonl", kto_rows)
    (out / "world.json").write_text(json.dumps({"world": "text", **asdict(spec)}, indent=2))
    return out
