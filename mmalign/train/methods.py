"""The algorithm table: every method name, its objective family, the policy kind it trains and its factory.

A new method is its own module plus one registration here; `mmalign methods` prints the resulting matrix.
"""

from __future__ import annotations

from typing import Any

from mmalign.core.policy import DiffusionPolicy, SequencePolicy
from mmalign.core.registry import AlgorithmSpec, register_algorithm
from mmalign.objectives.preference import PREFERENCE_LOSSES
from mmalign.train.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from mmalign.train.diffusion_pg import DiffusionPGConfig, DiffusionPolicyGradient
from mmalign.train.diffusion_preference import PairDenoisingScores
from mmalign.train.image_terms import CorruptibleImagePolicy
from mmalign.train.iterative_dpo import IterativeDPO, IterativeDPOConfig
from mmalign.train.kto import KTOAlgorithm, KTOConfig
from mmalign.train.mdpo import MDPOAlgorithm, MDPOConfig
from mmalign.train.online import OnlineDPO, OnlineDPOConfig, PolicyGradientConfig, SequencePolicyGradient
from mmalign.train.online_diffusion import OnlineDiffusionDPO
from mmalign.train.povid import DenseDPOAlgorithm, DenseDPOConfig, POVIDAlgorithm, POVIDConfig
from mmalign.train.ppo import PPO, PPOConfig
from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig
from mmalign.train.reward_backprop import RewardBackprop, RewardBackpropConfig
from mmalign.train.supervised import RewardModelAlgorithm, RewardModelConfig, SFTAlgorithm, SFTConfig

# ------------------------------------------------------------------------------------- preference family
# every loss of the registry is an algorithm name, plus the names papers use for some of them
ALIASES = {"cdpo": "dpo", "slic": "hinge"}
# losses with no default for a parameter they need get one for the matrix test's two-step runs
TINY_LOSS_SETTINGS = {"rdpo": {"alpha": 0.1}, "odpo": {"alpha": 0.5}, "beta_dpo": {"alpha": 0.5}}


def _loss_needs(name: str) -> frozenset[str]:
    """Model capabilities a preference loss needs beyond pair log-ratios."""
    spec = PREFERENCE_LOSSES[name]
    needs = set()
    if spec.needs_entropies:
        needs.add("token_entropies")
    if spec.needs_lengths:
        needs.add("token_lengths")
    if (
        not spec.needs_reference
    ):  # a reference-free loss reads log π itself, which must be a probability's log
        needs.add("log_probabilities")
    return frozenset(needs)


def _config_needs(config: PreferenceConfig) -> dict[str, str]:
    """Capabilities the chosen loss and settings need (`loss` may differ from the name's, e.g. via `loss_type`)."""
    needs = {capability: f"loss: {config.loss}" for capability in _loss_needs(config.loss_name)}
    if config.length_normalize:
        needs["token_lengths"] = "length_normalize: true"
    if config.rpo_alpha:
        needs["log_probabilities"] = "rpo_alpha"
    for key in ("share_prompt", "padding_free"):
        if getattr(config, key):
            needs["token_packing"] = f"{key}: true"
    return needs


def _about(loss: str) -> str:
    doc = (PREFERENCE_LOSSES[loss].fn.__doc__ or "").strip().splitlines()
    return doc[0] if doc else loss


def _preference(policy: SequencePolicy, inputs: Any, config: PreferenceConfig) -> PreferenceAlgorithm:
    return PreferenceAlgorithm(policy, inputs.rows["pairs"], config)


def _diffusion_preference(
    policy: DiffusionPolicy, inputs: Any, config: PreferenceConfig
) -> PreferenceAlgorithm:
    return PreferenceAlgorithm(PairDenoisingScores(policy), inputs.rows["pairs"], config)


