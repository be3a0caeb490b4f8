"""The flow-matching digits world: a tiny Stable-Diffusion-3-layout model of the image world's digits.

It builds on the DDPM image world (`zoo://image`): the same 1797 digits and train/held-out image split, the same
prompts and held-out templates, the same trained VAE (16×16×3 ↔ 8×8×4, saved with SD3's `shift_factor` field set
to 0) and the same digit classifier, so the two worlds' numbers compare; the image world's independent judge is
copied and reported too when that world has one (`judge/`). Its own parts are SD3's: two CLIP text encoders with
projection (trained first on the train templates and frozen, as the image world does for its one encoder) and an
`SD3Transformer2DModel` trained with the rectified-flow loss at SD3's logit-normal training σ, with a
`FlowMatchEulerDiscreteScheduler`. T5 is left out, as SD3 allows: load with
`StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)` and call it with
`max_sequence_length=0` (no T5 tokens; the model was trained with none). The transformer stops early on purpose,
so held-out-template prompts draw the right digit only part of the time.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import processors
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from mmalign.core.data import write_jsonl
from mmalign.core.flow import TIMESTEP_SAMPLING, FlowMatchForwardProcess, flow_matching_loss
from mmalign.evaluation.classifier import Classifier, load_classifier
from mmalign.zoo.image_world import (
    EVAL_TEMPLATES,
    IMAGE_SIZE,
    TRAIN_TEMPLATES,
    ImageWorldSpec,
    digit_of,
    encode,
    eval_prompts,
    load_digit_images,
    split_indices,
    train_prompts,
    world_tokenizer,
)
from mmalign.zoo.reproducible import build_threads

END_TOKEN = "</s>"
MAX_SEQUENCE_LENGTH = (
    0  # T5 tokens: none (text_encoder_3 is None and the transformer never saw zero T5 tokens)
)


@dataclass
class FlowWorldSpec:
    """Sizes of the flow world; `tiny()` is the fast build the tests use (on `image-tiny`)."""

    base_world: str = "image"
    batch_size: int = 32
    lr: float = 2e-3
    text_hidden: int = 32
    text_projection: int = 16
    text_layers: int = 2
    text_steps: int = 300
    patch_size: int = 2
    transformer_layers: int = 4
    transformer_heads: int = 4
    transformer_head_dim: int = 16
    transformer_steps: int = 300  # stopped early on purpose (see build_flow_world for the step sweep)
    prompt_dropout: float = 0.1
    shift: float = 1.0
    timestep_sampling: str = "logit_normal"
    # How base agreement is measured: the pipeline's own (Euler ODE) sampling, n images per prompt set.
    eval_images: int = 200
    eval_inference_steps: int = 10
    eval_guidance_scale: float = 3.0
    seed: int = 0
    torch_threads: int = 1

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}"
            )
        if (IMAGE_SIZE // 2) % self.patch_size:
            raise ValueError(
                f"patch_size must divide the {IMAGE_SIZE // 2}×{IMAGE_SIZE // 2} latents, got {self.patch_size}"
            )
        if not 0 <= self.prompt_dropout < 1:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        for name in (
            "text_steps",
            "transformer_steps",
            "eval_images",
            "eval_inference_steps",
            "torch_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")

    @classmethod
    def tiny(cls) -> FlowWorldSpec:
        return cls(
            base_world="image-tiny",
            batch_size=16,
            text_hidden=16,
            text_projection=8,
            text_layers=2,
            text_steps=20,
            transformer_layers=1,
            transformer_heads=2,
            transformer_head_dim=8,
            transformer_steps=20,
            eval_images=20,
            eval_inference_steps=2,
        )


def flow_tokenizer() -> PreTrainedTokenizerFast:
    """The image world's character tokenizer with an end token appended to every prompt.

    CLIP's pooled output is the hidden state at the end token; the image world's tokenizer appends none (and its
    `<eos>` has id 2, which makes transformers' CLIP pool at the highest token id, a space). `</s>` gets a new
    id, so CLIP pools at it and the pooled embedding SD3 conditions on has read the whole prompt.
    """
    tokenizer = world_tokenizer()
    tokenizer.add_special_tokens({"eos_token": END_TOKEN})
    end, bos = tokenizer.convert_tokens_to_ids(END_TOKEN), tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A {END_TOKEN}",
        pair=f"{tokenizer.bos_token} $A $B {END_TOKEN}",
        special_tokens=[(tokenizer.bos_token, bos), (END_TOKEN, end)],
    )
    return tokenizer


def _text_encoder(tokenizer: PreTrainedTokenizerFast, spec: FlowWorldSpec) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_hidden * 2,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4 if spec.text_hidden % 4 == 0 else 2,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=spec.text_projection,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def train_text_encoders(
    tokenizer: PreTrainedTokenizerFast, spec: FlowWorldSpec, generator: torch.Generator, log
) -> tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection]:
    """SD3's two CLIP encoders, each taught to tell the digits apart from what SD3 reads of it, then frozen.

    StableDiffusion3Pipeline reads each encoder's penultimate hidden states (the token sequence) and its projected
    pooled output; a linear probe on both (sequence mean-pooled) is trained on the train templates only, as the
    image world trains its encoder (a stand-in for CLIP pretraining).
    """
    ids = tokenizer(train_prompts(), padding="max_length", return_tensors="pt").input_ids
    encoders = []
    for k in range(2):
        encoder = _text_encoder(tokenizer, spec)
        probe = nn.Linear(spec.text_hidden + spec.text_projection, 10)
        optim = torch.optim.AdamW([*encoder.parameters(), *probe.parameters()], lr=spec.lr, weight_decay=0.0)
        for step in range(spec.text_steps):
            rows = torch.randint(len(ids), (spec.batch_size,), generator=generator)
            out = encoder(ids[rows], output_hidden_states=True)
            features = torch.cat([out.hidden_states[-2].mean(1), out.text_embeds], -1)
            loss = F.cross_entropy(probe(features), rows % 10)
            loss.backward()
            optim.step()
            optim.zero_grad()
            if step % 100 == 0 or step == spec.text_steps - 1:
                log(
                    f"[zoo image-flow] text encoder {k + 1} step {step + 1}/{spec.text_steps} loss {loss.item():.4f}"
                )
        encoders.append(encoder.eval().requires_grad_(False))
    return encoders[0], encoders[1]


def new_transformer(spec: FlowWorldSpec) -> SD3Transformer2DModel:
    """An MM-DiT over the 8×8×4 latents; joint attention reads both encoders' sequences side by side."""
    inner = spec.transformer_heads * spec.transformer_head_dim
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=spec.patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=spec.transformer_layers,
        attention_head_dim=spec.transformer_head_dim,
        num_attention_heads=spec.transformer_heads,
        joint_attention_dim=2 * spec.text_hidden,
        caption_projection_dim=inner,
        pooled_projection_dim=2 * spec.text_projection,
        pos_embed_max_size=IMAGE_SIZE // 2 // spec.patch_size,
    )


