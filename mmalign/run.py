"""From a recipe to the objects of a run: a lookup in the registries, checks, then the model (in that order).

A recipe has sections `model`, `data`, `algorithm`, `eval`, `train` and a top-level `seed`. `model.kind` names a
registered model kind, `algorithm.name` a registered algorithm, rewards are named in `eval.rewards` and
`algorithm.reward`. Everything that needs no model — every section's keys and values, the algorithm's fit to the
model kind, the data files' rows, the rewards — is checked before the model is loaded, so a typo never costs a
model load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mmalign import plugins
from mmalign.core.config import RecipeError, to_dataclass
from mmalign.core.data import Row
from mmalign.core.hf_data import load_rows
from mmalign.core.params import LoraSpec
from mmalign.core.paths import resolve
from mmalign.core.registry import (
    CAPABILITIES,
    DATA_KEYS,
    REWARDS,
    AlgorithmSpec,
    ModelKind,
    RewardSpec,
    algorithm_for,
    model_kind,
    reward_spec,
)
from mmalign.train.report import RunReport
from mmalign.train.trainer import TrainConfig

SECTIONS = ("seed", "model", "data", "algorithm", "eval", "train")
RECIPE_KEYS = ("name", "reward")  # algorithm keys read here, not by the algorithm's config


@dataclass
class EvalConfig:
    """`eval:` held-out data, the rewards reported, and sampling budget."""

    pairs: str | dict[str, Any] | None = None  # a data source (see README: Data)
    prompts: str | dict[str, Any] | None = None
    rewards: list[Any] = field(default_factory=list)
    batch_size: int = 64
    n_samples: int = 8  # samples shown in the report
    seeds: int = 4  # diffusion: seeds per held-out prompt
    kl: bool = True  # diffusion: report the path KL to the base model
    probes: str | None = None  # vlm: yes/no probe rows (image, prompt, answer) for POPE-style accuracy
    real_speech: str | None = None  # speech: held-out recordings (prompt, audio) for the denoising loss

    def __post_init__(self) -> None:
        for name in ("batch_size", "n_samples", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RunInputs:
    """What an algorithm's factory receives besides the policy: validated rows by data kind and its reward."""

    rows: dict[str, list[Row]]
    reward: Any = None


@dataclass
class EvalContext:
    """What a model kind's evaluation receives: the policy, `eval:` settings, held-out rows, rewards."""

    policy: Any
    config: EvalConfig
    pairs: list[Row]
    prompts: list[Row]
    rewards: list[Any]
    train_prompts: list[Row]
    algorithm_reward: Any = None


class Run(NamedTuple):
    """Everything `Trainer` needs, built from one recipe."""

    policy: Any
    algorithm: Any
    train: TrainConfig
    evaluator: Any
    report: RunReport


@dataclass
class Plan:
    """A recipe checked without any model: the specs and configs it resolves to, and its validated rows."""

    kind: ModelKind
    model: Any
    spec: AlgorithmSpec | None
    algorithm: Any
    train: TrainConfig
    eval: EvalConfig
    rows: dict[str, list[Row]]
    eval_pairs: list[Row]
    eval_prompts: list[Row]
    reward_specs: list[tuple[str, Any]]


def _rows(source: Any) -> list[Row]:
    """Rows of a data source: a file, a `save_to_disk` or data-file directory, a hub id, or a mapping with options."""
    return load_rows(source, resolve)


def _answers(*row_lists: list[Row]) -> dict[str, str]:
    """Known answers by prompt (a conversation is keyed by its last turn, as `AnswerMatch` looks it up)."""
    answers = {}
    for rows in row_lists:
        for r in rows:
            if "answer" in r.data and "prompt" in r.data:
                prompt = r.data["prompt"]
                key = prompt if isinstance(prompt, str) else prompt[-1]["content"]
                answers[key] = str(r.data["answer"])
    return answers


