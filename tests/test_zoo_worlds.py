"""What the tiny worlds hold besides their base models: the independent judges, the preference data the method ×
model matrix reads (validated with the model kinds' own validators), and recipes that report the judges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from mmalign import plugins
from mmalign.core.config import load_recipe
from mmalign.core.data import read_rows
from mmalign.core.registry import MODEL_KINDS
from mmalign.evaluation.classifier import ColumnConvClassifier, ConvClassifier, digit_of, load_classifier
from mmalign.zoo import registry

plugins.load()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build(mmalign_home):
    def build(name: str) -> Path:
        with FileLock(str(mmalign_home) + ".lock"):
            return registry.build(name, log=lambda *_: None)

    return build


def _validate(kind: str, data_kind: str, path: Path) -> list:
    return MODEL_KINDS[kind].validators[data_kind](read_rows(path))


# ------------------------------------------------------------------------------------------------ image


def test_image_world_holds_a_judge_of_another_architecture_with_its_report(build):
    world = build("image-tiny")
    judge, classifier = load_classifier(world / "judge"), load_classifier(world / "classifier")
    assert type(judge) is ColumnConvClassifier and type(classifier) is ConvClassifier
    report = json.loads((world / "world.json").read_text())["judge"]
    assert report["architecture"] == "column_conv" and report["seed"] != 0
    assert (
        report["n_train_images"] + report["n_test_images"]
        == json.loads((world / "world.json").read_text())["n_held_out_images"]
    )
    for split in ("eval_prompts", "train_prompts"):
        assert 0 <= report["base_agreement"][split]["agrees_with_classifier"] <= 1


def test_image_tiny_real_pairs_validate_and_prefer_the_prompted_digit(build):
    world = build("image-tiny")
    rows = _validate("diffusion_image", "pairs", world / "train_pairs.jsonl")
    assert len(rows) == 8 and _validate("image_reward_model", "pairs", world / "train_pairs.jsonl")
    from PIL import Image

    for row in rows:
        digit_of(row.data["prompt"])  # one digit per prompt
        w, lose = (Image.open(world / row.data[f]) for f in ("image_w", "image_l"))
        assert w.size == lose.size == (16, 16) and w.tobytes() != lose.tobytes()


def test_flow_world_loads_the_image_worlds_judge_with_its_own_class(build):
    flow = build("image-flow-tiny")
    world = json.loads((flow / "world.json").read_text())
    assert type(load_classifier(flow / "judge")) is ColumnConvClassifier
    assert world["judge"] == "judge" and world["judge_agreement"]["eval_prompts"]["n"] > 0


def test_vision_diffusion_recipes_report_the_judge_they_never_train_on(build, tmp_path):
    from mmalign.run import build_run, plan

    build("image-tiny")
    for name in (
        "ddpo_digits",
        "dpok_digits",
        "ddpo_compressibility",
        "diffusion_dpo_online",
        "diffusion_dpo_offline",
    ):
        text = json.dumps(load_recipe(str(ROOT / "vision" / f"{name}.yaml"), []))
        recipe = json.loads(
            text.replace("zoo://image-pairs/", "zoo://image-tiny/").replace(
                "zoo://image/", "zoo://image-tiny/"
            )
        )
        checked = plan(recipe)
        assert any(where == "eval.judges[0]" for where, _ in checked.reward_specs), name
    recipe["eval"].update(seeds=1, batch_size=64)
    recipe["model"]["num_steps"] = 2
    run = build_run(recipe)
    metrics = run.evaluator.evaluate(run.policy)
    assert {"digit_judge", "digit_judge_agreement_gain", "digit_judge_hacking_gap"} <= metrics.keys()
    assert metrics["digit_judge_hacking_gap"] == 0  # the untrained policy is its own base


# ----------------------------------------------------------------------------------------------- speech


def test_speech_world_holds_a_judge_trained_on_other_voices(build):
    world = build("speech-tiny")
    assert type(load_classifier(world / "judge")) is ColumnConvClassifier
    info = json.loads((world / "world.json").read_text())
    report = info["judge"]
    assert not set(report["variants"]) & (set(info["train_variants"]) | set(info["heldout_variants"]))
    assert 0 <= report["accuracy_heldout_voices"] <= 1
    assert report["base_accuracy"]["eval_prompts"]["n"] == info["base_accuracy"]["eval_prompts"]["n"]


def test_speech_pairs_are_scored_as_a_run_reads_their_wavs(build):
    from mmalign.speech.diffusion_policy import DiffusionSpeechPolicy

    world = build("speech-tiny")
    policy = DiffusionSpeechPolicy.from_pretrained(str(world / "base"), num_steps=2)
    recogniser = load_classifier(world / "recogniser")
    for split in ("train", "eval"):
        rows = _validate("diffusion_speech", "pairs", world / f"{split}_pairs.jsonl")
        assert rows and all(r.data["score_chosen"] >= r.data["score_rejected"] for r in rows)
    for row in rows[:3]:
        encoded = policy.encode_pair(row)  # what offline Diffusion-DPO trains on
        digit = torch.tensor([digit_of(row.data["prompt"])] * 2)
        mels = torch.stack([encoded["latents_w"], encoded["latents_l"]])
        scores = recogniser.log_prob(mels, digit).exp()
        assert scores.tolist() == pytest.approx(
            [row.data["score_chosen"], row.data["score_rejected"]], abs=1e-4
        )
    kept = {r.data[f] for r in rows for f in ("audio_w", "audio_l")}
    assert {p.name for p in (world / "pairs").glob("eval_*")} == {Path(k).name for k in kept}


# ------------------------------------------------------------------------------------------ vision-language


def test_vlm_world_writes_the_sequence_methods_data(build):
    world = build("vlm-tiny")
    describe = _validate("vlm", "prompts", world / "train_describe.jsonl")
    sft = _validate("vlm", "completions", world / "train_sft.jsonl")
    unpaired = _validate("vlm", "unpaired", world / "train_unpaired.jsonl")
    eval_keys = set(read_rows(world / "eval_describe.jsonl")[0].data)
    assert all(set(r.data) == eval_keys for r in describe)
    from mmalign.vision import vlm_digits as D

    truth = {r.data["image"]: D.describe({k: r.data[k] for k in D.FIELDS}) for r in describe}
    assert [r.data["completion"] for r in sft] == [truth[r.data["image"]] for r in sft]
    assert {r.data["image"] for r in describe}.isdisjoint(
        r.data["image"] for r in read_rows(world / "eval_describe.jsonl")
    )
    good = [r.data for r in unpaired if r.data["label"]]
    bad = [r.data for r in unpaired if not r.data["label"]]
    assert len(good) == len(bad) == len(describe)
    assert all(r["completion"] == truth[r["image"]] for r in good)
    assert all(r["completion"] != truth[r["image"]] for r in bad)
