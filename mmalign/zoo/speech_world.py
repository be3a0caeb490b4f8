"""The offline spoken-digits world: espeak-ng digit words → a tiny text-to-mel diffusion TTS and a recogniser.

Digit words ("zero" … "nine") are rendered with espeak-ng in many voices, rates, pitches and loudnesses, resampled
to 8 kHz and turned into standardised 32×32 log-mels. A spoken-digit recogniser (the digits world's CNN on
1-channel 32×32 inputs; optionally with an 11th non-speech class) learns them, tested on voices held out from everything else. A character CLIP text encoder
is pretrained to tell the digits apart and frozen; a small 1-D convolutional denoiser with cross-attention (`MelDenoiser`) learns to denoise mels given the
text, and is stopped early on purpose: its speech is recognised only part of the time, which is the room the
alignment recipes in speech/ have to gain. The training recordings (`train_speech.jsonl`) and the held-out-voice
recordings (`heldout_speech.jsonl`) are written as WAV files with their prompts.

Made after everything else, from their own generators (so the recogniser, encoder and UNet stay the bits they were
before): an independent judge (`judge/`, a `ColumnConvClassifier`, the keyword-spotting layout of mel bands as
channels convolved over time) trained with another seed on a third set of voices and tested on the held-out
voices; and preference pairs for offline Diffusion-DPO (`train_pairs.jsonl`, `eval_pairs.jsonl`, WAVs in
`pairs/`): the base TTS's own utterances of each prompt, vocoded with the world's Griffin-Lim vocoder, the one the
recogniser hears as the prompted digit most surely preferred over the one it hears least surely.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmalign.core.data import write_jsonl
from mmalign.evaluation.classifier import (
    DIGIT_WORDS,
    Classifier,
    ColumnConvClassifierConfig,
    ConvClassifierConfig,
    digit_of,
    train_classifier,
)
from mmalign.speech.audio import MelConfig, MelFrontend, read_wav, write_wav
from mmalign.speech.denoiser import MelDenoiser
from mmalign.speech.text import CharEncoder
from mmalign.speech.tts import MelTTS
from mmalign.zoo.reproducible import build_threads

TRAIN_TEMPLATES = ("{word}", "{num}", "{word}.", "{num}!")
EVAL_TEMPLATES = ("{word}!", "{num}.")


@dataclass
class SpeechWorldSpec:
    """Sizes of the speech world; `tiny()` is the seconds-fast build the tests use."""

    train_per_digit: int = 160
    heldout_per_digit: int = 16
    languages: tuple[str, ...] = ("en", "en-us", "en-gb-scotland", "en-029")
    # Not f2/f3: espeak-ng renders those two variants differently from one process to the next (speech/README).
    train_variants: tuple[str, ...] = ("", "f1", "m1", "m2", "m3", "m4", "klatt", "croak")
    heldout_variants: tuple[str, ...] = ("f4", "m6", "klatt3")
    rate: tuple[int, int] = (140, 250)
    pitch: tuple[int, int] = (25, 75)
    batch_size: int = 32
    lr: float = 2e-3
    recogniser_steps: int = 400
    recogniser_channels: tuple[int, int] = (16, 32)
    # >0: an 11th non-speech class, this many examples per speech example (mels with speech's spectra but not its
    # time course). Off: at 0.5 the recogniser judged 81% of the base TTS's own speech non-speech (speech/README).
    recogniser_nonspeech: float = 0.0
    text_hidden: int = 32
    text_layers: int = 2
    text_steps: int = 300
    denoiser_channels: int = 128
    unet_steps: int = 600
    prompt_dropout: float = 0.1
    probe_every: int = (
        0  # >0: log the base's recogniser accuracy every n UNet steps (for choosing unet_steps)
    )
    # How base accuracy is measured: the sampler settings of the speech/ recipes.
    eval_per_prompt: int = 8
    eval_inference_steps: int = 10
    eval_guidance_scale: float = 7.0
    mel: dict = field(default_factory=dict)  # MelConfig overrides
    seed: int = 0
    # The independent judge (judge/): a third set of voices (none of them f2/f3/f5, which espeak-ng renders
    # differently from one process to the next), its own architecture and seed; tested on the held-out voices.
    judge_variants: tuple[str, ...] = ("m5", "m7", "m8", "klatt2", "klatt4", "linda", "steph", "anika")
    judge_per_digit: int = 100
    judge_steps: int = 400
    judge_channels: tuple[int, int] = (64, 64)
    judge_seed: int = 1
    # Offline Diffusion-DPO pairs (pairs/, train_pairs.jsonl, eval_pairs.jsonl) drawn from the base TTS.
    pair_samples_per_prompt: int = 4
    pair_repeats: int = 8  # passes over the train prompts
    pair_eval_repeats: int = 4  # passes over the held-out prompts
    pair_min_gap: float = 0.2  # least difference in p(prompted digit) between the two utterances of a pair

    @classmethod
    def tiny(cls) -> SpeechWorldSpec:
        return cls(
            train_per_digit=6,
            heldout_per_digit=2,
            batch_size=8,
            recogniser_steps=20,
            recogniser_channels=(8, 8),
            text_hidden=16,
            text_layers=1,
            text_steps=20,
            denoiser_channels=32,
            unet_steps=20,
            eval_per_prompt=1,
            eval_inference_steps=2,
            judge_per_digit=4,
            judge_steps=20,
            judge_channels=(16, 16),
            pair_samples_per_prompt=2,
            pair_repeats=1,
            pair_eval_repeats=1,
            pair_min_gap=0.0,
        )


def prompt_for(template: str, digit: int) -> str:
    return template.format(word=DIGIT_WORDS[digit], num=digit)


def train_prompts() -> list[str]:
    """Every train template for digits 0..9, template-major (row t*10 + d)."""
    return [prompt_for(t, d) for t in TRAIN_TEMPLATES for d in range(10)]


def eval_prompts() -> list[str]:
    """Held-out spellings the TTS never saw in training."""
    return [prompt_for(t, d) for t in EVAL_TEMPLATES for d in range(10)]


def render(
    spec: SpeechWorldSpec, variants: tuple[str, ...], per_digit: int, mel: MelConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Waveforms `[N, samples]` at the model rate, digit labels and each utterance's voice settings."""
    import torchaudio.functional as AF

    from mmalign.zoo.speech_espeak import Espeak

    engine = Espeak()
    waves, digits, meta = [], [], []
    for digit in range(10):
        for _ in range(per_digit):
            lang = spec.languages[rng.integers(len(spec.languages))]
            variant = variants[rng.integers(len(variants))]
            voice = lang + (f"+{variant}" if variant else "")
            rate, pitch = int(rng.integers(*spec.rate)), int(rng.integers(*spec.pitch))
            raw = engine.say(DIGIT_WORDS[digit], voice, rate, pitch, int(rng.integers(30, 70)))
            loud = np.nonzero(np.abs(raw) > 0.01)[0]
            raw = raw[loud[0] : loud[-1] + 1] if len(loud) else raw
            wave = AF.resample(torch.from_numpy(raw), engine.sample_rate, mel.sample_rate)
            wave = wave / wave.abs().max().clamp_min(1e-6) * float(rng.uniform(0.4, 0.9))
            offset = int(rng.integers(0, int(0.08 * mel.sample_rate)))
            out = torch.zeros(mel.num_samples)
            piece = wave[: mel.num_samples - offset]
            out[offset : offset + len(piece)] = piece
            waves.append(out)
            digits.append(digit)
            meta.append({"digit": digit, "voice": voice, "rate": rate, "pitch": pitch})
    return torch.stack(waves), torch.tensor(digits), meta


