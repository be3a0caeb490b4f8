"""CausalLMPolicy: masks, pair batching, references (LoRA and full FT), length errors, chat data, loading,
generation and saving, each checked against a hand computation on the raw transformers model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mmalign.core.data import DataError, Row
from mmalign.text.policy import CausalLMPolicy, LoraSpec
from mmalign.zoo.tokenizer import CHAT_TEMPLATE, char_tokenizer

REPO = Path(__file__).resolve().parents[1]
EOS = 2  # char_tokenizer: <pad>=0, <bos>=1, <eos>=2


# ------------------------------------------------------------------------------------------------ helpers
def fresh_base(tiny_world) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(tiny_world / "base")).eval()


def chars(text: str) -> list[int]:
    """Ids of a string under the char tokenizer, looked up one character at a time (no tokenizer call)."""
    tok = char_tokenizer()
    return [tok.convert_tokens_to_ids(c) for c in text]


def str_prompt_ids(prompt: str) -> list[int]:
    return [1, *chars(prompt)]  # <bos> + characters


@torch.no_grad()
def hand_logps(model, prompt_ids: list[int], response_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of the response from one unpadded forward + log_softmax."""
    ids = torch.tensor([prompt_ids + response_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1)
    token = logp[positions, torch.tensor(response_ids)]
    entropy = -(logp[positions].exp() * logp[positions]).sum(-1)
    return token, entropy


def hand_sum(model, prompt_ids, response_ids) -> float:
    return hand_logps(model, prompt_ids, response_ids)[0].sum().item()


def policy_sums(policy, examples) -> torch.Tensor:
    with torch.no_grad():
        lp = policy.sequence_logprobs(policy.collate_completions(examples))
    return lp.token_logps.sum(-1)


def completion_rows() -> list[Row]:
    texts = [("7+8=", "15"), ("12+34=", "46"), ("99+99=", "198"), ("5+5=", "10")]
    return [Row("mem.jsonl", i + 1, {"prompt": p, "completion": c}) for i, (p, c) in enumerate(texts)]


def perturb_lora(policy, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.module.named_parameters():
            if "lora_" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------- log-probs
def test_response_mask_and_logps_match_hand_computation(tiny_world):
    policy = CausalLMPolicy(fresh_base(tiny_world), char_tokenizer(), max_length=24)
    rows = completion_rows()
    examples = [policy.encode_completion(r) for r in rows]
    for row, e in zip(rows, examples, strict=True):
        assert e["prompt_ids"] == str_prompt_ids(row.data["prompt"])
        assert e["response_ids"] == [*chars(row.data["completion"]), EOS]
    batch = policy.collate_completions(examples)
    width = max(len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples)
    assert batch["input_ids"].shape == (4, width)
    with torch.no_grad():
        lp = policy.sequence_logprobs(batch, entropies=True)
    assert lp.token_logps.shape == lp.mask.shape == lp.entropies.shape == (4, width - 1)
    reference = fresh_base(tiny_world)
    for i, e in enumerate(examples):
        n_p, n_r = len(e["prompt_ids"]), len(e["response_ids"])
        expected_mask = torch.zeros(width - 1)
        expected_mask[n_p - 1 : n_p + n_r - 1] = 1  # position t scores token t+1
        assert torch.equal(lp.mask[i], expected_mask)
        token, entropy = hand_logps(reference, e["prompt_ids"], e["response_ids"])
        assert_close(lp.token_logps[i, n_p - 1 : n_p + n_r - 1], token, atol=1e-5, rtol=1e-5)
        assert_close(lp.entropies[i, n_p - 1 : n_p + n_r - 1], entropy, atol=1e-5, rtol=1e-5)
        outside = expected_mask == 0  # prompt and padding: exactly zero
        assert torch.all(lp.token_logps[i][outside] == 0) and torch.all(lp.entropies[i][outside] == 0)
        assert lp.token_logps[i].sum().item() == pytest.approx(token.sum().item(), abs=1e-5)
    assert lp.lengths.tolist() == [len(e["response_ids"]) for e in examples]


def test_padding_does_not_change_logps(tiny_world):
    """The same example alone and next to a much longer one gives the same log-probs."""
    policy = CausalLMPolicy(fresh_base(tiny_world), char_tokenizer(), max_length=40)
    short = policy.encode_completion(Row("m", 1, {"prompt": "1+2=", "completion": "3"}))
    long = policy.encode_completion(Row("m", 2, {"prompt": "12+34+56+78=", "completion": "180180180"}))
    alone = policy_sums(policy, [short])
    padded = policy_sums(policy, [short, long])
    assert policy.collate_completions([short, long])["attention_mask"][0].sum() == 7
    assert_close(padded[0], alone[0], atol=1e-5, rtol=0)


def test_pair_batch_equals_separate_forwards(tiny_world):
    policy = CausalLMPolicy(fresh_base(tiny_world), char_tokenizer(), max_length=24)
    rows = [
        Row("p.jsonl", 1, {"prompt": "7+8=", "chosen": "15", "rejected": "5"}),
        Row("p.jsonl", 2, {"prompt": "12+34=", "chosen": "46", "rejected": "146"}),
        Row("p.jsonl", 3, {"prompt": "9+9=", "chosen": "18", "rejected": "8"}),
    ]
    examples = [policy.encode_pair(r) for r in rows]
    batch = policy.collate_pairs(examples)
    for i, e in enumerate(examples):  # chosen first, then rejected
        n = len(e["prompt_ids"])
        assert batch["input_ids"][i, n : n + len(e["chosen_ids"])].tolist() == e["chosen_ids"]
        assert batch["input_ids"][3 + i, n : n + len(e["rejected_ids"])].tolist() == e["rejected_ids"]
    with torch.no_grad():
        chosen, rejected = policy.sequence_logprobs(batch).split(3)
    model = fresh_base(tiny_world)
    for i, e in enumerate(examples):
        assert chosen.token_logps[i].sum().item() == pytest.approx(
            hand_sum(model, e["prompt_ids"], e["chosen_ids"]), abs=1e-5
        )
        assert rejected.token_logps[i].sum().item() == pytest.approx(
            hand_sum(model, e["prompt_ids"], e["rejected_ids"]), abs=1e-5
        )
        alone = policy_sums(policy, [{"prompt_ids": e["prompt_ids"], "response_ids": e["rejected_ids"]}])
        assert_close(rejected.token_logps[i].sum(), alone[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- references
def test_lora_reference_is_the_base_model_without_a_copy(tiny_world):
    policy = CausalLMPolicy.from_pretrained(
        str(tiny_world / "base"), lora=LoraSpec(r=4, alpha=8), max_length=24
    )
    perturb_lora(policy)  # policy != reference from here on
    examples = [policy.encode_completion(r) for r in completion_rows()]
    base = fresh_base(tiny_world)
    expected = torch.tensor([hand_sum(base, e["prompt_ids"], e["response_ids"]) for e in examples])
    with policy.reference():
        ref = policy_sums(policy, examples)
    assert_close(ref, expected, atol=1e-5, rtol=0)
    trained = policy_sums(policy, examples)  # adapter is back on after the context
    assert (trained - expected).abs().max() > 1e-2
    with policy.reference():
        assert_close(policy_sums(policy, examples), expected, atol=1e-5, rtol=0)

    assert policy._reference_model is None
    assert policy.vocab_size == len(char_tokenizer())
    r = 4
    adapter = sum(
        r * (m.in_features + m.out_features)
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    )
    n_base = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in policy.module.parameters()) == n_base + adapter
    assert sum(p.numel() for p in policy.trainable_parameters()) == adapter
    assert all("lora_" in n for n in policy.trainable_state_dict())


def test_full_finetuning_reference_is_a_frozen_copy(tiny_world):
    policy = CausalLMPolicy(fresh_base(tiny_world), char_tokenizer(), max_length=24)
    assert policy._reference_model is not None
    assert not any(p.requires_grad for p in policy._reference_model.parameters())
    n_all = sum(p.numel() for p in policy.module.parameters())
    assert sum(p.numel() for p in policy.trainable_parameters()) == n_all
    examples = [policy.encode_completion(r) for r in completion_rows()]
    batch = policy.collate_completions(examples)
    with policy.reference(), torch.no_grad():
        ref_before = policy.sequence_logprobs(batch).token_logps.clone()
    pol_before = policy_sums(policy, examples)

    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1e-3)
    loss = -policy.sequence_logprobs(batch).token_logps.sum()
    loss.backward()
    optimizer.step()

    with policy.reference(), torch.no_grad():
        ref_after = policy.sequence_logprobs(batch).token_logps
    assert torch.equal(ref_after, ref_before)
    pol_after = policy_sums(policy, examples)
    assert torch.all((pol_after - pol_before).abs() > 1e-3)  # the policy moved ...
    assert pol_after.sum() > pol_before.sum() + 1.0  # ... raising the likelihood it was asked to raise
    base = fresh_base(tiny_world)  # and the reference is still the model on disk
    expected = torch.tensor([hand_sum(base, e["prompt_ids"], e["response_ids"]) for e in examples])
    assert_close(ref_after.sum(-1), expected, atol=1e-5, rtol=0)

    policy.release_reference()
    with pytest.raises(RuntimeError, match="released"), policy.reference():
        pass


# ------------------------------------------------------------------------------------------ lengths
def test_too_long_examples_are_errors_naming_row_and_field(tiny_world):
    policy = CausalLMPolicy(fresh_base(tiny_world), char_tokenizer(), max_length=10)
    fits = Row("data/train.jsonl", 7, {"prompt": "12+34=", "chosen": "46", "rejected": "45"})
    encoded = policy.encode_pair(fits)  # 7 prompt + 3 response ids = max_length exactly: kept whole
    assert encoded["prompt_ids"] == str_prompt_ids("12+34=")
    assert encoded["chosen_ids"] == [*chars("46"), EOS]

    cases = [
        ({"prompt": "12+34=", "chosen": "460", "rejected": "45"}, "chosen"),
        ({"prompt": "12+34=", "chosen": "46", "rejected": "4500"}, "rejected"),
        ({"prompt": "1234567+89012=", "chosen": "1", "rejected": "2"}, "prompt"),
    ]
    for data, field in cases:
        with pytest.raises(DataError) as info:
            policy.encode_pair(Row("data/train.jsonl", 7, data))
        err = info.value
        assert (err.source, err.line, err.field) == ("data/train.jsonl", 7, field)
        message = str(err)
        assert "data/train.jsonl" in message and "line 7" in message and f"'{field}'" in message
        assert "max_length=10" in message

    with pytest.raises(DataError) as info:
        policy.encode_completion(Row("sft.jsonl", 3, {"prompt": "12+34=", "completion": "46000"}))
    assert (info.value.source, info.value.line, info.value.field) == ("sft.jsonl", 3, "completion")


def test_too_long_row_fails_build_run_before_training(tiny_recipe, tmp_path):
    from mmalign.run import build_run

    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
        {"prompt": "3+4=", "chosen": "7", "rejected": "8"},
        {"prompt": "5+6=", "chosen": "11", "rejected": "1" * 40},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {**tiny_recipe, "data": {"train": str(path)}}
    with pytest.raises(DataError) as info:
        build_run(recipe)
    assert (info.value.source, info.value.line, info.value.field) == (str(path), 3, "rejected")


# ------------------------------------------------------------------------------------ conversations
def test_conversational_rows_use_the_chat_template(tiny_world):
    tok = char_tokenizer()
    policy = CausalLMPolicy(fresh_base(tiny_world), tok, max_length=64)
    prompt = [
        {"role": "system", "content": "add"},
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "12+3="},
    ]
    row = Row(
        "chat.jsonl",
        1,
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "15"}],
            "rejected": [{"role": "assistant", "content": "14"}],
        },
    )
    e = policy.encode_pair(row)
    # the template, rendered by hand: <role>content, assistant turns closed by the <eos> special token
    expected_prompt = [
        *chars("<system>add<user>1+1=<assistant>2"),
        EOS,
        *chars("<user>12+3=<assistant>"),
    ]
    assert e["prompt_ids"] == expected_prompt
    assert e["chosen_ids"] == [*chars("15"), EOS]
    assert e["rejected_ids"] == [*chars("14"), EOS]
    assert tok.decode(e["chosen_ids"]) == "15<eos>"
    assert tok.decode(e["chosen_ids"], skip_special_tokens=True) == "15"
    with torch.no_grad():
        chosen, _ = policy.sequence_logprobs(policy.collate_pairs([e])).split(1)
    assert chosen.lengths.tolist() == [3]
    assert chosen.token_logps.sum().item() == pytest.approx(
        hand_sum(fresh_base(tiny_world), expected_prompt, [*chars("15"), EOS]), abs=1e-5
    )


