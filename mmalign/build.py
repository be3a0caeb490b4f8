"""From a recipe to the objects of a run: policy, algorithm, evaluator and report (the only place names meet).

A recipe has sections `model`, `data`, `algorithm`, `eval`, `train` and a top-level `seed`; see text/*.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmalign.config import RecipeError, to_dataclass
from mmalign.core.data import (
    Row,
    read_rows,
    validate_preference_rows,
    validate_prompt_rows,
    validate_unpaired_rows,
)
from mmalign.train.trainer import TrainConfig
from mmalign.zoo.registry import resolve


@dataclass
class ModelConfig:
    """The `model:` section: which network, how it trains, how it generates."""

    kind: str = "causal_lm"  # causal_lm | reward_model
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
class EvalConfig:
    """The `eval:` section: held-out data and the rewards reported on greedy generations."""

    pairs: str | None = None
    prompts: str | None = None
    rewards: list[Any] | None = None
    batch_size: int = 64
    n_samples: int = 8


def _rows(path: str | None, validate) -> list[Row]:
    return validate(read_rows(resolve(path))) if path else []


def build_policy(cfg: ModelConfig) -> Any:
    """Load the model a recipe names (hub id, local directory or zoo:// path)."""
    path = resolve(cfg.name_or_path)
    if not path:
        raise RecipeError("model.name_or_path is required")
    if cfg.kind == "causal_lm":
        from mmalign.text.policy import CausalLMPolicy, LoraSpec

        lora = to_dataclass(LoraSpec, cfg.lora, "model.lora") if cfg.lora is not None else None
        return CausalLMPolicy.from_pretrained(
            path,
            lora=lora,
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
    raise RecipeError(f"model.kind must be causal_lm or reward_model, got {cfg.kind!r}")


def build_reward(spec: Any, answers: dict[str, str]) -> Any:
    """A reward from its recipe spec: a name or a mapping with `name` and options."""
    from mmalign.text import rewards as text_rewards

    spec = {"name": spec} if isinstance(spec, str) else dict(spec or {})
    name = spec.pop("name", None)
    if name == "answer_match":
        if not answers:
            raise RecipeError(
                "reward answer_match needs prompt rows with an `answer` field (data.prompts/eval.prompts)"
            )
        return text_rewards.AnswerMatch(answers)
    if name == "regex":
        return text_rewards.RegexMatch(**spec)
    if name == "length":
        return text_rewards.LengthReward(**spec)
    if name == "reward_model":
        from mmalign.text.reward_model import RewardModel

        return RewardModel.from_pretrained(resolve(spec["path"]), max_length=spec.get("max_length", 512))
    raise RecipeError(f"unknown reward {name!r}; known: answer_match, regex, length, reward_model")


def _answers(*row_lists: list[Row]) -> dict[str, str]:
    return {
        r.data["prompt"]: str(r.data["answer"])
        for rows in row_lists
        for r in rows
        if "answer" in r.data and isinstance(r.data["prompt"], str)
    }


def build_run(recipe: dict[str, Any]) -> tuple[Any, Any, TrainConfig, Any, Any]:
    """Validate every input of a recipe and return (policy, algorithm, train config, evaluator, report).

    Data is read and validated (and tokenised) here, before any training starts.
    """
    known = {"seed", "model", "data", "algorithm", "eval", "train"}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise RecipeError(f"unknown recipe section(s) {unknown}; known: {sorted(known)}")
    train_section = dict(recipe.get("train") or {})
    train_section.setdefault("seed", recipe.get("seed", 0))
    train_cfg = to_dataclass(TrainConfig, train_section, "train")
    model_cfg = to_dataclass(ModelConfig, recipe.get("model"), "model")
    eval_cfg = to_dataclass(EvalConfig, recipe.get("eval"), "eval")
    data = dict(recipe.get("data") or {})
    algo = dict(recipe.get("algorithm") or {})
    name = algo.get("name", "dpo")

    import torch

    torch.manual_seed(train_cfg.seed)  # LoRA initialisation and any fresh heads follow the recipe seed
    policy = build_policy(model_cfg)

    eval_pairs = _rows(eval_cfg.pairs, validate_preference_rows)
    eval_prompts = _rows(eval_cfg.prompts, validate_prompt_rows)
    train_prompts = _rows(data.get("prompts"), validate_prompt_rows)
    answers = _answers(eval_prompts, train_prompts)
    rewards = [build_reward(r, answers) for r in (eval_cfg.rewards or [])]

    algorithm = build_algorithm(name, algo, policy, data, answers)
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
}


def build_algorithm(
    name: str, algo: dict[str, Any], policy: Any, data: dict[str, Any], answers: dict[str, str]
):
    """The algorithm a recipe names, with its training data read and validated."""
    if name in PREFERENCE:
        from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig

        section = dict(algo)
        if name != "preference":
            section.setdefault("loss", {"slic": "hinge", "cdpo": "dpo"}.get(name, name))
        cfg = to_dataclass(PreferenceConfig, section, "algorithm")
        return PreferenceAlgorithm(policy, _rows(_need(data, "train"), validate_preference_rows), cfg)
    if name == "kto":
        from mmalign.train.kto import KTOAlgorithm, KTOConfig

        cfg = to_dataclass(KTOConfig, algo, "algorithm")
        return KTOAlgorithm(policy, _rows(_need(data, "train"), validate_unpaired_rows), cfg)
    if name == "sft":
        from mmalign.train.supervised import SFTAlgorithm, SFTConfig

        cfg = to_dataclass(SFTConfig, algo, "algorithm")
        return SFTAlgorithm(policy, _rows(_need(data, "train"), validate_prompt_rows), cfg)
    if name == "reward_model":
        from mmalign.train.supervised import RewardModelAlgorithm, RewardModelConfig

        cfg = to_dataclass(RewardModelConfig, algo, "algorithm")
        return RewardModelAlgorithm(policy, _rows(_need(data, "train"), validate_preference_rows), cfg)
    if name in ("online_dpo", "rloo", "grpo", "reinforce"):
        from mmalign.train import online

        prompts = _rows(_need(data, "prompts"), validate_prompt_rows)
        section = dict(algo)
        reward = build_reward(section.pop("reward", "answer_match"), answers)
        if name == "online_dpo":
            return online.OnlineDPO(
                policy, prompts, reward, to_dataclass(online.OnlineDPOConfig, section, "algorithm")
            )
        section.setdefault("advantage", name)
        return online.SequencePolicyGradient(
            policy,
            prompts,
            reward,
            to_dataclass(online.PolicyGradientConfig, section, "algorithm", ignore=("name",)),
        )
    raise RecipeError(
        f"unknown algorithm.name {name!r}; known: {', '.join(sorted(PREFERENCE | {'kto', 'sft', 'reward_model', 'online_dpo', 'rloo', 'grpo', 'reinforce'}))}"
    )


def _need(data: dict[str, Any], key: str) -> str:
    if not data.get(key):
        raise RecipeError(f"data.{key} is required for this algorithm")
    return data[key]
