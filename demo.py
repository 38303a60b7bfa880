"""
The browser demo: speak to BLSP-Emo from the microphone (or upload a clip, or type), read the reply as it
is generated, see what the emotion head heard, and hear the reply spoken in a voice that fits it.

    pip install -r requirements-demo.txt    # gradio: an optional extra, the core does not need it
    python demo.py                           # http://127.0.0.1:7860, on the run train_emotion.py wrote
    python demo.py --ckpt=runs/blsp-emo-release --dtype=bf16 --port=7861

It works offline: no analytics, no version check, system fonts, every asset served by gradio itself.
"""
import argparse
import itertools
import os
import queue
import sys
import tempfile
import threading

import gradio as gr
import torch

import chat
import speak
from adapter import SpeechLM
from data import EMOTIONS, N_SAMPLES, SAMPLE_RATE, AudioError


@torch.inference_mode()
def hear(model, path):
    """A clip -> (encoder frames, the emotion head's probabilities or None, a note for the page or "").
    AudioError for what cannot be heard, with the file's name rather than gradio's upload path."""
    try:
        clip = chat.read_clip(path)
    except AudioError as e:
        raise AudioError(str(e).replace(path, os.path.basename(path))) from None
    note = (f"The clip is {clip.numel() / SAMPLE_RATE:.1f} s long: only its first 30 s were heard."
            if clip.numel() > N_SAMPLES else "")
    feats = model.encode_audio([clip])
    probs = chat.emotion_probs(model, feats)[0] if model.emotion_head is not None else None
    return feats[0], probs, note


def stream_reply(model, args, history, feats):
    """Yields the reply as it grows, the finished reply last: chat.reply runs in a thread and hands each new
    piece over a queue, so that the page shows the tokens as they come."""
    q = queue.Queue()

    def work():
        try:
            with torch.inference_mode():
                q.put(("done", chat.reply(model, args, history, feats, show=lambda piece: q.put(("piece", piece)))))
        except Exception as e:  # noqa: BLE001  handed over to the page's thread, which raises it
            q.put(("error", e))
    threading.Thread(target=work, daemon=True).start()
    text = ""
    while True:
        kind, x = q.get()
        if kind == "error":
            raise x
        text = x if kind == "done" else text + x
        yield text
        if kind == "done":
            return


def build(model, args):
    system, user = chat.prompts(model)
    out_dir, n_replies = tempfile.mkdtemp(prefix="blsp-emo-demo-"), itertools.count(1)   # the spoken replies

    def respond(clip, text, shown, session):
        """One turn (a clip, else the typed text): yields what changes on the page as the reply grows."""
        history, feats = session["history"], session["feats"]
        if not clip and not (text or "").strip():
            yield {status: "Record or upload a clip (or type a message) first."}
            return
        probs = None
        try:
            if clip:
                f, probs, note = hear(model, clip)
                feats.append(f)
                history.append({"role": "user", "content": user})
                shown = shown + [{"role": "user", "content": {"path": clip}}]
            else:
                note = ""
                history.append({"role": "user", "content": text.strip()})
                shown = shown + [{"role": "user", "content": text.strip()}]
        except AudioError as e:
            yield {status: f"Cannot hear that: {e}"}
            return
        chat.budget_trim(model, history, feats, args.max_new_tokens)
        bars = {label: {e: float(p) for e, p in zip(EMOTIONS, probs)}} if probs is not None else {}
        yield {chat_box: shown, status: note, mic: None, box: "", **bars}
        for reply in stream_reply(model, args, history, feats):
            yield {chat_box: shown + [{"role": "assistant", "content": reply}]}
        history.append({"role": "assistant", "content": reply})
        heard = chat.heard(probs)   # the prosody fits the emotion heard in this turn
        wav = speak.speak(reply, heard, os.path.join(out_dir, f"reply-{next(n_replies)}.wav")) if reply else None
        yield {reply_audio: wav, state: session, status: note or f"Spoken as a {heard} voice calls for."}

    def clear():
        return [], {"history": [{"role": "system", "content": system}], "feats": []}, None, None, ""

    with gr.Blocks(title="BLSP-Emo") as app:
        gr.Markdown("## BLSP-Emo\nSpeak (or upload a clip): it hears what you say and how you say it, and answers.")
        state = gr.State({"history": [{"role": "system", "content": system}], "feats": []})
        with gr.Row():
            with gr.Column(scale=3):
                chat_box = gr.Chatbot(label="conversation", height=420, elem_id="conversation")
                with gr.Row():
                    box = gr.Textbox(placeholder="or type a message", show_label=False, scale=4, elem_id="message")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    reset = gr.Button("Clear", scale=1, elem_id="clear")
            with gr.Column(scale=2):
                mic = gr.Audio(sources=["microphone", "upload"], type="filepath", label="your voice", elem_id="voice")
                label = gr.Label(num_top_classes=len(EMOTIONS), label="what the emotion head heard", elem_id="emotion")
                reply_audio = gr.Audio(label="the reply, spoken", type="filepath", interactive=False, autoplay=True,
                                       elem_id="spoken")
                status = gr.Markdown(elem_id="status")
        outputs = [chat_box, label, reply_audio, status, state, mic, box]
        send.click(respond, [mic, box, chat_box, state], outputs)
        box.submit(respond, [mic, box, chat_box, state], outputs)
        reset.click(clear, None, [chat_box, state, label, reply_audio, status])
    return app


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("--ckpt", default="runs/emotion", help="run folder (config.json + model.safetensors)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", help="fp32, bf16 or fp16 (auto: bf16 where this machine runs it fast)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    # what chat.reply reads besides
    args.seed, args.top_k, args.top_p, args.verbose = 0, None, None, False
    args.repetition_penalty = chat.REPETITION_PENALTY
    try:
        model = SpeechLM.from_run(args.ckpt, device=args.device, dtype=args.dtype)   # once, for every visitor
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {str(e).strip(chr(34) + chr(39))}", file=sys.stderr)
        return 2
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"   # read by gradio as it builds and launches: no telemetry, no version check
    # system fonts: nothing to fetch from a font server
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    build(model, args).queue().launch(server_name=args.host, server_port=args.port, theme=theme, ssr_mode=False,
                                      share=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
