"""The offline digits world: a tiny Stable-Diffusion-layout text-to-image model of handwritten digits.

scikit-learn's 1797 real 8×8 digits are upsampled to 16×16 RGB. A tiny VAE (16×16×3 ↔ 8×8×4 latents), a tiny
CLIP text encoder over a character tokenizer and a tiny cross-attention UNet are trained briefly and saved as a
`StableDiffusionPipeline`, so every code path that loads SD 1.5 loads this model offline. The UNet is stopped
early on purpose: prompted with a held-out template ("a sketch of a seven"), it draws the right digit only part of
the time, which a digit classifier trained on the same images measures (and rewards).

The world also holds an independent judge (`judge/`): a `ColumnConvClassifier` (another architecture than the
classifier's) trained with another seed on two thirds of the digits held out from everything else, and tested on
the last third. No recipe trains on it; evaluations report it beside the classifier (`eval.judges`). It and the
small real-digit preference set of the tiny world (`train_pairs.jsonl`) are made after everything else, from their
own generators, so the classifier, VAE, text encoder and UNet are the bits they were before the judge existed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from sklearn.datasets import load_digits
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from mmalign.core.data import write_jsonl
from mmalign.evaluation.classifier import (
    DIGIT_WORDS,
    Classifier,
    ColumnConvClassifierConfig,
    digit_of,
    train_classifier,
)
from mmalign.zoo.reproducible import build_threads
from mmalign.zoo.tokenizer import char_tokenizer

IMAGE_SIZE = 16
MAX_PROMPT_TOKENS = 32
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {word}",
    "a drawing of the number {num}",
    "the number {num}",
    "a handwritten {num}",
)
EVAL_TEMPLATES = ("a sketch of a {word}", "an image of the digit {num}")


@dataclass
class ImageWorldSpec:
    """Sizes of the image world; `tiny()` is the fast build the tests use."""

    eval_fraction: float = 0.2
    batch_size: int = 32
    lr: float = 2e-3
    classifier_steps: int = 400
    vae_channels: tuple[int, int] = (32, 32)
    vae_steps: int = 300
    vae_kl_weight: float = 1e-6
    text_hidden: int = 32
    text_layers: int = 2
    text_steps: int = 300
    unet_channels: tuple[int, int] = (32, 64)
    unet_steps: int = 400
    prompt_dropout: float = 0.1
    # How base agreement is measured: the sampler settings of the vision/ recipes, n images per prompt set.
    eval_images: int = 200
    eval_inference_steps: int = 10
    eval_guidance_scale: float = 3.0
    eval_eta: float = 1.0
    seed: int = 0
    # The independent judge (judge/): its own architecture, seed and split of the held-out digits.
    judge_steps: int = 400
    judge_channels: tuple[int, int] = (64, 64)
    judge_test_fraction: float = (
        1 / 3
    )  # of the held-out digits, kept to measure the judge; the rest trains it
    judge_seed: int = 1
    # Real-digit preference pairs (train_pairs.jsonl, pairs/*.png): the prompted digit over another; 0 = none.
    real_pairs: int = 0

    @classmethod
    def tiny(cls) -> ImageWorldSpec:
        return cls(
            batch_size=16,
            classifier_steps=20,
            vae_steps=20,
            text_hidden=16,
            text_layers=1,
            text_steps=20,
            unet_channels=(32, 32),
            unet_steps=20,
            eval_images=20,
            eval_inference_steps=2,
            judge_steps=20,
            real_pairs=8,
        )


def prompt_for(template: str, digit: int) -> str:
    return template.format(word=DIGIT_WORDS[digit], num=digit)


def train_prompts() -> list[str]:
    """Every train template for digits 0..9, template-major (row t*10 + d)."""
    return [prompt_for(t, d) for t in TRAIN_TEMPLATES for d in range(10)]


def eval_prompts() -> list[str]:
    """Held-out templates the model never saw in training, for measuring and rewarding generalisation."""
    return [prompt_for(t, d) for t in EVAL_TEMPLATES for d in range(10)]


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as `[N, 3, 16, 16]` floats in [-1, 1] and their labels.

    Bilinear upsampling gives smooth strokes instead of 2×2 blocks, so the images look like (blurry) drawings
    rather than pixel art whose hard block edges a tiny VAE and classifier would latch onto.
    """
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images.expand(-1, 3, -1, -1).contiguous(), torch.tensor(digits.target)


