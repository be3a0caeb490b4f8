"""Recipe names for the speech adapter: its policy, rewards, evaluator and report (called from mmalign.build)."""

from __future__ import annotations

from typing import Any

from mmalign.config import RecipeError
from mmalign.core.data import Row
from mmalign.zoo.registry import resolve

SPEECH_REWARDS = ("intelligibility", "tonality", "dnsmos")


def build_speech_policy(cfg: Any, lora: Any) -> Any:
    """`model.kind: diffusion_speech`: a mel TTS directory (zoo://speech/base or your own build)."""
    from mmalign.speech.diffusion_policy import DiffusionSpeechPolicy

    path = resolve(cfg.name_or_path)
    if not path:
        raise RecipeError("model.name_or_path is required")
    return DiffusionSpeechPolicy.from_pretrained(
        path,
        lora=lora,
        dtype=cfg.dtype,
        sampler=cfg.sampler,
        num_steps=cfg.num_steps,
        eta=cfg.eta,
        guidance_scale=cfg.guidance_scale,
    )


def _mel_of(spec: dict[str, Any], name: str):
    from mmalign.speech.audio import MelConfig

    if "model" not in spec:
        raise RecipeError(f"reward {name!r} needs `model:` (the TTS directory whose mel settings it decodes)")
    return MelConfig.load(resolve(spec.pop("model")))


def build_speech_reward(name: str, spec: dict[str, Any]) -> Any:
    """intelligibility {path: recogniser dir} · tonality {model: TTS dir} · dnsmos {model: TTS dir}."""
    if name == "intelligibility":
        from mmalign.speech.rewards import Intelligibility

        if "path" not in spec:
            raise RecipeError("reward 'intelligibility' needs `path:` (a recogniser directory)")
        return Intelligibility.from_pretrained(resolve(spec.pop("path")), **spec)
    if name == "tonality":
        from mmalign.speech.rewards import Tonality

        return Tonality(_mel_of(spec, name), **spec)
    from mmalign.speech.rewards import DNSMOS

    return DNSMOS(_mel_of(spec, name), **spec)


def speech_evaluation(
    policy: Any, eval_cfg: Any, eval_prompts: list[Row], train_prompts: list[Row], rewards: list[Any]
) -> tuple[Any, Any]:
    """Check every prompt against the text encoder's alphabet and read held-out speech, then the evaluator."""
    from mmalign.core.data import read_rows, validate_prompt_rows
    from mmalign.speech.evaluate import SpeechEvaluator
    from mmalign.speech.report import SpeechReport

    policy.check_prompts([*train_prompts, *eval_prompts])
    real = validate_prompt_rows(read_rows(resolve(eval_cfg.real_speech))) if eval_cfg.real_speech else []
    evaluator = None
    if eval_prompts:
        evaluator = SpeechEvaluator(
            eval_prompts,
            rewards,
            real_speech=real,
            seeds=eval_cfg.seeds,
            batch_size=eval_cfg.batch_size,
            grid_prompts=eval_cfg.n_samples,
            kl=eval_cfg.kl,
        )
        evaluator.prepare(policy)
    return evaluator, SpeechReport(policy.mel_config)
