"""From a recipe to the objects of a run: policy, algorithm, evaluator and report (the only place names meet).

A recipe has sections `model`, `data`, `algorithm`, `eval`, `train` and a top-level `seed`; see text/*.yaml and
vision/*.yaml. `model.kind` picks the adapter (causal_lm, reward_model, diffusion_image); `algorithm.name` the
method; rewards are named in `eval.rewards` and `algorithm.reward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmalign.config import RecipeError, to_dataclass
from mmalign.core.data import (
    Row,
    validate_image_pair_rows,
    validate_preference_rows,
    validate_prompt_rows,
    validate_unpaired_rows,
)
from mmalign.core.hf_data import load_rows
from mmalign.train.trainer import TrainConfig
from mmalign.vision.vlm_build import VLMModelConfig
from mmalign.zoo.registry import resolve


@dataclass
class TextModelConfig:
    """`model:` for kind causal_lm / reward_model: which network, how it trains, how it generates."""

    kind: str = "causal_lm"
    name_or_path: str = ""
    lora: dict[str, Any] | None = (
        None  # peft LoRA settings (r, alpha, dropout, target_modules); null = full FT
    )
    dtype: str = "float32"
    max_length: int = 512
    max_new_tokens: int = 64
    temperature: float = 1.0
    trust_remote_code: bool = False


@dataclass
class DiffusionModelConfig:
    """`model:` for kind diffusion_image: a Stable-Diffusion-layout pipeline and its sampler."""

    kind: str = "diffusion_image"
    name_or_path: str = ""
    lora: dict[str, Any] | None = None  # LoRA on the UNet attention projections; null = full UNet fine-tuning
    dtype: str = "float32"
    sampler: str = "ddim"  # ddim | ddpm
    num_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 5.0


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


@dataclass
class ImageRewardModelConfig:
    """`model:` for kind image_reward_model: a saved scorer to start from, or the shape of a fresh one."""

    kind: str = "image_reward_model"
    name_or_path: str = ""  # a saved image reward model directory; empty = a fresh network (`network`)
    network: dict[str, Any] | None = None  # ImageScorerConfig: image_size, channels, hidden, prompt_buckets


@dataclass
class EvalConfig:
    """`eval:` held-out data, the rewards reported, and sampling budget."""

    pairs: str | None = None
    prompts: str | None = None
    rewards: list[Any] = field(default_factory=list)
    batch_size: int = 64
    n_samples: int = 8  # samples shown in the report
    seeds: int = 4  # images: seeds per held-out prompt
    kl: bool = True  # images: report the path KL to the base model
    probes: str | None = None  # vlm: yes/no probe rows (image, prompt, answer) for POPE-style accuracy
    real_speech: str | None = None  # speech: held-out recordings (prompt, audio) for the denoising loss


MODEL_CONFIGS = {
    "causal_lm": TextModelConfig,
    "reward_model": TextModelConfig,
    "diffusion_image": DiffusionModelConfig,
    "diffusion_speech": DiffusionModelConfig,  # mel TTS (mmalign.speech); same sampler fields
    "diffusion_audioldm2": AudioLDM2ModelConfig,  # AudioLDM 2 speech checkpoints (GPU users)
    "image_reward_model": ImageRewardModelConfig,
    "vlm": VLMModelConfig,
}


def _rows(source: str | dict[str, Any] | None, validate) -> list[Row]:
    """Rows of a data source (a path, hub id or mapping; see mmalign.core.hf_data), validated."""
    return validate(load_rows(source, resolve)) if source else []


def _lora(section: dict[str, Any] | None):
    from mmalign.core.params import LoraSpec

    return to_dataclass(LoraSpec, section, "model.lora") if section is not None else None


def model_config(
    section: dict[str, Any] | None,
) -> TextModelConfig | DiffusionModelConfig | ImageRewardModelConfig:
    kind = (section or {}).get("kind", "causal_lm")
    if kind not in MODEL_CONFIGS:
        raise RecipeError(f"model.kind must be one of {', '.join(MODEL_CONFIGS)}, got {kind!r}")
    return to_dataclass(MODEL_CONFIGS[kind], section, "model")


def build_policy(cfg: TextModelConfig | DiffusionModelConfig) -> Any:
    """Load the model a recipe names (hub id, local directory or zoo:// path)."""
    if cfg.kind == "image_reward_model":
        return _image_reward_model(cfg)
    if cfg.kind == "vlm":
        from mmalign.vision.vlm_build import build_vlm_policy

        return build_vlm_policy(cfg, _lora(cfg.lora))
    path = resolve(cfg.name_or_path)
    if not path:
        raise RecipeError("model.name_or_path is required")
    if cfg.kind == "causal_lm":
        from mmalign.text.policy import CausalLMPolicy

        return CausalLMPolicy.from_pretrained(
            path,
            lora=_lora(cfg.lora),
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
            max_length=cfg.max_length,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
        )
    if cfg.kind == "reward_model":
        from mmalign.text.reward_model import RewardModel

        return RewardModel.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, max_length=cfg.max_length
        )
    if cfg.kind == "diffusion_audioldm2":
        from mmalign.speech import audioldm2_policy

        return audioldm2_policy.build_policy(cfg, _lora(cfg.lora))
    if cfg.kind == "diffusion_speech":
        from mmalign.speech.build import build_speech_policy

        return build_speech_policy(cfg, _lora(cfg.lora))
    from mmalign.vision.diffusion_policy import DiffusionImagePolicy

    return DiffusionImagePolicy.from_pretrained(
        path,
        lora=_lora(cfg.lora),
        dtype=cfg.dtype,
        sampler=cfg.sampler,
        num_steps=cfg.num_steps,
        eta=cfg.eta,
        guidance_scale=cfg.guidance_scale,
    )


