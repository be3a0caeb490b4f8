"""Registrations of the speech adapter: the mel TTS and AudioLDM 2 model kinds and the speech rewards."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mmalign.core.config import RecipeError
from mmalign.core.data import Row, require_text, validate_prompt_rows
from mmalign.core.diffusion_policy import DiffusionModelConfig
from mmalign.core.errors import ModelError
from mmalign.core.model_files import check_pipeline_dir, check_transformers_dir, local_model_dir
from mmalign.core.paths import resolve
from mmalign.core.registry import ModelKind, RewardSpec, register_model_kind, register_reward
from mmalign.evaluation.classifier import judge_builder


@dataclass
class AudioLDM2ModelConfig(DiffusionModelConfig):
    """`model:` for kind diffusion_audioldm2: an AudioLDM 2 speech pipeline (hub id or directory), its sampler."""

    kind: str = "diffusion_audioldm2"
    num_steps: int = 50
    guidance_scale: float = 3.5
    # the CLAP prompt: how it sounds (prompt rows are the transcriptions, what is said)
    description: str = "A person is speaking."
    audio_length_in_s: float | None = None  # null = the pipeline's default
    max_new_tokens: int | None = None  # GPT-2 prior length; null = the language model config's


def _path(cfg: Any) -> str:
    path = resolve(cfg.name_or_path)
    if not path:
        raise RecipeError("model.name_or_path is required")
    return path


def _audio_fields(*fields: str) -> Any:
    """Prompt rows whose `fields` name audio files (read and checked when the policy encodes them)."""

    def check(rows: list[Row]) -> list[Row]:
        validate_prompt_rows(rows)
        for row in rows:
            for field in fields:
                value = require_text(row, field, response=True)
                if not isinstance(value, str):
                    raise row.error(field, "expected an audio file path")
        return rows

    return check


def mel_tts_preflight(cfg: DiffusionModelConfig, rows: Mapping[str, list[Row]]) -> None:
    """The mel TTS directory's files (marker, alphabet, mel settings, UNet, text encoder, scheduler, weights), then
    every prompt against the text encoder's alphabet and length, before any weights load."""
    from mmalign.speech.text import AlphabetError, CharEncoder
    from mmalign.speech.tts import MARKER

    path = _path(cfg)
    directory = local_model_dir(path, "model.name_or_path")
    if directory is None:
        raise RecipeError(f"model.name_or_path {path!r}: a mel TTS model is a local directory")
    for name in (MARKER, "alphabet.json", "mel.json", "scheduler/scheduler_config.json"):
        if not (directory / name).exists():
            raise ModelError(
                f"model.name_or_path {path!r} is not a mel TTS model directory (no {name}); build one with "
                "`mmalign zoo build speech`"
            )
    for component in ("unet", "text_encoder"):
        check_transformers_dir(directory / component, f"model.name_or_path ({component})", tokenizer=False)
    chars = CharEncoder.load(directory)
    for kind in ("prompts", "pairs", "targets"):
        for row in rows.get(kind, []):
            try:
                chars.check(row.data.get("prompt"))
            except AlphabetError as err:
                raise row.error("prompt", str(err)) from None


def audioldm2_preflight(cfg: AudioLDM2ModelConfig, rows: Mapping[str, list[Row]]) -> None:
    """The pipeline's layout, component classes and weight files (a hub id is checked by its loader)."""
    directory = local_model_dir(_path(cfg), "model.name_or_path")
    if directory is not None:
        check_pipeline_dir(directory, "model.name_or_path")


def build_mel_tts(cfg: DiffusionModelConfig, lora: Any) -> Any:
    from mmalign.speech.diffusion_policy import DiffusionSpeechPolicy

    return DiffusionSpeechPolicy.from_pretrained(
        _path(cfg),
        lora=lora,
        dtype=cfg.dtype,
        sampler=cfg.sampler,
        num_steps=cfg.num_steps,
        eta=cfg.eta,
        guidance_scale=cfg.guidance_scale,
    )


