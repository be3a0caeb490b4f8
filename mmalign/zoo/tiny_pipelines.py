"""Randomly initialised, seconds-fast SD 1.x, SD3, FLUX, SDXL and AudioLDM 2 pipelines built from configs.

Each has the component layout of the real model family (SD 1.x: a cross-attention UNet on one CLIP encoder; SD3:
an MM-DiT with two CLIP text encoders with projection and an optional T5; FLUX: a packed-latent MM-DiT with CLIP
pooled + T5 sequence conditioning; SDXL: a UNet with `text_time` added conditioning fed by two CLIP text encoders;
AudioLDM 2 speech: CLAP + a VITS text encoder, a bare GPT-2 prior, the two-stream UNet, a 1-channel VAE and a
HiFi-GAN), the character tokenizer of the digits worlds (byte-level and character tokenizers for AudioLDM 2), 16×16
images and 8×8 latents. The `pipelines-tiny` world saves the SDXL, FLUX and AudioLDM 2 ones, untrained, so that
the model kinds without a trained tiny world run the method × model matrix through the same recipe path as a
user's checkpoint; the SD 1.x one serves the tests and benchmarks.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
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


def _clip(tokenizer, hidden: int, *, projection: int | None = None, layers: int = 2):
    """A CLIP text encoder, two layers by default (so the pipelines' penultimate-layer read is a real layer)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
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


def _vae(
    latent_channels: int,
    *,
    shift_factor: float | None,
    flow: bool,
    image_size: int = IMAGE_SIZE,
    scaling_factor: float = 1.5,
) -> AutoencoderKL:
    """One downsampling (image_size → image_size / 2); SD3/FLUX VAEs have no quant convs and a shift factor, as the
    real ones."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=image_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=not flow,
        use_post_quant_conv=not flow,
    )


def sd_ddim_scheduler() -> DDIMScheduler:
    """The DDIM scheduler SD 1.5 and AudioLDM 2 ship (scaled-linear betas, leading steps offset by 1)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_sd_pipeline(
    seed: int = 0,
    *,
    width: int = 16,
    text_width: int = 16,
    text_layers: int = 1,
    image_size: int = IMAGE_SIZE,
    norm_groups: int = 4,
) -> StableDiffusionPipeline:
    """SD 1.x layout: a cross-attention UNet of channels (width, 2·width) on one CLIP encoder, SD 1.5's DDIM.

    The defaults are the tests' seconds-fast model (a UNet of 0.2 M parameters on 8×8 latents); the benchmarks widen
    it so that the UNet dominates a step, as it does for real models.
    """
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = _clip(tokenizer, text_width, layers=text_layers)
    vae = _vae(4, shift_factor=None, flow=False, image_size=image_size, scaling_factor=0.18215)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=text_width,
        attention_head_dim=text_width // 4,
        norm_num_groups=norm_groups,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
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


def _tokenizers(tmp: Path):
    """A byte-level BPE Roberta tokenizer (no merges) and a character VITS tokenizer, built without downloads."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import RobertaTokenizer, VitsTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    roberta = RobertaTokenizer(vocab=vocab, merges=[], model_max_length=64)  # bytes: a token per char
    # pad id 0 and >= 183 ids: the pipeline writes VITS end token 182 over the first pad
    chars = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(" abcdefghijklmnopqrstuvwxyz'")}}
    chars.update({f"<unused{i}>": i for i in range(len(chars), 190)})
    (tmp / "vits_vocab.json").write_text(json.dumps(chars))
    vits = VitsTokenizer(
        vocab_file=str(tmp / "vits_vocab.json"),
        add_blank=False,
        normalize=True,
        phonemize=False,
        model_max_length=40,
    )
    return roberta, vits, len(vocab)


def tiny_audioldm2(tmp: Path):
    from diffusers import (
        AudioLDM2Pipeline,
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
        AutoencoderKL,
    )
    from transformers import (
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        GPT2Config,
        GPT2Model,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        VitsConfig,
        VitsModel,
    )

    torch.manual_seed(0)
    tokenizer, tokenizer_2, n_vocab = _tokenizers(tmp)
    clap = ClapModel(
        ClapConfig(
            text_config={
                "bos_token_id": 0,
                "eos_token_id": 2,
                "pad_token_id": 1,
                "vocab_size": n_vocab,
                "hidden_size": 16,
                "intermediate_size": 24,
                "num_attention_heads": 2,
                "num_hidden_layers": 1,
                "projection_dim": 16,
                "max_position_embeddings": 72,
            },
            audio_config={
                "spec_size": 64,
                "window_size": 4,
                "num_mel_bins": 64,
                "intermediate_size": 24,
                "depths": [1, 1],
                "num_attention_heads": [2, 2],
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "projection_dim": 16,
                "patch_size": 2,
                "patch_stride": 2,
                "patch_embed_input_channels": 4,
            },
            projection_dim=16,
        )
    )
    vits = VitsModel(
        VitsConfig(
            vocab_size=190,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=24,
            flow_size=8,
            spectrogram_bins=9,
            upsample_initial_channel=16,
            upsample_rates=[2, 2],
            upsample_kernel_sizes=[4, 4],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            prior_encoder_num_flows=1,
            prior_encoder_num_wavenet_layers=1,
            posterior_encoder_num_wavenet_layers=1,
            duration_predictor_num_flows=1,
            duration_predictor_filter_channels=8,
            depth_separable_num_layers=1,
            window_size=4,
        )
    )
    language_model = GPT2Model(GPT2Config(n_embd=16, n_head=2, n_layer=1, vocab_size=8, n_positions=64))
    language_model.config.max_new_tokens = 4
    projection = AudioLDM2ProjectionModel(
        text_encoder_dim=16,
        text_encoder_1_dim=16,
        langauge_model_dim=16,
        use_learned_position_embedding=True,
        max_seq_length=40,
    )
    unet = AudioLDM2UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=([None, 16, 16], [None, 16, 16]),
        norm_num_groups=8,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=1,
        out_channels=1,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=16,
            sampling_rate=16000,
            upsample_initial_channel=16,
            upsample_rates=[2, 2],
            upsample_kernel_sizes=[4, 4],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            normalize_before=False,
        )
    )
    return AudioLDM2Pipeline(
        vae=vae,
        text_encoder=clap,
        text_encoder_2=vits,
        projection_model=projection,
        language_model=language_model,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        feature_extractor=ClapFeatureExtractor(feature_size=64, sampling_rate=16000),
        unet=unet,
        scheduler=sd_ddim_scheduler(),
        vocoder=vocoder,
    )


SPOKEN_PROMPTS = ["one two", "call me at nine", "zero", "seven eight", "three", "five six"]


@dataclass
class TinyPipelinesSpec:
    """Which seed initialises the untrained tiny pipelines of the `pipelines-tiny` world."""

    seed: int = 0


def build_tiny_pipelines(out_dir: str | Path, spec: TinyPipelinesSpec | None = None, log=print) -> Path:
    """Save the tiny SDXL, FLUX and AudioLDM 2 pipelines (diffusers layout) and AudioLDM 2's prompt files."""
    spec = spec or TinyPipelinesSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as tmp
    ):  # AudioLDM 2's VITS vocabulary file, until the pipeline saves it
        for name, pipe in (
            ("sdxl", tiny_sdxl_pipeline(spec.seed)),
            ("flux", tiny_flux_pipeline(spec.seed)),
            ("audioldm2", tiny_audioldm2(Path(tmp))),
        ):
            pipe.save_pretrained(str(out / name))
            log(f"[pipelines-tiny] saved {name}")
    for split, prompts in (("train", SPOKEN_PROMPTS[:4]), ("eval", SPOKEN_PROMPTS[4:])):
        lines = [json.dumps({"prompt": p}) for p in prompts]
        (out / f"{split}_spoken_prompts.jsonl").write_text("\n".join(lines) + "\n")
    (out / "world.json").write_text(json.dumps({"world": "pipelines-tiny", **asdict(spec)}, indent=2))
    return out
