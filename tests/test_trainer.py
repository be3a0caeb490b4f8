"""The training loop's contracts: accumulation equals a bigger batch, exact resume, NaN refusal, run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mmalign.core.config import RecipeError, apply_overrides, load_recipe
from mmalign.run import build_run
from mmalign.train import checkpoint as ckpt
from mmalign.train.trainer import Trainer, TrainingError


def _train(recipe: dict, out: Path, evaluator: bool = True):
    policy, algorithm, cfg, ev, report = build_run(recipe)
    trainer = Trainer(policy, algorithm, cfg, out, evaluator=ev if evaluator else None, report=report)
    return trainer, policy, algorithm


def _losses(run: Path) -> list[float]:
    return [
        json.loads(line)["train/loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]


def test_grad_accumulation_equals_bigger_batch(tiny_recipe, tmp_path):
    recipe = apply_overrides(tiny_recipe, ["train.max_steps=3", "train.save_every=0"])
    t1, p1, _ = _train(recipe, tmp_path / "k1", evaluator=False)
    t1.train()
    t4, p4, _ = _train(apply_overrides(recipe, ["train.grad_accum=4"]), tmp_path / "k4", evaluator=False)
    t4.train()
    assert _losses(tmp_path / "k1") == pytest.approx(_losses(tmp_path / "k4"), abs=1e-6)
    s1, s4 = p1.trainable_state_dict(), p4.trainable_state_dict()
    for name in s1:
        torch.testing.assert_close(s1[name], s4[name], atol=1e-6, rtol=1e-5)
    # and training moved the weights at all (otherwise equality would be vacuous)
    fresh, _, _ = _train(recipe, tmp_path / "fresh", evaluator=False)
    assert any(not torch.equal(s1[n], v) for n, v in fresh.policy.trainable_state_dict().items())


@pytest.mark.parametrize("ema", [False, True], ids=["weights", "weights-and-their-ema"])
def test_resume_after_crash_matches_uninterrupted_run(tiny_recipe, tmp_path, ema):
    if ema:  # the moving average (train.ema_decay) resumes too, and the after metrics are its
        tiny_recipe = apply_overrides(tiny_recipe, ["train.ema_decay=0.9", "train.ema_every=2"])
    full, full_policy, _ = _train(tiny_recipe, tmp_path / "full")
    expected = full.train()

    crashed, _, algorithm = _train(tiny_recipe, tmp_path / "crash")
    calls = {"n": 0}
    original = algorithm.loss

    def crash_at_step_4(batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        return original(batch)

    algorithm.loss = crash_at_step_4
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert ckpt.latest_checkpoint(tmp_path / "crash").name == "step-00000002"
    assert not (tmp_path / "crash" / "summary.json").exists()

    resumed, resumed_policy, _ = _train(tiny_recipe, tmp_path / "crash")
    summary = resumed.train()
    assert summary["steps"] == expected["steps"] == 6
    assert summary["before"] == expected["before"]
    assert summary["after"] == expected["after"]
    a, b = full_policy.trainable_state_dict(), resumed_policy.trainable_state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    if ema:
        averages = [ckpt.load_state(ckpt.latest_checkpoint(tmp_path / r), "ema") for r in ("full", "crash")]
        assert averages[0]["updates"] == averages[1]["updates"] == 3
        assert all(torch.equal(averages[0]["weights"][n], averages[1]["weights"][n]) for n in a)


def test_nan_loss_stops_before_the_update_and_writes_no_checkpoint(tiny_recipe, tmp_path):
    recipe = apply_overrides(tiny_recipe, ["train.save_every=1"])
    trainer, _, algorithm = _train(recipe, tmp_path / "nan", evaluator=False)
    original = algorithm.loss
    calls = {"n": 0}

    def nan_at_step_3(batch):
        calls["n"] += 1
        losses, metrics = original(batch)
        if calls["n"] == 3:
            losses = losses * float("nan")
        return losses, metrics

    algorithm.loss = nan_at_step_3
    with pytest.raises(TrainingError, match="non-finite loss at step 3"):
        trainer.train()
    assert ckpt.latest_checkpoint(tmp_path / "nan").name == "step-00000002"
    saved = ckpt.load_state(ckpt.latest_checkpoint(tmp_path / "nan"), "policy")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_checkpoint_state_round_trip(tmp_path):
    state = {"a": torch.arange(3.0), "b": [1, 2.5, "x", None, (True, torch.ones(2, 2))], 3: {"n": -1}}
    ckpt.save_state(tmp_path, "s", state)
    back = ckpt.load_state(tmp_path, "s")
    assert torch.equal(back["a"], state["a"]) and back[3] == {"n": -1}
    assert back["b"][:4] == [1, 2.5, "x", None] and isinstance(back["b"][4], tuple)
    assert torch.equal(back["b"][4][1], torch.ones(2, 2))


def test_incomplete_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoints" / "step-00000004.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000002").mkdir()
    (tmp_path / "checkpoints" / "step-00000002" / "COMPLETE").write_text("{}")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"


def test_cli_writes_the_run_directory_contract(tiny_recipe, tmp_path, capsys):
    from mmalign.cli import main

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe))
    out = tmp_path / "run"
    overrides = ["--set", "train.max_steps=4", "--set", "train.eval_every=2"]
    assert main(["train", str(recipe_file), "--output-dir", str(out), *overrides]) == 0
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "report.md", "curves.png", "final"):
        assert (out / name).exists(), name
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["max_steps"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["wall_time_s"] > 0
    # the held-out evaluations (before and after) are counted apart from training
    assert 0 < summary["train_time_s"] < summary["wall_time_s"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (midway,) = [row for row in rows if "eval/preference_accuracy" in row]
    assert midway["step"] == 2 and 0 < midway["time/train_s"] < summary["train_time_s"]
    assert (
        set(summary["before"]) == set(summary["after"]) >= {"preference_accuracy", "answer_match", "n_pairs"}
    )
    assert ckpt.latest_checkpoint(out).name == "step-00000004"
    assert "| prompt | before | after |" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["preference_accuracy"] == pytest.approx(summary["after"]["preference_accuracy"])


def test_bad_training_data_fails_before_training_naming_line_and_field(tiny_recipe, tmp_path):
    from mmalign.core.data import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "1+2=", "chosen": 3, "rejected": "4"}\n'
    )
    recipe = apply_overrides(tiny_recipe, [f"data.train={bad}"])
    with pytest.raises(DataError) as err:
        build_run(recipe)
    assert err.value.line == 2 and err.value.field == "chosen" and str(bad) in str(err.value)


def test_too_long_prompt_is_rejected_not_truncated(tiny_recipe, tmp_path):
    from mmalign.core.data import DataError

    bad = tmp_path / "long.jsonl"
    bad.write_text(json.dumps({"prompt": "1+" * 30 + "1=", "chosen": "31", "rejected": "30"}) + "\n")
    with pytest.raises(DataError, match="max_length") as err:
        build_run(apply_overrides(tiny_recipe, [f"data.train={bad}"]))
    assert err.value.line == 1 and err.value.field == "prompt"


def test_recipe_errors_name_the_key(tiny_recipe):
    with pytest.raises(RecipeError, match=r"train\.lrr"):
        build_run(apply_overrides(tiny_recipe, ["train.lrr=1"]))
    with pytest.raises(RecipeError, match=r"train\.lr must be a number"):
        build_run(apply_overrides(tiny_recipe, ["train.lr=fast"]))
    with pytest.raises(RecipeError, match="override"):
        apply_overrides(tiny_recipe, ["train.lr"])
    recipe = apply_overrides(tiny_recipe, ["train.lr=5e-4"])  # YAML 1.1 reads this as a string
    assert build_run(recipe)[2].lr == 5e-4


def test_recipe_numbers_parse_as_users_write_them(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train: {lr: 1e-4, eps: 5E3, beta: 1.0e-4, steps: 10, name: 1e, range: [0.0, .8]}\n")
    train = load_recipe(path, ["train.wd=3e-2"])["train"]
    assert train == {
        "lr": 1e-4,
        "eps": 5e3,
        "beta": 1e-4,
        "steps": 10,
        "name": "1e",
        "range": [0.0, 0.8],
        "wd": 3e-2,
    }
    assert isinstance(train["steps"], int) and isinstance(train["lr"], float)


def test_bf16_autocast_and_tensorboard_tracker(tiny_recipe, tmp_path):
    pytest.importorskip("tensorboard")
    recipe = apply_overrides(
        tiny_recipe,
        [
            "train.max_steps=2",
            "train.save_every=0",
            "train.mixed_precision=bf16",
            "train.log_with=[tensorboard]",
        ],
    )
    trainer, _, _ = _train(recipe, tmp_path / "bf16", evaluator=False)
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(math.isfinite(x) for x in _losses(tmp_path / "bf16"))
    assert list((tmp_path / "bf16").rglob("events.out.tfevents.*")), "no TensorBoard event file written"


def test_cli_refuses_to_resume_a_run_directory_of_another_recipe(tiny_recipe, tmp_path):
    from mmalign.cli import main

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe))
    out = tmp_path / "run"
    assert main(["train", str(recipe_file), "-o", str(out), "--set", "train.max_steps=2"]) == 0
    # a longer run of the same recipe resumes; a changed recipe is refused before anything is overwritten
    assert main(["train", str(recipe_file), "-o", str(out), "--set", "train.max_steps=3"]) == 0
    # the same number spelled another way (`1e-3` vs `0.001`) is the same recipe
    spelled = recipe_file.read_text().replace("lr: 0.001", "lr: 1e-3")
    assert spelled != recipe_file.read_text()
    (tmp_path / "spelled.yaml").write_text(spelled)
    assert main(["train", str(tmp_path / "spelled.yaml"), "-o", str(out), "--set", "train.max_steps=3"]) == 0
    assert main(["train", str(recipe_file), "-o", str(out), "--set", "train.lr=0.5"]) == 2
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["max_steps"] == 3


def test_checking_a_scheduler_name_steps_no_optimizer(monkeypatch):
    """Config validation must not fire global optimizer-step hooks (profilers and benchmarks count steps with them)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from mmalign.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_SCHEDULERS", {})
    fired = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: fired.append(optimizer))
    try:
        trainer_module.check_scheduler("constant")
        with pytest.raises(ValueError, match="must be one of"):
            trainer_module.check_scheduler("reduce_lr_on_plateau")
    finally:
        handle.remove()
    assert fired == []


def test_an_online_algorithm_missing_protocol_members_is_named(tmp_path):
    from mmalign.train.trainer import TrainConfig, Trainer

    class NoRollout:  # says it is online, has prompts, but cannot sample
        online = True
        prompts = ({"prompt": "x"},)

    with pytest.raises(TypeError, match=r"NoRollout is online but lacks .*samples_per_prompt.*rollout"):
        Trainer(None, NoRollout(), TrainConfig(num_train_epochs=1), tmp_path)  # type: ignore[arg-type]
