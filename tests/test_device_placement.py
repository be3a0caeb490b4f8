"""A GPU run moves only the trained module (accelerate's prepare): every frozen part must follow it.

There is no GPU here, so the frozen parts are moved to the `meta` device and the test checks that every module the
policy holds (its attributes, and its pipeline's or TTS model's components) other than the trained one went there,
and nothing of the trained module did.
"""

from __future__ import annotations

import pytest
import torch

from mmalign.core.params import LoraSpec
from mmalign.text.policy import CausalLMPolicy
from mmalign.vision.diffusion_policy import DiffusionImagePolicy
from mmalign.zoo.tiny_pipelines import tiny_sd_pipeline


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _held_modules(policy) -> list[torch.nn.Module]:
    """Every torch module the policy can reach in one hop, except the trained one."""
    found = [v for v in vars(policy).values() if isinstance(v, torch.nn.Module)]
    for owner in (getattr(policy, "pipeline", None), getattr(policy, "tts", None)):
        if owner is not None:
            found += [v for v in vars(owner).values() if isinstance(v, torch.nn.Module)]
            found += [v for v in getattr(owner, "components", {}).values() if isinstance(v, torch.nn.Module)]
    trained = {id(policy.module), id(policy.model)}
    return [m for m in found if id(m) not in trained and m is not getattr(policy, "tts", None)]


def _check_moved(policy, expected: int) -> None:
    held = _held_modules(policy)
    assert len({id(m) for m in held}) == expected
    policy.move_frozen_to("meta")
    assert all(t.device.type == "meta" for m in held for t in _tensors(m))
    assert all(t.device.type == "cpu" for t in _tensors(policy.module))


@pytest.mark.parametrize("lora", [None, LoraSpec(r=2, alpha=2)], ids=["full", "lora"])
def test_stable_diffusion_policy_moves_text_encoder_vae_and_reference(tmp_path, lora):
    tiny_sd_pipeline().save_pretrained(tmp_path)
    policy = DiffusionImagePolicy.from_pretrained(str(tmp_path), lora=lora, num_steps=2)
    _check_moved(policy, expected=2 if lora else 3)  # VAE, text encoder (and the reference copy)


def test_speech_policy_moves_text_encoder_frontend_and_vocoder(tmp_path):
    from mmalign.speech.diffusion_policy import DiffusionSpeechPolicy
    from mmalign.zoo.speech_world import SpeechWorldSpec, build_speech_world

    world = build_speech_world(tmp_path, SpeechWorldSpec.tiny(), log=lambda *_: None)
    policy = DiffusionSpeechPolicy.from_pretrained(str(world / "base"))
    _check_moved(policy, expected=4)  # text encoder, mel frontend, vocoder, reference copy


def test_text_policy_moves_the_reference_copy(tiny_world):
    policy = CausalLMPolicy.from_pretrained(str(tiny_world / "base"))
    _check_moved(policy, expected=1)


def test_audioldm2_policy_moves_its_frozen_pipeline_parts_and_reference(tmp_path):
    from test_audioldm2 import DESCRIPTION

    from mmalign.speech.audioldm2_policy import AudioLDM2SpeechPolicy
    from mmalign.zoo.tiny_pipelines import tiny_audioldm2

    tiny_audioldm2(tmp_path).save_pretrained(str(tmp_path / "pipe"))
    policy = AudioLDM2SpeechPolicy.from_pretrained(str(tmp_path / "pipe"), description=DESCRIPTION)
    # VAE, CLAP, VITS, projection, GPT-2 prior, vocoder, and the full fine-tuning reference copy
    _check_moved(policy, expected=7)
