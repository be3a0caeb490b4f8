"""From a recipe to the objects of a run: a lookup in the registries, checks, then the model (in that order).

A recipe has sections `model`, `data`, `algorithm`, `eval`, `train` and a top-level `seed`. `model.kind` names a
registered model kind, `algorithm.name` a registered algorithm, rewards are named in `eval.rewards` and
`algorithm.reward`. Everything that needs no model — every section's keys and values, the algorithm's fit to the
model kind, the data files' rows, the rewards — is checked before the model is loaded, so a typo never costs a
model load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from mmalign import plugins
from mmalign.core.config import RecipeError, to_dataclass
from mmalign.core.data import Row
from mmalign.core.errors import MmalignError, library_error
from mmalign.core.hf_data import load_rows
from mmalign.core.params import LoraSpec
from mmalign.core.paths import resolve
from mmalign.core.registry import (
    CAPABILITIES,
    DATA_KEYS,
    MODEL_KINDS,
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

# trl / transformers TrainingArguments names with the same meaning as an mmalign `train:` key (an alias), and those
# whose meaning differs (an error that says what to write instead). trl's names that mmalign shares unchanged
# (max_steps, num_train_epochs, warmup_steps, warmup_ratio, weight_decay, max_grad_norm, gradient_checkpointing,
# seed) need no entry.
TRL_TRAIN_ALIASES = {
    "learning_rate": "lr",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints",
}
TRL_TRAIN_DIFFERENT = {
    "per_device_train_batch_size": "train.batch_size, which is the global batch (summed over processes and "
    "accumulation steps, so a recipe gives the same run on any number of processes): set train.batch_size to "
    "per_device_train_batch_size × processes × gradient_accumulation_steps",
    "adam_beta1": "train.adam_betas: [beta1, beta2]",
    "adam_beta2": "train.adam_betas: [beta1, beta2]",
    "bf16": "train.mixed_precision: bf16",
    "fp16": "train.mixed_precision: fp16",
    "report_to": "train.log_with (a list of tensorboard, wandb)",
    "output_dir": "the --output-dir option of mmalign train",
}
# trl's script arguments for data: one dataset id and its splits, onto `data:` / `eval:` sources (README: Data)
TRL_DATA_KEYS = (
    "dataset_name",
    "dataset_config",
    "dataset_train_split",
    "dataset_test_split",
    "dataset_streaming",
)


@dataclass
class EvalConfig:
    """`eval:` held-out data, the rewards reported, and sampling budget.

    `judges` lists independent evaluators, written like `rewards` (a name, or a mapping with `name` and options,
    e.g. `{name: digit_judge, path: zoo://image/judge}`): rewards that no run trains on. A diffusion evaluation
    reports each judge's mean, agreement and paired agreement gain beside the rewards, and
    `<judge>_hacking_gap(_se)`: the training reward's agreement gain minus the judge's (see `DiffusionEvaluator`),
    the reward-hacking signal. A recipe whose `algorithm.reward` is one of its judges is refused before any model
    loads (same spec, or the same `path`), so a judge stays independent of what it judges.
    """

    pairs: str | dict[str, Any] | None = None  # a data source (see README: Data)
    prompts: str | dict[str, Any] | None = None
    rewards: list[Any] = field(default_factory=list)
    judges: list[Any] = field(default_factory=list)  # diffusion: rewards never trained on
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
    judges: list[Any] = field(default_factory=list)


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
    path = options.get("path") or options.get("model")
    try:
        return reward.build(options, answers or {})
    except (TypeError, KeyError) as err:
        raise RecipeError(f"reward {reward.name!r}: {err}") from err
    except MmalignError:
        raise
    except (OSError, ValueError) as err:
        named = library_error(err, f"reward {reward.name!r}", path)
        if named is None:
            raise
        raise named from err


def _algorithm_section(recipe: dict[str, Any], spec: AlgorithmSpec) -> dict[str, Any]:
    section = dict(recipe.get("algorithm") or {})
    for key, value in spec.defaults.items():
        section.setdefault(key, value)
    return section


def _renamed(section: dict[str, Any], where: str, aliases: dict[str, str], different: dict[str, str]) -> dict:
    """A section with other tools' names folded into mmalign's (both given with different values is an error)."""
    out = dict(section)
    for key, hint in different.items():
        if key in out:
            raise RecipeError(f"{where}.{key} is trl's name; mmalign's is {hint}")
    for theirs, ours in aliases.items():
        if theirs in out:
            value = out.pop(theirs)
            if ours in out and out[ours] != value:
                raise RecipeError(
                    f"{where}.{theirs} (trl's name for {where}.{ours}) is {value!r} but {where}.{ours} is "
                    f"{out[ours]!r}; give one of them"
                )
            out[ours] = value
    return out


def train_section(recipe: dict[str, Any]) -> dict[str, Any]:
    """The `train:` section with trl's names folded in and the recipe's seed, ready for `TrainConfig`."""
    section = _renamed(dict(recipe.get("train") or {}), "train", TRL_TRAIN_ALIASES, TRL_TRAIN_DIFFERENT)
    if "max_steps" in section and section["max_steps"] is None:  # `max_steps: null`: unset (e.g. for epochs)
        del section["max_steps"]
    if section.get("max_steps") is not None and section.get("num_train_epochs") is not None:
        raise RecipeError("give train.max_steps or train.num_train_epochs, not both")
    section.setdefault("seed", recipe.get("seed", 0))
    return section


def _with_trl_data(recipe: dict[str, Any], spec: AlgorithmSpec | None) -> dict[str, Any]:
    """trl's `dataset_name` / `dataset_train_split` / `dataset_test_split` (and `dataset_config`,
    `dataset_streaming`) as data sources: the train split feeds the data key the algorithm reads first, the test
    split the held-out key of the same kind (eval.pairs for pairs, eval.prompts for prompts)."""
    data = dict(recipe.get("data") or {})
    given = {k: data.pop(k) for k in TRL_DATA_KEYS if k in data}
    if not given:
        return recipe
    if not given.get("dataset_name"):
        raise RecipeError(
            f"data.{next(iter(given))} needs data.dataset_name (the dataset's hub id or directory)"
        )
    source: dict[str, Any] = {"path": given["dataset_name"]}
    if given.get("dataset_config") is not None:
        source["name"] = given["dataset_config"]
    if given.get("dataset_streaming") is not None:
        source["streaming"] = given["dataset_streaming"]
    data_kind = spec.data[0] if spec is not None and spec.data else "pairs"
    key = DATA_KEYS[data_kind]
    if spec is not None:
        if data.get(key) is not None:
            raise RecipeError(f"give data.{key} or data.dataset_name, not both")
        split = given.get("dataset_train_split")
        data[key] = {**source, "split": split} if split is not None else source
    out = {**recipe, "data": data}
    if given.get("dataset_test_split") is not None:
        held_out = {"pairs": "pairs", "prompts": "prompts"}.get(data_kind)
        if held_out is None:
            raise RecipeError(
                f"data.dataset_test_split: algorithm {spec.name!r} reads {data_kind} rows, which have no held-out "
                "key; give eval.pairs or eval.prompts yourself"
            )
        evaluation = dict(recipe.get("eval") or {})
        if evaluation.get(held_out) is not None:
            raise RecipeError(f"give eval.{held_out} or data.dataset_test_split, not both")
        evaluation[held_out] = {**source, "split": given["dataset_test_split"]}
        out["eval"] = evaluation
    return out


def plan(recipe: dict[str, Any], *, with_training: bool = True) -> Plan:
    """Check a whole recipe and read its data without loading any model (what `mmalign validate` runs first)."""
    unknown = sorted(set(recipe) - set(SECTIONS))
    if unknown:
        raise RecipeError(f"unknown recipe section(s) {unknown}; known: {sorted(SECTIONS)}")
    for name in ("model", "data", "algorithm", "eval", "train"):
        if recipe.get(name) is not None and not isinstance(recipe[name], dict):
            raise RecipeError(f"recipe section `{name}` must be a mapping, got {type(recipe[name]).__name__}")
    train_cfg = to_dataclass(TrainConfig, train_section(recipe), "train")
    kind, model_cfg = model_plan(recipe)
    if getattr(model_cfg, "lora", None) is not None:
        to_dataclass(LoraSpec, model_cfg.lora, "model.lora")
    if train_cfg.gradient_checkpointing and "gradient_checkpointing" not in kind.capabilities:
        fitting = sorted(k for k, m in MODEL_KINDS.items() if "gradient_checkpointing" in m.capabilities)
        raise RecipeError(
            f"train.gradient_checkpointing: model.kind {kind.name!r} does not support it (kinds that do: "
            f"{', '.join(fitting)})"
        )
    algo = dict(recipe.get("algorithm") or {})
    spec = algorithm_for(algo.get("name", "dpo"), kind) if with_training else _known_algorithm(algo, kind)
    recipe = _with_trl_data(recipe, spec)
    eval_cfg = to_dataclass(EvalConfig, recipe.get("eval"), "eval")

    data = dict(recipe.get("data") or {})
    algo_cfg, rows = None, {}
    if with_training:
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
        first = spec.data[0]
        train_cfg = _for_data(train_cfg, len(rows[first]), spec, algo_cfg)
    eval_pairs = kind.validators["pairs"](_rows(eval_cfg.pairs)) if eval_cfg.pairs else []
    eval_prompts = _rows(eval_cfg.prompts) if eval_cfg.prompts else []
    if eval_prompts and "prompts" in kind.validators:
        eval_prompts = kind.validators["prompts"](eval_prompts)
    rewards = [("eval.rewards", r, eval_prompts) for r in eval_cfg.rewards]
    rewards += [(f"eval.judges[{i}]", j, eval_prompts) for i, j in enumerate(eval_cfg.judges)]
    if eval_cfg.judges and kind.policy_kind != "diffusion":
        raise RecipeError(
            f"eval.judges: model.kind {kind.name!r} does not report judges (diffusion model kinds do); "
            "list the scorer in eval.rewards"
        )
    if with_training and spec is not None and spec.online:
        training_reward = _algorithm_section(recipe, spec)["reward"]
        check_judges_independent(training_reward, eval_cfg.judges)
        rewards.append(("algorithm.reward", training_reward, rows.get("prompts", [])))
    for where, r, scored in rewards:
        reward = reward_spec(r if isinstance(r, str) else (r or {}).get("name"))
        if reward.outputs != kind.outputs:
            fitting = sorted(n for n, x in REWARDS.items() if x.outputs == kind.outputs)
            raise RecipeError(
                f"{where}: reward {reward.name!r} scores {reward.outputs} but model.kind {kind.name!r} outputs "
                f"{kind.outputs}; rewards for it: {', '.join(fitting)}"
            )
        if where == "algorithm.reward" and spec.needs_differentiable_reward:
            _check_backprop(spec, reward, kind, train_cfg)
        if reward.check_rows is not None:
            reward.check_rows(scored)
    reward_specs = [(where, r) for where, r, _ in rewards]
    return Plan(
        kind, model_cfg, spec, algo_cfg, train_cfg, eval_cfg, rows, eval_pairs, eval_prompts, reward_specs
    )


def _known_algorithm(algo: dict[str, Any], kind: ModelKind) -> AlgorithmSpec | None:
    """The algorithm a recipe names if it fits (`mmalign eval` reads a trained run's recipe, but needs no algorithm)."""
    try:
        return algorithm_for(algo.get("name", "dpo"), kind)
    except RecipeError:
        return None


def _for_data(train: TrainConfig, n_items: int, spec: AlgorithmSpec, algo_cfg: Any) -> TrainConfig:
    """`train.num_train_epochs` as optimizer steps over the training rows (prompts, for online algorithms)."""
    k = getattr(algo_cfg, "samples_per_prompt", 1)
    if spec.online and not train.rollout_prompts and train.batch_size < k:
        raise RecipeError(
            f"train.batch_size ({train.batch_size}) is smaller than algorithm.samples_per_prompt ({k}): a rollout "
            "of batch_size / samples_per_prompt prompts would have none; raise batch_size or set train.rollout_prompts"
        )
    try:
        return train.for_data(
            n_items, online=spec.online, samples_per_prompt=getattr(algo_cfg, "samples_per_prompt", 1)
        )
    except ValueError as err:
        raise RecipeError(str(err)) from err


def preflight(p: Plan) -> None:
    """Every check that reads the model's files but none of its weights (layout, weight-file integrity, tokenizer
    coverage of the data, text-encoder length); `mmalign validate` and `build_run` run it after `plan`."""
    if p.kind.preflight is None:
        return
    rows = {k: list(v) for k, v in p.rows.items()}
    rows["pairs"] = [*rows.get("pairs", []), *p.eval_pairs]
    rows["prompts"] = [*rows.get("prompts", []), *p.eval_prompts]
    try:
        p.kind.preflight(p.model, rows)
    except MmalignError:
        raise
    except (OSError, ValueError) as err:
        named = library_error(err, "model.name_or_path", getattr(p.model, "name_or_path", None))
        if named is None:
            raise
        raise named from err


def validate(recipe: dict[str, Any]) -> dict[str, Any]:
    """`mmalign validate`: `plan` and `preflight` (no weights load); returns what the recipe resolves to."""
    p = plan(recipe)
    preflight(p)
    return {
        "valid": True,
        "model": {"kind": p.kind.name, "name_or_path": getattr(p.model, "name_or_path", "")},
        "algorithm": {"name": p.spec.name, "family": p.spec.family, "policy": p.spec.policy_kind},
        "rows": {kind: len(rows) for kind, rows in p.rows.items()},
        "eval": {"pairs": len(p.eval_pairs), "prompts": len(p.eval_prompts)},
        "rewards": [r if isinstance(r, str) else r.get("name") for _, r in p.reward_specs],
        "train": {
            "max_steps": p.train.max_steps,
            "warmup_steps": p.train.warmup(),
            "batch_size": p.train.batch_size,
            "lr": p.train.lr,
        },
    }


PATH_OPTIONS = ("path", "model", "pretrained", "checkpoint", "head", "processor")  # options naming files
WEIGHT_OPTIONS = ("path", "checkpoint", "head")  # options naming a scorer's own weights


def _canonical_path(value: Any) -> Any:
    """A path option compared by where it points: zoo:// paths as written (no world is built), others absolute."""
    if not isinstance(value, str) or not value:
        return value
    if "://" in value:
        return value.rstrip("/")
    return str(Path(value).expanduser().resolve())


def _reward_identity(spec: Any) -> dict[str, Any]:
    options = {"name": spec} if isinstance(spec, str) else dict(spec or {})
    return {k: _canonical_path(v) if k in PATH_OPTIONS else v for k, v in options.items()}


def check_judges_independent(training_reward: Any, judges: list[Any]) -> None:
    """Refuse a training reward that is one of the run's judges: the same spec, or a scorer loaded from the same
    weights (`path`, `checkpoint`, `head`) under another name or options (a judge trained against is no longer
    independent)."""
    trained = _reward_identity(training_reward)
    for i, judge in enumerate(judges):
        other = _reward_identity(judge)
        same_weights = any(
            trained.get(k) is not None and trained.get(k) == other.get(k) for k in WEIGHT_OPTIONS
        )
        if trained == other or same_weights:
            raise RecipeError(
                f"algorithm.reward {training_reward!r} is eval.judges[{i}] ({judge!r}): a judge must never be the "
                "training reward of its own run; train on another reward or judge with another model"
            )


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
    """Load the model a recipe names (hub id, local directory or zoo:// path), LoRA settings applied; a loader's
    error for a user's mistake (missing path or file, truncated weights) is a `ModelError` naming the key."""
    lora = getattr(model_cfg, "lora", None)
    spec = to_dataclass(LoraSpec, lora, "model.lora") if lora is not None else None
    try:
        return kind.build(model_cfg, spec)
    except MmalignError:
        raise
    except (OSError, ValueError) as err:
        named = library_error(err, "model.name_or_path", getattr(model_cfg, "name_or_path", None))
        if named is None:
            raise
        raise named from err


def build_run(recipe: dict[str, Any]) -> Run:
    """Check every input of a recipe, then load the model and return the run's objects.

    Data is read and validated before the model loads, and encoded (tokenised, VAE-encoded) after it.
    """
    import torch

    p = plan(recipe)
    preflight(p)
    answers = _answers(p.eval_prompts, p.rows.get("prompts", []))
    rewards = [build_reward(r, answers) for r in p.eval.rewards]
    judges = [build_reward(j, answers) for j in p.eval.judges]
    algo_section = _algorithm_section(recipe, p.spec)
    reward = build_reward(algo_section["reward"], answers) if p.spec.online else None
    torch.manual_seed(p.train.seed)  # LoRA initialisation and any fresh heads follow the recipe seed
    policy = load_policy(p.kind, p.model)
    algorithm = p.spec.factory(policy, RunInputs(p.rows, reward), p.algorithm)
    context = EvalContext(
        policy, p.eval, p.eval_pairs, p.eval_prompts, rewards, p.rows.get("prompts", []), reward, judges
    )
    evaluator, samples = p.kind.evaluation(context)
    return Run(policy, algorithm, p.train, evaluator, RunReport(samples))


def build_evaluation(recipe: dict[str, Any]) -> tuple[Any, Any]:
    """The policy and evaluator of a recipe, without reading or encoding its training data (`mmalign eval`)."""
    import torch

    p = plan(recipe, with_training=False)
    preflight(p)
    rewards = [build_reward(r, _answers(p.eval_prompts)) for r in p.eval.rewards]
    judges = [build_reward(j, _answers(p.eval_prompts)) for j in p.eval.judges]
    torch.manual_seed(p.train.seed)
    policy = load_policy(p.kind, p.model)
    context = EvalContext(policy, p.eval, p.eval_pairs, p.eval_prompts, rewards, [], judges=judges)
    evaluator, _ = p.kind.evaluation(context)
    return policy, evaluator
