"""AudioLDM 2 speech adapter on a tiny `AudioLDM2Pipeline` built from configs (offline tokenizers, random weights).

The pipeline mirrors the layout of the speech checkpoints: CLAP + a VITS text encoder, a bare `GPT2Model` prior
(as `anhnct/audioldm2_gigaspeech` stores it), the two-stream AudioLDM 2 UNet, a 1-channel VAE and a SpeechT5
HiFi-GAN; it is saved to disk and loaded through the adapter by path, as a hub id would be.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import soundfile as sf
import torch

from mmalign.core.config import RecipeError, load_recipe
from mmalign.core.data import DataError, read_rows, rows_from_records
from mmalign.core.params import LoraSpec
from mmalign.speech.audioldm2_policy import AudioLDM2SpeechPolicy
from mmalign.zoo.tiny_pipelines import tiny_audioldm2

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["seven eight", "call me at nine", "zero", "one two"]
DESCRIPTION = "A person is speaking."


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-audioldm2")
    tiny_audioldm2(path).save_pretrained(str(path / "pipe"))
    return path / "pipe"


def _policy(pipeline_dir, **kwargs) -> AudioLDM2SpeechPolicy:
    torch.manual_seed(0)
    kwargs = {"num_steps": 3, "eta": 1.0, "guidance_scale": 3.0, "description": DESCRIPTION, **kwargs}
    return AudioLDM2SpeechPolicy.from_pretrained(str(pipeline_dir), **kwargs)


class Loudness:
    """RMS of the waveform: a cheap reward on this policy's outputs."""

    name = "loudness"
    differentiable = False

    def __call__(self, prompts, waves):
        return waves.float().pow(2).mean(1).sqrt()


def test_sampling_is_the_pipelines_own_and_decodes_to_a_waveform(pipeline_dir):
    policy = _policy(pipeline_dir, audio_length_in_s=0.01)
    assert (
        type(policy.pipeline.language_model).__name__ == "GPT2LMHeadModel"
    )  # the saved prior is a GPT2Model
    traj = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    waves = policy.decode(traj.final)
    assert waves.shape == (2, 160) and policy.sample_rate == 16000  # 0.01 s at 16 kHz
    # AudioLDM2Pipeline.__call__ draws the same noise from the same generator (initial latents, then each DDIM
    # step's variance noise), so with η = 1 its audio is exactly the policy's decoded sample
    audio = policy.pipeline(
        [DESCRIPTION] * 2,
        transcription=PROMPTS[:2],
        num_inference_steps=3,
        guidance_scale=3.0,
        eta=1.0,
        audio_length_in_s=0.01,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).audios
    torch.testing.assert_close(waves, audio, atol=1e-5, rtol=1e-4)


def test_step_logprob_is_the_schedulers_gaussian(pipeline_dir):
    policy = _policy(pipeline_dir)
    traj = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(1))
    pipe, sched, w = policy.pipeline, policy.sampler.scheduler, 3.0
    with torch.no_grad():  # conditioning straight from the pipeline, unconditional half first
        embeds, mask, generated = pipe.encode_prompt(
            [DESCRIPTION] * 2, "cpu", 1, True, transcription=PROMPTS[:2]
        )
    for i, t in enumerate(traj.timesteps):
        x, x_next = traj.latents[:, i], traj.next_latents[:, i]
        with torch.no_grad():
            both = pipe.unet(
                torch.cat([x, x]),
                t,
                encoder_hidden_states=generated,
                encoder_hidden_states_1=embeds,
                encoder_attention_mask_1=mask,
            ).sample
        uncond, cond = both.chunk(2)
        eps = uncond + w * (cond - uncond)
        # DDIM (Song et al. 2021, Eq. 12/16) written out from ᾱ, independently of scheduler.step
        a_t = sched.alphas_cumprod[int(t)]
        prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        mean = a_prev.sqrt() * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
        expected = torch.distributions.Normal(mean, sigma).log_prob(x_next).flatten(1).mean(1)
        torch.testing.assert_close(traj.logprobs[:, i], expected, atol=1e-4, rtol=1e-4)
        # the recorded x_{t-1} is what the scheduler's own step gives from that noise
        z = (x_next - mean) / sigma
        stepped = sched.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(stepped, x_next, atol=1e-5, rtol=1e-5)


