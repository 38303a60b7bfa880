"""The reply spoken by espeak-ng (through ctypes) with the prosody PROSODY picks for the emotion heard (--speak)."""
import ctypes
import functools
import os
from xml.sax.saxutils import escape as xml_escape

import espeakng_loader  # the shared library and its voice data, a pip dependency
import numpy as np
import soundfile as sf

ESPEAK_RATE, VOICE = 22050, "en-us+f3"  # espeak-ng's sample rate, written as it comes (16-bit mono); the voice

# emotion heard -> espeak prosody (words/min; pitch, range 0-99; volume 0-200): meet the speaker's state, not mirror it
PROSODY = {"neutral":  dict(rate=165, pitch=50, range=50, volume=100),
           "happy":    dict(rate=180, pitch=74, range=80, volume=110),
           "angry":    dict(rate=150, pitch=42, range=20, volume=90),
           "sad":      dict(rate=125, pitch=26, range=30, volume=70),
           "surprise": dict(rate=200, pitch=60, range=95, volume=115)}


class Espeak:
    def __init__(self):
        def on_audio(wav, n, events):  # called from inside espeak_Synth with each chunk of int16 samples
            self.chunks.append(ctypes.string_at(wav, 2 * n) if n > 0 else b"")
            return 0
        c, self.chunks = ctypes, []
        self.lib = lib = c.CDLL(espeakng_loader.get_library_path())
        lib.espeak_ng_SetRandSeed.argtypes = [c.c_long]   # the other calls take ints and char*, ctypes' defaults
        lib.espeak_Synth.argtypes = [c.c_char_p, c.c_size_t, c.c_uint, c.c_int, c.c_uint, c.c_uint] + [c.c_void_p] * 2
        if (sr := lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)) != ESPEAK_RATE:  # 2: sync
            raise RuntimeError(f"espeak_Initialize returned {sr}, expected a sample rate of {ESPEAK_RATE}")
        self.callback = c.CFUNCTYPE(c.c_int, c.POINTER(c.c_short), c.c_int, c.c_void_p)(on_audio)  # kept alive
        lib.espeak_SetSynthCallback(self.callback)

    def say(self, ssml, voice, rate, volume, pitch, range, gap=0, seed=0):
        r, w = os.pipe()
        pid = os.fork()   # espeak keeps state between utterances: each child starts from the same, so a seed repeats
        if pid == 0:
            try:
                ok = self.lib.espeak_SetVoiceByName(voice.encode()) == 0
                self.lib.espeak_ng_SetRandSeed(seed)  # Initialize seeds it from the clock
                for p, v in zip((1, 2, 3, 4, 7), (rate, volume, pitch, range, gap)):  # espeak_PARAMETER: RATE..WORDGAP
                    self.lib.espeak_SetParameter(p, int(round(v)), 0)
                text = ssml.encode()   # position type 1 (POS_CHARACTER); flags 0x11: UTF-8 text with SSML tags
                ok = ok and self.lib.espeak_Synth(text, len(text) + 1, 0, 1, 0, 0x11, None, None) == 0
                with os.fdopen(w, "wb") as f:
                    f.write(b"\x01" + b"".join(self.chunks) if ok else b"")
            finally:
                os._exit(0)   # no Python cleanup in the child
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        if not data:
            raise ValueError(f"espeak-ng could not speak {ssml!r} with voice {voice!r} (no such voice?)")
        return np.frombuffer(data[1:], np.int16)   # SSML in, samples at ESPEAK_RATE out


engine = functools.cache(Espeak)  # loaded and initialized once per process, on first use


def speak(text, emotion, path):
    pcm = engine().say(f"<speak>{xml_escape(text)}</speak>", VOICE, **PROSODY[emotion])
    sf.write(path, pcm, ESPEAK_RATE, subtype="PCM_16", format="WAV")
    return path