for _name, _loss in [*((n, n) for n in PREFERENCE_LOSSES), *ALIASES.items(), ("preference", "dpo")]:
    for _kind, _factory in (("sequence", _preference), ("diffusion", _diffusion_preference)):
        register_algorithm(
            AlgorithmSpec(
                _name,
                "preference",
                _kind,
                PreferenceConfig,
                _factory,
                data=("pairs",),
                needs=_loss_needs(_loss),
                # `dpo` and `preference` leave `loss` unset, so trl's `loss_type` can choose it
                defaults={} if _name in ("dpo", "preference") else {"loss": _loss},
                description=_about(_loss) if _name == _loss else f"{_name}: the {_loss} loss",
                config_needs=_config_needs,
                tiny=TINY_LOSS_SETTINGS.get(_loss, {}),
            )
        )
register_algorithm(
    AlgorithmSpec(
        "diffusion_dpo",
        "preference",
        "diffusion",
        PreferenceConfig,
        _diffusion_preference,
        data=("pairs",),
        defaults={"loss": "dpo"},
        description="Diffusion-DPO (Wallace et al. 2023): DPO on pairs of outputs",
        config_needs=_config_needs,
    )
)
register_algorithm(
    AlgorithmSpec(
        "kto",
        "preference",
        "sequence",
        KTOConfig,
        lambda policy, inputs, config: KTOAlgorithm(policy, inputs.rows["unpaired"], config),
        data=("unpaired",),
        description="KTO on unpaired desirable/undesirable completions",
    )
)


def _povid(policy: CorruptibleImagePolicy, inputs: Any, config: POVIDConfig) -> POVIDAlgorithm:
    return POVIDAlgorithm(policy, inputs.rows["pairs"], config)


def _dense_dpo(policy: CorruptibleImagePolicy, inputs: Any, config: DenseDPOConfig) -> DenseDPOAlgorithm:
    return DenseDPOAlgorithm(policy, inputs.rows["corrections"], config)


register_algorithm(
    AlgorithmSpec(
        "povid",
        "preference",
        "sequence",
        POVIDConfig,
        _povid,
        data=("pairs",),
        needs=frozenset({"image_inputs"}),
        description="POVID: DPO against hallucination-injected and noisy-image responses",
    )
)
register_algorithm(
    AlgorithmSpec(
        "mdpo",
        "preference",
        "sequence",
        MDPOConfig,
        lambda policy, inputs, config: MDPOAlgorithm(policy, inputs.rows["pairs"], config),
        data=("pairs",),
        needs=frozenset({"image_inputs"}),
        description="mDPO: DPO + the same response preferred under the real over a corrupted image + reward anchor",
    )
)
for _name in ("rlhfv", "dense_dpo"):
    register_algorithm(
        AlgorithmSpec(
            _name,
            "preference",
            "sequence",
            DenseDPOConfig,
            _dense_dpo,
            data=("corrections",),
            needs=frozenset({"image_inputs"}),
            description="RLHF-V dense DPO on segment-level corrections",
        )
    )


# ------------------------------------------------------------------------------------------- online
def _online_dpo(policy: SequencePolicy, inputs: Any, config: OnlineDPOConfig) -> OnlineDPO:
    return OnlineDPO(policy, inputs.rows["prompts"], inputs.reward, config)


def _online_diffusion_dpo(
    policy: DiffusionPolicy, inputs: Any, config: OnlineDPOConfig
) -> OnlineDiffusionDPO:
    return OnlineDiffusionDPO(policy, inputs.rows["prompts"], inputs.reward, config)


register_algorithm(
    AlgorithmSpec(
        "online_dpo",
        "preference",
        "sequence",
        OnlineDPOConfig,
        _online_dpo,
        data=("prompts",),
        description="online DPO: best vs worst of k own samples by a reward (OAIF with k = 2)",
        online=True,
        tiny={"samples_per_prompt": 2},
    )
)
for _name in ("online_dpo", "online_diffusion_dpo"):
    register_algorithm(
        AlgorithmSpec(
            _name,
            "preference",
            "diffusion",
            OnlineDPOConfig,
            _online_diffusion_dpo,
            data=("prompts",),
            description="online Diffusion-DPO: best vs worst of k own samples by a reward",
            online=True,
            tiny={"samples_per_prompt": 2},
        )
    )