# ------------------------------------------------------------------------------------ hub-id loading
@pytest.fixture
def hub_dir(tmp_path) -> tuple[Path, torch.nn.Module]:
    """A tiny LLaMA saved like a hub checkpoint (config + safetensors + tokenizer) in a local directory."""
    tok = char_tokenizer()
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path / "hub-model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


def test_from_pretrained_local_directory(hub_dir):
    path, original = hub_dir
    assert (path / "model.safetensors").exists()
    policy = CausalLMPolicy.from_pretrained(str(path), lora=LoraSpec(r=2, alpha=4), max_length=24)
    assert policy.tokenizer.chat_template == CHAT_TEMPLATE
    examples = [policy.encode_completion(r) for r in completion_rows()]
    assert examples[0]["prompt_ids"] == str_prompt_ids("7+8=")
    expected = torch.tensor([hand_sum(original, e["prompt_ids"], e["response_ids"]) for e in examples])
    assert_close(policy_sums(policy, examples), expected, atol=1e-5, rtol=0)  # LoRA B starts at zero
    with policy.reference():
        assert_close(policy_sums(policy, examples), expected, atol=1e-5, rtol=0)


def _recipe_for(model_dir: Path, tiny_recipe: dict) -> dict:
    recipe = json.loads(json.dumps(tiny_recipe))
    recipe["model"]["name_or_path"] = str(model_dir)
    return recipe


