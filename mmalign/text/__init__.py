"""Text adapters: causal-LM sequence policy, reward models and text rewards."""

from mmalign.text.policy import CausalLMPolicy

__all__ = ["CausalLMPolicy"]