def mel_evaluation(context: Any) -> tuple[Any, Any]:
    """Check every prompt against the text encoder's alphabet and read held-out speech, then the evaluator."""
    from mmalign.core.data import read_rows
    from mmalign.speech.evaluate import SpeechEvaluator
    from mmalign.speech.report import SpeechSamples

    policy, cfg = context.policy, context.config
    policy.check_prompts([*context.train_prompts, *context.prompts])
    real = validate_prompt_rows(read_rows(resolve(cfg.real_speech))) if cfg.real_speech else []
    evaluator = None
    if context.prompts:
        evaluator = SpeechEvaluator(
            context.prompts,
            context.rewards,
            judges=context.judges,
            trained_on=getattr(context.algorithm_reward, "name", None),
            real_speech=real,
            seeds=cfg.seeds,
            batch_size=cfg.batch_size,
            grid_prompts=cfg.n_samples,
            kl=cfg.kl,
        )
        evaluator.prepare(policy)
    return evaluator, SpeechSamples(policy.mel_config, context.rewards)


def _tiny_speech() -> dict[str, Any]:
    w = "zoo://speech-tiny"
    recogniser = {"name": "intelligibility", "path": f"{w}/recogniser"}
    return {
        "model": {
            "kind": "diffusion_speech",
            "name_or_path": f"{w}/base",
            "num_steps": 2,
            "guidance_scale": 3.0,
        },
        "data": {
            "prompts": f"{w}/train_prompts.jsonl",
            "pairs": f"{w}/train_pairs.jsonl",
            "targets": f"{w}/train_speech.jsonl",
        },
        "eval": {
            "prompts": f"{w}/eval_prompts.jsonl",
            "rewards": [recogniser],
            "judges": [{"name": "speech_judge", "path": f"{w}/judge"}],
            "seeds": 1,
            "n_samples": 2,
        },
        "reward": recogniser,
    }


register_model_kind(
    ModelKind(
        name="diffusion_speech",
        policy_kind="diffusion",
        config=DiffusionModelConfig,
        build=build_mel_tts,
        evaluation=mel_evaluation,
        validators={
            "prompts": validate_prompt_rows,
            "pairs": _audio_fields("audio_w", "audio_l"),
            "targets": _audio_fields("audio"),
        },
        capabilities=frozenset({"audio_pairs", "real_targets", "differentiable_decode", "forward_timesteps"}),
        outputs="mel",
        description="mel-spectrogram TTS diffusion (character encoder + mel UNet + Griffin-Lim vocoder)",
        tiny=_tiny_speech,
        preflight=mel_tts_preflight,
    )
)


def build_audioldm2(cfg: AudioLDM2ModelConfig, lora: Any) -> Any:
    from mmalign.speech.audioldm2_policy import AudioLDM2SpeechPolicy

    return AudioLDM2SpeechPolicy.from_pretrained(
        _path(cfg),
        dtype=cfg.dtype,
        lora=lora,
        sampler=cfg.sampler,
        num_steps=cfg.num_steps,
        eta=cfg.eta,
        guidance_scale=cfg.guidance_scale,
        description=cfg.description,
        audio_length_in_s=cfg.audio_length_in_s,
        max_new_tokens=cfg.max_new_tokens,
    )


def waveform_evaluation(context: Any) -> tuple[Any, Any]:
    """Check transcriptions and reward sample rates, then the evaluator (rewards, win rate vs base, path KL)."""
    from mmalign.speech.evaluate import WaveformEvaluator
    from mmalign.speech.report import WaveformSamples

    policy, cfg = context.policy, context.config
    policy.check_prompts([*context.train_prompts, *context.prompts])
    for reward in [*context.rewards, *context.judges, context.algorithm_reward]:
        rate = getattr(reward, "sample_rate", None)
        if rate is not None and rate != policy.sample_rate:
            raise RecipeError(
                f"reward {reward.name!r} is set to {rate} Hz but the model's vocoder outputs {policy.sample_rate} Hz"
            )
    evaluator = None
    if context.prompts:
        evaluator = WaveformEvaluator(
            context.prompts,
            context.rewards,
            judges=context.judges,
            trained_on=getattr(context.algorithm_reward, "name", None),
            seeds=cfg.seeds,
            batch_size=cfg.batch_size,
            grid_prompts=cfg.n_samples,
            kl=cfg.kl,
        )
    return evaluator, WaveformSamples(policy.sample_rate)