def test_build_run_with_local_model_directory(hub_dir, tiny_recipe):
    from mmalign.run import build_run

    path, original = hub_dir
    policy, algorithm, cfg, _, _ = build_run(_recipe_for(path, tiny_recipe))
    assert policy.lora is not None and cfg.max_steps == 6
    examples = algorithm.train_examples[:3]
    with torch.no_grad():
        chosen, _ = policy.sequence_logprobs(policy.collate_pairs(examples)).split(3)
    expected = [hand_sum(original, e["prompt_ids"], e["chosen_ids"]) for e in examples]
    assert chosen.token_logps.sum(-1).tolist() == pytest.approx(expected, abs=1e-5)


def test_qwen_recipe_runs_with_a_local_model(hub_dir, tmp_path):
    """The hub recipe, pointed at a local tiny checkpoint and conversational data, builds and trains."""
    recipe_path = REPO / "text" / "qwen_dpo.yaml"
    if not recipe_path.exists():
        pytest.skip("text/qwen_dpo.yaml does not exist yet")
    from mmalign.core.config import load_recipe
    from mmalign.run import build_run
    from mmalign.train.trainer import Trainer

    path, original = hub_dir
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"{a}+{a + 1}="}],
            "chosen": [{"role": "assistant", "content": str(2 * a + 1)}],
            "rejected": [{"role": "assistant", "content": str(2 * a)}],
        }
        for a in range(1, 9)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        f"model.name_or_path={path}",
        f"data.train={pairs}",
        f"eval.pairs={pairs}",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.warmup_steps=0",
        "train.log_with=[]",
        "train.mixed_precision='no'",  # accelerate's process-wide state must stay as other tests set it
        "train.progress=false",
    ]
    recipe = load_recipe(recipe_path, overrides)
    policy, algorithm, cfg, evaluator, _ = build_run(recipe)
    assert policy.lora is not None and len(algorithm.train_examples) == 8
    dtype = getattr(torch, recipe["model"].get("dtype", "float32"))
    assert next(policy.module.parameters()).dtype == dtype
    e = algorithm.train_examples[0]
    assert e["prompt_ids"] == chars("<user>1+2=<assistant>") and e["chosen_ids"] == [*chars("3"), EOS]
    expected = hand_sum(original, e["prompt_ids"], e["chosen_ids"])
    got = policy_sums(policy, [{"prompt_ids": e["prompt_ids"], "response_ids": e["chosen_ids"]}]).item()
    assert got == pytest.approx(expected, abs=1e-5 if dtype == torch.float32 else 0.1)
    summary = Trainer(policy, algorithm, cfg, tmp_path / "run", evaluator=evaluator).train()
    assert summary["steps"] == 2 and summary["after"]["n_pairs"] == 8
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------------------- generation
@torch.no_grad()
def hand_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids, out = list(prompt_ids), []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == EOS:
            break
    return out