def _image_reward_model(cfg: ImageRewardModelConfig) -> Any:
    from mmalign.vision.image_reward_model import ImageRewardModel, ImageScorerConfig

    if cfg.name_or_path:
        if cfg.network is not None:
            raise RecipeError(
                "model.network describes a fresh network; drop it when model.name_or_path is set"
            )
        return ImageRewardModel.from_pretrained(resolve(cfg.name_or_path))
    return ImageRewardModel.create(to_dataclass(ImageScorerConfig, cfg.network, "model.network"))


REWARDS = (
    "answer_match",
    "regex",
    "length",
    "reward_model",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "digit_classifier",
    "intelligibility",
    "tonality",
    "dnsmos",
    "dnsmos_waveform",
    "clip_score",
    "aesthetic",
    "image_reward_model",
)


def build_reward(spec: Any, answers: dict[str, str]) -> Any:
    """A reward from its recipe spec: a name, or a mapping with `name` and options."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec or {})
    name = spec.pop("name", None)
    try:
        if name == "answer_match":
            from mmalign.text.rewards import AnswerMatch

            if not answers:
                raise RecipeError("reward answer_match needs prompt rows with an `answer` field")
            return AnswerMatch(answers, **spec)
        if name in ("regex", "length"):
            from mmalign.text import rewards

            return (rewards.RegexMatch if name == "regex" else rewards.LengthReward)(**spec)
        if name == "reward_model":
            from mmalign.text.reward_model import RewardModel

            return RewardModel.from_pretrained(resolve(spec.pop("path")), **spec)
        if name in ("jpeg_compressibility", "jpeg_incompressibility"):
            from mmalign.vision import rewards

            return (
                rewards.JpegCompressibility()
                if name == "jpeg_compressibility"
                else rewards.JpegIncompressibility()
            )
        if name == "dnsmos_waveform":
            from mmalign.speech import audioldm2_policy

            return audioldm2_policy.build_reward(spec)
        if name in ("intelligibility", "tonality", "dnsmos"):
            from mmalign.speech.build import build_speech_reward

            return build_speech_reward(name, spec)
        if name == "digit_classifier":
            from mmalign.vision.rewards import DigitAgreement

            return DigitAgreement.from_pretrained(resolve(spec.pop("path")), **spec)
        if name in ("clip_score", "aesthetic"):
            from mmalign.vision import clip_rewards

            for key in ("model", "pretrained", "head"):
                if spec.get(key):
                    spec[key] = resolve(spec[key])
            cls = clip_rewards.CLIPScore if name == "clip_score" else clip_rewards.AestheticScore
            return cls.from_pretrained(**spec)
        if name == "image_reward_model":
            from mmalign.vision.image_reward_model import ImageRewardModel

            return ImageRewardModel.from_pretrained(resolve(spec.pop("path")), trainable=False, **spec)
    except (TypeError, KeyError) as err:
        raise RecipeError(f"reward {name!r}: {err}") from err
    raise RecipeError(f"unknown reward {name!r}; known: {', '.join(REWARDS)}")


def _answers(*row_lists: list[Row]) -> dict[str, str]:
    """Known answers by prompt (a conversation is keyed by its last turn, as `AnswerMatch` looks it up)."""
    answers = {}
    for rows in row_lists:
        for r in rows:
            if "answer" in r.data:
                prompt = r.data["prompt"]
                answers[prompt if isinstance(prompt, str) else prompt[-1]["content"]] = str(r.data["answer"])
    return answers


def build_run(recipe: dict[str, Any]) -> tuple[Any, Any, TrainConfig, Any, Any]:
    """Validate every input of a recipe and return (policy, algorithm, train config, evaluator, report).

    Data is read and validated (and tokenised or encoded) here, before any training starts.
    """
    known = {"seed", "model", "data", "algorithm", "eval", "train"}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise RecipeError(f"unknown recipe section(s) {unknown}; known: {sorted(known)}")
    train_section = dict(recipe.get("train") or {})
    train_section.setdefault("seed", recipe.get("seed", 0))
    train_cfg = to_dataclass(TrainConfig, train_section, "train")
    model_cfg = model_config(recipe.get("model"))
    eval_cfg = to_dataclass(EvalConfig, recipe.get("eval"), "eval")
    data = dict(recipe.get("data") or {})
    algo = dict(recipe.get("algorithm") or {})

    import torch

    torch.manual_seed(train_cfg.seed)  # LoRA initialisation and any fresh heads follow the recipe seed
    if model_cfg.kind == "diffusion_audioldm2":  # waveform outputs: refuse mel rewards before loading
        from mmalign.speech import audioldm2_policy

        audioldm2_policy.check_recipe(recipe)
    policy = build_policy(model_cfg)

    image_rm = model_cfg.kind == "image_reward_model"  # its pairs are image files, validated below
    eval_pairs = _rows(eval_cfg.pairs, validate_preference_rows) if not image_rm else []
    eval_prompts = _rows(eval_cfg.prompts, validate_prompt_rows)
    train_prompts = _rows(data.get("prompts"), validate_prompt_rows)
    answers = _answers(eval_prompts, train_prompts)
    rewards = [build_reward(r, answers) for r in eval_cfg.rewards]
    algorithm = build_algorithm(algo.get("name", "dpo"), algo, policy, model_cfg.kind, data, answers)

    if model_cfg.kind == "diffusion_audioldm2":
        from mmalign.speech import audioldm2_policy

        evaluator, report = audioldm2_policy.evaluation(
            policy, eval_cfg, eval_prompts, train_prompts, rewards, algorithm
        )
        return policy, algorithm, train_cfg, evaluator, report
    if model_cfg.kind == "diffusion_speech":
        from mmalign.speech.build import speech_evaluation

        evaluator, report = speech_evaluation(policy, eval_cfg, eval_prompts, train_prompts, rewards)
        return policy, algorithm, train_cfg, evaluator, report
    if model_cfg.kind == "diffusion_image":
        from mmalign.vision.evaluate import ImageEvaluator
        from mmalign.vision.report import ImageReport

        evaluator = (
            ImageEvaluator(
                eval_prompts,
                rewards,
                seeds=eval_cfg.seeds,
                batch_size=eval_cfg.batch_size,
                grid_prompts=eval_cfg.n_samples,
                kl=eval_cfg.kl,
            )
            if eval_prompts
            else None
        )
        return policy, algorithm, train_cfg, evaluator, ImageReport()
    if model_cfg.kind == "vlm":
        from mmalign.train.report import TextReport
        from mmalign.vision.vlm_build import build_vlm_evaluator

        evaluator = build_vlm_evaluator(
            eval_cfg.prompts, eval_cfg.probes, eval_cfg.batch_size, eval_cfg.n_samples
        )
        return policy, algorithm, train_cfg, evaluator, TextReport()
    if image_rm:
        from mmalign.train.report import RunReport
        from mmalign.train.supervised import PairwiseAccuracy

        eval_image_pairs = _rows(eval_cfg.pairs, validate_image_pair_rows)
        evaluator = PairwiseAccuracy(eval_image_pairs, eval_cfg.batch_size) if eval_image_pairs else None
        return policy, algorithm, train_cfg, evaluator, RunReport()
    from mmalign.text.evaluate import SequenceEvaluator
    from mmalign.train.report import TextReport
    from mmalign.train.supervised import PairwiseAccuracy

    if model_cfg.kind == "reward_model":
        evaluator = PairwiseAccuracy(eval_pairs, batch_size=eval_cfg.batch_size)
    else:
        evaluator = SequenceEvaluator(
            pairs=eval_pairs,
            prompts=eval_prompts,
            rewards=rewards,
            batch_size=eval_cfg.batch_size,
            n_samples=eval_cfg.n_samples,
        )
    return policy, algorithm, train_cfg, evaluator, TextReport()


PREFERENCE = {
    "dpo",
    "ipo",
    "hinge",
    "slic",
    "cdpo",
    "rdpo",
    "odpo",
    "fdpo",
    "dpop",
    "beta_dpo",
    "mallows",
    "orpo",
    "simpo",
    "cpo",
    "rainbow",
    "preference",
    "diffusion_dpo",
}
ONLINE_SEQUENCE = {"online_dpo", "rloo", "grpo", "reinforce"}
ONLINE_DIFFUSION = {"ddpo", "dpok", "dlpo", "online_diffusion_dpo"}


def build_algorithm(
    name: str, algo: dict[str, Any], policy: Any, kind: str, data: dict[str, Any], answers: dict[str, str]
):
    """The algorithm a recipe names, with its training data read and validated."""
    diffusion = kind in ("diffusion_image", "diffusion_speech", "diffusion_audioldm2")
    if kind == "vlm":
        from mmalign.vision.vlm_build import build_vlm_algorithm

        return build_vlm_algorithm(name, algo, policy, data)
    if kind == "image_reward_model":
        if name != "reward_model":
            raise RecipeError(
                f"model.kind image_reward_model trains with algorithm reward_model, not {name!r}"
            )
        from mmalign.train.supervised import RewardModelAlgorithm, RewardModelConfig

        rows = _rows(_need(data, "train"), validate_image_pair_rows)
        return RewardModelAlgorithm(policy, rows, to_dataclass(RewardModelConfig, algo, "algorithm"))
    if name in PREFERENCE:
        from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig

        section = dict(algo)
        if name != "preference":
            section.setdefault(
                "loss", {"slic": "hinge", "cdpo": "dpo", "diffusion_dpo": "dpo"}.get(name, name)
            )
        cfg = to_dataclass(PreferenceConfig, section, "algorithm")
        validate = validate_image_pair_rows if kind == "diffusion_image" else validate_preference_rows
        return PreferenceAlgorithm(policy, _rows(_need(data, "train"), validate), cfg)
    if name == "kto":
        from mmalign.train.kto import KTOAlgorithm, KTOConfig

        return KTOAlgorithm(
            policy,
            _rows(_need(data, "train"), validate_unpaired_rows),
            to_dataclass(KTOConfig, algo, "algorithm"),
        )
    if name == "sft":
        from mmalign.train.supervised import SFTAlgorithm, SFTConfig

        return SFTAlgorithm(
            policy,
            _rows(_need(data, "train"), validate_prompt_rows),
            to_dataclass(SFTConfig, algo, "algorithm"),
        )
    if name == "reward_model":
        from mmalign.train.supervised import RewardModelAlgorithm, RewardModelConfig

        return RewardModelAlgorithm(
            policy,
            _rows(_need(data, "train"), validate_preference_rows),
            to_dataclass(RewardModelConfig, algo, "algorithm"),
        )
    if name in ONLINE_SEQUENCE | ONLINE_DIFFUSION:
        if (name in ONLINE_DIFFUSION) != diffusion:
            raise RecipeError(f"algorithm {name!r} does not apply to model.kind {kind!r}")
        prompts = _rows(_need(data, "prompts"), validate_prompt_rows)
        section = dict(algo)
        if "reward" not in section:
            raise RecipeError(f"algorithm.reward is required for {name}")
        reward = build_reward(section.pop("reward"), answers)
        if name == "online_dpo":
            from mmalign.train.online import OnlineDPO, OnlineDPOConfig

            return OnlineDPO(policy, prompts, reward, to_dataclass(OnlineDPOConfig, section, "algorithm"))
        if name == "online_diffusion_dpo":
            from mmalign.train.online_diffusion import OnlineDiffusionDPO, OnlineDPOConfig

            return OnlineDiffusionDPO(
                policy, prompts, reward, to_dataclass(OnlineDPOConfig, section, "algorithm")
            )
        if diffusion:
            from mmalign.train.diffusion_pg import DiffusionPGConfig, DiffusionPolicyGradient

            return DiffusionPolicyGradient(
                policy,
                prompts,
                reward,
                to_dataclass(DiffusionPGConfig, section, "algorithm"),
                targets=_rows(data.get("targets"), validate_prompt_rows),  # DLPO's real outputs
            )
        from mmalign.train.online import PolicyGradientConfig, SequencePolicyGradient

        section.setdefault("advantage", name)
        cfg = to_dataclass(PolicyGradientConfig, section, "algorithm", ignore=("name",))
        return SequencePolicyGradient(policy, prompts, reward, cfg)
    known = sorted(PREFERENCE | ONLINE_SEQUENCE | ONLINE_DIFFUSION | {"kto", "sft", "reward_model"})
    raise RecipeError(f"unknown algorithm.name {name!r}; known: {', '.join(known)}")


def _need(data: dict[str, Any], key: str) -> str | dict[str, Any]:
    if not data.get(key):
        raise RecipeError(f"data.{key} is required for this algorithm")
    return data[key]
