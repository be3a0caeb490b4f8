"""Speech adapters: the mel TTS diffusion policy, AudioLDM 2, vocoder, audio I/O and speech rewards."""
