# demo.py in a real browser: Debian's chromium, headless, driven by playwright, with its microphone faked from
# a held-out clip (chromium captures the file as if it were spoken), so that the page's own recording path is
# what sends the speech. The run is whisper-base and SmolLM2 as prepare.py fetches them (test_prepare's `real`)
# with a fresh adapter, LoRA and emotion head: training one takes minutes, and every check compares the page
# with what this same run computes here from the audio the page sent. The page after the first reply is
# screenshotted (to the file DEMO_SCREENSHOT names, if set: the tracked docs/demo.png is the trained run's, not
# rewritten by every test run). The tests share one page and run in order: a spoken turn, a typed follow-up, bad input.
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import wave
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import chat
import data
import speak
import synth
from adapter import SpeechLM
from chat import REPETITION_PENALTY
from data import EMOTIONS
from trainer import save_run
from test_prepare import real  # noqa: F401  (a fixture: whisper-base and SmolLM2 fetched and prepared)

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"   # Debian's (test.sh installs it): playwright cannot download its own build here
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
MAX_NEW = 24
ARGS = Namespace(seed=0, temperature=0.0, top_k=None, top_p=None, max_new_tokens=MAX_NEW, verbose=False,
                 repetition_penalty=REPETITION_PENALTY)  # as demo.py


def same_text(a, b):
    return " ".join(a.split()) == " ".join(b.split())   # the page renders the reply as markdown: spaces fold


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # demo.py runs on one thread too: the same kernels give the same numbers, and the browser, the server and
    # this process then share 2 cores without waiting on each other's thread pools
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The shortest sad clip of speech/emo_test (a test voice, a test sentence), made as synth.make_speech
    makes it, written as the 16-bit wav that chromium plays as its microphone."""
    c = min((c for c in synth.make_plan()["emo_test"] if c["emotion"] == "sad"), key=lambda c: len(c["text"]))
    audio = synth.synthesize(c["text"], c["voice"], c["emotion"], synth.clip_rng(0, c["id"]))
    path = tmp_path_factory.mktemp("clip") / f"{c['id']}.wav"
    sf.write(path, audio, data.SAMPLE_RATE, subtype="PCM_16")
    return str(path), audio


@pytest.fixture(scope="module")
def run_dir(real, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    # the folders prepare.py writes by default: SmolLM2 in float32 ("default"), whisper-base in its file's float16
    m = SpeechLM.build(real["whisper", "bf16"], real["llm", "default"], device="cpu", dtype="fp32")
    m.start_stage2(lora=dict(r=4, alpha=8, dropout=0.0), num_emotions=len(EMOTIONS))
    save_run(m, str(d), {"whisper": real["whisper", "bf16"], "llm": real["llm", "default"], "stage": "emotion"})
    return str(d)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """demo.py on a free localhost port, in fp32 (so that this process computes the very same numbers)."""
    tmp = tmp_path_factory.mktemp("demo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(tmp / "gradio"), "PYTHONPATH": str(REPO)}
    log = open(tmp / "demo.log", "w+")
    proc = subprocess.Popen([sys.executable, str(REPO / "demo.py"), f"--ckpt={run_dir}", f"--port={port}",
                             "--dtype=fp32", f"--max_new_tokens={MAX_NEW}"], cwd=tmp, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            log.seek(0)
            assert proc.poll() is None and time.time() < deadline, f"demo.py did not start:\n{log.read()}"
            time.sleep(0.5)
    yield dict(url=url, log=log, tmp=tmp)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def model(run_dir):
    return SpeechLM.from_run(run_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def page(server, held_out):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=FLAGS + [f"--use-file-for-fake-audio-capture={held_out[0]}"])
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.outside = []   # every request to another host than the demo's: offline means none
        pg.on("request", lambda r: None if r.url.startswith((server["url"], "data:", "blob:")) else pg.outside.append(r.url))
        pg.goto(server["url"])
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def turns():
    return {}   # what the first test heard and answered, for the follow-up


def fetch(page, href, path):
    path.write_bytes(page.request.get(href).body())
    return path


STATUS = "() => (document.querySelector('#status .prose') || {innerText: ''}).innerText.trim()"   # the message only
# Records every text the last reply in the conversation takes, as the page renders it (a poll would miss some).
WATCH = """() => { window.seen = []; if (window.watch) window.watch.disconnect();
    window.watch = new MutationObserver(() => {
        const bots = document.querySelectorAll('#conversation [data-testid=bot]');
        const t = bots.length ? bots[bots.length - 1].innerText : '';
        if (t.trim() && t !== window.seen[window.seen.length - 1]) window.seen.push(t); });
    window.watch.observe(document.querySelector('#conversation'), {subtree: true, childList: true, characterData: true}); }"""


def send_and_wait_for_reply(page, old_href):
    """Sends, waits until the spoken reply changes; -> every text the last reply showed on the way (the stream,
    the finished reply last) and the new spoken reply's address."""
    page.evaluate(WATCH)
    page.click("#send")
    page.wait_for_function("""old => { const a = document.querySelector('#spoken a.download-link');
        return a && a.href !== old; }""", arg=old_href, timeout=120000)
    return page.evaluate("window.seen"), page.get_attribute("#spoken a.download-link", "href")