def _tiny_audioldm2() -> dict[str, Any]:
    w = "zoo://pipelines-tiny"
    dnsmos = {"name": "dnsmos_waveform", "sample_rate": 16000}
    return {
        "model": {
            "kind": "diffusion_audioldm2",
            "name_or_path": f"{w}/audioldm2",
            "num_steps": 2,
            "guidance_scale": 3.0,
            "audio_length_in_s": 0.01,
            "max_new_tokens": 4,
        },
        "data": {"prompts": f"{w}/train_spoken_prompts.jsonl"},
        "eval": {
            "prompts": f"{w}/eval_spoken_prompts.jsonl",
            "rewards": [dnsmos],
            "seeds": 1,
            "n_samples": 1,
        },
        "reward": dnsmos,
    }


register_model_kind(
    ModelKind(
        name="diffusion_audioldm2",
        policy_kind="diffusion",
        config=AudioLDM2ModelConfig,
        build=build_audioldm2,
        evaluation=waveform_evaluation,
        validators={"prompts": validate_prompt_rows},
        capabilities=frozenset({"differentiable_decode", "gradient_checkpointing", "forward_timesteps"}),
        outputs="waveform",
        description="AudioLDM 2 speech checkpoints (VITS text encoder, GPT-2 prior, HiFi-GAN); for GPU users",
        tiny=_tiny_audioldm2,
        preflight=audioldm2_preflight,
    )
)


# ---------------------------------------------------------------------------------------------- rewards
def _digit_prompts(rows: list[Row]) -> None:
    from mmalign.evaluation.classifier import require_digit_prompts

    require_digit_prompts(rows)


def _mel_config(options: dict[str, Any], name: str) -> Any:
    from mmalign.speech.audio import MelConfig

    if "model" not in options:
        raise RecipeError(f"reward {name!r} needs `model:` (the TTS directory whose mel settings it decodes)")
    return MelConfig.load(resolve(options.pop("model")))


def _intelligibility(options: dict[str, Any], context: Any) -> Any:
    from mmalign.speech.rewards import Intelligibility

    if "path" not in options:
        raise RecipeError("reward 'intelligibility' needs `path:` (a recogniser directory)")
    return Intelligibility.from_pretrained(resolve(options.pop("path")), **options)


def _tonality(options: dict[str, Any], context: Any) -> Any:
    from mmalign.speech.rewards import Tonality

    return Tonality(_mel_config(options, "tonality"), **options)


def _dnsmos(options: dict[str, Any], context: Any) -> Any:
    from mmalign.speech.rewards import DNSMOS

    return DNSMOS(_mel_config(options, "dnsmos"), **options)


def _dnsmos_waveform(options: dict[str, Any], context: Any) -> Any:
    from mmalign.speech.audioldm2_policy import WaveformDNSMOS

    return WaveformDNSMOS(**options)


register_reward(
    RewardSpec(
        "intelligibility",
        _intelligibility,
        "mel",
        True,
        "p(prompted digit | mel) under a recogniser",
        check_rows=_digit_prompts,
    )
)
register_reward(
    RewardSpec(
        "speech_judge",
        judge_builder("speech_judge", "zoo://speech/judge"),
        "mel",
        True,
        "p(prompted digit | mel) under an independent recogniser (another architecture, seed and voices; eval.judges)",
    )
)
register_reward(RewardSpec("tonality", _tonality, "mel", True, "1 − spectral flatness of voiced frames"))
register_reward(RewardSpec("dnsmos", _dnsmos, "mel", False, "DNSMOS P.835 overall MOS of the vocoded mel"))
register_reward(
    RewardSpec(
        "dnsmos_waveform", _dnsmos_waveform, "waveform", False, "DNSMOS P.835 overall MOS of waveforms"
    )
)
