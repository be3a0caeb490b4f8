"""Registrations of the text adapter: the `causal_lm` and `reward_model` model kinds and the text rewards."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mmalign.core.config import RecipeError, check_dtype
from mmalign.core.data import (
    DataError,
    Row,
    validate_preference_rows,
    validate_prompt_rows,
    validate_unpaired_rows,
)
from mmalign.core.model_files import check_transformers_dir, local_model_dir
from mmalign.core.paths import resolve
from mmalign.core.registry import ModelKind, RewardSpec, register_model_kind, register_reward
from mmalign.core.tokenizer_checks import check_vocabulary, load_tokenizer, text_items


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
        check_dtype(self.dtype)


def _path(cfg: Any) -> str:
    path = resolve(cfg.name_or_path)
    if not path:
        raise RecipeError("model.name_or_path is required")
    return path


def text_preflight(cfg: TextModelConfig, rows: Mapping[str, list[Row]]) -> None:
    """Model directory layout and weight files, every text field in the tokenizer's vocabulary, and (causal LMs)
    every example encoded as training will encode it: too long for model.max_length, or a conversation without a
    chat template, is named here, before the weights load."""
    path = _path(cfg)
    directory = local_model_dir(path, "model.name_or_path")
    if directory is not None:
        check_transformers_dir(directory, "model.name_or_path")
    tokenizer = load_tokenizer(path, "model.name_or_path", trust_remote_code=cfg.trust_remote_code)
    check_vocabulary(tokenizer, text_items(rows), f"model {cfg.name_or_path!r}")
    if cfg.kind != "causal_lm":
        return
    from mmalign.core.codec import TextCodec

    codec = TextCodec(tokenizer, cfg.max_length)
    encoders = {
        "pairs": codec.encode_pair,
        "unpaired": codec.encode_completion,
        "completions": codec.encode_completion,
    }
    for kind, encode in encoders.items():
        for row in rows.get(kind, []):
            if kind == "completions" and row.data.get("completion") is None:
                continue  # SFT may train on another field (algorithm.field); its encoder names a problem there
            try:
                encode(row)
            except DataError:
                raise
            except ValueError as err:  # e.g. a conversation for a tokenizer without a chat template
                raise row.error(None, str(err)) from None


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
            "completions": f"{w}/train_unpaired.jsonl",
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
        capabilities=frozenset(
            {
                "token_entropies",
                "token_lengths",
                "log_probabilities",
                "gradient_checkpointing",
                "token_packing",
            }
        ),
        description="any transformers causal LM (hub id or directory); LoRA or full fine-tuning",
        tiny=_tiny_text,
        preflight=text_preflight,
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
        tiny=lambda: {
            **_tiny_text(),
            "model": {"kind": "reward_model", "name_or_path": "zoo://text-tiny/base", "max_length": 24},
        },
        preflight=text_preflight,
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


def _rows_with_answers(rows: list[Row]) -> None:
    for row in rows:
        value = row.data.get("answer")
        if value is None or (isinstance(value, str) and not value.strip()):
            raise row.error(
                "answer",
                "reward answer_match needs the known answer of every prompt it scores (an `answer` field)",
            )


register_reward(
    RewardSpec(
        "answer_match",
        _answer_match,
        "text",
        False,
        "1 if the response is the known answer",
        check_rows=_rows_with_answers,
    )
)
register_reward(RewardSpec("regex", _regex, "text", False, "1 if the response matches `pattern`"))
register_reward(RewardSpec("length", _length, "text", False, "response length in characters × `scale`"))
register_reward(
    RewardSpec("reward_model", _reward_model, "text", False, "a trained Bradley–Terry reward model (`path`)")
)