def split_indices(n: int, spec: ImageWorldSpec) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed))
    n_eval = int(n * spec.eval_fraction)
    return perm[n_eval:], perm[:n_eval]


def world_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer with a fixed length, because the pipeline pads prompts to `model_max_length`."""
    tokenizer = char_tokenizer()
    tokenizer.model_max_length = MAX_PROMPT_TOKENS
    return tokenizer


def train_vae(images: torch.Tensor, spec: ImageWorldSpec, generator: torch.Generator, log) -> AutoencoderKL:
    """Fit a one-downsampling KL autoencoder (16×16×3 → 8×8×4) and set its scaling factor to 1/std of latents."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
    )
    optim = torch.optim.AdamW(vae.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, spec.lr, total_steps=spec.vae_steps, pct_start=0.1)
    for step in range(spec.vae_steps):
        x = images[torch.randint(len(images), (spec.batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        recon = F.mse_loss(vae.decode(posterior.sample(generator)).sample, x)
        loss = recon + spec.vae_kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad()
        if step % 200 == 0 or step == spec.vae_steps - 1:
            log(f"[zoo image] vae step {step + 1}/{spec.vae_steps} recon {recon.item():.4f}")
    vae.eval().requires_grad_(False)
    mean, std = encode(vae, images)
    sample = mean + std * torch.randn(mean.shape, generator=generator)
    vae.register_to_config(scaling_factor=1.0 / sample.std().item())
    return vae


def encode(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of each image (unscaled), so training can draw fresh latents without re-encoding."""
    with torch.no_grad():
        posteriors = [vae.encode(chunk).latent_dist for chunk in images.split(256)]
    return torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])


def train_text_encoder(
    tokenizer: PreTrainedTokenizerFast, spec: ImageWorldSpec, generator: torch.Generator, log
) -> CLIPTextModel:
    """A stand-in for CLIP pretraining: a tiny CLIP text encoder taught to tell the digits apart, then frozen.

    At random init the encodings of "a handwritten one" and "a handwritten seven" barely differ and the UNet
    ignores the prompt; trained jointly with the UNet the encoder collapses the same way. So, as Stable Diffusion
    does with CLIP, the encoder is trained first (a linear probe on its mean-pooled output, which is what
    cross-attention first sees) on the train templates only, and frozen.
    """
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_hidden * 2,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    ids = tokenizer(train_prompts(), padding="max_length", return_tensors="pt").input_ids
    probe = nn.Linear(spec.text_hidden, 10)
    optim = torch.optim.AdamW([*text_encoder.parameters(), *probe.parameters()], lr=spec.lr, weight_decay=0.0)
    for step in range(spec.text_steps):
        rows = torch.randint(len(ids), (spec.batch_size,), generator=generator)
        loss = F.cross_entropy(probe(text_encoder(ids[rows])[0].mean(1)), rows % 10)
        loss.backward()
        optim.step()
        optim.zero_grad()
        if step % 100 == 0 or step == spec.text_steps - 1:
            log(f"[zoo image] text encoder step {step + 1}/{spec.text_steps} loss {loss.item():.4f}")
    return text_encoder.eval().requires_grad_(False)


def train_unet(
    posterior: tuple[torch.Tensor, torch.Tensor],
    scaling_factor: float,
    digits: torch.Tensor,
    text_encoder: CLIPTextModel,
    tokenizer: PreTrainedTokenizerFast,
    spec: ImageWorldSpec,
    generator: torch.Generator,
    log,
) -> tuple[UNet2DConditionModel, DDPMScheduler]:
    """Train the UNet with the ε-prediction loss on train prompts, replacing 10% by the empty prompt (for CFG)."""
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=spec.unet_channels,
        layers_per_block=1,
        cross_attention_dim=spec.text_hidden,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    # Stable Diffusion's own training schedule, so code written for SD 1.5 sees the same noise levels.
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    # The encoder is frozen, so each prompt is encoded once: row t*10 + d is template t for digit d, then "".
    ids = tokenizer([*train_prompts(), ""], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        encodings = text_encoder(ids)[0]
    mean, std = posterior
    optim = torch.optim.AdamW(unet.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, spec.lr, total_steps=spec.unet_steps, pct_start=0.1)
    bsz = spec.batch_size
    for step in range(spec.unet_steps):
        idx = torch.randint(len(mean), (bsz,), generator=generator)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scaling_factor
        rows = torch.randint(len(TRAIN_TEMPLATES), (bsz,), generator=generator) * 10 + digits[idx]
        rows[torch.rand(bsz, generator=generator) < spec.prompt_dropout] = len(ids) - 1
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator)
        pred = unet(
            noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=encodings[rows]
        ).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad()
        if step % 250 == 0 or step == spec.unet_steps - 1:
            log(f"[zoo image] unet step {step + 1}/{spec.unet_steps} loss {loss.item():.4f}")
    return unet.eval().requires_grad_(False), noise_scheduler


@torch.no_grad()
def base_samples(
    pipe: StableDiffusionPipeline, prompts: list[str], spec: ImageWorldSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """`eval_images` images (in [-1, 1]) drawn for the prompts at the recipes' sampler settings, and their digits."""
    prompts = [p for p in prompts for _ in range(max(1, spec.eval_images // len(prompts)))]
    images = pipe(
        prompts,
        num_inference_steps=spec.eval_inference_steps,
        guidance_scale=spec.eval_guidance_scale,
        eta=spec.eval_eta,
        generator=torch.Generator().manual_seed(spec.seed),
        output_type="pt",
    ).images
    return images * 2 - 1, torch.tensor([digit_of(p) for p in prompts])


@torch.no_grad()
def prompt_agreement(classifier: Classifier, images: torch.Tensor, digits: torch.Tensor) -> dict[str, float]:
    """How often, and how surely, a classifier reads generated images as the prompted digit."""
    p_digit = classifier.log_prob(images, digits).exp().mean().item()
    return {"agreement": classifier.accuracy(images, digits), "p_digit": p_digit, "n": len(digits)}


def judge_split(held_out: torch.Tensor, spec: ImageWorldSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The judge's own split of the held-out digits (its own seed): (judge training part, judge test part)."""
    order = held_out[torch.randperm(len(held_out), generator=torch.Generator().manual_seed(spec.judge_seed))]
    n_test = round(len(order) * spec.judge_test_fraction)
    return order[n_test:], order[:n_test]


def train_judge(
    images: torch.Tensor,
    digits: torch.Tensor,
    held_out: torch.Tensor,
    classifier: Classifier,
    samples: dict[str, tuple[torch.Tensor, torch.Tensor]],
    spec: ImageWorldSpec,
    log,
) -> tuple[Classifier, dict]:
    """Train the independent judge on held-out digits the classifier never saw; measure it against the classifier.

    Its weights start from `judge_seed` and its draws come from its own generator (torch's global state is
    restored after), so the judge changes nothing else the build makes.
    """
    train, test = judge_split(held_out, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.judge_seed)
        judge = train_classifier(
            images[train],
            digits[train],
            spec.judge_steps,
            batch_size=spec.batch_size * 2,
            config=ColumnConvClassifierConfig(height=IMAGE_SIZE, in_channels=3, channels=spec.judge_channels),
            generator=torch.Generator().manual_seed(spec.judge_seed),
            log=log,
            log_prefix="[zoo image] judge",
        )
    base = {}
    for name, (generated, prompted) in samples.items():
        base[name] = {
            **prompt_agreement(judge, generated, prompted),
            "agrees_with_classifier": (judge.predict(generated) == classifier.predict(generated))
            .float()
            .mean()
            .item(),
        }
    report = {
        "architecture": judge.architecture,
        "config": asdict(judge.config),
        "seed": spec.judge_seed,
        "n_train_images": len(train),
        "n_test_images": len(test),
        "accuracy": judge.accuracy(images[test], digits[test]),
        "classifier_accuracy_same_images": classifier.accuracy(images[test], digits[test]),
        "agrees_with_classifier_real": (judge.predict(images[test]) == classifier.predict(images[test]))
        .float()
        .mean()
        .item(),
        "base_agreement": base,
    }
    log(f"[zoo image] judge test accuracy {report['accuracy']:.3f}; on the base's images {base}")
    return judge, report


def write_real_pairs(
    out: Path, images: torch.Tensor, digits: torch.Tensor, train: torch.Tensor, spec: ImageWorldSpec
) -> int:
    """`train_pairs.jsonl` + `pairs/*.png`: a training image of the prompted digit preferred over one of another
    digit (real images, so offline Diffusion-DPO and reward models have a preference with ground truth; its scores,
    1 for the prompted digit and 0 for another, are what score-aware losses such as ODPO read)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(spec.seed + 2)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    prompts, rows = train_prompts(), []
    for i in range(spec.real_pairs):
        prompt = prompts[int(torch.randint(len(prompts), (1,), generator=generator))]
        digit = digit_of(prompt)
        names = []
        for tag, pool in (("w", train[digits[train] == digit]), ("l", train[digits[train] != digit])):
            image = images[pool[int(torch.randint(len(pool), (1,), generator=generator))]]
            pixels = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            names.append(f"pairs/{i:03d}_{tag}.png")
            Image.fromarray(pixels).save(out / names[-1])
        rows.append(
            {
                "prompt": prompt,
                "image_w": names[0],
                "image_l": names[1],
                "score_chosen": 1.0,
                "score_rejected": 0.0,
            }
        )
    write_jsonl(out / "train_pairs.jsonl", rows)
    return len(rows)


@build_threads()
def build_image_world(out_dir: str | Path, spec: ImageWorldSpec | None = None, log=print) -> Path:
    """Train classifier, VAE, text encoder and UNet and write them with the prompts, then the independent judge;
    returns `out_dir`. Runs on `BUILD_THREADS` torch threads whatever the caller's setting (bit-identical builds)."""
    spec = spec or ImageWorldSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    images, digits = load_digit_images()
    train, held_out = split_indices(len(images), spec)
    classifier = train_classifier(
        images[train],
        digits[train],
        spec.classifier_steps,
        batch_size=spec.batch_size,
        generator=generator,
        log=log,
    )
    classifier.save_pretrained(out / "classifier")
    classifier_accuracy = classifier.accuracy(images[held_out], digits[held_out])
    log(f"[zoo image] classifier held-out accuracy {classifier_accuracy:.3f}")
    timings["classifier_s"] = time.perf_counter() - started

    vae = train_vae(images[train], spec, generator, log)
    with torch.no_grad():
        recon = vae.decode(encode(vae, images[held_out])[0]).sample
    vae_accuracy = classifier.accuracy(recon, digits[held_out])
    log(f"[zoo image] classifier accuracy on VAE reconstructions {vae_accuracy:.3f}")
    timings["vae_s"] = time.perf_counter() - started - sum(timings.values())

    tokenizer = world_tokenizer()
    text_encoder = train_text_encoder(tokenizer, spec, generator, log)
    unet, noise_scheduler = train_unet(
        encode(vae, images[train]),
        vae.config.scaling_factor,
        digits[train],
        text_encoder,
        tokenizer,
        spec,
        generator,
        log,
    )
    timings["unet_s"] = time.perf_counter() - started - sum(timings.values())

    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(noise_scheduler.config, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(out / "base")
    write_jsonl(out / "train_prompts.jsonl", [{"prompt": p, "digit": digit_of(p)} for p in train_prompts()])
    write_jsonl(out / "eval_prompts.jsonl", [{"prompt": p, "digit": digit_of(p)} for p in eval_prompts()])

    pipe = StableDiffusionPipeline.from_pretrained(out / "base", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    samples = {
        "eval_prompts": base_samples(pipe, eval_prompts(), spec),
        "train_prompts": base_samples(pipe, train_prompts(), spec),
    }
    agreement = {name: prompt_agreement(classifier, *drawn) for name, drawn in samples.items()}
    log(f"[zoo image] base agreement {agreement}")
    timings["eval_s"] = time.perf_counter() - started - sum(timings.values())

    judge, judge_report = train_judge(images, digits, held_out, classifier, samples, spec, log)
    judge.save_pretrained(out / "judge")
    n_pairs = write_real_pairs(out, images, digits, train, spec) if spec.real_pairs else 0
    timings["judge_s"] = time.perf_counter() - started - sum(timings.values())
    timings["total_s"] = time.perf_counter() - started

    world = {
        "world": "image",
        **asdict(spec),
        "image_shape": [3, IMAGE_SIZE, IMAGE_SIZE],
        "latent_shape": [4, IMAGE_SIZE // 2, IMAGE_SIZE // 2],
        "scaling_factor": vae.config.scaling_factor,
        "train_templates": list(TRAIN_TEMPLATES),
        "eval_templates": list(EVAL_TEMPLATES),
        "n_train_images": len(train),
        "n_held_out_images": len(held_out),
        "classifier_accuracy": classifier_accuracy,
        "vae_reconstruction_accuracy": vae_accuracy,
        "base_agreement": agreement,
        "judge": judge_report,
        "real_pairs": n_pairs,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "world.json").write_text(json.dumps(world, indent=2))
    return out
