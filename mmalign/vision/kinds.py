"""Registrations of the vision adapter: Stable Diffusion, vision-language and image-reward model kinds, and the
image rewards. Builders import their heavy modules lazily, so text users never import diffusers."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.core.config import RecipeError, check_dtype, to_dataclass
from mmalign.core.data import Row, validate_image_pair_rows, validate_prompt_rows
from mmalign.core.diffusion_policy import DiffusionModelConfig
from mmalign.core.model_files import check_pipeline_dir, check_transformers_dir, local_model_dir
from mmalign.core.paths import resolve
from mmalign.core.registry import ModelKind, RewardSpec, register_model_kind, register_reward
from mmalign.core.tokenizer_checks import check_prompt_length, check_vocabulary, load_tokenizer, text_items
from mmalign.evaluation.classifier import judge_builder
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

    def __post_init__(self) -> None:
        if self.max_length < 1 or self.max_new_tokens < 1:
            raise ValueError("model.max_length and model.max_new_tokens must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {self.temperature}")
        check_dtype(self.dtype)


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
def stable_diffusion_preflight(cfg: DiffusionModelConfig, rows: Mapping[str, list[Row]]) -> None:
    """Pipeline layout (components, classes, weight files), then every prompt against the text encoder's tokenizer:
    in its vocabulary and no longer than the encoder reads (the pipeline would cut it without a word)."""
    from mmalign.vision.images import check_image_header

    path = _path(cfg)
    directory = local_model_dir(path, "model.name_or_path")
    size = None
    if directory is not None:
        check_pipeline_dir(directory, "model.name_or_path")
        size = _image_size(directory)
    tokenizer = load_tokenizer(path, "model.name_or_path", subfolder="tokenizer")
    prompts = [(row, "prompt") for kind in ("prompts", "pairs") for row in rows.get(kind, [])]
    prompts = [(row, f) for row, f in prompts if isinstance(row.data.get(f), str)]
    check_vocabulary(tokenizer, prompts, "the text encoder's tokenizer")
    check_prompt_length(tokenizer, prompts, tokenizer.model_max_length, "the text encoder")
    for row in rows.get("pairs", []):  # headers only: nothing is decoded until the model encodes the pair
        base = Path(row.source).parent if row.source and not row.source.startswith("<") else Path(".")
        for field in ("image_w", "image_l"):
            check_image_header(row, field, base, size)


def _image_size(directory: Path) -> int | None:
    """The image side a local Stable Diffusion pipeline works at (UNet sample size × VAE scale), from its configs."""
    try:
        unet = json.loads((directory / "unet" / "config.json").read_text())
        vae = json.loads((directory / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _ddpm_family(policy_class: Any, cfg: DiffusionModelConfig, lora: Any) -> Any:
    """A UNet pipeline policy with the DDPM-family sampler settings of `cfg` (SD 1.x/2.x and SDXL)."""
    return policy_class.from_pretrained(
        _path(cfg),
        lora=lora,
        dtype=cfg.dtype,
        sampler=cfg.sampler,
        num_steps=cfg.num_steps,
        eta=cfg.eta,
        guidance_scale=cfg.guidance_scale,
    )


def build_stable_diffusion(cfg: DiffusionModelConfig, lora: Any) -> Any:
    from mmalign.vision.diffusion_policy import DiffusionImagePolicy

    return _ddpm_family(DiffusionImagePolicy, cfg, lora)


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
        judges=context.judges,
        trained_on=getattr(context.algorithm_reward, "name", None),
        seeds=cfg.seeds,
        batch_size=cfg.batch_size,
        grid_prompts=cfg.n_samples,
        kl=cfg.kl,
        grid_seeds=min(cfg.seeds, 3),
    )
    return evaluator, ImageSamples(context.rewards)


def validate_image_target_rows(rows: list[Any]) -> list[Any]:
    """Real images of prompts (`data.targets` of a loss on real data): a plain-string prompt and an `image`."""
    from mmalign.core.data import require_image, require_text

    for row in rows:
        if not isinstance(require_text(row, "prompt"), str):
            raise row.error("prompt", "image targets need a plain-string prompt, got a conversation")
        require_image(row, "image")
    return rows


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
        "eval": {
            "prompts": f"{w}/eval_prompts.jsonl",
            "rewards": [classifier],
            "judges": [{"name": "digit_judge", "path": f"{w}/judge"}],
            "seeds": 1,
            "n_samples": 2,
        },
        "reward": classifier,
    }


register_model_kind(
    ModelKind(
        name="diffusion_image",
        policy_kind="diffusion",
        config=DiffusionModelConfig,
        build=build_stable_diffusion,
        evaluation=diffusion_evaluation,
        validators={
            "prompts": validate_prompt_rows,
            "pairs": validate_image_pair_rows,
            "targets": validate_image_target_rows,
        },
        capabilities=frozenset(
            {
                "image_pairs",
                "real_targets",
                "differentiable_decode",
                "gradient_checkpointing",
                "forward_timesteps",
            }
        ),
        outputs="image",
        description="Stable Diffusion 1.x/2.x layout (UNet + CLIP text encoder + VAE); LoRA in diffusers format",
        tiny=_tiny_image,
        preflight=stable_diffusion_preflight,
    )
)


# ------------------------------------------------------------- SDXL, and the flow-matching models SD3 and FLUX
def build_sdxl(cfg: Any, lora: Any) -> Any:
    from mmalign.vision.sdxl_policy import SDXLPolicy

    return _ddpm_family(SDXLPolicy, cfg, lora)


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
        judges=context.judges,
        trained_on=getattr(context.algorithm_reward, "name", None),
        seeds=cfg.seeds,
        batch_size=cfg.batch_size,
        grid_prompts=cfg.n_samples,
        kl=cfg.kl and stochastic,
        grid_seeds=min(cfg.seeds, 3),
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
        "data": {"prompts": f"{w}/train_prompts.jsonl", "pairs": "zoo://image-tiny/train_pairs.jsonl"},
        "eval": {
            "prompts": f"{w}/eval_prompts.jsonl",
            "rewards": [classifier],
            "judges": [{"name": "digit_judge", "path": "zoo://image-tiny/judge"}],
            "seeds": 1,
            "n_samples": 2,
        },
        "reward": classifier,
    }


def _tiny_untrained(kind: str, **model: Any) -> Callable[[], dict[str, Any]]:
    """An untrained tiny pipeline of `kind` (zoo://pipelines-tiny) on image-tiny's prompts, pairs and scorers, with
    `model` settings added to the recipe's `model:` section."""

    def tiny() -> dict[str, Any]:
        recipe = _tiny_image()
        name = kind.removeprefix("diffusion_")
        path = f"zoo://pipelines-tiny/{name}"
        recipe["model"] = {**recipe["model"], "kind": kind, "name_or_path": path, **model}
        return recipe

    return tiny


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
        capabilities=_IMAGE_CAPABILITIES | {"forward_timesteps"},
        outputs="image",
        description="Stable Diffusion XL (UNet + two CLIP encoders, pooled embeddings and time ids); DDIM/DDPM",
        tiny=_tiny_untrained("diffusion_sdxl"),
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
        tiny=_tiny_untrained(
            "diffusion_flux",
            resolution=16,
            max_sequence_length=8,  # FLUX draws 1024 px by default; image-tiny is 16 px
        ),
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


def vlm_preflight(cfg: VLMModelConfig, rows: Mapping[str, list[Row]]) -> None:
    """Model directory layout and weight files, and every text field in the tokenizer's vocabulary."""
    path = _path(cfg)
    directory = local_model_dir(path, "model.name_or_path")
    if directory is not None:
        check_transformers_dir(directory, "model.name_or_path")
    tokenizer = load_tokenizer(path, "model.name_or_path", trust_remote_code=cfg.trust_remote_code)
    check_vocabulary(tokenizer, text_items(rows), f"model {cfg.name_or_path!r}")


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


def _vlm_unpaired(rows: list[Any]) -> list[Any]:
    from mmalign.vision.vlm_data import validate_vlm_unpaired_rows

    return validate_vlm_unpaired_rows(rows)


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
            "unpaired": _vlm_unpaired,
            "completions": _vlm_rows(validate_prompt_rows),
            "prompts": _vlm_rows(validate_prompt_rows),
        },
        capabilities=frozenset(
            {
                "token_entropies",
                "token_lengths",
                "log_probabilities",
                "image_inputs",
                "gradient_checkpointing",
            }
        ),
        description="LLaVA-style vision-language model (any AutoModelForImageTextToText + processor)",
        tiny=_tiny_vlm,
        preflight=vlm_preflight,
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


