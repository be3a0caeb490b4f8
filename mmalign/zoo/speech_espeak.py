"""Offline speech synthesis with espeak-ng (from the `espeakng-loader` wheel) to render the speech world's audio.

espeak-ng is GPL: it is an optional extra (`pip install mmalign[speech-world]`) used only to build the world; the
library never links it at training time. The C API is called through ctypes in synchronous mode, collecting the
16-bit samples its callback delivers.
"""

from __future__ import annotations

import ctypes

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_RATE, ESPEAK_VOLUME, ESPEAK_PITCH, ESPEAK_RANGE = 1, 2, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    """One initialised espeak-ng engine: `say(text, voice, rate, pitch)` → float32 waveform at `sample_rate`."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as err:
            raise ImportError(
                "building the speech world needs espeak-ng: pip install 'mmalign[speech-world]' "
                "(the espeakng-loader wheel)"
            ) from err
        self.lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        data = espeakng_loader.get_data_path().encode()
        self.sample_rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept referenced: the library calls it later
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def say(
        self, text: str, voice: str = "en", rate: int = 170, pitch: int = 50, range_: int = 50
    ) -> np.ndarray:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        for param, value in ((ESPEAK_RATE, rate), (ESPEAK_PITCH, pitch), (ESPEAK_RANGE, range_)):
            self.lib.espeak_SetParameter(param, int(value), 0)
        self._chunks = []
        raw = text.encode() + b"\0"
        status = self.lib.espeak_Synth(raw, len(raw), 0, 0, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        if status != 0 or not self._chunks:
            raise RuntimeError(f"espeak-ng produced no audio for {text!r} (status {status})")
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0
