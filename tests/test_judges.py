"""Independent judges: their classifier architecture, how they agree with the worlds' classifiers, what the
diffusion evaluator reports for them (computed by hand here), and the refusal to train on a run's own judge."""

from __future__ import annotations

import json
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmalign.core.config import RecipeError
from mmalign.core.data import rows_from_records, write_jsonl
from mmalign.evaluation.classifier import (
    Classifier,
    ColumnConvClassifier,
    ColumnConvClassifierConfig,
    ConvClassifier,
    ConvClassifierConfig,
    PromptedClassReward,
    load_classifier,
    train_classifier,
)
from mmalign.evaluation.diffusion import DiffusionEvaluator
from mmalign.run import build_reward, plan
from mmalign.zoo.image_world import ImageWorldSpec, judge_split, load_digit_images, split_indices

# ------------------------------------------------------------------------------------------ architectures


def test_column_conv_round_trip_names_its_architecture_and_conv_configs_stay_unchanged(tmp_path):
    torch.manual_seed(0)
    judge = ColumnConvClassifier(ColumnConvClassifierConfig(height=16, channels=(8, 8))).eval()
    classifier = ConvClassifier(ConvClassifierConfig(channels=(8, 8), hidden=16)).eval()
    judge.save_pretrained(tmp_path / "judge")
    classifier.save_pretrained(tmp_path / "classifier")
    # the judge's config names its class; the classifier's is the JSON the existing worlds hold (no new key)
    assert json.loads((tmp_path / "judge" / "config.json").read_text())["architecture"] == "column_conv"
    assert "architecture" not in json.loads((tmp_path / "classifier" / "config.json").read_text())

    images = torch.rand(5, 3, 16, 16) * 2 - 1
    loaded_judge, loaded_classifier = (
        load_classifier(tmp_path / "judge"),
        Classifier.from_pretrained(tmp_path / "classifier"),
    )
    assert type(loaded_judge) is ColumnConvClassifier and type(loaded_classifier) is ConvClassifier
    assert torch.equal(loaded_judge(images), judge(images))
    assert torch.equal(loaded_classifier(images), classifier(images))
    assert isinstance(
        PromptedClassReward.from_pretrained(str(tmp_path / "judge")).classifier, ColumnConvClassifier
    )
    with pytest.raises(ValueError, match="holds a 'column_conv' classifier"):
        ConvClassifier.from_pretrained(tmp_path / "judge")


def test_unknown_architecture_and_missing_directory_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "transformer"}))
    with pytest.raises(ValueError, match="unknown classifier architecture 'transformer'"):
        load_classifier(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a saved classifier directory"):
        load_classifier(tmp_path / "nowhere")


def test_judge_gradient_reaches_the_input_and_reads_mels():
    judge = ColumnConvClassifier(ColumnConvClassifierConfig(height=32, in_channels=1, channels=(8, 8)))
    mels = torch.randn(3, 1, 32, 32, requires_grad=True)
    judge.requires_grad_(False).log_prob(mels, torch.tensor([1, 2, 3])).sum().backward()
    assert mels.grad is not None and mels.grad.abs().sum() > 0
    assert judge.embed(mels).shape == (3, 16)


def test_judge_and_classifier_differ_but_agree_on_held_out_real_digits():
    """The image world's recipe on a short budget: the classifier on the train split, the judge (another
    architecture and seed) on two thirds of the held-out digits; both read on the last third."""
    spec = ImageWorldSpec()
    images, digits = load_digit_images()
    train, held_out = split_indices(len(images), spec)
    judge_train, judge_test = judge_split(held_out, spec)
    assert not set(judge_train.tolist()) & set(train.tolist())
    assert not set(judge_train.tolist()) & set(judge_test.tolist())
    assert set(judge_train.tolist()) | set(judge_test.tolist()) == set(held_out.tolist())
    quiet = lambda *_: None  # noqa: E731
    torch.manual_seed(0)
    classifier = train_classifier(
        images[train],
        digits[train],
        150,
        batch_size=32,
        generator=torch.Generator().manual_seed(0),
        log=quiet,
    )
    torch.manual_seed(spec.judge_seed)
    judge = train_classifier(
        images[judge_train],
        digits[judge_train],
        150,
        config=ColumnConvClassifierConfig(height=16, channels=spec.judge_channels),
        generator=torch.Generator().manual_seed(spec.judge_seed),
        log=quiet,
    )
    assert type(judge) is not type(classifier)
    test_images = images[judge_test]
    agreement = (judge.predict(test_images) == classifier.predict(test_images)).float().mean().item()
    # measured: 0.97 agreement, judge accuracy 0.97 (at the world's 400 steps: 0.967 and 0.975)
    assert agreement > 0.9
    assert judge.accuracy(test_images, digits[judge_test]) > 0.9
    assert not torch.equal(judge(test_images).softmax(-1), classifier(test_images).softmax(-1))


# ------------------------------------------------------------------------------------ evaluator, by hand


class Scored:
    """A reward scoring fake 'images' (rows of 0/1 codes) by column `column`, without an agreement (like JPEG)."""

    differentiable = False

    def __init__(self, name: str, column: int):
        self.name, self.column = name, column

    def __call__(self, prompts, images):
        return 0.5 + 0.25 * images[:, self.column]


class Coded(Scored):
    """A reward reading column `column` as its agreement (1 = the prompted class seen)."""

    def agreement(self, prompts, images):
        return images[:, self.column]


class FakePolicy:
    """Returns preset 'images' (one row of codes per (prompt, seed) job): the tuned ones, or the base's."""

    def __init__(self, tuned: torch.Tensor, base: torch.Tensor):
        self.tuned, self.base, self.in_reference = tuned, base, False

    @contextmanager
    def reference(self):
        self.in_reference = True
        try:
            yield
        finally:
            self.in_reference = False

    def sample(self, prompts, generator=None, record=False):
        return SimpleNamespace(final=(self.base if self.in_reference else self.tuned)[: len(prompts)])

    def decode(self, latents):
        return latents


# columns: reward agreement, judge agreement, for 3 prompts × 2 seeds
TUNED = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 1], [0, 0], [1, 1]], dtype=torch.float32)
BASE = torch.tensor([[0, 0], [1, 1], [0, 0], [0, 0], [0, 0], [1, 1]], dtype=torch.float32)
PROMPTS = rows_from_records([{"prompt": p} for p in ("one", "two", "three")])