def image_reward_model_preflight(cfg: ImageRewardModelConfig, rows: Mapping[str, list[Row]]) -> None:
    """A saved scorer to start from is a directory with its config and intact weights."""
    if cfg.name_or_path:
        path = resolve(cfg.name_or_path)
        directory = local_model_dir(path, "model.name_or_path")
        if directory is None:
            raise RecipeError(f"model.name_or_path {path!r}: an image reward model is a local directory")
        check_transformers_dir(directory, "model.name_or_path", tokenizer=False)


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
        preflight=image_reward_model_preflight,
        tiny=lambda: {
            "model": {"kind": "image_reward_model", "network": {"image_size": 16}},
            "data": {"pairs": "zoo://image-tiny/train_pairs.jsonl"},
            "eval": {"pairs": "zoo://image-tiny/train_pairs.jsonl"},
        },
    )
)


# ---------------------------------------------------------------------------------------------- rewards
def _digit_prompts(rows: list[Row]) -> None:
    from mmalign.evaluation.classifier import require_digit_prompts

    require_digit_prompts(rows)


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


def _clip(load: str) -> Any:
    """A builder for an open_clip reward class of mmalign.vision.clip_rewards (`load` names the class)."""

    def build(options: dict[str, Any], answers: dict[str, str]) -> Any:
        from mmalign.vision import clip_rewards

        for key in ("model", "pretrained", "head"):
            if options.get(key):
                options[key] = resolve(options[key])
        return getattr(clip_rewards, load).from_pretrained(**options)

    return build


