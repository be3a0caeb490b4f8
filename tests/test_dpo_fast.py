"""DPO speed options (share_prompt, padding_free, precompute_reference) give the plain path's log-probs, losses and
gradients: the packed layout is checked by hand, its log-probs against one unpadded forward per sequence, and its
losses and gradients against the padded batch on the tiny text world."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, LlamaConfig

from mmalign.core.config import RecipeError
from mmalign.core.data import Row
from mmalign.core.sequence_policy import packed_attention_mask
from mmalign.run import build_run, plan
from mmalign.text.policy import CausalLMPolicy, LoraSpec
from mmalign.train.logging import read_metrics
from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig
from mmalign.train.trainer import Trainer
from mmalign.zoo.tokenizer import char_tokenizer

LAYOUTS = [
    {"share_prompt": True, "padding_free": False},
    {"share_prompt": False, "padding_free": True},
    {"share_prompt": True, "padding_free": True},
]


def layout_id(layout: dict) -> str:
    return "+".join(k for k, v in layout.items() if v)


def pair_rows(tiny_world, n: int = 6) -> list[Row]:
    lines = (tiny_world / "train_pairs.jsonl").read_text().splitlines()[:n]
    rows = [Row("pairs.jsonl", i + 1, json.loads(line)) for i, line in enumerate(lines)]
    # responses of different lengths, so padding and the position of the rejected tokens both matter
    rows[0].data["rejected"] += " and more"
    rows[1].data["chosen"] += "!!"
    return rows


def perturbed_policy(tiny_world, *, lora: LoraSpec | None = None, attn: str = "sdpa") -> CausalLMPolicy:
    """The tiny world's model with its trained weights moved off the reference, so log-ratios are not zero."""
    torch.manual_seed(0)  # the LoRA initialisation
    policy = CausalLMPolicy.from_pretrained(str(tiny_world / "base"), lora=lora, max_length=48)
    policy.module.set_attn_implementation(attn)
    if policy._reference_model is not None:
        policy._reference_model.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy


def _tiny_model() -> torch.nn.Module:
    """A 1-layer LLaMA over the char tokenizer, for layout tests that need no trained weights."""
    tok = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------------------------------------- layout
def test_shared_prompt_layout_by_hand():
    """One pair, prompt [a b], chosen [c d], rejected [e]: one row a b c d e; e sits at position 2 and sees a, b."""
    policy = CausalLMPolicy(_tiny_model(), char_tokenizer(), max_length=16)
    a, b, c, d, e = 10, 11, 12, 13, 14
    batch = policy.collate_pairs_packed(
        [{"prompt_ids": [a, b], "chosen_ids": [c, d], "rejected_ids": [e]}],
        share_prompt=True,
        padding_free=False,
    )
    assert batch["input_ids"].tolist() == [[a, b, c, d, e]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 2]]
    # c is predicted at b (column 1), d at c (2); e at b (1), not at d
    assert batch["score_positions"].tolist() == [[1, 2], [1, 0]]
    assert batch["score_targets"][:, :1].tolist() == [[c], [e]]
    assert batch["score_mask"].tolist() == [[1, 1], [1, 0]]
    allowed = packed_attention_mask(batch["document_ids"], batch["branch_ids"], torch.float32)[0, 0] == 0
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # e sees the prompt and itself, not the chosen tokens
    ]
    assert allowed.int().tolist() == expected


def test_padding_free_layout_by_hand():
    """Two pairs, one row: four sequences, position ids restarting, attention block-diagonal and causal."""
    policy = CausalLMPolicy(_tiny_model(), char_tokenizer(), max_length=16)
    examples = [
        {"prompt_ids": [10], "chosen_ids": [11, 12], "rejected_ids": [13]},
        {"prompt_ids": [20, 21], "chosen_ids": [22], "rejected_ids": [23, 24]},
    ]
    batch = policy.collate_pairs_packed(examples, share_prompt=False, padding_free=True)
    # order: pair 0 chosen, pair 0 rejected, pair 1 chosen, pair 1 rejected
    assert batch["input_ids"].tolist() == [[10, 11, 12, 10, 13, 20, 21, 22, 20, 21, 23, 24]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2, 3]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3]]
    # responses: chosen of pairs 0, 1, then rejected of pairs 0, 1
    assert batch["score_positions"].tolist() == [[0, 1], [6, 0], [3, 0], [9, 10]]
    assert batch["score_targets"].masked_fill(batch["score_mask"] == 0, -1).tolist() == [
        [11, 12],
        [22, -1],
        [13, -1],
        [23, 24],
    ]
    allowed = packed_attention_mask(batch["document_ids"], batch["branch_ids"], torch.float32)[0, 0] == 0
    docs = batch["document_ids"][0]
    hand = torch.tensor(
        [[docs[i] == docs[j] and j <= i for j in range(12)] for i in range(12)], dtype=torch.bool
    )
    assert torch.equal(allowed, hand)


def test_padding_sees_only_itself():
    """Rows of unequal length: padding attends to nothing but itself (no empty softmax row, no leak)."""
    document = torch.tensor([[0, 0, 0], [1, -1, -1]])
    branch = torch.zeros_like(document)
    allowed = packed_attention_mask(document, branch, torch.float32)[:, 0] == 0
    assert allowed[1].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