def build_reward(spec: Any, answers: dict[str, str] | None = None) -> Any:
    """A reward from its recipe spec (a name, or a mapping with `name` and options); `answers` are the known
    answers by prompt that verifiable rewards read."""
    plugins.load()
    options = {"name": spec} if isinstance(spec, str) else dict(spec or {})
    reward = reward_spec(options.pop("name", None))
    try:
        return reward.build(options, answers or {})
    except (TypeError, KeyError) as err:
        raise RecipeError(f"reward {reward.name!r}: {err}") from err


def _algorithm_section(recipe: dict[str, Any], spec: AlgorithmSpec) -> dict[str, Any]:
    section = dict(recipe.get("algorithm") or {})
    for key, value in spec.defaults.items():
        section.setdefault(key, value)
    return section


def plan(recipe: dict[str, Any], *, with_training: bool = True) -> Plan:
    """Check a whole recipe and read its data without loading any model (what `mmalign validate` runs)."""
    unknown = sorted(set(recipe) - set(SECTIONS))
    if unknown:
        raise RecipeError(f"unknown recipe section(s) {unknown}; known: {sorted(SECTIONS)}")
    for name in ("model", "data", "algorithm", "eval", "train"):
        if recipe.get(name) is not None and not isinstance(recipe[name], dict):
            raise RecipeError(f"recipe section `{name}` must be a mapping, got {type(recipe[name]).__name__}")
    train_section = dict(recipe.get("train") or {})
    train_section.setdefault("seed", recipe.get("seed", 0))
    train_cfg = to_dataclass(TrainConfig, train_section, "train")
    kind, model_cfg = model_plan(recipe)
    if getattr(model_cfg, "lora", None) is not None:
        to_dataclass(LoraSpec, model_cfg.lora, "model.lora")
    eval_cfg = to_dataclass(EvalConfig, recipe.get("eval"), "eval")

    data = dict(recipe.get("data") or {})
    spec, algo_cfg, rows = None, None, {}
    if with_training:
        algo = dict(recipe.get("algorithm") or {})
        spec = algorithm_for(algo.get("name", "dpo"), kind)
        section = _algorithm_section(recipe, spec)
        algo_cfg = to_dataclass(spec.config, section, "algorithm", ignore=RECIPE_KEYS)
        if spec.online and section.get("reward") is None:
            raise RecipeError(f"algorithm.reward is required for {spec.name}")
        for capability, setting in (spec.config_needs(algo_cfg) if spec.config_needs else {}).items():
            if capability not in kind.capabilities:
                raise RecipeError(
                    f"algorithm.{setting} needs {CAPABILITIES[capability]}, which model.kind {kind.name!r} lacks"
                )
        used = {DATA_KEYS[d] for d in spec.data + spec.optional_data}
        extra = sorted(k for k in data if k not in used and data[k] is not None)
        if extra:
            raise RecipeError(
                f"data.{extra[0]} is not read by algorithm {spec.name!r} (it reads: "
                f"{', '.join(f'data.{k}' for k in sorted(used)) or 'nothing'})"
            )
        for data_kind in spec.data + spec.optional_data:
            key = DATA_KEYS[data_kind]
            if not data.get(key):
                if data_kind in spec.optional_data:
                    continue
                raise RecipeError(f"data.{key} is required for algorithm {spec.name!r} ({data_kind} rows)")
            if data_kind not in kind.validators:
                raise RecipeError(f"model.kind {kind.name!r} cannot read data.{key} ({data_kind} rows)")
            rows[data_kind] = kind.validators[data_kind](_rows(data[key]))
    eval_pairs = kind.validators["pairs"](_rows(eval_cfg.pairs)) if eval_cfg.pairs else []
    eval_prompts = _rows(eval_cfg.prompts) if eval_cfg.prompts else []
    if eval_prompts and "prompts" in kind.validators:
        eval_prompts = kind.validators["prompts"](eval_prompts)
    rewards = [("eval.rewards", r) for r in eval_cfg.rewards]
    if with_training and spec is not None and spec.online:
        rewards.append(("algorithm.reward", _algorithm_section(recipe, spec)["reward"]))
    for where, r in rewards:
        reward = reward_spec(r if isinstance(r, str) else (r or {}).get("name"))
        if reward.outputs != kind.outputs:
            fitting = sorted(n for n, x in REWARDS.items() if x.outputs == kind.outputs)
            raise RecipeError(
                f"{where}: reward {reward.name!r} scores {reward.outputs} but model.kind {kind.name!r} outputs "
                f"{kind.outputs}; rewards for it: {', '.join(fitting)}"
            )
        if where == "algorithm.reward" and spec.needs_differentiable_reward:
            _check_backprop(spec, reward, kind, train_cfg)
    return Plan(kind, model_cfg, spec, algo_cfg, train_cfg, eval_cfg, rows, eval_pairs, eval_prompts, rewards)