@torch.inference_mode()
def test_spoken_turn_gets_a_streamed_reply_the_heads_bars_and_a_voice(page, model, held_out, server, turns):
    page.click("#voice button.record-button")
    page.wait_for_timeout(int(1000 * (len(held_out[1]) / data.SAMPLE_RATE + 0.7)))   # the clip, and a little more
    page.click("#voice button.stop-button")
    page.wait_for_selector("#voice a.download-link", state="attached", timeout=30000)   # the recording is uploaded
    seen, spoken_href = send_and_wait_for_reply(page, None)

    # what the page sent is the held-out clip as the fake microphone captured it
    assert page.locator("#conversation [data-testid=user]").count() == 1
    sent = page.locator("#conversation a.download-link").first.get_attribute("href")
    heard = data.load_audio(fetch(page, sent, server["tmp"] / "heard.wav")).numpy()
    clip = held_out[1]
    n = 1 << int(np.ceil(np.log2(len(heard) + len(clip))))
    xc = np.fft.irfft(np.fft.rfft(heard, n) * np.conj(np.fft.rfft(clip, n)), n)   # best alignment of clip in heard
    lag = int(np.argmax(xc))
    lag = lag - n if lag > n // 2 else lag   # negative: the capture began a moment after the clip did
    skip, start = max(-lag, 0), max(lag, 0)  # skip: the clip's samples played before the recording started
    m = min(len(clip) - skip, len(heard) - start)
    corr = np.corrcoef(clip[skip:skip + m], heard[start:start + m])[0, 1]
    print(f"heard {len(heard) / data.SAMPLE_RATE:.2f} s, the clip {len(clip) / data.SAMPLE_RATE:.2f} s at "
          f"{lag / data.SAMPLE_RATE:.3f} s, correlation {corr:.2f}")
    assert m > 0.9 * len(clip) and corr > 0.5, (lag, m, corr)   # the browser's capture processing keeps the shape

    # the emotion head's five probabilities, as this run computes them from the audio the page sent
    feats = model.encode_audio([torch.from_numpy(heard)])
    probs = chat.emotion_probs(model, feats)[0]
    shown = {e: float(page.locator(f"#emotion [data-testid={e}-confidence-set] meter").get_attribute("value"))
             for e in EMOTIONS}
    print("emotion head:", {e: f"{p:.3f}" for e, p in shown.items()})
    assert np.allclose([shown[e] for e in EMOTIONS], probs.tolist(), atol=1e-4), (shown, probs)
    top = EMOTIONS[int(probs.argmax())]
    assert max(shown, key=shown.get) == top == page.inner_text("#emotion [data-testid=label-output-value]").strip()

    # the reply: this run's own, streamed (shown growing at least four times before the last), in the page
    system, user = chat.prompts(model)
    history = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    reply = chat.reply(model, ARGS, history, feats, show=lambda piece: None)
    print(f"reply: {reply!r}; {len(seen)} texts shown on the way")
    assert reply and same_text(seen[-1], reply), (seen[-1], reply)
    assert len(seen) >= 5 and all(" ".join(reply.split()).startswith(" ".join(s.split())) for s in seen), seen

    # the spoken reply: playable in the page, and exactly the reply spoken as the head's reading calls for
    wav = fetch(page, spoken_href, server["tmp"] / "spoken.wav")
    assert wav.read_bytes() == Path(speak.speak(reply, top, str(server["tmp"] / "ref.wav"))).read_bytes()
    with wave.open(str(wav)) as w:
        seconds = w.getnframes() / w.getframerate()
    played = page.evaluate("""url => new Promise((ok, bad) => { const a = new Audio(url);
        a.onloadedmetadata = () => ok(a.duration); a.onerror = () => bad(new Error('cannot play ' + url)); })""",
                           spoken_href)
    assert abs(played - seconds) < 0.05, (played, seconds)
    assert page.evaluate(STATUS) == f"Spoken as a {top} voice calls for."
    assert page.outside == []
    shot = page.screenshot(path=os.environ.get("DEMO_SCREENSHOT") or None)   # bytes, or a file when asked
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000
    turns.update(history=history + [{"role": "assistant", "content": reply}], feats=feats, spoken=spoken_href)


