# chat.py as a user runs it: a subprocess on a tiny random run folder made here. A clip gets a reply and
# exit code 0; every bad input gets exit code 2 and one line on stderr naming the problem, never a
# traceback; the multi-turn loop is driven through stdin. Each subprocess costs ~3 s of imports, so the
# bad inputs (which fail before any model is loaded) run side by side.
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny

REPO = Path(__file__).resolve().parent.parent
CHAT = str(REPO / "chat.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    models = tiny.make_models(root / "models", llm_dims=(32, 48))
    run = tiny.make_run(root / "run", models["whisper"], models["llm32"], stage="emotion", num_emotions=5)
    clips = root / "clips"
    clips.mkdir()
    paths = {
        "a": tiny.write_wav(clips / "a.wav", tiny.chirp(1.5, seed=0)),
        "b": tiny.write_wav(clips / "b.wav", tiny.chirp(2.5, seed=1)),
        "long": tiny.write_wav(clips / "long.wav", tiny.chirp(31.0, seed=2)),
        "silent": tiny.write_wav(clips / "silent.wav", np.zeros(16000)),
        "empty": tiny.write_wav(clips / "empty.wav", np.zeros(0)),
        "3ms": tiny.write_wav(clips / "3ms.wav", tiny.chirp(1.0, seed=3)[:48]),
        "missing": str(clips / "missing.wav"),
        "text": str(clips / "notes.txt"),
    }
    Path(paths["text"]).write_text("hello, this is not audio\n")
    noweights = root / "noweights"                 # a run folder whose model.safetensors went missing
    noweights.mkdir()
    shutil.copy(Path(run) / "config.json", noweights / "config.json")
    return dict(root=root, run=run, clips=paths, noweights=str(noweights), empty_dir=str(root / "empty_run"), **models)


def chat_cmd(s, *args):
    return [sys.executable, CHAT, f"--ckpt={s['run']}", "--max_new_tokens=8", *args]


def run(cmd, cwd, stdin=None):
    return subprocess.run(cmd, cwd=cwd, env=ENV, input=stdin, capture_output=True, text=True, timeout=120)


def assert_clean_error(p, *needles):
    """Exit code 2, exactly one stderr line starting "error:", naming every needle; no traceback."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert p.stdout == ""


# ------------------------------------------------------------------------------------------- bad input

BAD = {   # case -> (extra args, what the message must name)
    "missing file": (lambda s: [s["clips"]["missing"]], lambda s: ["missing.wav", "no such audio file"]),
    "a folder as audio": (lambda s: [s["noweights"]], lambda s: [s["noweights"], "a folder, not an audio file"]),
    "text file as audio": (lambda s: [s["clips"]["text"]], lambda s: ["notes.txt", "not a readable audio file"]),
    "empty clip": (lambda s: [s["clips"]["empty"]], lambda s: ["empty.wav", "empty", "0 samples"]),
    "silent clip": (lambda s: [s["clips"]["silent"]], lambda s: ["silent.wav", "silent"]),
    "3 ms clip": (lambda s: [s["clips"]["3ms"]], lambda s: ["3ms.wav", "3.0 ms is shorter than one 10 ms mel frame"]),
    "no model.safetensors": (lambda s: [s["clips"]["a"], f"--ckpt={s['noweights']}"],
                             lambda s: [os.path.join(s["noweights"], "model.safetensors"), "missing"]),
    "no run folder": (lambda s: [s["clips"]["a"], f"--ckpt={s['empty_dir']}"],
                      lambda s: [os.path.join(s["empty_dir"], "config.json"), "missing"]),
    "repetition penalty 0": (lambda s: [s["clips"]["a"], "--repetition_penalty=0"],
                             lambda s: ["--repetition_penalty=0.0", "must be > 0"]),
    # the adapter was trained for (whisper, llm32); loading it on llm48 names both pairs and both widths
    "adapter for another LLM": (lambda s: [s["clips"]["a"], f"--llm={s['llm48']}"],
                                lambda s: ["does not fit", "llm32", "d_llm 32", s["llm48"], "dim 48"]),
}


@pytest.fixture(scope="session")
def bad_results(setup):
    # started together, collected after: the CPU time is the same, the wall time a third
    procs = {k: subprocess.Popen(chat_cmd(setup, *args(setup)), cwd=setup["root"], env=ENV, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, (args, _) in BAD.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(setup, bad_results, case):
    assert_clean_error(bad_results[case], *BAD[case][1](setup))


# ------------------------------------------------------------------------------------------- replies

@pytest.fixture(scope="session")
def one_shot_b(setup):
    return run(chat_cmd(setup, setup["clips"]["b"], "--ser", "--verbose"), setup["root"])


def test_one_clip_gets_a_reply_with_ser_and_timings(one_shot_b):
    p = one_shot_b
    assert p.returncode == 0, p.stderr
    head, reply = p.stdout.split("\n", 1)
    # the emotion head's five probabilities, most likely first, summing to ~100%
    m = re.fullmatch(r"emotion head: " + ", ".join([r"(\w+) (\d+)%"] * 5), head)
    assert m, head
    names, probs = m.groups()[::2], [int(x) for x in m.groups()[1::2]]
    assert sorted(names) == sorted(["neutral", "happy", "angry", "sad", "surprise"])
    assert probs == sorted(probs, reverse=True) and 97 <= sum(probs) <= 103
    assert reply.strip(), p.stdout                       # the lm_head never picks a stop token: 8 tokens
    assert re.search(r"\[8 tokens; time to first token [\d.]+ s; [\d.]+ tokens/s\]", p.stderr), p.stderr
    assert "Traceback" not in p.stderr


def test_clip_over_30_s_is_cut_and_said(setup):
    p = run(chat_cmd(setup, setup["clips"]["long"]), setup["root"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    note = [ln for ln in p.stderr.splitlines() if "long.wav" in ln]
    assert len(note) == 1 and "31.0 s" in note[0] and "first 30 s" in note[0], p.stderr


def test_several_files_are_each_answered(setup):
    a, b = setup["clips"]["a"], setup["clips"]["b"]
    p = run(chat_cmd(setup, a, b, "--ser"), setup["root"])
    assert p.returncode == 0, p.stderr
    blocks = re.split(r"(?m)^== ", p.stdout)[1:]
    assert [blk.split("\n", 1)[0] for blk in blocks] == [a, b], p.stdout
    for blk in blocks:
        lines = blk.split("\n")
        assert lines[1].startswith("emotion head: ") and lines[2].strip(), blk


def test_multi_turn_through_stdin(setup, one_shot_b):
    """Three turns: text, `/audio path`, a bare path; a bad path in between is reported and skipped.
    Then /reset and the bare path again: with the history gone, the reply is the one-shot reply."""
    a, b = setup["clips"]["a"], setup["clips"]["b"]
    lines = ["hello there", f"/audio {a}", f"/audio {setup['clips']['missing']}", b, "/reset", b, "/quit",
             "never read"]
    p = run(chat_cmd(setup, "--ser"), setup["root"], stdin="\n".join(lines) + "\n")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert re.search(r"(?m)^error: .*missing\.wav: no such audio file$", p.stderr), p.stderr
    # stdout: "assistant: R1\n" then, per speech turn, "emotion head: ...\n" before its "assistant: R\n"
    turns = re.split(r"(?m)^assistant: ", p.stdout)
    assert turns[0] == "", p.stdout                      # the first turn was text: no emotion head line
    replies, ser_next = [], []
    for t in turns[1:]:
        r, sep, _ = t.partition("\nemotion head: ")
        replies.append(r if sep else r[:-1])
        ser_next.append(bool(sep))
    assert len(replies) == 4, p.stdout                   # three turns, and one after /reset
    assert ser_next == [True, True, True, False], p.stdout
    assert all(r.strip() for r in replies)
    # after /reset, b.wav is answered exactly as `chat.py b.wav` answers it; as the third turn, with two
    # turns of history in the prompt, it was answered otherwise (the history is really there)
    assert one_shot_b.returncode == 0
    alone = one_shot_b.stdout.split("\n", 1)[1][:-1]
    assert replies[3] == alone
    assert replies[2] != alone
