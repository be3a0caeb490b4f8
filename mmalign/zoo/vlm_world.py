"""The offline digits vision-language world: a tiny LLaVA that describes handwritten digits and hallucinates.

scikit-learn's 1797 digits are rendered at 16×16 (gray, bold or faint ink, with or without a one-pixel frame) and
described with checkable statements: the digit and two attributes measured from the rendered pixels (ink, frame;
see `mmalign.vision.vlm_digits`). Each digit has a usual ink and frame (drawn 75% of the
time), which is what makes a language prior possible. The base model is a real
`LlavaForConditionalGeneration` (tiny CLIP vision tower + projector + tiny Llama over the character tokenizer)
with a `LlavaProcessor`, trained in LLaVA's two stages: the vision tower is first trained alone to see the digit,
ink and frame (a pretrained encoder, as CLIP is for LLaVA), then frozen while the projector and language model
learn from descriptions and yes/no probes. The base therefore reads the digit reliably; its errors are not a
capability gap.

Its hallucinations are made the way real ones arise, from a language prior: in the training captions, an
attribute whose true value is not the most common one for that digit is replaced, with probability
`prior_noise`, by that most common value (annotators writing what a "7" usually looks like). The model therefore
learns to say what the digit usually looks like instead of what the image shows. The yes/no probes of the same
images are answered from the true facts, so (as with real VLMs that answer "is the ink faint?" better than they
describe) the vision side carries the attributes and the free-form descriptions do not use them; preference
data built from ground truth can re-align the descriptions, and the metrics measure how much.

Besides the held-out evaluation files and the POVID / DPO / RLHF-V pairs, the world writes the training data of the
other sequence methods, after everything else and without new random draws: `train_describe.jsonl` (training images
with the describe prompt and their ground truth, what online methods sample from and the `vlm_statements` reward
checks), `train_sft.jsonl` (the true description as `completion`) and `train_unpaired.jsonl` (KTO: each DPO pair's
true description labelled desirable, its hallucination-injected rewrite undesirable).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from mmalign.core.data import write_jsonl
from mmalign.vision import vlm_builders as B
from mmalign.vision import vlm_digits as D
from mmalign.vision.hallucination import description_metrics, diversity, pope_metrics
from mmalign.vision.vlm_policy import VisionLanguagePolicy
from mmalign.zoo.reproducible import build_threads
from mmalign.zoo.tokenizer import char_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 16
PATCH = 4


FAINT = 0.5  # ink intensity of a faint digit (bold = 1)
FRAME = 0.8  # intensity of the one-pixel frame of a framed image
USUAL_SHARE = 0.75  # how often a digit is drawn with its usual ink and frame
ATTR_INK, ATTR_FRAME = D.ATTRIBUTES["ink"], D.ATTRIBUTES["frame"]


def usual(digit: int) -> dict[str, str]:
    """Each digit's usual rendering: even digits bold, odd faint; 0-4 framed, 5-9 unframed."""
    return {"ink": "bold" if digit % 2 == 0 else "faint", "frame": "framed" if digit < 5 else "unframed"}


def render(image8: torch.Tensor | np.ndarray, ink: str, frame: str) -> Image.Image:
    """One 8×8 digit (values 0..16) upsampled to 16×16 (the image world's pixels), bold or faint, framed or not."""
    x = torch.as_tensor(np.asarray(image8), dtype=torch.float32)[None, None] / 16
    gray = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[0, 0]
    gray = gray.clamp(0, 1) * (1.0 if ink == "bold" else FAINT)
    if frame == "framed":
        for edge in (gray[0], gray[-1], gray[:, 0], gray[:, -1]):
            edge.clamp_(min=FRAME)
    pixels = (gray * 255).round().to(torch.uint8)[..., None].expand(-1, -1, 3).contiguous().numpy()
    return Image.fromarray(pixels, "RGB")


def render_all(seed: int) -> tuple[list[Image.Image], list[int]]:
    """Every scikit-learn digit rendered with a seeded ink and frame (its usual ones with `USUAL_SHARE`)."""
    digits = load_digits()
    rng = random.Random(seed)
    images = []
    for image8, digit in zip(digits.images, digits.target, strict=True):
        look = usual(int(digit))
        for attr, (a, b) in (("ink", ("bold", "faint")), ("frame", ("framed", "unframed"))):
            if rng.random() >= USUAL_SHARE:
                look[attr] = b if look[attr] == a else a
        images.append(render(image8, look["ink"], look["frame"]))
    return images, [int(d) for d in digits.target]


