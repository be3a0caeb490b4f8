"""The moving average of the weights (train.ema_decay): its arithmetic, and that a run evaluates and saves it
(resuming it: tests/test_trainer.py)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmalign.core.config import apply_overrides
from mmalign.run import build_run
from mmalign.train import checkpoint as ckpt
from mmalign.train.ema import WeightAverage
from mmalign.train.trainer import TrainConfig, Trainer, TrainingError


def test_average_follows_the_warmed_up_decay_every_k_steps():
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    module.bias.requires_grad_(False)  # frozen parameters are not averaged
    average = WeightAverage(module, decay=0.5, every=2)
    expected = module.weight.detach().clone()
    updates = 0
    for step in range(1, 8):
        with torch.no_grad():
            module.weight.add_(torch.randn_like(module.weight))
        average.update(step)
        if step % 2 == 0:
            updates += 1
            # diffusers' EMAModel: the first update copies; the n-th uses min(decay, n / (n + 9))
            decay = 0.0 if updates == 1 else min(0.5, updates / (updates + 9))
            expected = decay * expected + (1 - decay) * module.weight.detach()
    trained = module.weight.detach().clone()
    with average.applied():
        torch.testing.assert_close(module.weight.detach(), expected)
        assert not torch.equal(module.weight.detach(), trained)
    assert torch.equal(module.weight.detach(), trained)  # the trained weights are back
    state = average.state_dict()
    assert state["updates"] == 3 and list(state["weights"]) == ["weight"]


def test_ema_settings_are_checked():
    with pytest.raises(ValueError, match=r"train\.ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match=r"train\.ema_every"):
        TrainConfig(ema_decay=0.9, ema_every=0)


def _train(recipe: dict, out):
    policy, algorithm, cfg, evaluator, report = build_run(recipe)
    return Trainer(policy, algorithm, cfg, out, evaluator=evaluator, report=report), policy, evaluator


def test_run_evaluates_and_saves_the_average(tiny_recipe, tmp_path, capsys):
    recipe = apply_overrides(tiny_recipe, ["train.ema_decay=0.9", "train.ema_every=2"])
    full, policy, evaluator = _train(recipe, tmp_path / "full")
    expected = full.train()
    last = ckpt.latest_checkpoint(tmp_path / "full")
    trained, averaged = ckpt.load_state(last, "policy"), ckpt.load_state(last, "ema")
    assert averaged["updates"] == 3
    # the module keeps training the trained weights; the average differs from them
    now = policy.trainable_state_dict()
    assert all(torch.equal(now[n], trained[n]) for n in now)
    assert any(not torch.equal(averaged["weights"][n], trained[n]) for n in trained)
    # final/ holds the average: every averaged tensor is in it, and some trained tensor is not
    saved = list(load_file(str(next((tmp_path / "full" / "final").glob("*.safetensors")))).values())

    def in_final(t: torch.Tensor) -> bool:
        return any(s.shape == t.shape and torch.equal(s, t) for s in saved)

    assert all(in_final(t) for t in averaged["weights"].values())
    assert not all(in_final(t) for t in trained.values())
    # the held-out "after" metrics are those of the average
    policy.load_trainable_state_dict(averaged["weights"])
    with torch.no_grad():
        assert evaluator.evaluate(policy) == expected["after"]

    # `mmalign eval RUN` evaluates what the run evaluated: the average
    from mmalign.cli import main

    (tmp_path / "full" / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "full")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["preference_accuracy"] == pytest.approx(expected["after"]["preference_accuracy"])


def test_resuming_a_run_without_an_average_with_one_is_refused_by_name(tiny_recipe, tmp_path):
    plain = apply_overrides(tiny_recipe, ["train.max_steps=2"])
    _train(plain, tmp_path / "run")[0].train()
    extended = apply_overrides(plain, ["train.ema_decay=0.9", "train.max_steps=4"])
    trainer = _train(extended, tmp_path / "run")[0]
    with pytest.raises(TrainingError, match="no moving average"):
        trainer.train()