def train_transformer(
    pipe: StableDiffusion3Pipeline,
    posterior: tuple[torch.Tensor, torch.Tensor],
    digits: torch.Tensor,
    spec: FlowWorldSpec,
    generator: torch.Generator,
    log,
) -> None:
    """Flow matching on train prompts with 10% empty prompts (for CFG), conditioned exactly as the pipeline does."""
    transformer, scale = pipe.transformer, pipe.vae.config.scaling_factor
    prompts = [*train_prompts(), ""]  # row t*10 + d is template t for digit d, the last row the empty prompt
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
    process = FlowMatchForwardProcess(pipe.scheduler.config, timestep_sampling=spec.timestep_sampling)
    mean, std = posterior
    transformer.train()
    optim = torch.optim.AdamW(transformer.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optim, spec.lr, total_steps=spec.transformer_steps, pct_start=0.1
    )
    bsz = spec.batch_size
    for step in range(spec.transformer_steps):
        idx = torch.randint(len(mean), (bsz,), generator=generator)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scale
        rows = torch.randint(len(TRAIN_TEMPLATES), (bsz,), generator=generator) * 10 + digits[idx]
        rows[torch.rand(bsz, generator=generator) < spec.prompt_dropout] = len(prompts) - 1
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = process.sample_timesteps(bsz, generator)

        def predict(x, timestep, rows=rows):
            return transformer(
                hidden_states=x,
                timestep=timestep,
                encoder_hidden_states=embeds[rows],
                pooled_projections=pooled[rows],
            ).sample

        loss = flow_matching_loss(predict, process, latents, noise, sigmas).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"flow-matching loss is {loss.item()} at transformer step {step + 1}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad()
        if step % 200 == 0 or step == spec.transformer_steps - 1:
            log(
                f"[zoo image-flow] transformer step {step + 1}/{spec.transformer_steps} loss {loss.item():.4f}"
            )
    transformer.eval().requires_grad_(False)


