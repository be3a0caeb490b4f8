"""The vision/ VLM recipes run end to end on the seconds-fast `vlm-tiny` world, and the LLaVA-1.5 recipe's code
path runs on a tiny LLaVA saved locally (the hub is not reachable here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmalign.core.config import load_recipe
from mmalign.core.data import DataError, read_rows
from mmalign.run import build_run, validate
from mmalign.train.trainer import Trainer
from mmalign.vision import vlm_digits as D

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "train.max_steps=2",
    "train.batch_size=4",
    "train.save_every=0",
    "train.progress=false",
    "eval.batch_size=64",
]


@pytest.fixture(scope="module")
def vlm_tiny(mmalign_home) -> Path:
    from filelock import FileLock

    from mmalign.zoo import registry

    with FileLock(str(mmalign_home) + ".vlm.lock"):
        return registry.build("vlm-tiny", log=lambda *_: None)


def _tiny(recipe: str) -> list[str]:
    return (
        [*FAST, "model.name_or_path=zoo://vlm-tiny/base"]
        + [
            f"{k}=zoo://vlm-tiny/{f}"
            for k, f in (("eval.prompts", "eval_describe.jsonl"), ("eval.probes", "eval_probes.jsonl"))
        ]
        + [f"data.train=zoo://vlm-tiny/train_{recipe}.jsonl"]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "data"),
    [("dpo", "dpo"), ("povid", "povid"), ("rlhfv", "rlhfv"), ("iterative_dpo_offline", "dpo")],
)
def test_vlm_recipes_train_and_report_hallucination(vlm_tiny, tmp_path, recipe, data):
    world = json.loads((vlm_tiny / "world.json").read_text())
    assert world["image_tokens"] == 16 and 0 <= world["base_held_out"]["chair_s"] <= 1
    rows = read_rows(vlm_tiny / f"train_{data}.jsonl")
    assert rows and all((vlm_tiny / r.data["image"]).exists() for r in rows)
    config = load_recipe(ROOT / "vision" / f"vlm_{recipe}.yaml", _tiny(data))
    policy, algorithm, train_cfg, evaluator, report = build_run(config)
    summary = Trainer(policy, algorithm, train_cfg, tmp_path, evaluator=evaluator, report=report).train()
    for key in ("chair_s", "chair_i", "digit_accuracy", "pope_accuracy", "response_tokens", "distinct_1"):
        assert key in summary["before"] and key in summary["after"]
    assert (tmp_path / "report.md").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["online_dpo", "grpo", "iterative_dpo"])
def test_vlm_online_recipes_sample_score_and_train(vlm_tiny, tmp_path, recipe):
    overrides = [
        *_tiny(recipe)[:-1],
        "data.prompts=zoo://vlm-tiny/train_describe.jsonl",
        "algorithm.samples_per_prompt=2",
    ]
    if recipe == "iterative_dpo":  # one rollout of 4 prompts, 2 steps over its pairs (ppo_epochs 2)
        overrides += ["train.rollout_prompts=4", "algorithm.prompts_per_iteration=4"]
    config = load_recipe(ROOT / "vision" / f"vlm_{recipe}.yaml", overrides)
    checked = validate(config)
    assert checked["algorithm"]["name"] == recipe and checked["rewards"][-1] == "vlm_statements"
    policy, algorithm, train_cfg, evaluator, report = build_run(config)
    summary = Trainer(policy, algorithm, train_cfg, tmp_path, evaluator=evaluator, report=report).train()
    assert summary["steps"] == 2
    for key in ("chair_s", "chair_i", "pope_accuracy"):
        assert key in summary["before"] and key in summary["after"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rewards = [
        r["rollout/reward"] for r in rows if "rollout/reward" in r
    ]  # one per rollout (grpo: 2 steps each)
    assert rewards and all(-1 <= r <= 1 for r in rewards)


@pytest.mark.slow
def test_povid_probes_recipe_mixes_the_world_pairs_with_training_image_probe_pairs(vlm_tiny, tmp_path):
    """vision/vlm_povid_probes.yaml: its data.train lists the world's POVID rows and the probe pairs that
    vision/vlm_probe_pairs.py writes (about training images only); both kinds reach POVID, the probe rows without a
    noisy-image response."""
    out = tmp_path / "probe_pairs.jsonl"
    script = ROOT / "vision" / "vlm_probe_pairs.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), str(vlm_tiny), str(out), "--digit-negatives", "1"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    train_images = {
        str((vlm_tiny / r.data["image"]).resolve()) for r in read_rows(vlm_tiny / "train_describe.jsonl")
    }
    held_out = {
        str((vlm_tiny / r.data["image"]).resolve()) for r in read_rows(vlm_tiny / "eval_probes.jsonl")
    }
    assert len(pairs) == 4 * len(train_images) and f"{len(pairs)} probe pairs" in done.stdout
    assert {p["image"] for p in pairs} == train_images and not train_images & held_out
    recipe = load_recipe(ROOT / "vision" / "vlm_povid_probes.yaml")
    assert (
        recipe["data"]["train"][0] == "zoo://vlm/train_povid.jsonl" and recipe["algorithm"]["name"] == "povid"
    )
    overrides = [*_tiny("povid")[:-1], f"data.train=[zoo://vlm-tiny/train_povid.jsonl, {out}]"]
    config = load_recipe(ROOT / "vision" / "vlm_povid_probes.yaml", overrides)
    n_povid = len(read_rows(vlm_tiny / "train_povid.jsonl"))
    assert validate(config)["rows"]["pairs"] == n_povid + len(pairs)
    policy, algorithm, train_cfg, evaluator, report = build_run(config)
    examples = algorithm.train_examples
    assert [e["noisy_ids"] is None for e in examples[n_povid:]] == [True] * len(pairs)
    assert any(e["noisy_ids"] is not None for e in examples[:n_povid])
    summary = Trainer(
        policy, algorithm, train_cfg, tmp_path / "run", evaluator=evaluator, report=report
    ).train()
    assert summary["steps"] == 2 and "pope_accuracy" in summary["after"]
    # a held-out image among the training records is refused
    fake = tmp_path / "world"
    fake.mkdir()
    for name in ("eval_describe.jsonl", "eval_probes.jsonl"):
        (fake / name).write_text((vlm_tiny / name).read_text())
    held_out_rows = (vlm_tiny / "eval_describe.jsonl").read_text().splitlines(keepends=True)
    train_rows = (vlm_tiny / "train_describe.jsonl").read_text().splitlines(keepends=True)
    (fake / "train_describe.jsonl").write_text("".join(train_rows[:3] + held_out_rows[:1]))
    bad = subprocess.run(
        [sys.executable, str(script), str(fake), str(tmp_path / "bad.jsonl")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert (
        bad.returncode != 0 and "held-out images too" in bad.stderr and not (tmp_path / "bad.jsonl").exists()
    )


def test_llava15_recipe_path_on_a_local_tiny_llava(vlm_tiny, tmp_path):
    rows = [json.loads(line) for line in (vlm_tiny / "train_povid.jsonl").read_text().splitlines()]
    for r in rows:
        r["image"] = str(vlm_tiny / r["image"])
    (tmp_path / "povid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    overrides = [
        f"model.name_or_path={vlm_tiny / 'base'}",
        "model.dtype=float32",
        "model.max_length=160",
        f"data.train={tmp_path / 'povid.jsonl'}",
        "train.max_steps=1",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.mixed_precision=no",
        "train.save_every=0",
        "train.eval_every=0",
        "train.progress=false",
    ]
    recipe = load_recipe(ROOT / "vision" / "llava15_povid.yaml", overrides)
    assert (
        load_recipe(ROOT / "vision" / "llava15_povid.yaml")["model"]["name_or_path"]
        == "llava-hf/llava-1.5-7b-hf"
    )
    policy, algorithm, train_cfg, evaluator, report = build_run(recipe)
    ids = algorithm.train_examples[0]["prompt_ids"]
    text = policy.tokenizer.decode([t for t in ids if t != policy.image_token_id], skip_special_tokens=True)
    assert text.startswith("USER: ") and text.endswith(
        f"{D.DESCRIBE_PROMPT} ASSISTANT:"
    )  # char vocab has no \n
    assert ids.count(policy.image_token_id) == 16
    summary = Trainer(
        policy, algorithm, train_cfg, tmp_path / "run", evaluator=evaluator, report=report
    ).train()
    assert summary["steps"] == 1 and (tmp_path / "run" / "final").is_dir()
    # too short for the 16 image tokens plus text: a named error before training, never a truncation
    recipe = load_recipe(
        ROOT / "vision" / "llava15_povid.yaml", [*overrides[:2], "model.max_length=60", overrides[3]]
    )
    with pytest.raises(
        DataError, match=r"povid.jsonl, line 1, field 'chosen': prompt \+ chosen is \d+ tokens"
    ):
        build_run(recipe)


def test_cli_sample_takes_an_image_per_prompt(vlm_tiny, tmp_path, capsys):
    from mmalign.cli import main

    row = json.loads((vlm_tiny / "eval_describe.jsonl").read_text().splitlines()[0])
    recipe = [str(ROOT / "vision" / "vlm_povid.yaml"), "--set", "model.name_or_path=zoo://vlm-tiny/base"]
    image = str(vlm_tiny / row["image"])
    assert main(["sample", *recipe, "--prompt", row["prompt"], "--image", image, "-n", "2", "--greedy"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0]["response"]  # greedy: the same text twice
    assert main(["sample", *recipe, "--prompt", row["prompt"]]) == 2
    assert "one --image per --prompt" in capsys.readouterr().err
    assert main(["sample", *recipe, "--prompt", row["prompt"], "--image", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and "image" in err
