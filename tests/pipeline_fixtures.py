"""Randomly initialised, seconds-fast SD3, FLUX and SDXL pipelines built from configs, for tests of their layouts.

Each has the component layout of the real model family (SD3: an MM-DiT with two CLIP text encoders with
projection and an optional T5; FLUX: a packed-latent MM-DiT with CLIP pooled + T5 sequence conditioning; SDXL: a
UNet with `text_time` added conditioning fed by two CLIP text encoders), the character tokenizer of the digits
worlds in place of the real tokenizers, 16×16 images and 8×8 latents. `saved_and_loaded` round-trips a pipeline
through `save_pretrained` / `from_pretrained` of the plain diffusers class, as a user's checkpoint would load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from mmalign.zoo.tokenizer import char_tokenizer

IMAGE_SIZE = 16
MAX_TOKENS = 24


def _tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = char_tokenizer()
    tokenizer.model_max_length = MAX_TOKENS
    return tokenizer


def _clip(tokenizer, hidden: int, *, projection: int | None = None):
    """A two-layer CLIP text encoder (two so the pipelines' penultimate-layer read is a real layer)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection or hidden,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(tokenizer, d_model: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def _vae(latent_channels: int, *, shift_factor: float | None, flow: bool) -> AutoencoderKL:
    """One downsampling (16×16 → 8×8); SD3/FLUX VAEs have no quant convs and a shift factor, as the real ones."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.5,
        shift_factor=shift_factor,
        use_quant_conv=not flow,
        use_post_quant_conv=not flow,
    )


def tiny_sd3_pipeline(seed: int = 0, *, t5: bool = False, shift: float = 3.0) -> StableDiffusion3Pipeline:
    """SD3 layout: `SD3Transformer2DModel`, two CLIP encoders with projection, T5 optional (None by default)."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    clip_1, clip_2 = _clip(tokenizer, 16, projection=8), _clip(tokenizer, 16, projection=8)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # ≥ the two CLIP widths side by side (16 + 16), the T5 width when present
        caption_projection_dim=16,  # = heads · head dim
        pooled_projection_dim=16,  # the two CLIP projections side by side (8 + 8)
        pos_embed_max_size=IMAGE_SIZE // 2,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=_vae(4, shift_factor=0.1, flow=True),
        text_encoder=clip_1,
        tokenizer=tokenizer,
        text_encoder_2=clip_2,
        tokenizer_2=_tokenizer(),
        text_encoder_3=_t5(tokenizer, 32) if t5 else None,
        tokenizer_3=_tokenizer() if t5 else None,
    )


def tiny_flux_pipeline(seed: int = 0, *, guidance_embeds: bool = False) -> FluxPipeline:
    """FLUX layout: `FluxTransformer2DModel` on 2×2-packed latents, CLIP pooled + T5 sequence conditioning.

    The scheduler is FLUX.1-dev's: resolution-dependent (dynamic) shifting; `guidance_embeds` True is the
    guidance-distilled (dev) variant, False the schnell one.
    """
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels × 2×2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,  # the T5 width
        pooled_projection_dim=16,  # the CLIP width
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),  # sums to the head dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(4, shift_factor=0.1, flow=True),
        text_encoder=_clip(tokenizer, 16),
        tokenizer=tokenizer,
        text_encoder_2=_t5(tokenizer, 16),
        tokenizer_2=_tokenizer(),
        transformer=transformer,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL layout: a UNet with `addition_embed_type="text_time"` (pooled text + six time ids), two CLIP encoders."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder, text_encoder_2 = _clip(tokenizer, 16), _clip(tokenizer, 16, projection=8)
    time_embed_dim = 4
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,  # the two encoders' hidden states side by side (16 + 16)
        attention_head_dim=4,
        norm_num_groups=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=8 + 6 * time_embed_dim,  # pooled projection + six time ids
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=_vae(4, shift_factor=None, flow=False),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def saved_and_loaded(pipe, path: str | Path):
    """The pipeline after `save_pretrained(path)` and its own class's `from_pretrained(path)` (local only).

    Absent components (SD3 without T5) are passed as None, as diffusers documents for dropping T5.
    """
    pipe.save_pretrained(path)
    absent = {name: None for name, module in pipe.components.items() if module is None}
    loaded = type(pipe).from_pretrained(path, local_files_only=True, **absent)
    loaded.set_progress_bar_config(disable=True)
    return loaded
