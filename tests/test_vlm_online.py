"""The digits VLM world's verifiable reward, per-probe POPE breakdown, and online alignment of the VLM."""

from __future__ import annotations

import pytest

from mmalign.vision import vlm_digits as D
from mmalign.vision.hallucination import StatementReward, pope_breakdown

TRUTH = {"digit": 7, "ink": "bold", "frame": "framed"}


@pytest.mark.parametrize(
    "text, want",
    [
        ("digit 7. bold ink. framed.", 3),
        ("framed. digit 7. bold ink.", 3),  # order is free
        ("digit 7.", 1),  # a missing fact earns nothing
        ("", 0),
        ("digit 1. bold ink. framed.", 1),  # 2 true − 1 false
        ("digit 7. nolint ink. nnn. frain", 1 - 3),  # garbled statements cost a point each
        ("digit 7. digit 7. digit 7.", 1 - 2),  # repeating a true fact cannot pay
        ("digit 7. digit 1. bold ink. framed.", 3 - 1 - 1),  # hedging: false + repeated
        ("Digit 7. Bold ink. Framed.", -3),
        ("digit 7. bold ink. framed." + " z." * 20, -3),  # clipped at −1
    ],
)
def test_statement_reward_pays_only_true_single_statements(text, want):
    got = StatementReward()([dict(TRUTH, image="x.png")], [{"text": text}])
    assert got.tolist() == pytest.approx([want / 3])


@pytest.mark.parametrize(
    "question, answer, want",
    [
        ("is it a 7?", "yes", 1),
        ("is it a 7?", "no", -1),
        ("is it a 3?", "no.", 1),  # the same normalisation as POPE accuracy
        ("is it a 3?", "yes", -1),
        ("is the ink faint?", "no", 1),
        ("is it framed?", "Yes!", 1),
        ("is it unframed?", "digit 7.", -1),  # anything but the right yes/no
    ],
)
def test_statement_reward_scores_a_probe_prompt_as_a_yes_no_answer(question, answer, want):
    rows = [
        dict(TRUTH, image="x.png", prompt=question),
        dict(TRUTH, image="x.png", prompt="describe the digit."),
    ]
    got = StatementReward()(rows, [{"text": answer}, {"text": "digit 7. bold ink. framed."}])
    assert got.tolist() == [want, 1.0]


def test_statement_reward_names_missing_or_bad_ground_truth():
    reward = StatementReward()
    with pytest.raises(ValueError, match="ground truth"):
        reward([{"image": "x.png"}], ["digit 7."])
    with pytest.raises(ValueError, match="'digit' must be one of"):
        reward([dict(TRUTH, digit="7")], ["digit 7."])


def test_pope_breakdown_by_hand():
    questions = ["is it a 7?", "is it a 3?", "is the ink faint?", "is it framed?", "is it unframed?"]
    truth = ["yes", "no", "no", "yes", "no"]
    answers = ["yes", "yes", "no.", "yes", "maybe"]
    got = pope_breakdown(questions, answers, truth)
    assert got == {
        "pope_accuracy_digit": 0.5,
        "pope_yes_ratio_digit": 1.0,
        "pope_accuracy_ink": 1.0,
        "pope_yes_ratio_ink": 0.0,
        "pope_accuracy_frame": 0.5,
        "pope_yes_ratio_frame": 0.5,
        "pope_unanswered": 0.2,
    }
    with pytest.raises(ValueError, match="not a probe"):
        pope_breakdown(["what is it?"], ["yes"], ["yes"])
    assert D.probe_claim("is it a 12?") is None and D.probe_claim("is it framed?") == ("frame", "framed")