@torch.no_grad()
def prompt_agreement(
    pipe: StableDiffusion3Pipeline, classifier: Classifier, prompts: list[str], spec: FlowWorldSpec
) -> dict[str, float]:
    """How often, and how surely, a classifier reads the pipeline's images as the prompted digit."""
    prompts = [p for p in prompts for _ in range(max(1, spec.eval_images // len(prompts)))]
    images = pipe(
        prompts,
        num_inference_steps=spec.eval_inference_steps,
        guidance_scale=spec.eval_guidance_scale,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(spec.seed),
        output_type="pt",
    ).images
    digits = torch.tensor([digit_of(p) for p in prompts])
    p_digit = classifier.log_prob(images * 2 - 1, digits).exp().mean().item()
    return {"agreement": classifier.accuracy(images * 2 - 1, digits), "p_digit": p_digit, "n": len(prompts)}


def load_pipeline(path: str | Path) -> StableDiffusion3Pipeline:
    """The world's pipeline, loaded as SD3 without T5 is loaded."""
    pipe = StableDiffusion3Pipeline.from_pretrained(
        path, text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flow_world(out_dir: str | Path, spec: FlowWorldSpec | None = None, log=print) -> Path:
    """Train SD3's text encoders and transformer on the base world's digits and write the world; returns `out_dir`.

    `transformer_steps` sets how imperfect the model is (classifier agreement on held-out / train templates, 200
    images each, one thread): 250 steps 37% / 62%, 300 (default) 45.5% / 77%, 400 58% / 90.5%; trained to
    1500 steps it reaches 73% / 100% (100 images each), so held-out prompts stay imperfect even when trained
    long. The default build takes ~1 min on top of the image world's.
    """
    from mmalign.zoo import registry

    spec = spec or FlowWorldSpec()
    with build_threads(spec.torch_threads):  # the same weights whatever thread count the caller runs with
        return _build(Path(out_dir), spec, registry.build(spec.base_world, log=log), log)


def _build(out: Path, spec: FlowWorldSpec, base: Path, log) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    base_world = json.loads((base / "world.json").read_text())
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    images, digits = load_digit_images()
    base_spec = ImageWorldSpec(seed=base_world["seed"], eval_fraction=base_world["eval_fraction"])
    train, _ = split_indices(len(images), base_spec)  # the base world's split: the same training images
    shutil.copytree(base / "classifier", out / "classifier", dirs_exist_ok=True)
    classifier = load_classifier(out / "classifier")
    judge = None
    if (base / "judge").exists():
        shutil.copytree(base / "judge", out / "judge", dirs_exist_ok=True)
        judge = load_classifier(out / "judge")
    vae = (
        AutoencoderKL.from_pretrained(base / "base" / "vae", local_files_only=True)
        .eval()
        .requires_grad_(False)
    )
    vae.register_to_config(shift_factor=0.0)  # SD3 pipelines subtract it; the base world's latents have none
    # where it came from, instead of the cache path it was loaded from (which would make builds differ by home)
    vae.register_to_config(_name_or_path=f"zoo://{spec.base_world}/base/vae")

    tokenizer = flow_tokenizer()
    text_encoder, text_encoder_2 = train_text_encoders(tokenizer, spec, generator, log)
    timings["text_encoders_s"] = time.perf_counter() - started
    pipe = StableDiffusion3Pipeline(
        transformer=new_transformer(spec),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=spec.shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=flow_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    train_transformer(pipe, encode(vae, images[train]), digits[train], spec, generator, log)
    timings["transformer_s"] = time.perf_counter() - started - sum(timings.values())

    pipe.save_pretrained(out / "base")
    write_jsonl(out / "train_prompts.jsonl", [{"prompt": p, "digit": digit_of(p)} for p in train_prompts()])
    write_jsonl(out / "eval_prompts.jsonl", [{"prompt": p, "digit": digit_of(p)} for p in eval_prompts()])

    pipe = load_pipeline(out / "base")
    evaluators = {"classifier": classifier} | ({"judge": judge} if judge is not None else {})
    agreement = {
        name: {
            "eval_prompts": prompt_agreement(pipe, model, eval_prompts(), spec),
            "train_prompts": prompt_agreement(pipe, model, train_prompts(), spec),
        }
        for name, model in evaluators.items()
    }
    log(f"[zoo image-flow] base agreement {agreement}")
    timings["eval_s"] = time.perf_counter() - started - sum(timings.values())
    timings["total_s"] = time.perf_counter() - started

    world = {
        "world": "image-flow",
        **asdict(spec),
        "load": "StableDiffusion3Pipeline.from_pretrained(base, text_encoder_3=None, tokenizer_3=None)",
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "base_world_fingerprint": (base / "fingerprint.txt").read_text().strip(),
        "image_shape": [3, IMAGE_SIZE, IMAGE_SIZE],
        "latent_shape": [4, IMAGE_SIZE // 2, IMAGE_SIZE // 2],
        "scaling_factor": vae.config.scaling_factor,
        "train_templates": list(TRAIN_TEMPLATES),
        "eval_templates": list(EVAL_TEMPLATES),
        "n_train_images": len(train),
        "classifier_accuracy": base_world["classifier_accuracy"],
        "judge": "judge" if judge is not None else None,
        "base_agreement": agreement["classifier"],
        "judge_agreement": agreement.get("judge"),
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "world.json").write_text(json.dumps(world, indent=2))
    return out