@dataclass
class VLMWorldSpec:
    """Sizes of the VLM world; `tiny()` is the fast build the tests use."""

    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 4
    vision_pretrain_steps: int = 1000  # stage 1: the vision tower learns to see (digit, ink, frame); 0 = skip
    vision_pretrain_lr: float = 3e-3
    freeze_vision: bool = True  # stage 2 trains projector + language model only (as LLaVA does)
    sft_steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    describe_share: float = 0.5  # the rest of each batch are yes/no probes
    prior_noise: float = 0.85
    noisy_attributes: tuple[str, ...] = ("ink", "frame")
    eval_fraction: float = 0.2
    max_images: int | None = None
    eval_probes_per_image: int = 2
    povid_noise_step: int = 500
    max_length: int = 128
    max_new_tokens: int = 48
    seed: int = 0

    @classmethod
    def tiny(cls) -> VLMWorldSpec:
        return cls(
            vision_hidden=16,
            vision_layers=1,
            text_hidden=32,
            text_layers=1,
            heads=2,
            vision_pretrain_steps=20,
            sft_steps=30,
            batch_size=16,
            max_images=80,
            max_new_tokens=24,
        )


def world_processor() -> LlavaProcessor:
    """The character tokenizer plus an image token, and a CLIP image processor for 16×16 images in [−1, 1]."""
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_model(processor: LlavaProcessor, spec: VLMWorldSpec) -> LlavaForConditionalGeneration:
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config)


def prior_facts(facts: list[dict], train: list[int]) -> dict[int, dict[str, str]]:
    """Each digit's most common value of each attribute on the training images (the language prior)."""
    out = {}
    for digit in range(10):
        rows = [facts[i] for i in train if facts[i]["digit"] == digit]
        out[digit] = {a: Counter(r[a] for r in rows).most_common(1)[0][0] for a in D.ATTRIBUTES}
    return out


def caption_facts(
    truth: dict, prior: dict[int, dict[str, str]], spec: VLMWorldSpec, rng: random.Random
) -> dict:
    """The facts a biased annotator writes: minority attribute values replaced by the prior with prob p."""
    out = dict(truth)
    for a in spec.noisy_attributes:
        if truth[a] != prior[truth["digit"]][a] and rng.random() < spec.prior_noise:
            out[a] = prior[truth["digit"]][a]
    return out


def pretrain_vision(
    model: LlavaForConditionalGeneration,
    images8: list[np.ndarray],
    labels: list[int],
    held_out: tuple[list[Image.Image], list[int]],
    spec,
    log,
) -> dict[str, float]:
    """Stage 1, the pretrained-encoder stage of a real LLaVA: the vision tower learns to classify the digit, ink
    and frame of the training images (each rendered in all four looks), through a linear head on its mean patch
    feature (the features the projector will read). Returns the digit head's accuracy on the held-out images.

    Without it, the tower trained jointly with the captions does not learn to read the digit reliably (the
    digit was wrong in 38% of descriptions), so most base errors were a capability gap rather than the
    language-prior hallucinations POVID and RLHF-V are made to fix.
    """
    looks = [(ink, frame) for ink in ATTR_INK for frame in ATTR_FRAME]
    pil, targets = [], []
    for image8, digit in zip(images8, labels, strict=True):
        for ink, frame in looks:
            pil.append(render(image8, ink, frame))
            targets.append((digit, float(ink == "bold"), float(frame == "framed")))
    processor = world_processor()
    pixels = processor.image_processor(pil, return_tensors="pt")["pixel_values"]
    y = torch.tensor(targets)
    tower = model.model.vision_tower
    head = torch.nn.Linear(spec.vision_hidden, 12)
    params = [*tower.parameters(), *head.parameters()]
    optim = torch.optim.AdamW(params, lr=spec.vision_pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optim, spec.vision_pretrain_lr, total_steps=spec.vision_pretrain_steps, pct_start=0.1
    )
    gen = torch.Generator().manual_seed(spec.seed)
    tower.train()
    for step in range(spec.vision_pretrain_steps):
        idx = torch.randint(0, len(pixels), (64,), generator=gen)
        feats = tower(pixel_values=pixels[idx]).last_hidden_state[:, 1:].mean(1)
        out, t = head(feats), y[idx]
        loss = (
            F.cross_entropy(out[:, :10], t[:, 0].long())
            + F.binary_cross_entropy_with_logits(out[:, 10], t[:, 1])
            + F.binary_cross_entropy_with_logits(out[:, 11], t[:, 2])
        )
        loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad()
        if step % 250 == 0 or step == spec.vision_pretrain_steps - 1:
            log(f"[zoo vlm] vision step {step + 1}/{spec.vision_pretrain_steps} loss {loss.item():.4f}")
    tower.eval()
    with torch.no_grad():
        held_pixels = processor.image_processor(held_out[0], return_tensors="pt")["pixel_values"]
        guess = head(tower(pixel_values=held_pixels).last_hidden_state[:, 1:].mean(1))[:, :10].argmax(1)
    acc = (guess == torch.tensor(held_out[1])).float().mean().item()
    log(f"[zoo vlm] vision tower: held-out digit accuracy of its linear head {acc:.3f}")
    return {"held_out_digit_accuracy": acc}


