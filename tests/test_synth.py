# The speech maker: same seed -> same bytes, a clean train/test split, recipes that really differ when measured
# from the audio, and errors that name what was wrong. (Whisper's WER on neutral clips is an integration test.)
import json
import os

import numpy as np
import pytest
import soundfile as sf

import synth

TINY = dict(n_asr_train=4, n_asr_test=2, n_emo_train=5, n_emo_test_sentences=1, real=False, progress=False)


def files(out):
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(out) for f in fs if f.endswith((".flac", ".jsonl"))}


def test_same_seed_same_bytes_and_reruns_skip(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    ra = synth.make_speech(a, seed=3, workers=1, **TINY)
    synth.make_speech(b, seed=3, workers=2, **TINY)  # other processes, other order: still the same bytes
    fa = files(a)
    assert len(fa) == 4 + 2 + 5 + 10 + 4
    fb = {k: v.replace(b.encode(), a.encode()) for k, v in files(b).items()}  # manifests hold the folder name
    assert fa == fb
    assert ra["stats"]["new"] == 21
    again = synth.make_speech(a, seed=3, workers=1, **TINY)
    assert again["stats"]["new"] == 0 and files(a) == fa
    synth.make_speech(c, seed=4, workers=1, **TINY)
    flac = lambda fs: {v for k, v in fs.items() if k.endswith(".flac")}  # noqa: E731
    assert not flac(fa) & flac(files(c))  # another seed: other sentences, voices and jitter


def test_rerun_with_other_settings_is_refused(tmp_path):
    out = str(tmp_path / "s")
    synth.make_speech(out, seed=0, workers=1, **dict(TINY, n_asr_train=1, n_asr_test=1, n_emo_train=0,
                                                      n_emo_test_sentences=0))
    with pytest.raises(ValueError, match="seed"):
        synth.make_speech(out, seed=1, workers=1, **TINY)


def test_manifests_and_audio(tmp_path):
    out = str(tmp_path / "m")
    r = synth.make_speech(out, seed=0, workers=1, **TINY)
    for name, keys in (("asr_train", {"audio", "text"}), ("asr_test", {"audio", "text"}),
                       ("emo_train", {"audio", "text", "emotion", "voice"}),
                       ("emo_test", {"audio", "text", "emotion", "voice"})):
        rows = [json.loads(ln) for ln in open(r[name])]
        assert rows and all(set(x) == keys for x in rows)
        for x in rows:
            info = sf.info(x["audio"])
            assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
            assert 0.5 < info.duration < 15.0, (x, info.duration)
    emo = [json.loads(ln) for ln in open(r["emo_train"])]
    assert [x["emotion"] for x in emo] == synth.EMOTIONS and len({x["text"] for x in emo}) == 1


def test_split_shares_no_voice_and_no_sentence():
    plan = synth.make_plan(seed=0)  # the default sizes
    assert {k: len(v) for k, v in plan.items()} == dict(asr_train=600, asr_test=100, emo_train=1000, emo_test=200)
    train = plan["asr_train"] + plan["emo_train"]
    test = plan["asr_test"] + plan["emo_test"]
    assert not {c["voice"] for c in train} & {c["voice"] for c in test}
    assert not {c["text"] for c in train} & {c["text"] for c in test}
    assert not {c["sentence"] for c in train} & {c["sentence"] for c in test}
    assert {c["voice"] for c in test} == set(synth.TEST_VOICES)
    assert {c["voice"] for c in plan["asr_train"]} == set(synth.TRAIN_VOICES)
    assert len(synth.VOICES) >= 8 and len(synth.TEST_VOICES) == 2
    train_s, test_s = synth.load_sentences()
    assert len(train_s) + len(test_s) >= 300 and len({s for _, s in train_s + test_s}) == len(train_s) + len(test_s)
    lengths = [len(s.split()) for _, s in train_s + test_s]
    assert min(lengths) >= 3 and max(lengths) <= 20
    # every test sentence: all five emotions by both test voices, so the words carry no emotion cue
    seen = {}
    for c in plan["emo_test"]:
        seen.setdefault(c["text"], set()).add((c["voice"], c["emotion"]))
    assert len(seen) == 20
    assert all(v == {(tv, e) for tv in synth.TEST_VOICES for e in synth.EMOTIONS} for v in seen.values())
    # in training, the emotions are balanced and each sentence is spoken in all five
    em = [c["emotion"] for c in plan["emo_train"]]
    assert all(em.count(e) == 200 for e in synth.EMOTIONS)
    by_text = {}
    for c in plan["emo_train"]:
        by_text.setdefault(c["text"], set()).add(c["emotion"])
    assert all(v == set(synth.EMOTIONS) for v in by_text.values())


def test_unknown_names_are_named():
    with pytest.raises(ValueError, match="'robot'"):
        synth.synthesize("The cup is empty.", "robot", "happy")
    with pytest.raises(ValueError, match="'bored'"):
        synth.synthesize("The cup is empty.", "us-f3", "bored")
    with pytest.raises(SystemExit, match="--nope"):
        synth.main(["--nope=1"])


def test_resample_matches_torchaudio():
    torch = pytest.importorskip("torch")
    import torchaudio
    x = np.random.default_rng(0).standard_normal(22050).astype(np.float32) * 0.1
    ref = torchaudio.functional.resample(torch.from_numpy(x), 22050, 16000).numpy()
    ours = synth.resample(x, 22050, 16000)
    assert ours.shape == ref.shape and np.abs(ours - ref).max() < 1e-4


# --- the recipes, measured from the audio ---------------------------------------------------------------

def f0_track(x, sr=16000, frame=1024, hop=160, fmin=40, fmax=500):
    """Autocorrelation pitch per 10 ms frame -> (f0 Hz, voiced mask, rms)."""
    fr = np.lib.stride_tricks.sliding_window_view(x, frame)[::hop]
    fr = fr - fr.mean(1, keepdims=True)
    rms = np.sqrt((fr ** 2).mean(1))
    ac = np.fft.irfft(np.abs(np.fft.rfft(fr * np.hanning(frame), 2 * frame)) ** 2)[:, :frame]
    lo, hi = sr // fmax, sr // fmin
    lag = lo + ac[:, lo:hi].argmax(1)
    peak = ac[np.arange(len(fr)), lag] / np.maximum(ac[:, 0], 1e-9)
    return sr / lag, (peak > 0.5) & (rms > 0.1 * rms.max()), rms


def measure(x, text):
    f0, voiced, rms = f0_track(x)
    active = np.nonzero(rms > 0.05 * rms.max())[0]
    spec = np.abs(np.fft.rfft(x[: len(x) // 512 * 512].reshape(-1, 512) * np.hanning(512), axis=1)) ** 2
    spec = spec[spec.sum(1) > 0.05 * spec.sum(1).max()]
    high = spec[:, np.fft.rfftfreq(512, 1 / 16000) > 2000].sum() / spec.sum()
    return dict(f0=12 * np.log2(np.median(f0[voiced]) / 100),  # semitones re 100 Hz
                spw=(active[-1] - active[0] + 1) / 100 / len(text.split()),  # seconds per word
                db=20 * np.log10(rms[active].mean()), high=10 * np.log10(high))


@pytest.fixture(scope="module")
def measured():
    texts = ["The train was delayed by ten minutes.", "Put the plates on the top shelf.",
             "The museum keeps its collection of old clocks in a long room on the second floor."]
    out = {}
    for v in synth.TEST_VOICES:  # one female, one male voice
        for e in synth.EMOTIONS:
            ms = [measure(synth.synthesize(t, v, e, np.random.default_rng(i)), t) for i, t in enumerate(texts)]
            out[v, e] = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
    return out


@pytest.mark.parametrize("voice", synth.TEST_VOICES)
def test_recipes_differ_in_pitch(measured, voice):
    m = {e: measured[voice, e]["f0"] for e in synth.EMOTIONS}
    assert m["sad"] < m["neutral"] - 3, m  # semitones
    assert m["neutral"] < m["angry"] < m["happy"] - 3, m
    assert m["happy"] > m["neutral"] + 6 and m["surprise"] > m["neutral"] + 6, m


@pytest.mark.parametrize("voice", synth.TEST_VOICES)
def test_recipes_differ_in_rate(measured, voice):
    m = {e: measured[voice, e]["spw"] for e in synth.EMOTIONS}
    assert m["sad"] > 1.5 * m["neutral"], m  # slow, with pauses
    assert m["happy"] < 0.9 * m["neutral"] and m["angry"] < m["neutral"], m
    assert m["surprise"] > m["happy"] * 1.2, m  # the stretched last word


@pytest.mark.parametrize("voice", synth.TEST_VOICES)
def test_recipes_differ_in_loudness_and_tilt(measured, voice):
    db = {e: measured[voice, e]["db"] for e in synth.EMOTIONS}
    high = {e: measured[voice, e]["high"] for e in synth.EMOTIONS}
    assert db["angry"] > db["happy"] > db["neutral"] > db["sad"] + 4, db
    assert high["angry"] > high["neutral"] + 3 > high["sad"] + 6, high  # dB of energy above 2 kHz


@pytest.mark.slow
def test_fetch_real_speech(tmp_path):
    manifest = synth.fetch_real(str(tmp_path))
    rows = [json.loads(ln) for ln in open(manifest)]
    assert len(rows) >= 3
    for r in rows:
        x, sr = sf.read(r["audio"])
        assert sr == 16000 and x.ndim == 1 and len(x) > 8000 and len(r["text"].split()) >= 2
