"""The method × model matrix as data: model kinds, algorithms and rewards register here; a run is a lookup.

Adapter packages register **model kinds** (the `model.kind` of a recipe: its config class, the policy kind it
builds, row validators per data kind, its evaluation); algorithm modules register **algorithms** (name, objective
family, the policy kind they run on, config class, factory). An algorithm fits a model kind when it is registered
for the model's policy kind, the model can validate every data kind the algorithm reads, and the model has every
capability the algorithm needs; otherwise `why_not` says why, in words a user can act on. Registration modules are
imported by `mmalign.plugins`, so building a run never walks an if-chain of names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mmalign.core.config import RecipeError

POLICY_KINDS = ("sequence", "diffusion", "scorer")
FAMILIES = ("preference", "policy_gradient", "reward_backprop", "supervised")

# What a capability means, for error messages and `mmalign methods`.
CAPABILITIES = {
    "token_entropies": "per-token predictive entropies over a vocabulary",
    "token_lengths": "responses made of tokens whose count means length",
    "log_probabilities": "exact log-probabilities of outputs (a likelihood that is a probability)",
    "image_inputs": "an image with every prompt",
    "image_pairs": "preference pairs of images",
    "audio_pairs": "preference pairs of audio files",
    "real_targets": "real outputs of the prompts (data.targets) it can encode",
    "differentiable_decode": "a decoder that passes gradients from the output back to the latents",
    "gradient_checkpointing": "activation (gradient) checkpointing in its trained network",
    "token_packing": "token-only sequences that can be packed with their own positions and attention mask",
    "forward_timesteps": "sampler timesteps that are its forward process's (a denoising loss on its own samples)",
}


@dataclass(frozen=True)
class ModelKind:
    """One `model.kind`: how a recipe's `model:` section becomes a policy, and what its runs can read and report.

    `build(config, lora)` loads the policy; `validators` maps a data kind ("pairs", "unpaired", "prompts",
    "completions", "corrections", "targets") to a function that checks rows of that kind for this model before any
    model is loaded; `evaluation(context)` returns (evaluator or None, report). `tiny` is a recipe fragment on the
    seconds-fast zoo worlds (model, data by data kind, eval) that the matrix test runs every fitting cell on.
    `preflight(config, rows)` checks what needs the model's files but none of its weights: the directory layout
    and weight-file integrity, and the rows (by data kind, held-out rows included) against the tokenizer or text
    encoder (vocabulary coverage, lengths); `mmalign validate` and `build_run` run it before loading weights.
    """

    name: str
    policy_kind: str
    config: type
    build: Callable[[Any, Any], Any]
    evaluation: Callable[[Any], tuple[Any, Any]]
    validators: Mapping[str, Callable[[list[Any]], list[Any]]] = field(default_factory=dict)
    capabilities: frozenset[str] = frozenset()
    outputs: str = "text"  # what its rewards score: text | image | mel | waveform
    description: str = ""
    tiny: Callable[[], dict[str, Any]] | None = None
    preflight: Callable[[Any, Mapping[str, list[Any]]], None] | None = None


@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm on one policy kind: `factory(policy, inputs, config)` returns the trainer's algorithm.

    `data` lists the data kinds it reads from `data:` (e.g. "pairs" from `data.train`), `optional_data` those it
    reads when given; `needs` the model capabilities it requires; `defaults` are recipe settings the name implies (e.g. `ipo` → `loss: ipo`);
    `tiny` the settings the matrix test adds to a model kind's tiny recipe (a few-second run).
    """

    name: str
    family: str
    policy_kind: str
    config: type
    factory: Callable[[Any, Any, Any], Any]
    data: tuple[str, ...] = ()
    needs: frozenset[str] = frozenset()
    optional_data: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    tiny: Mapping[str, Any] = field(default_factory=dict)
    online: bool = False
    config_needs: Callable[[Any], dict[str, str]] | None = None  # capability → the setting that needs it
    needs_differentiable_reward: bool = False  # reward backprop: `algorithm.reward` must pass gradients


@dataclass(frozen=True)
class RewardSpec:
    """A reward a recipe names: `build(options, context)` returns a `Reward`; `differentiable` tells reward
    backprop whether it may be used; `outputs` names what it scores (text, image, mel, waveform).
    `check_rows(rows)` raises a `DataError` for a prompt row the reward cannot score (e.g. `answer_match` needs an
    `answer` field), before any model is loaded."""

    name: str
    build: Callable[[dict[str, Any], Any], Any]
    outputs: str
    differentiable: bool
    description: str = ""
    check_rows: Callable[[list[Any]], None] | None = None


MODEL_KINDS: dict[str, ModelKind] = {}
ALGORITHMS: dict[str, dict[str, AlgorithmSpec]] = {}  # name → policy kind → spec
REWARDS: dict[str, RewardSpec] = {}
# which data-section key each data kind is read from
DATA_KEYS = {
    "pairs": "train",
    "unpaired": "train",
    "completions": "train",
    "corrections": "train",
    "prompts": "prompts",
    "targets": "targets",
}


