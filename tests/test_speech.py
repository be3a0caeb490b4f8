"""Speech adapter contracts: scheduler-exact step log-probs on mels, WAV I/O, named input errors, speech rewards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mmalign.core.data import DataError, read_rows, rows_from_records
from mmalign.core.params import LoraSpec
from mmalign.speech.audio import AudioError, MelConfig, MelFrontend, read_wav, write_wav
from mmalign.speech.diffusion_policy import DiffusionSpeechPolicy
from mmalign.speech.rewards import Intelligibility, Tonality
from mmalign.speech.text import AlphabetError, CharEncoder
from mmalign.train.diffusion_pg import data_denoising_loss, trajectory_denoising_loss
from mmalign.zoo.speech_world import SpeechWorldSpec, build_speech_world, nonspeech_mels


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_speech_world(
        tmp_path_factory.mktemp("speech-world"), SpeechWorldSpec.tiny(), log=lambda *_: None
    )


def _policy(world, **kwargs) -> DiffusionSpeechPolicy:
    torch.manual_seed(0)
    return DiffusionSpeechPolicy.from_pretrained(str(world / "base"), **kwargs)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_speech_step_logprob_is_the_ddim_gaussian(world, eta):
    policy = _policy(world, num_steps=4, eta=eta, guidance_scale=3.0)
    traj = policy.sample(["seven", "2!"], generator=torch.Generator().manual_seed(0))
    assert traj.final.shape == (2, 1, 32, 32)
    sched, embeds = policy.sampler.scheduler, traj.conditioning
    for i, t in enumerate(traj.timesteps):
        x, x_next = traj.latents[:, i], traj.next_latents[:, i]
        with torch.no_grad():
            eps = policy.predict(x, t, embeds)
        # DDIM (Song et al. 2021, Eq. 12/16) from ᾱ, independently of scheduler.step
        a_t = sched.alphas_cumprod[int(t)]
        prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        mean = a_prev.sqrt() * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
        expected = torch.distributions.Normal(mean, sigma).log_prob(x_next).flatten(1).mean(1)
        torch.testing.assert_close(traj.logprobs[:, i], expected, atol=1e-4, rtol=1e-4)
        # the policy re-scores the recorded step to the same value under unchanged weights
        step = policy.sampler.step(policy.predict(x, t, embeds), i, x)
        got = torch.distributions.Normal(step.mean, step.std).log_prob(x_next).flatten(1).mean(1)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_dlpo_penalty_is_the_noise_regression_to_the_final_sample(world):
    policy = _policy(world, num_steps=4)
    traj = policy.sample(["three"], generator=torch.Generator().manual_seed(1))
    embeds = traj.conditioning["prompt_embeds"]
    got = trajectory_denoising_loss(
        policy, traj.latents[:, 1], traj.timesteps[1], traj.final, traj.conditioning
    )
    abar = policy.forward_process.scheduler.alphas_cumprod[int(traj.timesteps[1])]
    eps_tilde = (traj.latents[:, 1] - abar.sqrt() * traj.final) / (1 - abar).sqrt()
    with torch.no_grad():
        eps = policy.module(traj.latents[:, 1], traj.timesteps[1], encoder_hidden_states=embeds).sample
    torch.testing.assert_close(got, ((eps - eps_tilde) ** 2).mean((1, 2, 3)), atol=1e-5, rtol=1e-5)


def test_dlpo_data_penalty_is_the_pretraining_loss_on_real_speech(world):
    """DLPO's data term, recomputed by hand: the recording's mel noised at (ε, t), the ε-error of the denoiser
    under the prompt and under the empty prompt, averaged."""
    policy = _policy(world)
    rows = read_rows(world / "train_speech.jsonl")[:3]
    targets = [policy.encode_target(r) for r in rows]
    x0 = torch.stack([t["latents"] for t in targets])
    wave = read_wav(world / rows[0].data["audio"], 8000)
    torch.testing.assert_close(x0[0], policy.frontend(wave)[0])
    cond = policy.encode_prompts([t["prompt"] for t in targets])
    embeds = cond["prompt_embeds"]
    torch.manual_seed(5)
    got = data_denoising_loss(policy, x0, cond)
    torch.manual_seed(5)
    noise, t = torch.randn(x0.shape), torch.randint(0, 1000, (3,))
    abar = policy.forward_process.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with torch.no_grad():
        cond = policy.module(x_t, t, encoder_hidden_states=embeds).sample
        empty = policy.module(
            x_t, t, encoder_hidden_states=policy.encode_prompts([""] * 3)["prompt_embeds"]
        ).sample
    expected = 0.5 * (((cond - noise) ** 2).mean((1, 2, 3)) + ((empty - noise) ** 2).mean((1, 2, 3)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dlpo_data_term_enters_each_update_once(world):
    """DLPO's loss over several trained steps = the policy-gradient terms + β × one data-term draw per sample."""
    from mmalign.train.diffusion_pg import DiffusionPGConfig, DiffusionPolicyGradient

    policy, reward = _policy(world, num_steps=4), Intelligibility.from_pretrained(str(world / "recogniser"))
    prompts = rows_from_records([{"prompt": "seven"}, {"prompt": "7!"}])
    targets = [r for r in read_rows(world / "train_speech.jsonl") if r.data["prompt"] in ("seven", "7!")]
    common = {"clip_range": 0.2, "advantage": "reinforce", "samples_per_prompt": 2}
    dlpo = DiffusionPolicyGradient(
        policy,
        prompts,
        reward,
        DiffusionPGConfig(diffusion_loss_coef=2.0, diffusion_loss_on="data", **common),
        targets=targets,
    )
    torch.manual_seed(0)
    batch, _ = dlpo.rollout(prompts)
    assert batch["steps"].shape[1] == 4
    pg_only = DiffusionPolicyGradient(policy, prompts, reward, DiffusionPGConfig(**common))
    torch.manual_seed(3)
    total, metrics = dlpo.loss(batch)
    pg, _ = pg_only.loss(batch)
    torch.manual_seed(3)
    cond = {"prompt_embeds": batch["cond.prompt_embeds"]}
    data = data_denoising_loss(policy, batch["targets"], cond)
    torch.testing.assert_close(total, pg + 2.0 * data, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(metrics["diffusion_loss"], data.mean(), atol=1e-6, rtol=1e-5)


def test_dlpo_data_loss_checks_its_recordings_before_training(world, tmp_path):
    from mmalign.train.diffusion_pg import DiffusionPGConfig, DiffusionPolicyGradient

    policy, reward = _policy(world, num_steps=2), Intelligibility.from_pretrained(str(world / "recogniser"))
    prompts = rows_from_records([{"prompt": "seven"}, {"prompt": "7!"}])
    data = DiffusionPGConfig(diffusion_loss_coef=1.0, diffusion_loss_on="data")
    with pytest.raises(ValueError, match=r"needs real outputs of the prompts in data\.targets"):
        DiffusionPolicyGradient(policy, prompts, reward, data)
    good = str(world / "heldout_speech" / "0000_zero.wav")
    sf.write(tmp_path / "rate.wav", np.zeros(100, dtype=np.float32), 16000)
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"prompt": "seven", "audio": good})
        + "\n"
        + json.dumps({"prompt": "7!", "audio": "rate.wav"})
    )
    with pytest.raises(AudioError, match="16000 Hz") as err:
        DiffusionPolicyGradient(policy, prompts, reward, data, targets=read_rows(tmp_path / "t.jsonl"))
    assert err.value.line == 2 and err.value.field == "audio"
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "seven", "audio": good}) + "\n")
    with pytest.raises(DataError, match="no real output for this prompt") as err:
        DiffusionPolicyGradient(policy, prompts, reward, data, targets=read_rows(tmp_path / "t.jsonl"))
    assert err.value.line == 2 and err.value.field == "prompt"
    with pytest.raises(ValueError, match="only used by DLPO's data loss"):
        DiffusionPolicyGradient(
            policy, prompts, reward, DiffusionPGConfig(), targets=read_rows(tmp_path / "t.jsonl")
        )