def _check_ends(results, max_new_tokens):
    for r in results:
        resp = r["response_ids"]
        assert EOS not in resp[:-1]  # nothing after the end
        assert resp[-1] == EOS or len(resp) == max_new_tokens


def test_greedy_generation_is_deterministic_and_matches_hand_decoding(tiny_world):
    tok = char_tokenizer()
    policy = CausalLMPolicy(fresh_base(tiny_world).train(), tok, max_length=40, max_new_tokens=6)
    prompts = ["7+8=", "12+34=", "99+1="]  # different lengths: left padding in the batch
    first = policy.generate(prompts, num_samples=2, greedy=True)
    again = policy.generate(prompts, num_samples=2, greedy=True)
    assert first == again
    assert len(first) == 6
    base = fresh_base(tiny_world)
    for i, r in enumerate(first):
        prompt = prompts[i // 2]
        assert r["prompt_ids"] == str_prompt_ids(prompt)
        assert r["response_ids"] == hand_greedy(base, str_prompt_ids(prompt), 6)
        assert r["text"] == tok.decode(r["response_ids"], skip_special_tokens=True)
    assert first[0] == first[1] and first[2] == first[3]
    _check_ends(first, 6)
    assert policy.module.training  # generation restores the mode it found


def test_sampled_generation_groups_samples_per_prompt(tiny_world):
    policy = CausalLMPolicy(fresh_base(tiny_world), char_tokenizer(), max_length=40, max_new_tokens=5)
    prompts = ["7+8=", "12+34="]
    out = policy.generate(prompts, num_samples=3, generator_seed=0)
    assert len(out) == 6
    assert [r["prompt_ids"] for r in out] == [str_prompt_ids(p) for p in prompts for _ in range(3)]
    _check_ends(out, 5)
    assert out == policy.generate(prompts, num_samples=3, generator_seed=0)
    responses = {tuple(r["response_ids"]) for r in out + policy.generate(prompts, num_samples=3)}
    assert len(responses) > 2  # it does sample


def test_generated_pad_tokens_are_kept_in_responses(tiny_world):
    """A response without eos is never padded by transformers, so every token of it was generated."""
    model = fresh_base(tiny_world).train()
    model.generation_config.sequence_bias = {(0,): 100.0}  # a model that strongly prefers the pad token ...
    model.generation_config.bad_words_ids = [[EOS]]  # ... and cannot end
    policy = CausalLMPolicy(model, char_tokenizer(), max_length=40, max_new_tokens=4)
    prompt = torch.tensor([str_prompt_ids("7+8=")])
    with torch.no_grad():
        raw = model.generate(
            input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=EOS
        )
    generated = raw[0, prompt.shape[1] :].tolist()
    assert generated == [0, 0, 0, 0]
    out = policy.generate(["7+8="], greedy=True)[0]
    assert out["response_ids"] == generated  # the library returns []


# ------------------------------------------------------------------------------------------- saving
def test_saved_lora_adapter_loads_with_peft(tiny_world, tmp_path):
    from peft import PeftModel

    policy = CausalLMPolicy.from_pretrained(
        str(tiny_world / "base"), lora=LoraSpec(r=4, alpha=8), max_length=24
    )
    perturb_lora(policy)
    out = tmp_path / "adapter"
    policy.save_pretrained(str(out))
    assert (out / "adapter_model.safetensors").exists()
    assert (out / "adapter_config.json").exists()
    assert not (out / "model.safetensors").exists()  # the adapter alone, not the base weights
    assert (out / "tokenizer.json").exists()
    examples = [policy.encode_completion(r) for r in completion_rows()]
    loaded = PeftModel.from_pretrained(fresh_base(tiny_world), str(out)).eval()
    expected = torch.tensor([hand_sum(loaded, e["prompt_ids"], e["response_ids"]) for e in examples])
    assert_close(policy_sums(policy, examples), expected, atol=1e-5, rtol=0)
    base = fresh_base(tiny_world)
    plain = torch.tensor([hand_sum(base, e["prompt_ids"], e["response_ids"]) for e in examples])
    assert (expected - plain).abs().max() > 1e-2  # the adapter carries the perturbation