def _check_backprop(spec: AlgorithmSpec, reward: RewardSpec, kind: ModelKind, train: TrainConfig) -> None:
    """Reward backprop descends the reward's gradient: a reward without one (JPEG size, DNSMOS) cannot train it,
    and gradients through a sampling chain need the trainer's norm clipping, which also catches NaN/inf."""
    if not reward.differentiable:
        fitting = sorted(n for n, x in REWARDS.items() if x.outputs == kind.outputs and x.differentiable)
        raise RecipeError(
            f"algorithm.reward: {spec.name} backpropagates through the reward, but reward {reward.name!r} is not "
            f"differentiable; differentiable rewards for {kind.name}: {', '.join(fitting) or 'none'} "
            "(or use a policy-gradient method such as ddpo)"
        )
    if train.max_grad_norm is None:
        raise RecipeError(
            f"train.max_grad_norm must be set for {spec.name}: gradients through a sampling chain can explode, and "
            "the clipped norm is where a NaN/inf gradient is caught before the update"
        )


def model_plan(recipe: dict[str, Any]) -> tuple[ModelKind, Any]:
    """The model kind and `model:` config of a recipe, checked (what `mmalign sample` needs, and nothing else)."""
    plugins.load()
    section = dict(recipe.get("model") or {})
    kind = model_kind(section.get("kind", "causal_lm"))
    return kind, to_dataclass(kind.config, section, "model")


def load_policy(kind: ModelKind, model_cfg: Any) -> Any:
    """Load the model a recipe names (hub id, local directory or zoo:// path), LoRA settings applied."""
    lora = getattr(model_cfg, "lora", None)
    return kind.build(model_cfg, to_dataclass(LoraSpec, lora, "model.lora") if lora is not None else None)


def build_run(recipe: dict[str, Any]) -> Run:
    """Check every input of a recipe, then load the model and return the run's objects.

    Data is read and validated before the model loads, and encoded (tokenised, VAE-encoded) after it.
    """
    import torch

    p = plan(recipe)
    answers = _answers(p.eval_prompts, p.rows.get("prompts", []))
    rewards = [build_reward(r, answers) for r in p.eval.rewards]
    algo_section = _algorithm_section(recipe, p.spec)
    reward = build_reward(algo_section["reward"], answers) if p.spec.online else None
    torch.manual_seed(p.train.seed)  # LoRA initialisation and any fresh heads follow the recipe seed
    policy = load_policy(p.kind, p.model)
    algorithm = p.spec.factory(policy, RunInputs(p.rows, reward), p.algorithm)
    evaluator, samples = p.kind.evaluation(
        EvalContext(policy, p.eval, p.eval_pairs, p.eval_prompts, rewards, p.rows.get("prompts", []), reward)
    )
    return Run(policy, algorithm, p.train, evaluator, RunReport(samples))


def build_evaluation(recipe: dict[str, Any]) -> tuple[Any, Any]:
    """The policy and evaluator of a recipe, without reading or encoding its training data (`mmalign eval`)."""
    import torch

    p = plan(recipe, with_training=False)
    rewards = [build_reward(r, _answers(p.eval_prompts)) for r in p.eval.rewards]
    torch.manual_seed(p.train.seed)
    policy = load_policy(p.kind, p.model)
    evaluator, _ = p.kind.evaluation(EvalContext(policy, p.eval, p.eval_pairs, p.eval_prompts, rewards, []))
    return policy, evaluator
