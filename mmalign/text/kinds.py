"""Registrations of the text adapter: the `causal_lm` and `reward_model` model kinds and the text rewards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmalign.core.config import RecipeError
from mmalign.core.data import (
    validate_preference_rows,
    validate_prompt_rows,
    validate_unpaired_rows,
)
from mmalign.core.paths import resolve
from mmalign.core.registry import ModelKind, RewardSpec, register_model_kind, register_reward


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

    def __post_init__(self) -> None:
        if self.max_length < 1 or self.max_new_tokens < 1:
            raise ValueError("model.max_length and model.max_new_tokens must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {self.temperature}")


def _path(cfg: Any) -> str:
    path = resolve(cfg.name_or_path)
    if not path:
        raise RecipeError("model.name_or_path is required")
    return path


def build_causal_lm(cfg: TextModelConfig, lora: Any) -> Any:
    from mmalign.text.policy import CausalLMPolicy

    return CausalLMPolicy.from_pretrained(
        _path(cfg),
        lora=lora,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        max_length=cfg.max_length,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
    )


def build_reward_model(cfg: TextModelConfig, lora: Any) -> Any:
    from mmalign.text.reward_model import RewardModel

    if lora is not None:
        raise RecipeError("model.lora is not supported for kind reward_model (the whole classifier trains)")
    return RewardModel.from_pretrained(
        _path(cfg), trust_remote_code=cfg.trust_remote_code, max_length=cfg.max_length
    )


def sequence_evaluation(context: Any) -> tuple[Any, Any]:
    """Preference accuracy on held-out pairs and rewards of greedy answers to held-out prompts."""
    from mmalign.evaluation.samples import TextSamples
    from mmalign.evaluation.sequence import SequenceEvaluator

    cfg = context.config
    evaluator = SequenceEvaluator(
        pairs=context.pairs,
        prompts=context.prompts,
        rewards=context.rewards,
        batch_size=cfg.batch_size,
        n_samples=cfg.n_samples,
    )
    return evaluator, TextSamples()


def reward_model_evaluation(context: Any) -> tuple[Any, Any]:
    from mmalign.evaluation.sequence import PairwiseAccuracy

    return PairwiseAccuracy(context.pairs, batch_size=context.config.batch_size), None


TEXT_ROWS = {
    "pairs": validate_preference_rows,
    "unpaired": validate_unpaired_rows,
    "prompts": validate_prompt_rows,
    "completions": validate_prompt_rows,
}


def _tiny_text() -> dict[str, Any]:
    w = "zoo://text-tiny"
    return {
        "model": {
            "name_or_path": f"{w}/base",
            "lora": {"r": 4, "alpha": 8},
            "max_length": 24,
            "max_new_tokens": 4,
        },
        "data": {
            "pairs": f"{w}/train_pairs.jsonl",
            "unpaired": f"{w}/train_unpaired.jsonl",
            "completions": f"{w}/train_sft.jsonl",
            "prompts": f"{w}/train_prompts.jsonl",
        },
        "eval": {
            "pairs": f"{w}/eval_pairs.jsonl",
            "prompts": f"{w}/eval_prompts.jsonl",
            "rewards": ["answer_match"],
        },
        "reward": "answer_match",
    }


register_model_kind(
    ModelKind(
        name="causal_lm",
        policy_kind="sequence",
        config=TextModelConfig,
        build=build_causal_lm,
        evaluation=sequence_evaluation,
        validators=TEXT_ROWS,
        capabilities=frozenset({"token_entropies", "token_lengths", "log_probabilities", "token_packing"}),
        description="any transformers causal LM (hub id or directory); LoRA or full fine-tuning",
        tiny=_tiny_text,
    )
)
register_model_kind(
    ModelKind(
        name="reward_model",
        policy_kind="scorer",
        config=TextModelConfig,
        build=build_reward_model,
        evaluation=reward_model_evaluation,
        validators={"pairs": validate_preference_rows},
        description="a transformers sequence classifier trained as a Bradley–Terry reward model",
        tiny=lambda: {**_tiny_text(), "model": {"name_or_path": "zoo://text-tiny/base", "max_length": 24}},
    )
)


def _answer_match(options: dict[str, Any], answers: dict[str, str]) -> Any:
    from mmalign.text.rewards import AnswerMatch

    if not answers:
        raise RecipeError("reward answer_match needs prompt rows with an `answer` field")
    return AnswerMatch(answers, **options)


def _regex(options: dict[str, Any], context: Any) -> Any:
    from mmalign.text.rewards import RegexMatch

    return RegexMatch(**options)


def _length(options: dict[str, Any], context: Any) -> Any:
    from mmalign.text.rewards import LengthReward

    return LengthReward(**options)


def _reward_model(options: dict[str, Any], context: Any) -> Any:
    from mmalign.text.reward_model import RewardModel

    if "path" not in options:
        raise RecipeError("reward 'reward_model' needs `path:` (a trained reward model directory)")
    return RewardModel.from_pretrained(resolve(options.pop("path")), **options)


register_reward(
    RewardSpec("answer_match", _answer_match, "text", False, "1 if the response is the known answer")
)
register_reward(RewardSpec("regex", _regex, "text", False, "1 if the response matches `pattern`"))
register_reward(RewardSpec("length", _length, "text", False, "response length in characters × `scale`"))
register_reward(
    RewardSpec("reward_model", _reward_model, "text", False, "a trained Bradley–Terry reward model (`path`)")
)
