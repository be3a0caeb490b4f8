"""A small text-conditioned mel denoiser built from diffusers parts: 1-D residual convolutions over frames.

A 2-D UNet over a 32×32 mel costs seconds per step on a CPU; treating the mel as `n_mels` channels over time
makes the same job ~50× cheaper. Inputs and outputs keep the `[B, 1, n_mels, frames]` layout of the policy's
latents. Timestep embeddings and cross-attention to the text are diffusers modules (`Timesteps`,
`TimestepEmbedding`, `Attention`), so LoRA targets the same `to_q/to_k/to_v/to_out.0` projections as in a
Stable Diffusion UNet, and `ModelMixin`/`PeftAdapterMixin` give safetensors saving and adapter switching. Text
enters twice: cross-attention per frame, and its mean state added to the timestep embedding (scale/shift of
every block), which a tiny model needs to follow the prompt at all (cross-attention alone was ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class MelDenoiserOutput(BaseOutput):
    """The predicted noise, named like diffusers' UNet outputs."""

    sample: torch.Tensor


class ResidualBlock(nn.Module):
    """GroupNorm → SiLU → dilated Conv1d, time-conditioned scale/shift, then cross-attention to the text."""

    def __init__(self, channels: int, time_dim: int, text_dim: int, dilation: int, heads: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.time = nn.Linear(time_dim, 2 * channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)
        self.attn_norm = nn.LayerNorm(channels)
        self.attn = Attention(channels, cross_attention_dim=text_dim, heads=heads, dim_head=channels // heads)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time(temb)[:, :, None].chunk(2, dim=1)
        x = self.conv1(nn.functional.silu(self.norm1(h)))
        x = self.norm2(x) * (1 + scale) + shift
        h = h + self.conv2(nn.functional.silu(x))
        q = self.attn_norm(h.transpose(1, 2))
        return h + self.attn(q, encoder_hidden_states=text).transpose(1, 2)


class MelDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """ε-prediction network for `[B, 1, n_mels, frames]` mels conditioned on text states `[B, L, text_dim]`."""

    @register_to_config
    def __init__(
        self,
        n_mels: int = 32,
        frames: int = 32,
        channels: int = 128,
        text_dim: int = 32,
        dilations: tuple[int, ...] = (1, 2, 4, 8, 1, 2),
        heads: int = 4,
        groups: int = 8,
    ):
        super().__init__()
        time_dim = 2 * channels
        self.time_proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels, time_dim)
        self.text_proj = nn.Linear(
            text_dim, time_dim
        )  # pooled text joins the time embedding (FiLM in every block)
        self.conv_in = nn.Conv1d(n_mels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            ResidualBlock(channels, time_dim, text_dim, d, heads, groups) for d in dilations
        )
        self.norm_out = nn.GroupNorm(groups, channels)
        self.conv_out = nn.Conv1d(channels, n_mels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor
    ) -> MelDenoiserOutput:
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        temb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        temb = temb + self.text_proj(encoder_hidden_states.mean(1))
        h = self.conv_in(sample.squeeze(1))
        for block in self.blocks:
            h = block(h, temb, encoder_hidden_states)
        out = self.conv_out(nn.functional.silu(self.norm_out(h)))
        return MelDenoiserOutput(sample=out.unsqueeze(1))