def test_evaluator_reports_judges_and_the_hacking_gap_computed_by_hand():
    reward, judge = Coded("digit_classifier", 0), Coded("digit_judge", 1)
    evaluator = DiffusionEvaluator(PROMPTS, [reward], judges=[judge], seeds=2, kl=False)
    metrics = evaluator.evaluate(FakePolicy(TUNED, BASE))

    gain_r = (TUNED[:, 0] - BASE[:, 0]).numpy()  # [1, 0, 1, 1, 0, 0]
    gain_j = (TUNED[:, 1] - BASE[:, 1]).numpy()  # [1, -1, 0, 1, 0, 0]
    gap = gain_r - gain_j  # [0, 1, 1, 0, 0, 0]
    assert metrics["digit_judge"] == pytest.approx(0.5 + 0.25 * 3 / 6)
    assert metrics["digit_judge_agreement"] == pytest.approx(3 / 6)
    assert metrics["digit_judge_agreement_gain"] == pytest.approx(gain_j.mean())
    assert metrics["digit_judge_agreement_gain_se"] == pytest.approx(gain_j.std(ddof=1) / np.sqrt(6))
    assert metrics["digit_classifier_agreement_gain"] == pytest.approx(gain_r.mean())
    assert metrics["digit_judge_hacking_gap"] == pytest.approx(2 / 6)
    assert metrics["digit_judge_hacking_gap_se"] == pytest.approx(gap.std(ddof=1) / np.sqrt(6))
    assert metrics["digit_judge_hacking_gap"] == pytest.approx(
        metrics["digit_classifier_agreement_gain"] - metrics["digit_judge_agreement_gain"]
    )
    # the win rate still follows the first reward, not the judge
    assert metrics["win_rate_vs_base"] == pytest.approx((3 + 0.5 * 3) / 6)  # 3 wins, 3 ties


class Classed(Coded):
    """A classifier-like reward that reads class 7 where column `column` is 1 and class 0 elsewhere."""

    def classes(self, images):
        return 7 * images[:, self.column].long()


def test_by_prompt_rows_are_each_prompts_seeds_computed_by_hand():
    reward, judge = Coded("digit_classifier", 0), Classed("digit_judge", 1)
    rows = DiffusionEvaluator(PROMPTS, [reward], judges=[judge], seeds=2, kl=False).by_prompt(
        FakePolicy(TUNED, BASE)
    )
    # jobs run seed-major: prompt i's images are rows i and i + 3 of TUNED
    assert [r["prompt"] for r in rows] == ["one", "two", "three"] and all(r["n"] == 2 for r in rows)
    assert [r["digit_classifier"] for r in rows] == pytest.approx([0.75, 0.625, 0.75])
    assert [r["digit_classifier_agreement"] for r in rows] == pytest.approx([1.0, 0.5, 1.0])
    assert [r["digit_judge_agreement"] for r in rows] == pytest.approx([1.0, 0.0, 0.5])
    assert [r["digit_judge_reads"] for r in rows] == [{"7": 2}, {"0": 2}, {"0": 1, "7": 1}]
    assert "digit_classifier_reads" not in rows[0]  # a reward without classes reads none