def register_model_kind(kind: ModelKind) -> ModelKind:
    """Add a model kind; registering a name twice is an error (two adapters would fight over it)."""
    if kind.policy_kind not in POLICY_KINDS:
        raise ValueError(f"model kind {kind.name!r}: policy_kind must be one of {POLICY_KINDS}")
    unknown = set(kind.capabilities) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"model kind {kind.name!r}: unknown capabilities {sorted(unknown)}")
    if kind.name in MODEL_KINDS and MODEL_KINDS[kind.name] is not kind:
        raise ValueError(f"model kind {kind.name!r} is registered twice")
    MODEL_KINDS[kind.name] = kind
    return kind


def register_algorithm(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Add an algorithm for one policy kind (the same name may be registered once per policy kind)."""
    if spec.family not in FAMILIES:
        raise ValueError(f"algorithm {spec.name!r}: family must be one of {FAMILIES}")
    if spec.policy_kind not in POLICY_KINDS:
        raise ValueError(f"algorithm {spec.name!r}: policy_kind must be one of {POLICY_KINDS}")
    unknown = (set(spec.needs) - set(CAPABILITIES)) | (set(spec.data + spec.optional_data) - set(DATA_KEYS))
    if unknown:
        raise ValueError(f"algorithm {spec.name!r}: unknown capabilities or data kinds {sorted(unknown)}")
    by_kind = ALGORITHMS.setdefault(spec.name, {})
    if spec.policy_kind in by_kind and by_kind[spec.policy_kind] is not spec:
        raise ValueError(f"algorithm {spec.name!r} is registered twice for {spec.policy_kind} policies")
    by_kind[spec.policy_kind] = spec
    return spec


def register_reward(spec: RewardSpec) -> RewardSpec:
    if spec.name in REWARDS and REWARDS[spec.name] is not spec:
        raise ValueError(f"reward {spec.name!r} is registered twice")
    REWARDS[spec.name] = spec
    return spec


def model_kind(name: str) -> ModelKind:
    if name not in MODEL_KINDS:
        raise RecipeError(f"model.kind must be one of {', '.join(sorted(MODEL_KINDS))}; got {name!r}")
    return MODEL_KINDS[name]


def why_not(algorithm: str, kind: ModelKind) -> str | None:
    """None if `algorithm` runs on model kind `kind`, else the reason in one sentence."""
    specs = ALGORITHMS[algorithm]
    spec = specs.get(kind.policy_kind)
    if spec is None:
        wanted = " or ".join(sorted(specs))
        return f"{algorithm} trains {wanted} policies; {kind.name} is a {kind.policy_kind} policy"
    missing_data = [d for d in spec.data if d not in kind.validators]
    if missing_data:
        return f"{algorithm} reads {', '.join(missing_data)} rows, which {kind.name} has no schema for"
    missing = sorted(set(spec.needs) - set(kind.capabilities))
    if missing:
        return f"{algorithm} needs {'; '.join(CAPABILITIES[m] for m in missing)}, which {kind.name} lacks"
    if spec.config_needs is not None:
        default_needs = _default_config_needs(spec)
        lacking = sorted(c for c in default_needs if c not in kind.capabilities)
        if lacking:
            needed = "; ".join(f"{CAPABILITIES[c]} ({default_needs[c]})" for c in lacking)
            return f"{algorithm} with its default settings needs {needed}, which {kind.name} lacks"
    if spec.needs_differentiable_reward and not any(
        r.differentiable and r.outputs == kind.outputs for r in REWARDS.values()
    ):
        return f"{algorithm} backpropagates through its reward, and no registered reward of {kind.outputs} is differentiable"
    return None


def _default_config_needs(spec: AlgorithmSpec) -> dict[str, str]:
    """The capabilities the algorithm's settings need when a recipe gives only its name."""
    assert spec.config_needs is not None
    fields = {f.name for f in dataclasses.fields(spec.config)}
    try:
        config = spec.config(**{k: v for k, v in {"name": spec.name, **spec.defaults}.items() if k in fields})
    except (TypeError, ValueError):  # a setting without a default: no recipe runs on defaults alone
        return {}
    return spec.config_needs(config)


def algorithm_for(name: str, kind: ModelKind) -> AlgorithmSpec:
    """The spec of algorithm `name` for a model kind, or a named error listing what would fit."""
    if name not in ALGORITHMS:
        raise RecipeError(f"unknown algorithm.name {name!r}; known: {', '.join(sorted(ALGORITHMS))}")
    reason = why_not(name, kind)
    if reason is not None:
        fitting = [a for a in sorted(ALGORITHMS) if why_not(a, kind) is None]
        raise RecipeError(
            f"algorithm {name!r} does not fit model.kind {kind.name!r}: {reason}. "
            f"Algorithms for {kind.name}: {', '.join(fitting)}"
        )
    return ALGORITHMS[name][kind.policy_kind]


def reward_spec(name: Any) -> RewardSpec:
    if name not in REWARDS:
        raise RecipeError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]
