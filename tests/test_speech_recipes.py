"""Every speech/ recipe builds through mmalign.run and trains on the seconds-fast speech-tiny world.

The recipes' zoo://speech paths are pointed at zoo://speech-tiny; sampling and evaluation budgets are cut. The
measured results on the full world are in speech/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.core.config import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "speech"


@pytest.fixture(scope="module")
def speech_tiny(mmalign_home):
    from filelock import FileLock

    from mmalign.zoo import registry

    with FileLock(str(mmalign_home) + ".speech.lock"):
        return registry.build("speech-tiny", log=lambda *_: None)


def _tiny(recipe: dict, tmp_path: Path, full_eval: bool = False) -> dict:
    """The recipe on speech-tiny with 2 sampler steps, 4 held-out prompts, 2 train steps (DNSMOS only if asked)."""
    recipe = json.loads(json.dumps(recipe).replace("zoo://speech/", "zoo://speech-tiny/"))
    prompts = tmp_path / "eval_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("seven!", "2.", "nine!", "0.")))
    recipe["model"]["num_steps"] = 2
    recipe["eval"].update(seeds=1, n_samples=2, prompts=str(prompts), kl=full_eval)
    if not full_eval:
        recipe["eval"]["rewards"] = [r for r in recipe["eval"]["rewards"] if r["name"] != "dnsmos"]
    recipe["train"].update(max_steps=2, batch_size=8)
    return recipe


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["dlpo_digits", "dlpo_no_diffusion_loss", "ddpo_digits", "diffusion_dpo_online", "diffusion_dpo_offline"],
)
def test_speech_recipe_trains_and_reports(speech_tiny, tmp_path, name):
    from mmalign.run import build_run
    from mmalign.train.trainer import Trainer

    full = name == "dlpo_digits"
    recipe = _tiny(load_recipe(RECIPES / f"{name}.yaml"), tmp_path, full_eval=full)
    policy, algorithm, train_cfg, evaluator, report = build_run(recipe)
    train_cfg.progress = False
    summary = Trainer(policy, algorithm, train_cfg, tmp_path, evaluator=evaluator, report=report).train()
    keys = [
        "intelligibility",
        "intelligibility_agreement",
        "tonality",
        "heldout_denoising_loss",
        "frechet_to_real",
    ]
    for key in keys + (["dnsmos_ovrl", "kl_to_base"] if full else []):
        assert key in summary["after"], key
    text = (tmp_path / "report.md").read_text()
    assert "samples_after_0.wav" in text and (tmp_path / "mels_before.png").exists()
    if name == "dlpo_digits":
        metrics = (tmp_path / "metrics.jsonl").read_text()
        assert "diffusion_loss" in metrics


def test_out_of_alphabet_prompt_fails_before_training(speech_tiny, tmp_path):
    from mmalign.core.data import DataError
    from mmalign.run import build_run

    (tmp_path / "prompts.jsonl").write_text('{"prompt": "seven"}\n{"prompt": "sept ÷ 2"}\n')
    recipe = _tiny(load_recipe(RECIPES / "ddpo_digits.yaml"), tmp_path)
    recipe["data"]["prompts"] = str(tmp_path / "prompts.jsonl")
    with pytest.raises(DataError, match=r"line 2, field 'prompt'.*'÷'"):
        build_run(recipe)