def test_hacking_gap_follows_the_training_reward_or_is_left_out():
    jpeg, classifier, judge = Scored("jpeg", 0), Coded("classifier", 0), Coded("judge", 1)
    policy = FakePolicy(TUNED, BASE)
    # trained on a reward with an agreement: the gap is measured against it (here the classifier column)
    named = DiffusionEvaluator(
        PROMPTS, [jpeg, classifier], judges=[judge], trained_on="classifier", seeds=2, kl=False
    )
    assert named.evaluate(policy)["judge_hacking_gap"] == pytest.approx(2 / 6)
    # trained on JPEG size, which has no agreement: no gap is made up from another reward
    assert "judge_hacking_gap" not in DiffusionEvaluator(
        PROMPTS, [jpeg, classifier], judges=[judge], trained_on="jpeg", seeds=2, kl=False
    ).evaluate(policy)
    # no training reward (offline methods): the first reward with an agreement
    swapped = DiffusionEvaluator(PROMPTS, [jpeg, judge], judges=[classifier], seeds=2, kl=False).evaluate(
        policy
    )
    assert swapped["classifier_hacking_gap"] == pytest.approx(-2 / 6)


def test_reward_and_judge_names_must_differ():
    with pytest.raises(ValueError, match=r"distinct names.*'same'"):
        DiffusionEvaluator(PROMPTS, [Coded("same", 0)], judges=[Coded("same", 1)])


# ---------------------------------------------------------------------------------------- recipe checks


@pytest.fixture
def diffusion_recipe(tmp_path):
    """A recipe plan() can check without any model or world (nothing here is ever loaded)."""
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a handwritten seven"}])
    return {
        "model": {"kind": "diffusion_image", "name_or_path": str(tmp_path / "model")},
        "data": {"prompts": str(tmp_path / "prompts.jsonl")},
        "algorithm": {
            "name": "ddpo",
            "reward": {"name": "digit_classifier", "path": str(tmp_path / "classifier")},
        },
        "eval": {
            "prompts": str(tmp_path / "prompts.jsonl"),
            "rewards": [{"name": "digit_classifier", "path": str(tmp_path / "classifier")}],
            "judges": [{"name": "digit_judge", "path": str(tmp_path / "judge")}],
        },
    }


def test_a_recipe_with_an_independent_judge_plans(diffusion_recipe):
    checked = plan(diffusion_recipe)
    assert checked.eval.judges == diffusion_recipe["eval"]["judges"]
    assert ("eval.judges[0]", diffusion_recipe["eval"]["judges"][0]) in checked.reward_specs


@pytest.mark.parametrize(
    "judge",
    [
        "same-spec",
        "same-path-other-name",
        "same-path-written-differently",
    ],
)
def test_training_on_a_judge_of_the_same_run_is_refused_before_any_model_loads(
    diffusion_recipe, tmp_path, judge
):
    trained = diffusion_recipe["algorithm"]["reward"]
    diffusion_recipe["eval"]["judges"] = [
        {
            "same-spec": dict(trained),
            "same-path-other-name": {"name": "digit_judge", "path": trained["path"]},
            "same-path-written-differently": {
                "name": "digit_judge",
                "path": f"{tmp_path}/./sub/../classifier",
            },
        }[judge]
    ]
    (tmp_path / "sub").mkdir()
    with pytest.raises(
        RecipeError, match=r"algorithm.reward .* is eval.judges\[0\].*never be the training reward"
    ):
        plan(diffusion_recipe)


def test_judges_are_refused_where_no_evaluation_reports_them(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    recipe = {
        "model": {"name_or_path": str(tmp_path / "model")},
        "data": {"train": str(tmp_path / "pairs.jsonl")},
        "eval": {"judges": ["answer_match"]},
    }
    with pytest.raises(RecipeError, match=r"eval\.judges: model\.kind 'causal_lm' does not report judges"):
        plan(recipe)


def test_a_judge_scoring_other_outputs_is_named(diffusion_recipe):
    diffusion_recipe["eval"]["judges"] = [{"name": "speech_judge", "path": "x"}]
    with pytest.raises(RecipeError, match=r"eval.judges\[0\]: reward 'speech_judge' scores mel"):
        plan(diffusion_recipe)


def test_judge_rewards_need_a_path():
    for name in ("digit_judge", "speech_judge"):
        with pytest.raises(RecipeError, match=f"reward '{name}' needs `path:`"):
            build_reward({"name": name})


def test_the_same_weights_under_other_options_are_the_same_judge(tmp_path, monkeypatch):
    from mmalign.run import check_judges_independent

    monkeypatch.chdir(tmp_path)
    check_judges_independent(
        {"name": "hpsv2", "checkpoint": "a.safetensors"}, [{"name": "hpsv2", "checkpoint": "b.st"}]
    )
    with pytest.raises(RecipeError, match=r"eval.judges\[1\]"):
        check_judges_independent(
            {"name": "hpsv2", "checkpoint": "a.safetensors", "model": "ViT-H-14"},
            ["jpeg_compressibility", {"name": "hpsv2", "checkpoint": f"{tmp_path}/a.safetensors"}],
        )
    # an architecture shared by two scorers with their own weights does not make them one judge
    check_judges_independent(
        {"name": "clip_score", "model": "ViT-L-14"},
        [{"name": "aesthetic", "model": "ViT-L-14", "head": "h.st"}],
    )
