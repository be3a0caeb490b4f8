"""Registrations of the vision adapter: Stable Diffusion, vision-language and image-reward model kinds, and the
image rewards. Builders import their heavy modules lazily, so text users never import diffusers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmalign.core.config import RecipeError, to_dataclass
from mmalign.core.data import validate_image_pair_rows, validate_prompt_rows, validate_unpaired_rows
from mmalign.core.diffusion_policy import DiffusionModelConfig
from mmalign.core.paths import resolve
from mmalign.core.registry import ModelKind, RewardSpec, register_model_kind, register_reward
from mmalign.vision.flux_policy import FluxModelConfig
from mmalign.vision.sd3_policy import SD3ModelConfig
from mmalign.vision.sdxl_policy import SDXLModelConfig


@dataclass
class VLMModelConfig:
    """`model:` for kind vlm: a LLaVA-style model (hub id, local dir or zoo path) and how it reads images."""

    kind: str = "vlm"
    name_or_path: str = ""
    lora: dict[str, Any] | None = None  # peft LoRA settings; null = full fine-tuning with a frozen copy
    dtype: str = "float32"
    max_length: int = 512
    max_new_tokens: int = 64
    temperature: float = 1.0
    trust_remote_code: bool = False
    prompt_template: str = "{image}{prompt}"  # e.g. "USER: {image}\n{prompt} ASSISTANT:" for LLaVA-1.5
    image_size: int | None = None  # set to reject images of any other size instead of resizing them


@dataclass
class ImageRewardModelConfig:
    """`model:` for kind image_reward_model: a saved scorer to start from, or the shape of a fresh one."""

    kind: str = "image_reward_model"
    name_or_path: str = ""  # a saved image reward model directory; empty = a fresh network (`network`)
    network: dict[str, Any] | None = None  # ImageScorerConfig: image_size, channels, hidden, prompt_buckets


def _path(cfg: Any) -> str:
    path = resolve(cfg.name_or_path)
    if not path:
        raise RecipeError("model.name_or_path is required")
    return path


# ------------------------------------------------------------------------------------ Stable Diffusion
def build_stable_diffusion(cfg: DiffusionModelConfig, lora: Any) -> Any:
    from mmalign.vision.diffusion_policy import DiffusionImagePolicy

    return DiffusionImagePolicy.from_pretrained(
        _path(cfg),
        lora=lora,
        dtype=cfg.dtype,
        sampler=cfg.sampler,
        num_steps=cfg.num_steps,
        eta=cfg.eta,
        guidance_scale=cfg.guidance_scale,
    )


def diffusion_evaluation(context: Any) -> tuple[Any, Any]:
    """Rewards, win rate and path KL over held-out prompts × seeds; before/after image grids."""
    from mmalign.evaluation.diffusion import DiffusionEvaluator
    from mmalign.vision.report import ImageSamples

    cfg = context.config
    if not context.prompts:
        return None, ImageSamples()
    evaluator = DiffusionEvaluator(
        context.prompts,
        context.rewards,
        seeds=cfg.seeds,
        batch_size=cfg.batch_size,
        grid_prompts=cfg.n_samples,
        kl=cfg.kl,
    )
    return evaluator, ImageSamples()


def _tiny_image() -> dict[str, Any]:
    w = "zoo://image-tiny"
    classifier = {"name": "digit_classifier", "path": f"{w}/classifier"}
    return {
        "model": {
            "kind": "diffusion_image",
            "name_or_path": f"{w}/base",
            "num_steps": 2,
            "guidance_scale": 3.0,
        },
        "data": {"prompts": f"{w}/train_prompts.jsonl", "pairs": f"{w}/train_pairs.jsonl"},
        "eval": {"prompts": f"{w}/eval_prompts.jsonl", "rewards": [classifier], "seeds": 1, "n_samples": 2},
        "reward": classifier,
    }


register_model_kind(
    ModelKind(
        name="diffusion_image",
        policy_kind="diffusion",
        config=DiffusionModelConfig,
        build=build_stable_diffusion,
        evaluation=diffusion_evaluation,
        validators={"prompts": validate_prompt_rows, "pairs": validate_image_pair_rows},
        capabilities=frozenset({"image_pairs", "differentiable_decode"}),
        outputs="image",
        description="Stable Diffusion 1.x/2.x layout (UNet + CLIP text encoder + VAE); LoRA in diffusers format",
        tiny=_tiny_image,
    )
)


# ------------------------------------------------------------- SDXL, and the flow-matching models SD3 and FLUX
def build_sdxl(cfg: Any, lora: Any) -> Any:
    from mmalign.vision.sdxl_policy import SDXLPolicy

    return SDXLPolicy.from_pretrained(
        _path(cfg),
        lora=lora,
        dtype=cfg.dtype,
        sampler=cfg.sampler,
        num_steps=cfg.num_steps,
        eta=cfg.eta,
        guidance_scale=cfg.guidance_scale,
    )


def build_sd3(cfg: Any, lora: Any) -> Any:
    from mmalign.vision.sd3_policy import SD3Policy

    return SD3Policy.from_pretrained(
        _path(cfg), lora=lora, dtype=cfg.dtype, text_encoder_3=cfg.text_encoder_3, **cfg.policy_kwargs()
    )


def build_flux(cfg: Any, lora: Any) -> Any:
    from mmalign.vision.flux_policy import FluxPolicy

    return FluxPolicy.from_pretrained(_path(cfg), lora=lora, dtype=cfg.dtype, **cfg.policy_kwargs())


def flow_evaluation(context: Any) -> tuple[Any, Any]:
    """The diffusion evaluation, sampled with the flow policy's `eval_sampler` (the pipeline's ODE by default);
    the path KL to the base needs stochastic steps, so it is reported only when evaluation samples with the SDE."""
    from mmalign.evaluation.diffusion import DiffusionEvaluator
    from mmalign.vision.flow_image_policy import EvalSamplerEvaluation
    from mmalign.vision.report import ImageSamples

    cfg, policy = context.config, context.policy
    if not context.prompts:
        return None, ImageSamples()
    stochastic = any(policy.eval_sampler.is_stochastic(i) for i in range(policy.eval_sampler.num_steps))
    evaluator = DiffusionEvaluator(
        context.prompts,
        context.rewards,
        seeds=cfg.seeds,
        batch_size=cfg.batch_size,
        grid_prompts=cfg.n_samples,
        kl=cfg.kl and stochastic,
    )
    return EvalSamplerEvaluation(evaluator), ImageSamples()


def _tiny_flow() -> dict[str, Any]:
    w = "zoo://image-flow-tiny"
    classifier = {"name": "digit_classifier", "path": f"{w}/classifier"}
    return {
        "model": {
            "kind": "diffusion_sd3",
            "name_or_path": f"{w}/base",
            "num_steps": 2,
            "guidance_scale": 3.0,
            "max_sequence_length": 0,
        },
        "data": {"prompts": f"{w}/train_prompts.jsonl"},
        "eval": {"prompts": f"{w}/eval_prompts.jsonl", "rewards": [classifier], "seeds": 1, "n_samples": 2},
        "reward": classifier,
    }


_IMAGE_VALIDATORS = {"prompts": validate_prompt_rows, "pairs": validate_image_pair_rows}
_IMAGE_CAPABILITIES = frozenset({"image_pairs", "differentiable_decode"})


register_model_kind(
    ModelKind(
        name="diffusion_sdxl",
        policy_kind="diffusion",
        config=SDXLModelConfig,
        build=build_sdxl,
        evaluation=diffusion_evaluation,
        validators=_IMAGE_VALIDATORS,
        capabilities=_IMAGE_CAPABILITIES,
        outputs="image",
        description="Stable Diffusion XL (UNet + two CLIP encoders, pooled embeddings and time ids); DDIM/DDPM",
    )
)
register_model_kind(
    ModelKind(
        name="diffusion_sd3",
        policy_kind="diffusion",
        config=SD3ModelConfig,
        build=build_sd3,
        evaluation=flow_evaluation,
        validators=_IMAGE_VALIDATORS,
        capabilities=_IMAGE_CAPABILITIES,
        outputs="image",
        description="Stable Diffusion 3/3.5 (MM-DiT flow matching; ODE or Flow-GRPO/DanceGRPO SDE sampling)",
        tiny=_tiny_flow,
    )
)
register_model_kind(
    ModelKind(
        name="diffusion_flux",
        policy_kind="diffusion",
        config=FluxModelConfig,
        build=build_flux,
        evaluation=flow_evaluation,
        validators=_IMAGE_VALIDATORS,
        capabilities=_IMAGE_CAPABILITIES,
        outputs="image",
        description="FLUX.1 (packed-latent MM-DiT flow matching, guidance embedding; ODE or SDE sampling)",
    )
)


# ------------------------------------------------------------------------------- vision-language models
def build_vlm(cfg: VLMModelConfig, lora: Any) -> Any:
    from mmalign.vision.vlm_policy import VisionLanguagePolicy

    return VisionLanguagePolicy.from_pretrained(
        _path(cfg),
        lora=lora,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        max_length=cfg.max_length,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        prompt_template=cfg.prompt_template,
        image_size=cfg.image_size,
    )


def vlm_evaluation(context: Any) -> tuple[Any, Any]:
    """Hallucination metrics on held-out images (eval.prompts = describe rows, eval.probes = yes/no rows)."""
    from mmalign.core.data import read_rows
    from mmalign.evaluation.samples import TextSamples
    from mmalign.vision.hallucination import HallucinationEvaluator

    probes = read_rows(resolve(context.config.probes)) if context.config.probes else []
    if not context.prompts and not probes:
        return None, TextSamples()
    evaluator = HallucinationEvaluator(
        context.prompts, probes, batch_size=context.config.batch_size, n_samples=context.config.n_samples
    )
    return evaluator, TextSamples()


def _vlm_pairs(rows: list[Any]) -> list[Any]:
    from mmalign.vision.vlm_data import validate_vlm_preference_rows

    return validate_vlm_preference_rows(rows, noisy=True)


def _vlm_corrections(rows: list[Any]) -> list[Any]:
    from mmalign.vision.vlm_data import validate_correction_rows

    return validate_correction_rows(rows)


def _vlm_rows(validate: Any) -> Any:
    """A text-row validator plus the image field every VLM row needs."""

    def check(rows: list[Any]) -> list[Any]:
        from mmalign.vision.vlm_data import require_image_field

        for row in rows:
            require_image_field(row)
        return validate(rows)

    return check


def _tiny_vlm() -> dict[str, Any]:
    w = "zoo://vlm-tiny"
    return {
        "model": {
            "kind": "vlm",
            "name_or_path": f"{w}/base",
            "lora": {"r": 4, "alpha": 8},
            "max_new_tokens": 12,
        },
        "data": {
            "pairs": f"{w}/train_povid.jsonl",
            "corrections": f"{w}/train_rlhfv.jsonl",
            "unpaired": f"{w}/train_unpaired.jsonl",
            "completions": f"{w}/train_sft.jsonl",
            "prompts": f"{w}/train_describe.jsonl",
        },
        "eval": {"prompts": f"{w}/eval_describe.jsonl", "probes": f"{w}/eval_probes.jsonl", "n_samples": 2},
        "reward": "vlm_statements",
    }


register_model_kind(
    ModelKind(
        name="vlm",
        policy_kind="sequence",
        config=VLMModelConfig,
        build=build_vlm,
        evaluation=vlm_evaluation,
        validators={
            "pairs": _vlm_pairs,
            "corrections": _vlm_corrections,
            "unpaired": _vlm_rows(validate_unpaired_rows),
            "completions": _vlm_rows(validate_prompt_rows),
            "prompts": _vlm_rows(validate_prompt_rows),
        },
        capabilities=frozenset({"token_entropies", "token_lengths", "log_probabilities", "image_inputs"}),
        description="LLaVA-style vision-language model (any AutoModelForImageTextToText + processor)",
        tiny=_tiny_vlm,
    )
)


# -------------------------------------------------------------------------------- image reward models
def build_image_reward_model(cfg: ImageRewardModelConfig, lora: Any) -> Any:
    from mmalign.vision.image_reward_model import ImageRewardModel, ImageScorerConfig

    if lora is not None:
        raise RecipeError("model.lora is not supported for kind image_reward_model")
    if cfg.name_or_path:
        if cfg.network is not None:
            raise RecipeError(
                "model.network describes a fresh network; drop it when model.name_or_path is set"
            )
        return ImageRewardModel.from_pretrained(resolve(cfg.name_or_path))
    return ImageRewardModel.create(to_dataclass(ImageScorerConfig, cfg.network, "model.network"))


def image_reward_model_evaluation(context: Any) -> tuple[Any, Any]:
    from mmalign.evaluation.sequence import PairwiseAccuracy

    evaluator = PairwiseAccuracy(context.pairs, context.config.batch_size) if context.pairs else None
    return evaluator, None


register_model_kind(
    ModelKind(
        name="image_reward_model",
        policy_kind="scorer",
        config=ImageRewardModelConfig,
        build=build_image_reward_model,
        evaluation=image_reward_model_evaluation,
        validators={"pairs": validate_image_pair_rows},
        outputs="image",
        description="a small prompt-conditioned CNN trained as a Bradley–Terry image reward model",
        tiny=lambda: {
            "model": {"kind": "image_reward_model", "network": {"image_size": 16}},
            "data": {"pairs": "zoo://image-tiny/train_pairs.jsonl"},
            "eval": {"pairs": "zoo://image-tiny/train_pairs.jsonl"},
        },
    )
)


# ---------------------------------------------------------------------------------------------- rewards
def _classifier_reward(options: dict[str, Any], context: Any) -> Any:
    from mmalign.vision.rewards import DigitAgreement

    if "path" not in options:
        raise RecipeError("reward 'digit_classifier' needs `path:` (a classifier directory)")
    return DigitAgreement.from_pretrained(resolve(options.pop("path")), **options)


def _jpeg(larger: bool) -> Any:
    def build(options: dict[str, Any], context: Any) -> Any:
        from mmalign.vision import rewards

        if options:
            raise RecipeError(f"jpeg rewards take no options, got {sorted(options)}")
        return rewards.JpegIncompressibility() if larger else rewards.JpegCompressibility()

    return build


def _clip(kind: str) -> Any:
    def build(options: dict[str, Any], context: Any) -> Any:
        from mmalign.vision import clip_rewards

        for key in ("model", "pretrained", "head"):
            if options.get(key):
                options[key] = resolve(options[key])
        cls = clip_rewards.CLIPScore if kind == "clip_score" else clip_rewards.AestheticScore
        return cls.from_pretrained(**options)

    return build


def _image_reward_model(options: dict[str, Any], context: Any) -> Any:
    from mmalign.vision.image_reward_model import ImageRewardModel

    if "path" not in options:
        raise RecipeError("reward 'image_reward_model' needs `path:` (a trained image reward model)")
    return ImageRewardModel.from_pretrained(resolve(options.pop("path")), trainable=False, **options)


def _vlm_statements(options: dict[str, Any], context: Any) -> Any:
    from mmalign.vision.hallucination import StatementReward

    return StatementReward(**options)


register_reward(
    RewardSpec("digit_classifier", _classifier_reward, "image", True, "p(prompted digit | image)")
)
register_reward(RewardSpec("jpeg_compressibility", _jpeg(False), "image", False, "−JPEG size in kB (DDPO)"))
register_reward(RewardSpec("jpeg_incompressibility", _jpeg(True), "image", False, "+JPEG size in kB (DDPO)"))
register_reward(
    RewardSpec("clip_score", _clip("clip_score"), "image", True, "open_clip image–prompt similarity")
)
register_reward(RewardSpec("aesthetic", _clip("aesthetic"), "image", True, "LAION aesthetic head on CLIP"))
register_reward(
    RewardSpec(
        "image_reward_model", _image_reward_model, "image", True, "a trained Bradley–Terry image scorer"
    )
)
register_reward(
    RewardSpec(
        "vlm_statements",
        _vlm_statements,
        "text",
        False,
        "share of a description's statements that are true of its image (the digits VLM world's ground truth)",
    )
)
