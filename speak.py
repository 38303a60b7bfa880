"""
A reply spoken in a voice that fits what was heard. espeak-ng (its library and voices ship in the
espeakng-loader wheel, driven here through ctypes) speaks the reply with the prosody that PROSODY picks for
the emotion the head heard. The same driver speaks the training clips (scripts/synth.py).

    python chat.py clip.wav --speak reply.wav
"""
import ctypes
import functools
import os
from xml.sax.saxutils import escape as xml_escape

import numpy as np
import soundfile as sf

ESPEAK_RATE = 22050  # what espeak-ng speaks; speak() writes it as it comes, 16-bit mono
VOICE = "en-us+f3"

# emotion heard -> how the reply is spoken. espeak units: rate in words/minute, pitch and range 0-99 (of the
# voice's own span), volume 0-200. The reply meets the speaker's state rather than mirroring it: a sad voice
# gets a slower, lower, softer answer; an angry one a calm, steady one (low range, never louder); happy and
# surprise get a brighter, livelier one.
PROSODY = {
    "neutral":  dict(rate=165, pitch=50, range=50, volume=100),
    "happy":    dict(rate=180, pitch=74, range=80, volume=110),
    "angry":    dict(rate=150, pitch=42, range=20, volume=90),
    "sad":      dict(rate=125, pitch=26, range=30, volume=70),
    "surprise": dict(rate=200, pitch=60, range=95, volume=115),
}


# espeak-ng through ctypes. The library keeps state from one utterance to the next (glottal phase, filter
# memories, its random generator), so the same call gives other samples the second time. For the same bytes
# from the same seed, the process loads and initializes the library once and never speaks itself: every
# utterance is spoken by a forked child, which starts from that same untouched state.

class Espeak:
    def __init__(self):
        import espeakng_loader  # a pip dependency: the shared library and its voice data, no system package
        c = ctypes
        lib = c.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [c.c_int, c.c_int, c.c_char_p, c.c_int]
        lib.espeak_SetVoiceByName.argtypes = [c.c_char_p]
        lib.espeak_SetParameter.argtypes = [c.c_int, c.c_int, c.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [c.c_long]
        lib.espeak_Synth.argtypes = [c.c_char_p, c.c_size_t, c.c_uint, c.c_int, c.c_uint, c.c_uint, c.c_void_p, c.c_void_p]
        sr = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)  # 2: AUDIO_OUTPUT_SYNCHRONOUS
        if sr != ESPEAK_RATE:
            raise RuntimeError(f"espeak_Initialize returned {sr}, expected a sample rate of {ESPEAK_RATE}")

        def on_audio(wav, n, events):  # called synchronously from inside espeak_Synth
            if n > 0:
                self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0
        self.callback = c.CFUNCTYPE(c.c_int, c.POINTER(c.c_short), c.c_int, c.c_void_p)(on_audio)  # kept: ctypes must not free it
        lib.espeak_SetSynthCallback(self.callback)
        self.lib = lib

    def _speak(self, text, voice, rate, volume, pitch, range, gap, seed):
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            return None
        self.lib.espeak_ng_SetRandSeed(seed)  # Initialize seeds it from the clock
        for p, v in zip((1, 2, 3, 4, 7), (rate, volume, pitch, range, gap)):  # espeak_PARAMETER: RATE ... WORDGAP
            self.lib.espeak_SetParameter(p, int(round(v)), 0)
        self.chunks, b = [], text.encode("utf-8")
        # position type 1 (POS_CHARACTER); flags 0x11: UTF-8 text with SSML tags
        if self.lib.espeak_Synth(b, len(b) + 1, 0, 1, 0, 0x11, None, None) != 0:
            return None
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)

    def say(self, ssml, voice, rate, volume, pitch, range, gap=0, seed=0):
        """SSML text -> int16 samples at ESPEAK_RATE."""
        args = (ssml, voice, rate, volume, pitch, range, gap, seed)
        if not hasattr(os, "fork"):  # Windows: same sound, but not the same bytes from run to run
            pcm = self._speak(*args)
        else:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: speak, send the samples, exit without running any Python cleanup
                try:
                    os.close(r)
                    pcm = self._speak(*args)
                    data = b"" if pcm is None else b"\x01" + pcm.tobytes()
                    while data:
                        data = data[os.write(w, data):]
                finally:
                    os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                data = f.read()
            os.waitpid(pid, 0)
            pcm = np.frombuffer(data[1:], np.int16) if data else None
        if pcm is None:
            raise ValueError(f"espeak-ng could not speak {ssml!r} with voice {voice!r} (no such voice?)")
        return pcm


@functools.lru_cache(maxsize=None)
def engine():
    return Espeak()  # loaded and initialized once per process, on first use


def speak(text, emotion, path):
    """Speak `text` with PROSODY[emotion] -> `path`, a 16-bit mono wav at ESPEAK_RATE."""
    p = PROSODY[emotion]
    pcm = engine().say(f"<speak>{xml_escape(text)}</speak>", VOICE, p["rate"], p["volume"], p["pitch"], p["range"])
    sf.write(path, pcm, ESPEAK_RATE, subtype="PCM_16", format="WAV")
    return path