def _iterative_dpo(policy: SequencePolicy, inputs: Any, config: IterativeDPOConfig) -> IterativeDPO:
    return IterativeDPO(policy, inputs.rows["prompts"], inputs.reward, config)


register_algorithm(
    AlgorithmSpec(
        "iterative_dpo",
        "preference",
        "sequence",
        IterativeDPOConfig,
        _iterative_dpo,
        data=("prompts",),
        description="iterative online DPO (seed 003): each iteration's pairs drawn by the policy at its start",
        online=True,
        tiny={"prompts_per_iteration": 16, "samples_per_prompt": 2},
    )
)


def _sequence_pg(policy: SequencePolicy, inputs: Any, config: PolicyGradientConfig) -> SequencePolicyGradient:
    return SequencePolicyGradient(policy, inputs.rows["prompts"], inputs.reward, config)


# the names and what they imply; a preset's settings are defaults a recipe may override (one config class)
SEQUENCE_PG_PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    "reinforce": ({"advantage": "reinforce"}, "REINFORCE with the batch-mean baseline"),
    "rloo": (
        {"advantage": "rloo"},
        "RLOO: leave-one-out baseline over k samples, PPO-clip, KL to the reference",
    ),
    "grpo": ({"advantage": "grpo"}, "GRPO: group-normalised advantages, PPO-clip, KL to the reference"),
    "dr_grpo": (
        {"advantage": "dr_grpo", "loss_type": "dr_grpo"},
        "Dr. GRPO: group-mean baseline without std scaling, sum over tokens / max_new_tokens",
    ),
    "dapo": (
        {
            "advantage": "grpo",
            "loss_type": "dapo",
            "epsilon": 0.2,
            "epsilon_high": 0.28,
            "dynamic_sampling": True,
            "mask_truncated_completions": True,
        },
        "DAPO: clip-higher, token-level loss, dynamic sampling (zero weight for tied groups), overlong filtering",
    ),
    "gspo": (
        {"advantage": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
        "GSPO: the length-normalised sequence importance ratio, clipped per sequence",
    ),
}
for _name, (_defaults, _description) in SEQUENCE_PG_PRESETS.items():
    register_algorithm(
        AlgorithmSpec(
            _name,
            "policy_gradient",
            "sequence",
            PolicyGradientConfig,
            _sequence_pg,
            data=("prompts",),
            defaults=_defaults,
            description=_description,
            online=True,
            tiny={} if _name == "reinforce" else {"samples_per_prompt": 2},
        )
    )


def _ppo(policy: SequencePolicy, inputs: Any, config: PPOConfig) -> PPO:
    return PPO(policy, inputs.rows["prompts"], inputs.reward, config)


register_algorithm(
    AlgorithmSpec(
        "ppo",
        "policy_gradient",
        "sequence",
        PPOConfig,
        _ppo,
        data=("prompts",),
        description="PPO with a value model (a head on the policy's backbone or a separate network), GAE, "
        "KL-shaped reward",
        online=True,
    )
)


def _diffusion_pg(policy: DiffusionPolicy, inputs: Any, config: DiffusionPGConfig) -> DiffusionPolicyGradient:
    return DiffusionPolicyGradient(
        policy, inputs.rows["prompts"], inputs.reward, config, targets=inputs.rows.get("targets", [])
    )


def _data_needs(config: DiffusionPGConfig) -> dict[str, str]:
    if config.uses_data:
        return {"real_targets": "diffusion_loss_on: data"}
    if config.diffusion_loss_coef and config.diffusion_loss_on == "samples":
        return {"forward_timesteps": "diffusion_loss_on: samples"}
    return {}


