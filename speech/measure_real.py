"""Reference values on real held-out speech of the speech world (voices unseen by recogniser and TTS).

Recogniser accuracy, intelligibility, tonality, and DNSMOS on the raw 8 kHz audio and on the same speech after
mel → Griffin-Lim (the TTS output path). Run after `mmalign zoo build speech`: `python speech/measure_real.py`.
"""

import json

import torch

from mmalign.core.data import read_rows
from mmalign.speech.audio import MelConfig, MelFrontend, read_wav
from mmalign.speech.rewards import DNSMOS, Intelligibility, Tonality
from mmalign.zoo.registry import world_dir

torch.set_num_threads(1)
W = world_dir("speech")
mel = MelConfig.load(W / "base")
rows = read_rows(W / "heldout_speech.jsonl")
waves = torch.stack([read_wav(W / r.data["audio"], mel.sample_rate) for r in rows])
prompts = [r.data["prompt"] for r in rows]
mels = MelFrontend(mel)(waves)
intel = Intelligibility.from_pretrained(str(W / "recogniser"))
d = DNSMOS(mel)
sub = slice(0, len(rows), 2)  # 80 clips
out = {
    "n": len(rows),
    "recogniser_accuracy": intel.agreement(prompts, mels).mean().item(),
    "intelligibility": intel(prompts, mels).mean().item(),
    "tonality": Tonality(mel)(prompts, mels).mean().item(),
    "dnsmos_raw_audio_80": d.audio_mos(waves[sub], mel.sample_rate).mean().item(),
    "dnsmos_griffin_lim_80": d(prompts[sub], mels[sub]).mean().item(),
}
print(json.dumps(out, indent=1))