NONSPEECH = 10  # the recogniser's extra class


def nonspeech_mels(mels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` mels without speech's time course, from real ones: a third each with frames shuffled in time, every
    band held at its utterance average (stationary bands, plus noise), and Gaussian noise."""
    src = mels[torch.randint(len(mels), (n,), generator=generator)]
    k = n // 3
    order = torch.rand(k, src.shape[-1], generator=generator).argsort(-1)
    shuffled = src[:k].gather(-1, order[:, None, None, :].expand(-1, *src.shape[1:3], -1))
    held = src[k : 2 * k].mean(-1, keepdim=True).expand(-1, -1, -1, src.shape[-1])
    stationary = held + 0.3 * torch.randn(held.shape, generator=generator)
    noise = torch.randn(src[2 * k :].shape, generator=generator)
    return torch.cat([shuffled, stationary, noise])


def train_text_encoder(chars: CharEncoder, spec: SpeechWorldSpec, generator: torch.Generator, log):
    """A stand-in for text-encoder pretraining: a char CLIP encoder taught to tell the digits apart, then frozen."""
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=chars.vocab_size,
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_hidden * 2,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4,
            max_position_embeddings=chars.max_length,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    ids = chars(train_prompts())
    probe = nn.Linear(spec.text_hidden, 10)
    optim = torch.optim.AdamW([*encoder.parameters(), *probe.parameters()], lr=spec.lr, weight_decay=0.0)
    for step in range(spec.text_steps):
        rows = torch.randint(len(ids), (spec.batch_size,), generator=generator)
        loss = F.cross_entropy(probe(encoder(ids[rows])[0].mean(1)), rows % 10)
        loss.backward()
        optim.step()
        optim.zero_grad()
        if step % 100 == 0 or step == spec.text_steps - 1:
            log(f"[zoo speech] text encoder step {step + 1}/{spec.text_steps} loss {loss.item():.4f}")
    return encoder.eval().requires_grad_(False)


def make_denoiser(spec: SpeechWorldSpec, mel: MelConfig) -> MelDenoiser:
    return MelDenoiser(
        n_mels=mel.n_mels, frames=mel.frames, channels=spec.denoiser_channels, text_dim=spec.text_hidden
    )


def sampling_policy(tts: MelTTS, spec: SpeechWorldSpec):
    """The TTS as a diffusion policy at the speech/ recipes' sampler settings."""
    from mmalign.speech.diffusion_policy import DiffusionSpeechPolicy

    return DiffusionSpeechPolicy(
        tts, num_steps=spec.eval_inference_steps, guidance_scale=spec.eval_guidance_scale, eta=1.0
    )


@torch.no_grad()
def base_speech(tts: MelTTS, prompts: list[str], spec: SpeechWorldSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """`eval_per_prompt` mels of each prompt from the TTS (seeded), and the prompted digits."""
    policy = sampling_policy(tts, spec)
    jobs = [p for p in prompts for _ in range(spec.eval_per_prompt)]
    mels = policy.sample(jobs, generator=torch.Generator().manual_seed(spec.seed), record=False).final
    tts.unet.requires_grad_(False)
    return mels, torch.tensor([digit_of(p) for p in jobs])


@torch.no_grad()
def recognised(recogniser: Classifier, mels: torch.Tensor, digits: torch.Tensor) -> dict[str, float]:
    """A recogniser's accuracy and mean p(prompted digit) on mels."""
    logp = recogniser.log_prob(mels, digits)
    return {
        "accuracy": recogniser.accuracy(mels, digits),
        "p_digit": logp.exp().mean().item(),
        "n": len(digits),
    }


def base_accuracy(tts: MelTTS, recogniser, prompts: list[str], spec: SpeechWorldSpec) -> dict[str, float]:
    """Recogniser accuracy and mean p(prompted digit) on the TTS's speech, at the recipes' sampler settings."""
    return recognised(recogniser, *base_speech(tts, prompts, spec))


def train_judge(
    spec: SpeechWorldSpec,
    frontend: MelFrontend,
    held: tuple[torch.Tensor, torch.Tensor],
    recogniser: Classifier,
    speech: dict[str, tuple[torch.Tensor, torch.Tensor]],
    log,
) -> tuple[Classifier, dict]:
    """Render the judge's own voices and train the independent judge on them; measure it against the recogniser
    on the held-out voices and on the base TTS's speech. Its draws come from its own generators (torch's global
    state is restored after), so it changes nothing else the build makes."""
    mel = frontend.config
    waves, digits, _ = render(
        spec, spec.judge_variants, spec.judge_per_digit, mel, np.random.default_rng(spec.judge_seed)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.judge_seed)
        judge = train_classifier(
            frontend(waves),
            digits,
            spec.judge_steps,
            batch_size=spec.batch_size * 2,
            config=ColumnConvClassifierConfig(height=mel.n_mels, in_channels=1, channels=spec.judge_channels),
            generator=torch.Generator().manual_seed(spec.judge_seed),
            log=log,
            log_prefix="[zoo speech] judge",
        )
    held_mels, held_digits = held
    base = {}
    for name, (mels, prompted) in speech.items():
        agree = (judge.predict(mels) == recogniser.predict(mels)).float().mean().item()
        base[name] = {**recognised(judge, mels, prompted), "agrees_with_recogniser": agree}
    report = {
        "architecture": judge.architecture,
        "config": asdict(judge.config),
        "seed": spec.judge_seed,
        "variants": list(spec.judge_variants),
        "n_train_utterances": len(waves),
        "accuracy_heldout_voices": judge.accuracy(held_mels, held_digits),
        "agrees_with_recogniser_heldout_voices": (judge.predict(held_mels) == recogniser.predict(held_mels))
        .float()
        .mean()
        .item(),
        "base_accuracy": base,
    }
    log(
        f"[zoo speech] judge accuracy on held-out voices {report['accuracy_heldout_voices']:.3f}; base {base}"
    )
    return judge, report


@torch.no_grad()
def write_pairs(out: Path, tts: MelTTS, recogniser: Classifier, spec: SpeechWorldSpec, log) -> dict:
    """Offline Diffusion-DPO pairs from the base TTS's own speech: `pair_samples_per_prompt` utterances per prompt
    per pass, vocoded to WAV; the utterance the recogniser gives the highest p(prompted digit) is `audio_w`, the
    lowest `audio_l` (kept when they differ by `pair_min_gap`). Scores are measured on the WAV files as a run reads
    them back (Griffin-Lim, 16-bit PCM, the frontend), not on the sampled mels.

    Both utterances come from the same model through the same vocoder, so what separates them is what the
    recogniser hears (the digit), as in Pick-a-Pic-style data; real recordings as winners would also teach "sound
    like espeak-ng, not like Griffin-Lim". Returns counts and recogniser accuracy after the round trip.
    """
    policy = sampling_policy(tts, spec)
    generator = torch.Generator().manual_seed(spec.seed + 3)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    k, stats = spec.pair_samples_per_prompt, {}
    for split, prompts, repeats in (
        ("train", train_prompts(), spec.pair_repeats),
        ("eval", eval_prompts(), spec.pair_eval_repeats),
    ):
        rows, heard_right, heard = [], 0, 0
        for rep in range(repeats):
            batch = [p for p in prompts for _ in range(k)]
            waves = policy.to_waveform(policy.sample(batch, generator=generator, record=False).final)
            files = [f"pairs/{split}_{rep:02d}_{j:04d}.wav" for j in range(len(batch))]
            for file, wave in zip(files, waves, strict=True):
                write_wav(out / file, wave, policy.sample_rate)
            mels = torch.cat([policy.frontend(read_wav(out / file, policy.sample_rate)) for file in files])
            digits = torch.tensor([digit_of(p) for p in batch])
            scores = recogniser.log_prob(mels, digits).exp().view(len(prompts), k)
            heard_right += int((recogniser.predict(mels) == digits).sum())
            heard += len(batch)
            keep = set()
            for i, prompt in enumerate(prompts):
                best, worst = int(scores[i].argmax()), int(scores[i].argmin())
                if best == worst or scores[i, best] - scores[i, worst] < spec.pair_min_gap:
                    continue
                keep |= {i * k + best, i * k + worst}
                rows.append(
                    {
                        "prompt": prompt,
                        "audio_w": files[i * k + best],
                        "audio_l": files[i * k + worst],
                        "score_chosen": round(float(scores[i, best]), 4),
                        "score_rejected": round(float(scores[i, worst]), 4),
                    }
                )
            for j, file in enumerate(files):
                if j not in keep:
                    (out / file).unlink()
        if not rows:
            raise RuntimeError(
                f"no {split} pair had a score gap >= pair_min_gap; lower SpeechWorldSpec.pair_min_gap"
            )
        write_jsonl(out / f"{split}_pairs.jsonl", rows)
        stats[f"{split}_pairs"] = len(rows)
        stats[f"{split}_recogniser_accuracy_after_vocoder"] = heard_right / heard
        log(
            f"[zoo speech] {len(rows)} {split} pairs; recogniser accuracy on the vocoded speech {heard_right / heard:.3f}"
        )
    return stats


def train_unet(mels, digits, text_encoder, chars, mel, spec, generator, log, probe=None):
    """ε-prediction training on train prompts, 10% of them replaced by the empty prompt (for CFG)."""
    from diffusers import DDPMScheduler

    unet = make_denoiser(spec, mel)
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    with torch.no_grad():
        encodings = text_encoder(chars([*train_prompts(), ""]))[0]
    optim = torch.optim.AdamW(unet.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, spec.lr, total_steps=spec.unet_steps, pct_start=0.1)
    bsz = spec.batch_size
    for step in range(spec.unet_steps):
        idx = torch.randint(len(mels), (bsz,), generator=generator)
        rows = torch.randint(len(TRAIN_TEMPLATES), (bsz,), generator=generator) * 10 + digits[idx]
        rows[torch.rand(bsz, generator=generator) < spec.prompt_dropout] = len(encodings) - 1
        noise = torch.randn(mels[idx].shape, generator=generator)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator)
        pred = unet(
            noise_scheduler.add_noise(mels[idx], noise, t), t, encoder_hidden_states=encodings[rows]
        ).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad()
        if step % 100 == 0 or step == spec.unet_steps - 1:
            log(f"[zoo speech] unet step {step + 1}/{spec.unet_steps} loss {loss.item():.4f}")
        if probe is not None and spec.probe_every and (step + 1) % spec.probe_every == 0:
            unet.eval()
            log(f"[zoo speech] probe at unet step {step + 1}: {probe(unet, noise_scheduler)}")
            unet.train().requires_grad_(True)
    return unet.eval().requires_grad_(False), noise_scheduler


def _write_split(out: Path, name: str, waves, digits, meta, templates, mel: MelConfig) -> None:
    """WAV files plus a JSONL of {prompt, audio, digit, voice…}: real speech for evaluation and preference data."""
    (out / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (wave, digit, m) in enumerate(zip(waves, digits.tolist(), meta, strict=True)):
        file = f"{name}/{i:04d}_{DIGIT_WORDS[digit]}.wav"
        write_wav(out / file, wave, mel.sample_rate)
        rows.append({"prompt": prompt_for(templates[i % len(templates)], digit), "audio": file, **m})
    write_jsonl(out / f"{name}.jsonl", rows)


@build_threads()
def build_speech_world(out_dir: str | Path, spec: SpeechWorldSpec | None = None, log=print) -> Path:
    """Render the audio, train recogniser, text encoder and UNet, write them with prompts, then the judge and the
    preference pairs; returns `out_dir`. Runs on `BUILD_THREADS` torch threads (bit-identical builds)."""
    from diffusers import DDIMScheduler

    spec = spec or SpeechWorldSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    mel = MelConfig(**spec.mel)
    train_w, train_d, train_meta = render(spec, spec.train_variants, spec.train_per_digit, mel, rng)
    held_w, held_d, held_meta = render(spec, spec.heldout_variants, spec.heldout_per_digit, mel, rng)
    raw = MelFrontend(mel).log_mel(train_w)
    mel.mean, mel.std = raw.mean().item(), raw.std().item()
    frontend = MelFrontend(mel)
    train_mels, held_mels = frontend(train_w), frontend(held_w)
    timings["render_s"] = time.perf_counter() - started
    log(f"[zoo speech] rendered {len(train_w)} train + {len(held_w)} held-out-voice utterances")

    # Non-speech examples from their own generator, so the rest of the build draws what it drew without them.
    negatives_generator = torch.Generator().manual_seed(spec.seed + 1)
    n_neg = round(spec.recogniser_nonspeech * len(train_mels))
    negatives = nonspeech_mels(train_mels, n_neg, negatives_generator)
    recogniser = train_classifier(
        torch.cat([train_mels, negatives]),
        torch.cat([train_d, torch.full((n_neg,), NONSPEECH)]),
        spec.recogniser_steps,
        batch_size=spec.batch_size * 2,
        config=ConvClassifierConfig(
            image_size=mel.n_mels,
            in_channels=1,
            channels=spec.recogniser_channels,
            hidden=64,
            num_classes=11 if n_neg else 10,
        ),
        generator=generator,
        log=log,
    )
    recogniser.save_pretrained(out / "recogniser")
    recogniser_accuracy = recogniser.accuracy(held_mels, held_d)
    log(f"[zoo speech] recogniser accuracy on held-out voices {recogniser_accuracy:.3f}")
    nonspeech_recall = None
    if n_neg:
        held_negatives = nonspeech_mels(held_mels, len(held_mels), negatives_generator)
        nonspeech_recall = recogniser.accuracy(held_negatives, torch.full((len(held_mels),), NONSPEECH))
        log(f"[zoo speech] non-speech made from held-out voices recognised as such {nonspeech_recall:.3f}")
    timings["recogniser_s"] = time.perf_counter() - started - sum(timings.values())

    chars = CharEncoder()
    text_encoder = train_text_encoder(chars, spec, generator, log)

    def probe(unet, noise_scheduler):
        scheduler = DDIMScheduler.from_config(noise_scheduler.config, set_alpha_to_one=False)
        tts = MelTTS(unet, text_encoder, chars, scheduler, mel)
        return base_accuracy(tts, recogniser, eval_prompts(), spec)

    unet, noise_scheduler = train_unet(
        train_mels, train_d, text_encoder, chars, mel, spec, generator, log, probe=probe
    )
    timings["unet_s"] = time.perf_counter() - started - sum(timings.values())

    tts = MelTTS(
        unet,
        text_encoder,
        chars,
        DDIMScheduler.from_config(noise_scheduler.config, set_alpha_to_one=False),
        mel,
    )
    tts.save_pretrained(out / "base")
    write_jsonl(out / "train_prompts.jsonl", [{"prompt": p, "digit": digit_of(p)} for p in train_prompts()])
    write_jsonl(out / "eval_prompts.jsonl", [{"prompt": p, "digit": digit_of(p)} for p in eval_prompts()])
    _write_split(out, "heldout_speech", held_w, held_d, held_meta, EVAL_TEMPLATES, mel)
    # The TTS's own training recordings with the prompt spellings they were trained under: DLPO's pretraining
    # data (its diffusion-loss term is the ε-loss on these, as in its reference implementation).
    _write_split(out, "train_speech", train_w, train_d, train_meta, TRAIN_TEMPLATES, mel)

    tts = MelTTS.from_pretrained(out / "base")
    speech = {"eval_prompts": base_speech(tts, eval_prompts(), spec)}
    speech["train_prompts"] = base_speech(tts, train_prompts(), spec)
    accuracy = {name: recognised(recogniser, *drawn) for name, drawn in speech.items()}
    log(f"[zoo speech] base recogniser accuracy on its speech {accuracy}")
    timings["eval_s"] = time.perf_counter() - started - sum(timings.values())

    judge, judge_report = train_judge(spec, frontend, (held_mels, held_d), recogniser, speech, log)
    judge.save_pretrained(out / "judge")
    timings["judge_s"] = time.perf_counter() - started - sum(timings.values())
    pairs = write_pairs(out, tts, recogniser, spec, log)
    timings["pairs_s"] = time.perf_counter() - started - sum(timings.values())
    timings["total_s"] = time.perf_counter() - started
    world = {
        "world": "speech",
        **asdict(spec),
        "mel_config": asdict(mel),
        "train_templates": list(TRAIN_TEMPLATES),
        "eval_templates": list(EVAL_TEMPLATES),
        "n_train_utterances": len(train_w),
        "n_heldout_utterances": len(held_w),
        "recogniser_accuracy_heldout_voices": recogniser_accuracy,
        "recogniser_nonspeech_recall_heldout_voices": nonspeech_recall,
        "base_accuracy": accuracy,
        "judge": judge_report,
        "pairs": pairs,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "world.json").write_text(json.dumps(world, indent=2))
    return out