def test_nonspeech_examples_keep_the_spectra_but_not_the_time_course():
    mel = torch.linspace(-2, 2, 32).view(1, 1, 1, 32) * torch.randn(1, 1, 32, 1)  # bands that change in time
    neg = nonspeech_mels(mel, 9, torch.Generator().manual_seed(0))
    assert neg.shape == (9, 1, 32, 32)
    torch.testing.assert_close(neg[:3].sort(-1).values, mel.expand(3, -1, -1, -1).sort(-1).values)  # shuffled
    assert not torch.equal(neg[0], mel[0])
    residual = neg[3:6] - mel.mean(-1, keepdim=True)  # stationary bands + noise
    assert abs(residual.std().item() - 0.3) < 0.05
    assert abs(neg[6:].std().item() - 1) < 0.15  # noise


def test_wav_round_trip_and_mel_shape(tmp_path):
    rate = 8000
    wave = 0.5 * torch.sin(2 * math.pi * 440 * torch.arange(4000) / rate)
    write_wav(tmp_path / "a.wav", wave, rate)
    back = read_wav(tmp_path / "a.wav", rate)
    assert back.shape == wave.shape
    assert (back - wave).abs().max() <= 1 / 32767 + 1e-6  # 16-bit PCM quantisation
    mel = MelFrontend(MelConfig())(back)
    assert mel.shape == (1, 1, 32, 32) and torch.isfinite(mel).all()