def _pickscore(options: dict[str, Any], context: Any) -> Any:
    from mmalign.vision.clip_rewards import PickScore

    for key in ("model", "processor"):
        if options.get(key):
            options[key] = resolve(options[key])
    return PickScore.from_pretrained(**options)


def _hpsv2(options: dict[str, Any], context: Any) -> Any:
    from mmalign.vision.clip_rewards import HPSv2Score

    if not options.get("checkpoint"):
        raise RecipeError(
            "reward 'hpsv2' needs `checkpoint:` (HPS_v2.1_compressed.pt converted to .safetensors; see "
            "mmalign.vision.clip_rewards.HPS_TO_SAFETENSORS)"
        )
    options["checkpoint"] = resolve(options["checkpoint"])
    if options.get("model"):
        options["model"] = resolve(options["model"])
    return HPSv2Score.from_pretrained(**options)


def _image_reward_model(options: dict[str, Any], context: Any) -> Any:
    from mmalign.vision.image_reward_model import ImageRewardModel

    if "path" not in options:
        raise RecipeError("reward 'image_reward_model' needs `path:` (a trained image reward model)")
    return ImageRewardModel.from_pretrained(resolve(options.pop("path")), trainable=False, **options)


def _vlm_statements(options: dict[str, Any], context: Any) -> Any:
    from mmalign.vision.hallucination import StatementReward

    return StatementReward(**options)


register_reward(
    RewardSpec(
        "digit_classifier",
        _classifier_reward,
        "image",
        True,
        "p(prompted digit | image)",
        check_rows=_digit_prompts,
    )
)
register_reward(
    RewardSpec(
        "digit_judge",
        judge_builder("digit_judge", "zoo://image/judge"),
        "image",
        True,
        "p(prompted digit | image) under an independent judge (another architecture, seed and data split; eval.judges)",
        check_rows=_digit_prompts,
    )
)
register_reward(RewardSpec("jpeg_compressibility", _jpeg(False), "image", False, "−JPEG size in kB (DDPO)"))
register_reward(RewardSpec("jpeg_incompressibility", _jpeg(True), "image", False, "+JPEG size in kB (DDPO)"))
register_reward(
    RewardSpec("clip_score", _clip("CLIPScore"), "image", True, "open_clip image–prompt similarity")
)
register_reward(
    RewardSpec("aesthetic", _clip("AestheticScore"), "image", True, "LAION aesthetic head on CLIP")
)
register_reward(
    RewardSpec(
        "pickscore", _pickscore, "image", True, "PickScore: exp(logit_scale)·cos on a transformers CLIPModel"
    )
)
register_reward(
    RewardSpec(
        "hpsv2", _hpsv2, "image", True, "HPS v2/v2.1: cos on an open_clip ViT-H-14 with the HPS weights"
    )
)
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