@torch.inference_mode()
def test_typed_follow_up_is_answered_with_the_history(page, model, server, turns):
    page.fill("#message textarea", "Thank you. What should I do now?")
    seen, spoken_href = send_and_wait_for_reply(page, turns["spoken"])
    history = turns["history"] + [{"role": "user", "content": "Thank you. What should I do now?"}]
    reply = chat.reply(model, ARGS, history, turns["feats"], show=lambda piece: None)
    alone = chat.reply(model, ARGS, [history[0], history[-1]], [], show=lambda piece: None)
    print(f"follow-up: {reply!r}")
    assert page.locator("#conversation [data-testid=bot]").count() == 2
    assert same_text(seen[-1], reply) and reply != alone   # the first turn is really in the prompt
    wav = fetch(page, spoken_href, server["tmp"] / "spoken2.wav")
    assert wav.read_bytes() == Path(speak.speak(reply, "neutral", str(server["tmp"] / "ref2.wav"))).read_bytes()
    assert page.outside == []


def upload(page, path):
    page.click("#voice button[aria-label='Upload file']")
    page.set_input_files("#voice input[type=file]", str(path))


def status_after_send(page, before):
    page.click("#send")
    page.wait_for_function(f"s => ({STATUS})() != s", arg=before, timeout=60000)
    return page.evaluate(STATUS)


def test_bad_input_gets_a_message_in_the_page(page, server, held_out):
    tmp = server["tmp"]
    page.click("#clear")
    page.wait_for_function("() => !document.querySelector('#conversation [data-testid=bot]')")
    msg = status_after_send(page, page.evaluate(STATUS))
    assert msg == "Record or upload a clip (or type a message) first."

    (tmp / "notes.txt").write_text("hello, this is not audio\n")   # the page itself refuses the type
    upload(page, tmp / "notes.txt")
    page.get_by_text("Invalid file type: notes.txt").wait_for()

    (tmp / "notes.wav").write_text("hello, this is not audio either\n")   # named as audio: the server reads it
    upload(page, tmp / "notes.wav")
    page.wait_for_selector("#voice a.download-link", state="attached")
    msg = status_after_send(page, msg)
    assert re.fullmatch(r"Cannot hear that: notes\.wav: not a readable audio file \(.*\)", msg), msg

    page.click("#voice button[aria-label='Clear']")
    sf.write(tmp / "silent.wav", np.zeros(data.SAMPLE_RATE, np.float32), data.SAMPLE_RATE, subtype="PCM_16")
    upload(page, tmp / "silent.wav")
    page.wait_for_selector("#voice a.download-link", state="attached")
    msg = status_after_send(page, msg)
    assert msg == "Cannot hear that: silent.wav: the clip is silent (peak amplitude 0.0e+00)", msg

    page.click("#voice button[aria-label='Clear']")
    clip = held_out[1]
    sf.write(tmp / "long.wav", np.tile(clip, int(np.ceil(31 * data.SAMPLE_RATE / len(clip))))[:31 * data.SAMPLE_RATE],
             data.SAMPLE_RATE, subtype="PCM_16")
    upload(page, tmp / "long.wav")
    page.wait_for_selector("#voice a.download-link", state="attached")
    msg = status_after_send(page, msg)
    assert msg == "The clip is 31.0 s long: only its first 30 s were heard.", msg
    page.wait_for_selector("#spoken a.download-link", state="attached", timeout=120000)   # and it is answered
    assert page.locator("#conversation [data-testid=bot]").count() == 1

    server["log"].seek(0)
    assert "Traceback" not in server["log"].read() and "Traceback" not in page.content()
    assert page.outside == []


def test_a_missing_run_is_one_line_before_any_page(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "demo.py"), f"--ckpt={tmp_path / 'nope'}", "--port=1"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == f"error: run folder {tmp_path / 'nope'}: missing {tmp_path / 'nope' / 'config.json'}", p.stderr