def test_bad_audio_files_are_named_errors(tmp_path):
    sf.write(tmp_path / "rate.wav", np.zeros(100, dtype=np.float32), 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 8000)
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wav")
    with pytest.raises(AudioError, match="16000 Hz, the model expects 8000 Hz"):
        read_wav(tmp_path / "rate.wav", 8000)
    with pytest.raises(AudioError, match="empty"):
        read_wav(tmp_path / "empty.wav", 8000)
    with pytest.raises(AudioError, match="cannot read audio"):
        read_wav(tmp_path / "junk.wav", 8000)
    with pytest.raises(AudioError, match="not found"):
        read_wav(tmp_path / "missing.wav", 8000)


@pytest.mark.parametrize(
    "bad, match", [("rate", "16000 Hz"), ("empty", "empty"), ("junk", "cannot read audio")]
)
def test_bad_audio_in_preference_pairs_names_row_and_field(world, tmp_path, bad, match):
    from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig

    write_wav(tmp_path / "good.wav", torch.zeros(800), 8000)
    sf.write(tmp_path / "rate.wav", np.zeros(100, dtype=np.float32), 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 8000)
    (tmp_path / "junk.wav").write_bytes(b"junk")
    records = [
        {"prompt": "seven", "audio_w": "good.wav", "audio_l": "good.wav"},
        {"prompt": "one", "audio_w": "good.wav", "audio_l": f"{bad}.wav"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(AudioError, match=match) as err:
        PreferenceAlgorithm(_policy(world), read_rows(tmp_path / "pairs.jsonl"), PreferenceConfig())
    assert err.value.line == 2 and err.value.field == "audio_l"


def test_text_outside_the_alphabet_is_a_named_error(world):
    chars = CharEncoder()
    assert chars(["Seven"]).tolist() == chars(["seven"]).tolist()  # lower-cased first
    with pytest.raises(AlphabetError, match="'é' at position 3"):
        chars(["caf\u00e9"])
    policy = _policy(world)
    rows = rows_from_records([{"prompt": "seven"}, {"prompt": "eight #8"}])
    with pytest.raises(DataError, match="'#' at position 6") as err:
        policy.check_prompts(rows)
    assert err.value.line == 2 and err.value.field == "prompt"


def test_recogniser_reward_gradient_reaches_the_mel(world):
    reward = Intelligibility.from_pretrained(str(world / "recogniser"))
    mels = torch.randn(3, 1, 32, 32, requires_grad=True)
    values = reward(["seven", "2", "nine."], mels)
    assert values.shape == (3,) and ((values > 0) & (values < 1)).all()
    values.sum().backward()
    assert mels.grad is not None and torch.isfinite(mels.grad).all() and mels.grad.abs().sum() > 0
    # and through the sampler's last step back to the denoiser's weights (what reward backprop would use)
    policy = _policy(world, lora=LoraSpec(r=2, alpha=2), num_steps=2, guidance_scale=1.0)
    traj = policy.sample(["seven"], generator=torch.Generator().manual_seed(0))
    x = traj.latents[:, -1]
    mean = policy.sampler.step(policy.predict(x, traj.timesteps[-1], traj.conditioning), 1, x).mean
    reward(["seven"], mean).sum().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_tonality_prefers_a_tone_to_white_noise():
    cfg = MelConfig()
    frontend = MelFrontend(MelConfig())
    t = torch.arange(cfg.num_samples) / cfg.sample_rate
    tone = 0.5 * torch.sin(2 * math.pi * 300 * t) + 0.3 * torch.sin(2 * math.pi * 600 * t)
    noise = 0.3 * torch.randn(cfg.num_samples, generator=torch.Generator().manual_seed(0))
    scores = Tonality(cfg)(["x", "x"], frontend(torch.stack([tone, noise])))
    assert scores[0] > scores[1] + 0.2


def test_dnsmos_runs_offline_on_vocoded_audio():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("speechmos")
    from mmalign.speech.rewards import DNSMOS

    cfg = MelConfig()
    reward = DNSMOS(cfg)
    t = torch.arange(cfg.num_samples) / cfg.sample_rate
    tone = 0.3 * torch.sin(2 * math.pi * 200 * t) * (1 + torch.sin(2 * math.pi * 3 * t))
    noisy = tone + 0.3 * torch.randn(cfg.num_samples, generator=torch.Generator().manual_seed(0))
    mos = reward.audio_mos(torch.stack([tone, noisy]), cfg.sample_rate)
    assert mos.shape == (2,) and torch.isfinite(mos).all() and ((mos > 0.5) & (mos < 5.5)).all()


def test_vocoder_output_and_report_files(world, tmp_path):
    from mmalign.speech.report import SpeechSamples

    policy = _policy(world, num_steps=2)
    mels = policy.decode(policy.sample(["one", "two"], generator=torch.Generator().manual_seed(0)).final)
    waves = policy.to_waveform(mels)
    assert waves.shape == (2, policy.mel_config.num_samples) and waves.abs().max() <= 1
    report = SpeechSamples(policy.mel_config)
    stored = report.store_samples(
        tmp_path, "after", [{"prompt": "one", "mel": mels[0]}, {"prompt": "two", "mel": mels[1]}]
    )
    assert [s["wav"] for s in stored] == ["samples_after_0.wav", "samples_after_1.wav"]
    assert read_wav(tmp_path / "samples_after_1.wav", 8000).shape == (policy.mel_config.num_samples,)
    assert (tmp_path / "mels_after.png").stat().st_size > 0


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    from mmalign.speech.evaluate import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(4000, 3, generator=g) * torch.tensor([2.0, 1.0, 0.5]) + torch.tensor([1.0, 0.0, 0.0])
    # diagonal covariances: ‖Δμ‖² + Σ (σa − σb)²  = 1 + (1−2)² + (2−1)² + 0
    assert frechet_distance(a, b) == pytest.approx(3.0, abs=0.2)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_tonality_is_finite_on_extreme_mels():
    cfg = MelConfig(mean=-3.0, std=2.0)
    mels = torch.full((2, 1, 32, 32), 60.0)
    mels[1, :, :, ::2] = -60.0
    assert torch.isfinite(Tonality(cfg)(["x", "x"], mels)).all()


def test_world_audio_is_the_same_in_every_process():
    """The spoken-digits world's recordings do not depend on the process that renders them (espeak-ng's f2/f3
    variants did, so they are not used)."""
    import subprocess
    import sys

    script = (
        "import hashlib, numpy as np\n"
        "from mmalign.speech.audio import MelConfig\n"
        "from mmalign.zoo.speech_world import SpeechWorldSpec, render\n"
        "spec = SpeechWorldSpec.tiny()\n"
        "rng = np.random.default_rng(0)\n"
        "for variants in (spec.train_variants, spec.heldout_variants):\n"
        "    waves = render(spec, variants, 2, MelConfig(), rng)[0]\n"
        "    print(hashlib.sha256(waves.numpy().tobytes()).hexdigest())\n"
    )
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert len(runs[0].split()) == 2 and runs[0] == runs[1]


def test_vocoder_clips_only_mels_louder_than_any_full_scale_waveform(world):
    """A reward-hacked mel far above full scale vocodes to finite audio; real and full-scale audio are unclipped."""
    policy = _policy(world)
    vocoder, frontend, n = policy.vocoder, policy.frontend, policy.mel_config.num_samples
    loud = torch.sign(torch.sin(torch.arange(n) * 2 * math.pi * 440 / 8000))  # a full-scale square wave
    real = read_wav(world / "heldout_speech" / "0000_zero.wav", 8000)
    for wave in (loud, real):
        assert frontend.log_mel(wave[None]).max() < vocoder.max_log_mel
    hacked = torch.full((2, 1, 32, 32), 40.0)
    raw = (hacked.squeeze(1) * policy.mel_config.std + policy.mel_config.mean).exp()
    assert not torch.isfinite(raw).all()  # what the vocoder would have inverted without the clip
    assert torch.isfinite(vocoder(hacked)).all()