def test_dlpo_with_lora_trains_only_lora_and_the_saved_lora_loads_back(pipeline_dir, tmp_path):
    from mmalign.speech.evaluate import WaveformEvaluator
    from mmalign.speech.report import WaveformSamples
    from mmalign.train.diffusion_pg import DiffusionPGConfig, DiffusionPolicyGradient
    from mmalign.train.report import RunReport
    from mmalign.train.trainer import TrainConfig, Trainer

    policy = _policy(pipeline_dir, lora=LoraSpec(r=4, alpha=4))
    modules = {n: getattr(policy.pipeline, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    modules.update(language_model=policy.pipeline.language_model, vocoder=policy.pipeline.vocoder)
    before = {f"{m}.{n}": p.detach().clone() for m, mod in modules.items() for n, p in mod.named_parameters()}
    rows = rows_from_records([{"prompt": p} for p in PROMPTS])
    cfg = DiffusionPGConfig(name="dlpo", clip_range=0.2, advantage="reinforce", diffusion_loss_coef=1.0)
    Trainer(
        policy,
        DiffusionPolicyGradient(policy, rows, Loudness(), cfg),
        TrainConfig(max_steps=1, batch_size=4, lr=1e-2, progress=False),
        tmp_path / "run",
        evaluator=WaveformEvaluator(rows[:1], [Loudness()], seeds=1, grid_prompts=1, kl=False),
        report=RunReport(WaveformSamples(policy.sample_rate)),
    ).train()
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "diffusion_loss" in log and "rollout/reward" in log
    assert "samples_after_0.wav" in (tmp_path / "run" / "report.md").read_text()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["after"]["n_clips"] == 1
    assert sf.info(str(tmp_path / "run" / "samples_after_0.wav")).samplerate == 16000
    changed = {
        k
        for m, mod in modules.items()
        for n, p in mod.named_parameters()
        if not torch.equal(p.detach(), before[(k := f"{m}.{n}")])
    }
    assert changed and all(".lora_" in k and k.startswith("unet.") for k in changed), sorted(changed)[:5]

    policy.save_pretrained(str(tmp_path / "lora"))
    reloaded = _policy(pipeline_dir, lora=LoraSpec(r=4, alpha=4))
    reloaded.load_lora(str(tmp_path / "lora"))
    for p in (policy, reloaded):
        p.module.eval()
    samples = [
        p.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(3), record=False).final
        for p in (policy, reloaded)
    ]
    torch.testing.assert_close(samples[0], samples[1], atol=1e-6, rtol=1e-5)
    with reloaded.reference():  # the reference is the base UNet, which the trained LoRA moved away from
        base = reloaded.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(3), record=False).final
    assert not torch.allclose(base, samples[1])


def test_full_fine_tuning_trains_the_unet_against_a_frozen_copy_and_saves_the_pipeline(
    pipeline_dir, tmp_path
):
    from mmalign.train.diffusion_pg import DiffusionPGConfig, DiffusionPolicyGradient
    from mmalign.train.trainer import TrainConfig, Trainer

    policy = _policy(pipeline_dir)
    reference = {n: p.detach().clone() for n, p in policy._reference_model.named_parameters()}
    vae = {n: p.detach().clone() for n, p in policy.pipeline.vae.named_parameters()}
    rows = rows_from_records([{"prompt": p} for p in PROMPTS])
    cfg = DiffusionPGConfig(clip_range=0.2, advantage="reinforce", kl_coef=0.1)  # DPOK: reference in the loss
    Trainer(
        policy,
        DiffusionPolicyGradient(policy, rows, Loudness(), cfg),
        TrainConfig(max_steps=1, batch_size=4, lr=1e-3, progress=False),
        tmp_path / "run",
    ).train()
    assert "kl" in (tmp_path / "run" / "metrics.jsonl").read_text()
    assert any(not torch.equal(p, reference[n]) for n, p in policy.module.named_parameters())
    for n, p in policy._reference_model.named_parameters():
        assert torch.equal(p, reference[n]), n
    for n, p in policy.pipeline.vae.named_parameters():
        assert torch.equal(p, vae[n]), n
    reloaded = AudioLDM2SpeechPolicy.from_pretrained(
        str(tmp_path / "run" / "final"), num_steps=3, guidance_scale=3.0, description=DESCRIPTION
    )
    policy.module.eval()
    samples = [
        p.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(3), record=False).final
        for p in (policy, reloaded)
    ]
    torch.testing.assert_close(samples[0], samples[1], atol=1e-6, rtol=1e-5)