for _name, _defaults, _tiny, _description in (
    ("ddpo", {}, {}, "DDPO: PPO-clip (or the score function) over denoising steps"),
    ("dpok", {}, {"kl_coef": 0.1}, "DPOK: DDPO + KL to the base model's step distributions (kl_coef)"),
    (
        "dlpo",
        {"diffusion_loss_coef": 1.0},
        {},
        "DLPO: DDPO + the diffusion model's denoising loss (diffusion_loss_coef, on data or samples)",
    ),
    (
        "grpo",
        {"advantage": "grpo", "samples_per_prompt": 4},
        {"samples_per_prompt": 2},
        "GRPO on denoising trajectories: advantages normalised over each prompt's group of samples",
    ),
):
    register_algorithm(
        AlgorithmSpec(
            _name,
            "policy_gradient",
            "diffusion",
            DiffusionPGConfig,
            _diffusion_pg,
            data=("prompts",),
            optional_data=("targets",),
            defaults=_defaults,
            description=_description,
            online=True,
            config_needs=_data_needs,
            tiny=_tiny,
        )
    )


def _diffusion_nft(policy: DiffusionPolicy, inputs: Any, config: DiffusionNFTConfig) -> DiffusionNFT:
    return DiffusionNFT(policy, inputs.rows["prompts"], inputs.reward, config)


register_algorithm(
    AlgorithmSpec(
        "diffusion_nft",
        "policy_gradient",
        "diffusion",
        DiffusionNFTConfig,
        _diffusion_nft,
        data=("prompts",),
        description="DiffusionNFT: online RL on the forward process (positive/negative implicit policies, no log-probs, CFG-free)",
        online=True,
        tiny={"samples_per_prompt": 2},
    )
)


# --------------------------------------------------------------------------------------- supervised
register_algorithm(
    AlgorithmSpec(
        "sft",
        "supervised",
        "sequence",
        SFTConfig,
        lambda policy, inputs, config: SFTAlgorithm(policy, inputs.rows["completions"], config),
        data=("completions",),
        description="supervised fine-tuning on target responses",
    )
)
register_algorithm(
    AlgorithmSpec(
        "reward_model",
        "supervised",
        "scorer",
        RewardModelConfig,
        lambda model, inputs, config: RewardModelAlgorithm(model, inputs.rows["pairs"], config),
        data=("pairs",),
        description="Bradley–Terry reward-model training on preference pairs",
    )
)


# ---------------------------------------------------------------------------------------- reward backprop
def _reward_backprop(policy: DiffusionPolicy, inputs: Any, config: RewardBackpropConfig) -> RewardBackprop:
    return RewardBackprop(
        policy, inputs.rows["prompts"], inputs.reward, config, targets=inputs.rows.get("targets", [])
    )


def _pretrain_needs(config: RewardBackpropConfig) -> dict[str, str]:
    return {"real_targets": "pretrain_loss_coef"} if config.uses_data else {}


for _name, _defaults, _description in (
    (
        "alignprop",
        {"truncation": "uniform"},
        "AlignProp: reward backprop through a randomly truncated chain (first gradient step drawn per batch)",
    ),
    (
        "draft",
        {"truncation": "last"},
        "DRaFT-K: reward backprop through the last K denoising steps (backprop_steps; null = full DRaFT)",
    ),
    (
        "draft_lv",
        {"truncation": "last", "backprop_steps": 1, "last_step_repeats": 2},
        "DRaFT-LV: DRaFT-1 with the last step repeated from re-noised samples, rewards averaged",
    ),
    (
        "refl",
        {"truncation": "refl", "loss": "refl"},
        "ReFL: one gradient step at a random late step, its predicted clean sample scored (+ pretraining loss)",
    ),
):
    register_algorithm(
        AlgorithmSpec(
            _name,
            "reward_backprop",
            "diffusion",
            RewardBackpropConfig,
            _reward_backprop,
            data=("prompts",),
            optional_data=("targets",),
            needs=frozenset({"differentiable_decode"}),
            defaults=_defaults,
            description=_description,
            online=True,
            config_needs=_pretrain_needs,
            needs_differentiable_reward=True,
        )
    )
