"""PPO with a value model for sequence policies: the classical RLHF setup (seed 001 §3.1, Eq. (2); Ziegler et al.
2019; Ouyang et al. 2022; trl PPOTrainer), for text LLMs and VLMs alike.

One rollout samples responses, scores them with the reward, and computes in one no-grad pass the old per-token
log-probs and values; the reference's log-probs give the per-token KL-shaped reward

    r_t = −β · KL_t + [t = last response token] · r_φ(x, y)                 (`kl_shaped_rewards`, k1 by default)

from which GAE (γ, λ) gives advantages and returns (`gae_advantages`); advantages are whitened over the global batch
(`masked_whiten` on the rows of every process). Each update minimises

    L = L_clip(π_θ; A, ε) + vf_coef · ½ · max((V − R)², (clip(V, V_old ± ε_v) − R)²)

with both per-token terms averaged over the global batch's response tokens (loss_type dapo; `grpo` averages per
sequence first).

The value function V_t reads the state before response token t. `value_model: null` puts a `torch.nn.Linear` head on
the policy's last hidden state (one forward gives log-probs and values; with LoRA the backbone is shared and frozen
except the adapter, so the value loss also trains the adapter); `value_model: PATH` loads a separate network of the
policy's architecture class from PATH (a local directory or hub id) with its own head, fully trained. Either way
the head (and the separate network) is registered as a submodule of the policy's module: its parameters are among
`policy.trainable_parameters()`, so the optimizer steps them, checkpoints save and restore them (exact resume), and
distributed training all-reduces their gradients. They are kept out of `final/` (the policy's save_pretrained):
the value function is training state, not part of the aligned model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from mmalign.core.data import Row
from mmalign.core.reward import Reward, score
from mmalign.core.types import Batch
from mmalign.objectives import policy_gradient as PG
from mmalign.train.algorithm import AlgorithmBase
from mmalign.train.distributed import gather_all, process_info, this_process
from mmalign.train.online import completion_examples, input_fields, model_inputs, policy_device

VALUE_HEAD = "value_head"
VALUE_MODEL = "value_model"


@dataclass
class PPOConfig:
    """The `algorithm:` section of ppo, in trl PPOTrainer's names where it has them."""

    name: str = "ppo"
    samples_per_prompt: int = 1
    epsilon: float = 0.2  # trl cliprange
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # β of the KL penalty in the reward
    kl_estimator: str = "k1"
    whiten_rewards: bool = False
    loss_type: str = (
        "dapo"  # dapo: mean over the global batch's tokens (trl's masked mean) · grpo: per sequence
    )
    value_model: str | None = None  # None: a head on the policy's backbone · a path: a separate network

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be ≥ 1, got {self.samples_per_prompt}")
        for name in ("epsilon", "cliprange_value"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.vf_coef < 0 or self.kl_coef < 0:
            raise ValueError(f"vf_coef and kl_coef must be ≥ 0, got {self.vf_coef} and {self.kl_coef}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.kl_estimator not in PG._KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.loss_type not in ("dapo", "grpo"):
            raise ValueError(
                f"loss_type must be dapo (token mean) or grpo (sequence mean), got {self.loss_type!r}"
            )


def attach_value_function(policy: Any, value_model: str | None) -> None:
    """Give the policy's module a value head (and, with `value_model`, a separate network under it), zero-initialised
    so every value starts at 0, and keep them out of the policy's saved weights."""
    module = policy.module
    if hasattr(module, VALUE_HEAD):
        raise ValueError("the policy already has a value head (was ppo built twice on one policy?)")
    names = [VALUE_HEAD]
    if value_model is not None:
        base_class = type(_base_model(module))
        if not issubclass(base_class, PreTrainedModel):
            raise ValueError(
                f"algorithm.value_model loads a transformers model; the policy's network is a {base_class.__name__}"
            )
        network = base_class.from_pretrained(value_model)
        # transformers wraps `to` with functools.wraps(torch.nn.Module.to), which types it as unbound
        network.to(policy_device(policy)).requires_grad_(True)  # type: ignore[arg-type]
        module.add_module(VALUE_MODEL, network)
        names.append(VALUE_MODEL)
        width = network.get_output_embeddings().weight.shape[1]
    else:
        width = module.get_output_embeddings().weight.shape[1]
    head = torch.nn.Linear(width, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    module.add_module(VALUE_HEAD, head.to(policy_device(policy)))
    base = _base_model(module)
    if base is module:  # full fine-tuning saves the module's state dict: leave the value function out
        ignored = set(getattr(module, "_keys_to_ignore_on_save", None) or ())
        ignored |= {n for n in module.state_dict() if n.split(".")[0] in names}
        # torch types Module attributes as Tensor | Module; transformers reads this set when saving
        module._keys_to_ignore_on_save = ignored  # type: ignore[assignment]


def _base_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the module itself without one)."""
    get_base_model = getattr(module, "get_base_model", None)
    return get_base_model() if get_base_model is not None else module


class PPO(AlgorithmBase):
    """PPO-clip with a learned value function, GAE and a KL-shaped reward, on any sequence policy."""

    online = True

    def __init__(self, policy: Any, prompts: Sequence[Row], reward: Reward, config: PPOConfig):
        self.policy, self.prompts, self.reward, self.config = policy, list(prompts), reward, config
        self.samples_per_prompt = config.samples_per_prompt
        attach_value_function(policy, config.value_model)

    def _values(self, inputs: dict[str, torch.Tensor], hidden: torch.Tensor | None) -> torch.Tensor:
        """V at every position that predicts a token, [B, T − 1], from the shared hidden states or the value
        network's own."""
        module = self.policy.module
        if self.config.value_model is not None:
            network = getattr(module, VALUE_MODEL)
            device = policy_device(self.policy)
            out = network(
                **self.policy._model_inputs(inputs, device), use_cache=False, output_hidden_states=True
            )
            hidden = out.hidden_states[-1][:, :-1]
        if hidden is None:
            raise ValueError("the value head reads the policy's hidden states; none were computed")
        return getattr(module, VALUE_HEAD)(hidden.float()).squeeze(-1)

    def _forward(self, inputs: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        shared = self.config.value_model is None
        lp = self.policy.sequence_logprobs(inputs, hidden_states=shared)
        return lp, self._values(inputs, lp.hidden_states)

    @torch.no_grad()
    def rollout(self, rows: Sequence[Row]) -> tuple[Batch, dict[str, float]]:
        cfg, policy, k = self.config, self.policy, self.config.samples_per_prompt
        prompts = [policy.prompt_of(r) for r in rows]
        outputs = policy.generate(prompts, num_samples=k)
        reward_prompts = [policy.reward_prompt(r) for r in rows for _ in range(k)]
        scores = score(self.reward, reward_prompts, outputs).float().cpu()
        inputs = policy.collate_completions(completion_examples(prompts, outputs, k))
        old, values = self._forward(inputs)
        with policy.reference():
            ref = policy.sequence_logprobs(inputs)
        mask, logps, ref_logps, values = (
            old.mask.cpu(),
            old.token_logps.cpu(),
            ref.token_logps.cpu(),
            values.cpu(),
        )
        values = values * mask
        # responses follow their prompts: move each to column 0 for the KL shaping and GAE, then back
        starts = mask.to(torch.long).argmax(dim=-1)
        front = _to_front(mask, starts)
        rewards = PG.kl_shaped_rewards(
            scores,
            _to_front(logps, starts),
            _to_front(ref_logps, starts),
            front,
            cfg.kl_coef,
            cfg.kl_estimator,
        )
        if cfg.whiten_rewards:
            rewards = _whiten_global(rewards, front, shift_mean=False)
        advantages, returns = PG.gae_advantages(rewards, _to_front(values, starts), front, cfg.gamma, cfg.lam)
        advantages = _whiten_global(advantages, front)
        kl = (logps - ref_logps) * mask
        all_tokens = gather_all(mask.sum(-1))
        fields: dict[str, Any] = {
            **input_fields(inputs),
            "mask": mask,
            "old_logps": logps,
            "old_values": values,
            "advantages": _to_back(advantages, starts),
            "returns": _to_back(returns, starts),
            "tokens_per_sample": torch.full((len(outputs),), float(all_tokens.sum()) / len(all_tokens)),
        }
        lengths = mask.sum(-1)
        metrics = {
            "rollout/reward": gather_all(scores).mean().item(),
            "rollout/kl": (kl.sum(-1)).mean().item(),
            "rollout/response_tokens": lengths.mean().item(),
            "rollout/value_mean": (values.sum() / mask.sum().clamp(min=1)).item(),
        }
        return Batch(**fields), metrics

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        batch = batch.to(policy_device(self.policy))
        lp, values = self._forward(model_inputs(batch))
        mask = batch["mask"]
        policy_tokens, metrics = PG.clipped_surrogate(
            lp.token_logps, batch["old_logps"], batch["advantages"], mask, epsilon=cfg.epsilon
        )
        value_tokens, value_metrics = PG.value_loss(
            values, batch["old_values"], batch["returns"], mask, cfg.cliprange_value
        )
        aggregate = {"mask": mask, "loss_type": cfg.loss_type}
        if cfg.loss_type == "dapo":
            aggregate["tokens_per_sample"] = float(batch["tokens_per_sample"][0])
        policy_loss = PG.aggregate_token_losses(policy_tokens, **aggregate)
        value_loss = PG.aggregate_token_losses(value_tokens, **aggregate)
        on = mask.sum().clamp(min=1)
        metrics.update(value_metrics)
        metrics["policy_loss"] = policy_loss.detach().mean()
        metrics["value_loss"] = value_loss.detach().mean()
        metrics["value_error"] = (((values - batch["returns"]) ** 2) * mask).sum().detach() / on
        return policy_loss + cfg.vf_coef * value_loss, metrics


def _to_front(values: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Shift row i left by starts[i] (zeros enter at the right): responses, which follow their prompts, then start
    at column 0 — the right-padded layout `kl_shaped_rewards` and `gae_advantages` expect."""
    columns = torch.arange(values.shape[-1]).unsqueeze(0)
    index = (columns + starts.unsqueeze(-1)).clamp(max=values.shape[-1] - 1)
    valid = columns < values.shape[-1] - starts.unsqueeze(-1)
    return torch.gather(values, 1, index) * valid.to(values.dtype)


def _to_back(values: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Undo `_to_front`: shift row i right by starts[i]."""
    columns = torch.arange(values.shape[-1]).unsqueeze(0)
    index = (columns - starts.unsqueeze(-1)).clamp(min=0)
    valid = columns >= starts.unsqueeze(-1)
    return torch.gather(values, 1, index) * valid.to(values.dtype)


def _whiten_global(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`masked_whiten` with the statistics of the global batch (every process's rows), so N processes equal 1."""
    if process_info()[1] == 1:
        return PG.masked_whiten(values, mask, shift_mean=shift_mean)
    from accelerate.utils import pad_across_processes

    all_values = gather_all(pad_across_processes(values, dim=1))
    all_mask = gather_all(pad_across_processes(mask, dim=1))
    whitened = PG.masked_whiten(all_values, all_mask, shift_mean=shift_mean)
    return this_process(whitened, len(values))[:, : values.shape[1]]