def test_diffusion_dpo_scores_run_on_the_packed_conditioning(pipeline_dir):
    """Online Diffusion-DPO's path: pairs of the policy's own latents, shared (noise, t), unguided scores."""
    policy = _policy(pipeline_dir)
    final = policy.sample(PROMPTS[:4], generator=torch.Generator().manual_seed(0), record=False).final
    pairs = [{"prompt": PROMPTS[i], "latents_w": final[i], "latents_l": final[i + 2]} for i in range(2)]
    from mmalign.train.diffusion_preference import PairDenoisingScores

    scorer = PairDenoisingScores(policy)
    torch.manual_seed(0)
    batch = scorer.collate_pairs(pairs)
    with torch.no_grad():
        scores = scorer.sequence_logprobs(batch).token_logps[:, 0]
        # −½‖ε − ε_θ(x_t, c, t)‖² written out with the UNet and the pipeline's own conditioning
        embeds, mask, generated = policy.pipeline.encode_prompt(
            [DESCRIPTION] * 4, "cpu", 1, False, transcription=[PROMPTS[0], PROMPTS[1]] * 2
        )
        noisy = policy.forward_process.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
        eps = policy.pipeline.unet(
            noisy,
            batch["timesteps"],
            encoder_hidden_states=generated,
            encoder_hidden_states_1=embeds,
            encoder_attention_mask_1=mask,
        ).sample
    expected = -0.5 * ((eps - batch["noise"]) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_text_to_audio_checkpoints_are_refused():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=r"T5EncoderModel.*not supported"):
        AudioLDM2SpeechPolicy(SimpleNamespace(text_encoder_2=type("T5EncoderModel", (), {})()))


def test_recipe_path_on_a_local_tiny_audioldm2(pipeline_dir, tmp_path):
    from mmalign.run import build_run
    from mmalign.train.trainer import Trainer

    recipe_path = ROOT / "speech" / "audioldm2_dlpo.yaml"
    assert load_recipe(recipe_path)["model"]["name_or_path"] == "anhnct/audioldm2_gigaspeech"
    recipe = load_recipe(
        recipe_path,
        [
            f"model.name_or_path={pipeline_dir}",
            "model.num_steps=2",
            "model.audio_length_in_s=0.01",
            "model.max_new_tokens=4",
            f"data.prompts={ROOT / 'speech' / 'audioldm2_train_prompts.jsonl'}",
            "eval.prompts=null",  # the evaluator and WAV report run in the DLPO test (DNSMOS takes ~1 s a clip here)
            "algorithm.samples_per_prompt=1",
            "train.max_steps=1",
            "train.batch_size=2",
            "train.ppo_epochs=1",
            "train.mixed_precision=no",
            "train.progress=false",
        ],
    )
    policy, algorithm, train_cfg, evaluator, report = build_run(recipe)
    assert isinstance(policy, AudioLDM2SpeechPolicy) and policy.lora is not None
    summary = Trainer(
        policy, algorithm, train_cfg, tmp_path / "run", evaluator=evaluator, report=report
    ).train()
    assert summary["steps"] == 1 and evaluator is None
    assert "rollout/reward" in (tmp_path / "run" / "metrics.jsonl").read_text()  # DNSMOS of the rollout
    assert (tmp_path / "run" / "final" / "unet_lora.safetensors").exists()
    # the recipe's own prompt files pass the transcription check
    policy.check_prompts(read_rows(ROOT / "speech" / "audioldm2_eval_prompts.jsonl"))


def test_mel_rewards_and_offline_pairs_are_refused_before_loading(monkeypatch):
    from mmalign.run import plan

    monkeypatch.chdir(ROOT)  # the recipe names its prompt files relative to the repository
    recipe = load_recipe(ROOT / "speech" / "audioldm2_dlpo.yaml")
    recipe["algorithm"]["reward"] = {"name": "intelligibility", "path": "zoo://speech/recogniser"}
    with pytest.raises(RecipeError, match=r"algorithm.reward: reward 'intelligibility' scores mel"):
        plan(recipe)
    recipe = load_recipe(ROOT / "speech" / "audioldm2_dlpo.yaml")
    recipe["eval"]["rewards"] = [{"name": "tonality", "model": "zoo://speech/base"}]
    with pytest.raises(RecipeError, match=r"eval.rewards: reward 'tonality'"):
        plan(recipe)
    recipe = load_recipe(ROOT / "speech" / "audioldm2_dlpo.yaml")
    with pytest.raises(RecipeError, match="online_diffusion_dpo"):
        plan({**recipe, "algorithm": {"name": "diffusion_dpo"}})
    with pytest.raises(RecipeError, match="diffusion_loss_on: data"):
        plan(
            {
                **recipe,
                "algorithm": {**recipe["algorithm"], "diffusion_loss_on": "data", "diffusion_loss_coef": 1},
            }
        )


def test_transcriptions_the_vits_tokenizer_cannot_spell_are_named_errors(pipeline_dir):
    policy = _policy(pipeline_dir)
    rows = rows_from_records([{"prompt": "seven"}, {"prompt": "call 555-0199"}])
    with pytest.raises(DataError, match=r"row 2.*'prompt'.*\['-', '0', '1', '5', '9'\]"):
        policy.check_prompts(rows)
    with pytest.raises(DataError, match=r"'prompt'.*tokens"):
        policy.check_prompts(rows_from_records([{"prompt": "a" * 50}]))