# ------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_packed_logprobs_equal_one_forward_per_sequence(tiny_world, layout):
    """Independent check: each response's per-token log-probs from one unpadded forward of prompt + response."""
    policy = perturbed_policy(tiny_world)
    examples = [policy.encode_pair(r) for r in pair_rows(tiny_world)]
    with torch.no_grad():
        lp = policy.sequence_logprobs(policy.collate_pairs_packed(examples, **layout), entropies=True)
    model = policy.module.eval()
    sequences = [(e["prompt_ids"], e["chosen_ids"]) for e in examples]
    sequences += [(e["prompt_ids"], e["rejected_ids"]) for e in examples]
    for s, (prompt, response) in enumerate(sequences):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
        logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
        token = logp[torch.arange(len(response)), torch.tensor(response)]
        entropy = -(logp.exp() * logp).sum(-1)
        k = len(response)
        assert lp.mask[s].sum().item() == k
        assert_close(lp.token_logps[s, :k], token, atol=1e-5, rtol=0)
        assert_close(lp.entropies[s, :k], entropy, atol=1e-5, rtol=0)
        assert lp.token_logps[s, k:].abs().sum() == 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_loss_and_gradients_equal_the_padded_path(tiny_world, layout, lora, attn):
    """Policy and reference forwards packed: DPO losses, metrics and every gradient equal the padded batch's."""
    results = []
    for options in ({}, layout):
        policy = perturbed_policy(tiny_world, lora=LoraSpec(r=4, alpha=8) if lora else None, attn=attn)
        algorithm = PreferenceAlgorithm(policy, pair_rows(tiny_world), PreferenceConfig(beta=0.5, **options))
        losses, metrics = algorithm.loss(algorithm.train_examples)
        losses.mean().backward()
        grads = {n: p.grad.clone() for n, p in policy.module.named_parameters() if p.requires_grad}
        results.append((losses.detach(), metrics, grads))
    (plain, plain_metrics, plain_grads), (packed, packed_metrics, packed_grads) = results
    # the policy moved off the reference: the losses differ from ln 2 and from each other
    assert (plain - 0.6931472).abs().max() > 1e-3 and (plain - plain.mean()).abs().max() > 1e-3
    assert_close(packed, plain, atol=1e-5, rtol=0)
    for key in ("rewards/margin", "logps/chosen", "logps/rejected"):
        assert_close(packed_metrics[key], plain_metrics[key], atol=1e-4, rtol=1e-6)
    assert packed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_mallows_entropies_through_the_packed_path(tiny_world):
    """Mallows-DPO reads the reference's per-token entropies: the packed batch gives the same loss."""
    losses = []
    for options in ({}, {"share_prompt": True, "padding_free": True}):
        policy = perturbed_policy(tiny_world)
        algorithm = PreferenceAlgorithm(
            policy, pair_rows(tiny_world), PreferenceConfig(loss="mallows", beta=0.5, **options)
        )
        losses.append(algorithm.loss(algorithm.train_examples)[0].detach())
    assert_close(losses[1], losses[0], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------- whole runs
def _recipe(tiny_world, **algorithm) -> dict:
    return {
        "seed": 0,
        "model": {"name_or_path": "zoo://text-tiny/base", "max_length": 24},
        "data": {"train": str(tiny_world / "train_pairs.jsonl")},
        "algorithm": {"name": "dpo", "beta": 0.5, **algorithm},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "progress": False},
    }


def test_all_options_train_like_the_plain_path(tiny_world, tmp_path):
    """precompute_reference + share_prompt + padding_free from a recipe: the same losses as the plain run."""
    losses = {}
    for fast in (False, True):
        options = {"precompute_reference": True, "share_prompt": True, "padding_free": True} if fast else {}
        policy, algorithm, cfg, _, _ = build_run(_recipe(tiny_world, **options))
        Trainer(policy, algorithm, cfg, tmp_path / str(fast)).train()
        assert (policy._reference_model is None) == fast
        losses[fast] = [r["train/loss"] for r in read_metrics(tmp_path / str(fast))]
    assert len(losses[True]) == 4
    assert losses[True][0] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 1
    assert len(set(losses[True])) > 1
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True], strict=True)) < 1e-5


# ------------------------------------------------------------------------------------------- errors
def test_packing_needs_a_token_model_kind(tiny_world):
    recipe = {
        "model": {"kind": "vlm", "name_or_path": "zoo://vlm-tiny/base"},
        "data": {"train": "zoo://vlm-tiny/train_pairs.jsonl"},
        "algorithm": {"name": "dpo", "share_prompt": True},
    }
    with pytest.raises(RecipeError, match=r"algorithm\.share_prompt: true needs token-only sequences"):
        plan(recipe)


def test_packing_errors_name_what_is_wrong(tiny_world):
    class ImagePolicy(CausalLMPolicy):
        def _model_inputs(self, batch, device):
            return {**super()._model_inputs(batch, device), "pixel_values": batch["pixel_values"]}

    pair = {"prompt_ids": [1, 10], "chosen_ids": [11, 2], "rejected_ids": [12, 2]}
    with pytest.raises(ValueError, match="ImagePolicy feeds its network more inputs than token ids"):
        ImagePolicy(_tiny_model(), char_tokenizer()).collate_pairs_packed(
            [pair], share_prompt=True, padding_free=False
        )
    policy = CausalLMPolicy(_tiny_model(), char_tokenizer())
    with pytest.raises(ValueError, match="at least one prompt token"):
        policy.collate_pairs_packed([{**pair, "prompt_ids": []}], share_prompt=True, padding_free=False)
    policy.module.config._attn_implementation = (
        "flash_attention_2"  # set directly: the kernel is not installed
    )
    batch = policy.collate_pairs_packed([pair], share_prompt=False, padding_free=True)
    with pytest.raises(ValueError, match="attn_implementation 'sdpa' or 'eager'; this model uses 'flash"):
        policy.sequence_logprobs(batch)

    class NoPacking:
        def encode_pair(self, row):
            return {}

    with pytest.raises(
        ValueError, match=r"algorithm\.padding_free packs token sequences; NoPacking does not"
    ):
        PreferenceAlgorithm(NoPacking(), [], PreferenceConfig(padding_free=True))
