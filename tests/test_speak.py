# The spoken reply (speak.py, chat.py --speak): a 16-bit mono wav at the stated rate, understood by whisper-base
# whatever the prosody, with a measured pitch and tempo that follow PROSODY's order across the emotions heard.
# Then chat.py --speak as a user runs it (on test_chat's tiny run): the file holds exactly the reply, spoken
# as the head's reading of the clip calls for; in the chat, each turn gets its own numbered file.
import re
import wave

import numpy as np
import pytest

import data
import speak
from data import EMOTIONS
from test_chat import assert_clean_error, chat_cmd, run, setup  # noqa: F401  (setup: the tiny run, a fixture)
from test_prepare import real, transcribe, wer  # noqa: F401  (real: whisper-base fetched by prepare, a fixture)
from test_synth import measure

REPLIES = ["I'm sorry to hear that. I'm here for you, and we can take this one step at a time.",
           "That sounds wonderful! Tell me more about how it went."]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    d = tmp_path_factory.mktemp("speak")
    return {(e, i): speak.speak(t, e, str(d / f"{e}-{i}.wav")) for e in EMOTIONS for i, t in enumerate(REPLIES)}


def test_wav_is_16_bit_mono_at_the_stated_rate(spoken):
    assert speak.ESPEAK_RATE == 22050
    for path in spoken.values():
        with wave.open(path) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getcomptype()) == (1, 2, 22050, "NONE")
            seconds = w.getnframes() / w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        assert 2.0 < seconds < 12.0, (path, seconds)
        assert 3000 < np.abs(x).max() < 32767, path   # speech at a sane level, not silence, not clipped


@pytest.mark.slow
def test_whisper_base_understands_every_prosody(real, spoken):
    keys = sorted(spoken)
    hyps = transcribe(real, [data.load_audio(spoken[k]) for k in keys])
    for e in EMOTIONS:
        rows = [(REPLIES[i], h) for (e2, i), h in zip(keys, hyps) if e2 == e]
        words = sum(len(r.split()) for r, _ in rows)
        err = sum(wer(r, h) * len(r.split()) for r, h in rows) / words
        print(f"{e}: WER {err:.1%} " + " | ".join(h.strip() for _, h in rows))
        assert err <= 0.20, (e, rows)


def test_pitch_tempo_and_loudness_follow_the_table(spoken):
    m = {}
    for e in EMOTIONS:
        ms = [measure(data.load_audio(spoken[e, i]).numpy(), REPLIES[i]) for i in range(len(REPLIES))]
        m[e] = {k: float(np.mean([x[k] for x in ms])) for k in ms[0]}
        print(f"{e}: median F0 {100 * 2 ** (m[e]['f0'] / 12):.0f} Hz, {60 / m[e]['spw']:.0f} words/min, "
              f"{m[e]['db']:.1f} dB  (table: {speak.PROSODY[e]})")
    by = lambda key: sorted(EMOTIONS, key=lambda e: speak.PROSODY[e][key])   # noqa: E731
    f0 = [m[e]["f0"] for e in by("pitch")]
    wpm = [60 / m[e]["spw"] for e in by("rate")]
    assert all(b > a + 0.5 for a, b in zip(f0, f0[1:])), f0      # semitones, in the table's pitch order
    assert all(b > a * 1.04 for a, b in zip(wpm, wpm[1:])), wpm  # in the table's rate order
    assert m["sad"]["db"] < m["neutral"]["db"] - 3 and m["angry"]["db"] < m["neutral"]["db"], m   # softer, never louder


# ------------------------------------------------------------------------------------------- chat.py --speak

def heard_and_spoken(stderr):
    return re.findall(r"^\[spoken as an? (\w+) voice calls for: (.+)\]$", stderr, re.M)


def same_as_speak(path, text, emotion, tmp_path):
    """The file chat.py wrote == speak.speak(text, emotion): espeak speaks each utterance from the same state."""
    return open(path, "rb").read() == open(speak.speak(text, emotion, str(tmp_path / "ref.wav")), "rb").read()


def test_chat_speaks_the_reply_as_the_head_heard(setup, tmp_path):
    out = tmp_path / "reply.wav"
    p = run(chat_cmd(setup, setup["clips"]["b"], "--ser", f"--speak={out}"), setup["root"])
    assert p.returncode == 0, p.stderr
    ser, reply = p.stdout.split("\n", 1)
    top = ser.removeprefix("emotion head: ").split()[0]   # the head's likeliest emotion comes first
    assert heard_and_spoken(p.stderr) == [(top, str(out))], p.stderr
    assert same_as_speak(out, reply.strip(), top, tmp_path)


def test_chat_turns_are_numbered_and_a_typed_turn_is_neutral(setup, tmp_path):
    out = tmp_path / "r.wav"
    lines = [setup["clips"]["a"], "hello there", "/quit"]
    p = run(chat_cmd(setup, "--ser", f"--speak={out}"), setup["root"], stdin="\n".join(lines) + "\n")
    assert p.returncode == 0, p.stderr
    ser = re.search(r"(?m)^emotion head: (\w+)", p.stdout).group(1)
    replies = [r.split("\nemotion head: ")[0].strip() for r in re.split(r"(?m)^assistant: ", p.stdout)[1:]]
    assert heard_and_spoken(p.stderr) == [(ser, str(tmp_path / "r-1.wav")), ("neutral", str(tmp_path / "r-2.wav"))]
    assert same_as_speak(tmp_path / "r-1.wav", replies[0], ser, tmp_path)
    assert same_as_speak(tmp_path / "r-2.wav", replies[1], "neutral", tmp_path)
    assert not out.exists()


def test_chat_speak_into_a_missing_folder_is_one_line(setup, tmp_path):
    p = run(chat_cmd(setup, setup["clips"]["a"], f"--speak={tmp_path / 'nope' / 'reply.wav'}"), setup["root"])
    assert_clean_error(p, "--speak=", "nope", "no such folder")