def train_base(
    policy: VisionLanguagePolicy, pixels: torch.Tensor, captions: list[dict], truth: list[dict], spec, log
) -> None:
    """Teacher-forced training on descriptions of the (biased) caption facts and yes/no probes of the truth."""
    rng = random.Random(spec.seed)
    model = policy.module
    model.train()
    prompt_cache: dict[str, list[int]] = {}
    dummy = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))

    def prompt_ids(text: str) -> list[int]:
        if text not in prompt_cache:
            prompt_cache[text] = policy.encode_image_prompt(text, dummy)[0]
        return prompt_cache[text]

    def response_ids(text: str) -> list[int]:
        return policy.tokenizer(text, add_special_tokens=False)["input_ids"] + [policy.tokenizer.eos_token_id]

    if spec.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, spec.lr, total_steps=spec.sft_steps, pct_start=0.1)
    for step in range(spec.sft_steps):
        seqs = []
        for _ in range(spec.batch_size):
            i = rng.randrange(len(captions))
            if rng.random() < spec.describe_share:
                question, answer = D.DESCRIBE_PROMPT, D.describe(captions[i])
            else:
                question, answer = rng.choice(D.probes(truth[i], rng))
            seqs.append((prompt_ids(question), response_ids(answer), pixels[i]))
        lp = policy.sequence_logprobs(policy.collate(seqs))
        loss = -(lp.token_logps.sum() / lp.mask.sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad()
        if step % 200 == 0 or step == spec.sft_steps - 1:
            log(f"[zoo vlm] sft step {step + 1}/{spec.sft_steps} loss {loss.item():.4f}")
    model.requires_grad_(True)
    model.eval()


def evaluate_base(policy, images, facts, probe_rows, batch_size=128) -> dict[str, float]:
    """The hallucination metrics of the base on held-out images (as `mmalign eval` computes them)."""
    prompts = [D.DESCRIBE_PROMPT] * len(images)
    out = []
    for s in range(0, len(images), batch_size):
        chunk = [
            {"prompt": p, "image": im}
            for p, im in zip(prompts[s : s + batch_size], images[s : s + batch_size], strict=True)
        ]
        out += policy.generate(chunk, greedy=True)
    metrics = {
        **description_metrics([o["text"] for o in out], facts),
        **diversity([o["response_ids"] for o in out]),
    }
    if not probe_rows:
        return metrics
    answers = []
    for s in range(0, len(probe_rows), batch_size):
        chunk = [{"prompt": q, "image": im} for im, q, _ in probe_rows[s : s + batch_size]]
        answers += [o["text"] for o in policy.generate(chunk, greedy=True)]
    metrics.update(pope_metrics(answers, [a for _, _, a in probe_rows]))
    return metrics


def sequence_method_rows(records: list[dict], dpo: list[dict]) -> dict[str, list[dict]]:
    """Rows of the online, SFT and KTO files from the training records and the DPO pairs (no random draws)."""
    describe = [{"image": r["image"], "prompt": r["prompt"], **r["facts"]} for r in records]
    sft = [
        {"image": r["image"], "prompt": r["prompt"], "completion": D.describe(r["facts"])} for r in records
    ]
    unpaired = []
    for row in dpo:
        for field, label in (("chosen", True), ("rejected", False)):
            unpaired.append(
                {"image": row["image"], "prompt": row["prompt"], "completion": row[field], "label": label}
            )
    return {"train_describe": describe, "train_sft": sft, "train_unpaired": unpaired}


@build_threads()
def build_vlm_world(out_dir: str | Path, spec: VLMWorldSpec | None = None, log=print) -> Path:
    """Train the base VLM and write it with held-out eval files and POVID / DPO / RLHF-V / KTO / SFT / online
    training data. Runs on `BUILD_THREADS` torch threads whatever the caller's setting (bit-identical builds)."""
    spec = spec or VLMWorldSpec()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    started = time.perf_counter()

    rendered, labels = render_all(spec.seed)
    n = len(rendered) if spec.max_images is None else min(spec.max_images, len(rendered))
    perm = torch.randperm(len(rendered), generator=torch.Generator().manual_seed(spec.seed))[:n].tolist()
    n_eval = int(n * spec.eval_fraction)
    held_out, train = perm[:n_eval], perm[n_eval:]
    facts = {i: D.facts_of(np.asarray(rendered[i]), labels[i]) for i in perm}
    pil = {i: rendered[i] for i in perm}
    for i in perm:
        pil[i].save(out / "images" / f"{i:04d}.png")
    prior = prior_facts([facts.get(i) for i in range(len(rendered))], train)

    processor = world_processor()
    torch.manual_seed(spec.seed)
    policy = VisionLanguagePolicy(
        build_model(processor, spec),
        processor,
        max_length=spec.max_length,
        max_new_tokens=spec.max_new_tokens,
        image_size=IMAGE_SIZE,
    )
    digits8 = load_digits().images
    vision = pretrain_vision(
        policy.module,
        [digits8[i] for i in train],
        [labels[i] for i in train],
        ([pil[i] for i in held_out], [labels[i] for i in held_out]),
        spec,
        log,
    )
    pixels = policy.pixel_values([pil[i] for i in train])
    captions = [caption_facts(facts[i], prior, spec, rng) for i in train]
    noise_share = sum(c != facts[i] for c, i in zip(captions, train, strict=True)) / len(train)
    log(f"[zoo vlm] {len(train)} train / {len(held_out)} held-out images; {noise_share:.1%} captions biased")
    train_base(policy, pixels, captions, [facts[i] for i in train], spec, log)
    policy.module.save_pretrained(out / "base")
    processor.save_pretrained(out / "base")
    sft_s = time.perf_counter() - started

    base = VisionLanguagePolicy.from_pretrained(
        str(out / "base"),
        max_length=spec.max_length,
        max_new_tokens=spec.max_new_tokens,
        image_size=IMAGE_SIZE,
    )
    base.module.eval()
    rel = {i: f"images/{i:04d}.png" for i in perm}
    describe_eval = [{"image": rel[i], "prompt": D.DESCRIBE_PROMPT, **facts[i]} for i in held_out]
    probe_eval, probe_rows = [], []
    for i in held_out:
        for question, answer in rng.sample(D.probes(facts[i], rng), spec.eval_probes_per_image):
            probe_eval.append({"image": rel[i], "prompt": question, "answer": answer})
            probe_rows.append((pil[i], question, answer))
    write_jsonl(out / "eval_describe.jsonl", describe_eval)
    write_jsonl(out / "eval_probes.jsonl", probe_eval)
    base_metrics = evaluate_base(base, [pil[i] for i in held_out], [facts[i] for i in held_out], probe_rows)
    train_metrics = evaluate_base(base, [pil[i] for i in train[:300]], [facts[i] for i in train[:300]], [])
    log(f"[zoo vlm] base held-out {json.dumps({k: round(v, 3) for k, v in base_metrics.items()})}")

    records = [{"image": rel[i], "prompt": D.DESCRIBE_PROMPT, "facts": facts[i]} for i in train]
    train_pil = [pil[i] for i in train]
    dpo = B.dpo_rows(records, seed=spec.seed)
    write_jsonl(out / "train_dpo.jsonl", dpo)
    povid, povid_stats = B.povid_rows(
        base, records, train_pil, noise_step=spec.povid_noise_step, seed=spec.seed
    )
    # ground truth for score-aware losses (ODPO): the image's own description 1, a hallucinated one 0
    write_jsonl(out / "train_povid.jsonl", [{**r, "score_chosen": 1.0, "score_rejected": 0.0} for r in povid])
    rlhfv, rlhfv_stats = B.correction_rows(base, records, train_pil)
    write_jsonl(out / "train_rlhfv.jsonl", rlhfv)
    log(f"[zoo vlm] povid {povid_stats}; rlhf-v {rlhfv_stats}")
    for name, rows in sequence_method_rows(records, dpo).items():
        write_jsonl(out / f"{name}.jsonl", rows)

    world = {
        "world": "vlm",
        **asdict(spec),
        "prior": {str(k): v for k, v in prior.items()},
        "biased_caption_share": noise_share,
        "n_train_images": len(train),
        "n_held_out_images": len(held_out),
        "image_tokens": policy._image_tokens,
        "vision_pretrain": vision,
        "base_held_out": base_metrics,
        "base_train_subset": train_metrics,
        "povid_data": povid_stats,
        "rlhfv_data": rlhfv_stats,
        "timings": {"sft_s": round(sft_s, 1), "total_s": round(time.perf_counter() - started, 1)},
    }
    (out / "world.json").write_text(json.dumps(world, indent=2))
    return out
