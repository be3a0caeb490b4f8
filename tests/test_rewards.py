"""Rewards: validation, combinators by hand, rule rewards, and the reward model's read-out position."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForSequenceClassification

from mmalign.core.reward import Clipped, Normalized, Reward, RewardError, WeightedSum, check_rewards, score
from mmalign.text.reward_model import RewardModel
from mmalign.text.rewards import AnswerMatch, LengthReward, RegexMatch
from mmalign.zoo.tokenizer import char_tokenizer


class Fixed:
    """A reward returning preset values, to drive the combinators with known numbers."""

    differentiable = False

    def __init__(self, values, name="fixed"):
        self.values, self.name = values, name
        self.calls = 0

    def __call__(self, prompts, outputs):
        self.calls += 1
        return self.values if not isinstance(self.values, list) else torch.tensor(self.values)


PROMPTS = ["a", "b", "c"]
OUTPUTS = ["x", "y", "z"]


# ------------------------------------------------------------------------------------------ checking
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_rewards_rejects_non_finite_values_naming_the_reward(bad):
    reward = Fixed([1.0, bad, 0.0], name="judge")
    with pytest.raises(RewardError, match=r"reward 'judge'.*non-finite.*\[1\]"):
        score(reward, PROMPTS, OUTPUTS)
    with pytest.raises(RewardError, match="'judge'"):
        check_rewards(reward, torch.tensor([bad, bad, 0.0]), 3)


@pytest.mark.parametrize(
    "values", [torch.zeros(3, 1), torch.zeros(2), torch.zeros(4), torch.tensor(1.0), torch.zeros(1, 3)]
)
def test_check_rewards_rejects_wrong_shapes_naming_the_reward(values):
    with pytest.raises(RewardError, match=r"reward 'judge' returned shape .*expected \(3,\)"):
        check_rewards(Fixed(values, name="judge"), values, 3)


def test_check_rewards_rejects_non_tensors_and_passes_good_values():
    with pytest.raises(RewardError, match="reward 'judge' returned list"):
        check_rewards(Fixed(None, name="judge"), [1.0, 2.0, 3.0], 3)
    good = torch.tensor([0.5, -1.0, 2.0])
    assert check_rewards(Fixed(good), good, 3) is good
    unnamed = type("Unnamed", (), {"differentiable": False})()
    with pytest.raises(RewardError, match="'Unnamed'"):
        check_rewards(unnamed, torch.zeros(2), 3)


def test_rule_rewards_satisfy_the_protocol():
    for reward in (AnswerMatch({}), RegexMatch("x"), LengthReward()):
        assert isinstance(reward, Reward)
        assert reward.differentiable is False


# ------------------------------------------------------------------------------------------ combinators
def test_weighted_sum_by_hand():
    a, b = Fixed([1.0, 2.0, -3.0], "a"), Fixed([0.5, 0.0, 4.0], "b")
    total = WeightedSum([a, b], [2, -0.5])
    assert total.name == "2*a+-0.5*b"
    expected = [2 * 1.0 - 0.5 * 0.5, 2 * 2.0 - 0.5 * 0.0, 2 * -3.0 - 0.5 * 4.0]
    assert score(total, PROMPTS, OUTPUTS).tolist() == pytest.approx(expected)
    assert a.calls == b.calls == 1


def test_weighted_sum_validates_parts_and_arguments():
    with pytest.raises(RewardError, match="'b'"):  # the failing part is named, not just the sum
        WeightedSum([Fixed([1.0, 1.0, 1.0], "a"), Fixed([1.0, math.nan, 1.0], "b")], [1, 1])(PROMPTS, OUTPUTS)
    with pytest.raises(ValueError):
        WeightedSum([Fixed([1.0], "a")], [1.0, 2.0])
    with pytest.raises(ValueError):
        WeightedSum([], [])
    diff = Fixed([1.0, 1.0, 1.0], "d")
    diff.differentiable = True
    assert WeightedSum([diff, diff], [1, 1]).differentiable is True
    assert WeightedSum([diff, Fixed([0.0] * 3)], [1, 1]).differentiable is False


def test_clipped_by_hand():
    clipped = Clipped(Fixed([-5.0, 0.3, 7.0], "r"), low=-1.0, high=2.0)
    assert clipped.name == "clip(r)"
    assert score(clipped, PROMPTS, OUTPUTS).tolist() == pytest.approx([-1.0, 0.3, 2.0])
    with pytest.raises(ValueError):
        Clipped(Fixed([0.0]), 1.0, 1.0)
    with pytest.raises(RewardError, match="'r'"):
        Clipped(Fixed([0.0, math.inf, 0.0], "r"), -1, 1)(PROMPTS, OUTPUTS)  # inf is not clipped away


def test_normalized_by_hand():
    norm = Normalized(Fixed([1.0, 3.0, -2.0], "r"), mean=1.0, std=2.0)
    assert norm.name == "norm(r)"
    assert score(norm, PROMPTS, OUTPUTS).tolist() == pytest.approx([0.0, 1.0, -1.5])
    for std in (0.0, -1.0):
        with pytest.raises(ValueError):
            Normalized(Fixed([0.0]), 0.0, std)


def test_combinators_compose():
    inner = Normalized(Fixed([10.0, 0.0, -10.0], "r"), mean=0.0, std=5.0)  # [2, 0, -2]
    composed = WeightedSum([Clipped(inner, -1.0, 1.0), Fixed([1.0, 1.0, 1.0], "one")], [3.0, 1.0])
    assert score(composed, PROMPTS, OUTPUTS).tolist() == pytest.approx([4.0, 1.0, -2.0])


# ------------------------------------------------------------------------------------------ rule rewards
def test_answer_match():
    reward = AnswerMatch({"1+2=": "3", "10+5=": " 15 "})
    prompts = ["1+2=", "1+2=", "10+5=", "10+5="]
    outputs = [{"text": "3"}, " 4", "15\n", {"text": "150"}]
    assert reward(prompts, outputs).tolist() == [1.0, 0.0, 1.0, 0.0]
    chat = [[{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="}]]
    assert reward(chat, [" 3 "]).tolist() == [1.0]  # conversations are keyed by their last turn
    with pytest.raises(KeyError, match=r"answer_match.*'2\+2='"):
        reward(["2+2="], ["4"])
    with pytest.raises(ValueError):
        reward(["1+2="], ["3", "3"])  # prompts and outputs must pair up


def test_regex_match():
    reward = RegexMatch(r"^1\d$")
    outputs = ["12", {"text": "19"}, "123", "21", "", {"text": "1"}]
    assert reward(["p"] * 6, outputs).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert RegexMatch("5")(["p", "p"], ["x5y", "xy"]).tolist() == [1.0, 0.0]  # search, not full match
    assert reward.name == "regex"


def test_length_reward():
    assert LengthReward()(["p"] * 3, ["", "abc", {"text": "hello"}]).tolist() == [0.0, 3.0, 5.0]
    assert LengthReward(scale=-0.5)(["p", "p"], ["ab", "abcd"]).tolist() == [-1.0, -2.0]


# ------------------------------------------------------------------------------------------ reward model
def _reward_model(pad_is_eos: bool) -> tuple[RewardModel, LlamaForSequenceClassification]:
    tok = char_tokenizer()
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForSequenceClassification(config).eval()
    return RewardModel(model, tok, max_length=32), model


@torch.no_grad()
def _manual_score(model, ids: list[int]) -> float:
    hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    return model.score(hidden).item()


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_model_reads_the_last_attended_token(pad_is_eos):
    rm, model = _reward_model(pad_is_eos)
    assert (rm.tokenizer.pad_token_id == rm.tokenizer.eos_token_id) == pad_is_eos
    prompts = ["7+8=", "12+34=", "1+1="]
    outputs = ["15", {"text": "4600"}, "2"]  # different lengths: right padding in the batch
    scores = score(rm, prompts, outputs)
    assert scores.shape == (3,)
    tok = char_tokenizer()
    expected = []
    for prompt, out in zip(prompts, outputs, strict=True):
        text = out["text"] if isinstance(out, dict) else out
        ids = [1, *(tok.convert_tokens_to_ids(c) for c in prompt + text), 2]  # <bos> prompt response <eos>
        expected.append(_manual_score(model, ids))
    assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=0)
    assert len(set(scores.tolist())) == 3  # the scores are not all equal, so the positions matter


def test_reward_model_differs_from_a_read_before_eos():
    """Guard that the previous test can fail: the score at the token before eos is a different number."""
    rm, model = _reward_model(pad_is_eos=True)
    tok = char_tokenizer()
    ids = [1, *(tok.convert_tokens_to_ids(c) for c in "7+8=15"), 2]
    assert abs(_manual_score(model, ids) - _manual_score(model, ids[:-1])) > 1e-4
    assert rm(["7+8="], ["15"]).item() == pytest.approx(_manual_score(model, ids), abs=1e-5)


# ------------------------------------------------------------------------------------- recipe wiring
def test_answer_match_from_a_recipe_with_conversational_prompts(tiny_world, tmp_path):
    import json

    from mmalign.run import build_run

    rows = [{"prompt": [{"role": "user", "content": f"{a}+1="}], "answer": str(a + 1)} for a in range(8)]
    path = tmp_path / "chat_prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "seed": 0,
        "model": {"name_or_path": "zoo://text-tiny/base", "max_length": 40, "max_new_tokens": 3},
        "data": {"prompts": str(path)},
        "algorithm": {"name": "rloo", "reward": "answer_match"},
        "train": {"max_steps": 1, "batch_size": 8, "progress": False},
    }
    _, algorithm, *_ = build_run(recipe)
    prompts = [r["prompt"] for r in rows[:2]]
    assert algorithm.reward(prompts, ["1", "3"]).tolist() == [1.0, 0.0]
