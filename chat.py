"""Talk to BLSP-Emo: it hears a clip (the words *and* the tone) and answers, streamed token by token.

    python chat.py clip.wav                          # one reply, from runs/emotion (what train_emotion.py wrote)
    python chat.py a.wav b.flac --ser                # several clips, batched; --ser adds the emotion head's guess
    python chat.py                                   # multi-turn: type text, or /audio path.wav (or a bare path)
    python chat.py clip.wav --ckpt runs/blsp-emo-release --emotion --dtype bf16
    python chat.py clip.wav --speak reply.wav        # the reply spoken too, in a voice fitting the tone heard

Clips longer than Whisper's 30 s window are cut to their first 30 s (said on stderr). Bad input gets
one line on stderr and exit code 2.
"""
import argparse
import os
import sys
import time

import torch

from data import (CONTINUE, CONTINUE_HEARD_EMOTION, EMOTION_SYSTEM_PROMPT, EMOTIONS, N_SAMPLES, SAMPLE_RATE, SPEECH,
                  SYSTEM_PROMPT, AudioError, load_audio)

# The text before the speech in a turn, as each stage was trained to hear it: stage 1 continues, stage 2
# replies to the speech alone (data.emotion_student_parts), the release follows spoken instructions as they are.
INSTRUCTIONS = {"semantic": CONTINUE, "emotion": "", "release": ""}


class InputError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def read_clip(path):
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    try:
        audio = load_audio(path)
    except AudioError as e:
        raise InputError(str(e)) from None
    if audio.abs().max() < 1e-4:
        raise InputError(f"{path}: the clip is silent (peak amplitude {audio.abs().max():.1e})")
    if audio.numel() > N_SAMPLES:   # data.log_mel_batch cuts it
        print(f"note: {path} is {audio.numel() / SAMPLE_RATE:.1f} s; only its first 30 s are heard (Whisper's window)",
              file=sys.stderr)
    return audio


class Streamer:
    """Prints one row's tokens as they come; decodes the whole reply each time so multi-byte characters
    split across tokens print only once complete."""

    def __init__(self, tok, show=None):
        self.tok, self.ids, self.text, self.shown, self.t_first = tok, [], "", "", None
        self.show = show or (lambda piece: print(piece, end="", flush=True))   # demo.py shows it in the page

    def __call__(self, ids):
        t = int(ids[0])
        if t < 0:
            return
        if self.t_first is None:
            self.t_first = time.time()
        self.ids.append(t)
        self.text = self.tok.decode(self.ids)
        if not self.text.endswith("\ufffd"):
            self.show(self.text[len(self.shown):])
            self.shown = self.text


def reply(model, args, history, feats, stream=True, show=None):
    gen = torch.Generator(device=model.decoder.embed_tokens.weight.device).manual_seed(args.seed)
    streamer = Streamer(model.tok, show) if stream else None
    t0 = time.time()
    new = model.generate(history, feats=feats, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, on_token=streamer, generator=gen)
    if args.verbose and streamer is not None:
        n, dt = len(new[0]), time.time() - t0
        ttft = (streamer.t_first or time.time()) - t0
        rate = (n - 1) / max(dt - ttft, 1e-9) if n > 1 else 0.0
        print(f"\n[{n} tokens; time to first token {ttft:.2f} s; {rate:.1f} tokens/s]", file=sys.stderr, end="")
    texts = [streamer.text] if stream else [model.tok.decode(t) for t in new]   # streamed: decoded already
    return [t.strip() for t in texts]


def emotion_probs(model, feats):
    """The emotion head's probabilities, (B, 5) in EMOTIONS' order."""
    emb, lengths = model.speech_embeds(feats)
    return model.emotion_logits(emb, lengths).float().softmax(-1)


def ser_line(model, feats):
    return ["emotion head: " + ", ".join(f"{e} {p:.0%}" for e, p in sorted(zip(EMOTIONS, row.tolist()), key=lambda x: -x[1]))
            for row in emotion_probs(model, feats)]


def heard(probs):
    """The emotion the head heard in a turn (its likeliest); neutral where nothing was heard (a typed turn, a
    run without a head). It picks the spoken reply's prosody, here and in demo.py."""
    return "neutral" if probs is None else EMOTIONS[int(probs.argmax())]


def say(model, args, text, feats, n=None):
    """--speak: the reply spoken with the prosody (speak.PROSODY) fitting the emotion the head heard in feats;
    neutral where nothing was heard (a typed turn, a run without a head). n: the reply's number."""
    if not args.speak:
        return
    import speak   # imported late: chat without --speak never loads espeak-ng
    emotion = heard(emotion_probs(model, feats)[0] if feats and model.emotion_head is not None else None)
    root, ext = os.path.splitext(args.speak)
    path = args.speak if n is None else f"{root}-{n}{ext}"
    print(f"[spoken as a {emotion} voice calls for: {path}]", file=sys.stderr)
    speak.speak(text, emotion, path)


def budget_trim(model, history, feats, max_new_tokens):
    """Drops the oldest user/assistant turns until the prompt plus the reply fit the context window."""
    limit = model.decoder.cfg.max_seq_len - max_new_tokens
    def size():
        rows = model.tok.encode_chat(history)
        n_speech = sum(int(model.adapter.out_lengths(f.shape[0])) for f in feats)
        return len(rows) - rows.count(SPEECH) + n_speech
    while size() > limit and len(history) > 2:
        first = next(i for i, m in enumerate(history) if m["role"] != "system")
        drop = history[first]
        n_slots = drop["content"].count(SPEECH) if isinstance(drop["content"], list) else 0
        del history[first]
        del feats[:n_slots]
        if first < len(history) and history[first]["role"] == "assistant":
            del history[first]


def interactive(model, args, system, user):
    history, feats, turn = [{"role": "system", "content": system}], [], 0
    print("type a message, or /audio PATH (a bare path to a clip works too); /reset clears, /quit ends", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history, feats = history[:1], []
            continue
        path = line[len("/audio"):].strip() if line.startswith("/audio") else line if os.path.isfile(line) else None
        if path is not None:
            try:
                clip = read_clip(path)
            except InputError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            feats.append(model.encode_audio([clip])[0])
            history.append({"role": "user", "content": user})
            if args.ser:
                print(ser_line(model, feats[-1:])[0])
        else:
            history.append({"role": "user", "content": line})
        budget_trim(model, history, feats, args.max_new_tokens)
        print("assistant: ", end="", flush=True)
        answer = reply(model, args, history, feats)[0]
        print()
        history.append({"role": "assistant", "content": answer})
        turn += 1
        say(model, args, answer, feats[-1:] if path is not None else [], turn)


def prompts(model, system=None, emotion=False, instruction=None):
    """-> (system prompt, a speech turn's content) as the run was trained to hear them, unless overridden."""
    stage = model.config.get("stage", "emotion")
    system = system or (EMOTION_SYSTEM_PROMPT if emotion or stage in ("emotion", "release") else SYSTEM_PROMPT)
    trained = CONTINUE_HEARD_EMOTION if model.config.get("paper_prompts") else INSTRUCTIONS.get(stage, "")
    instruction = instruction if instruction is not None else trained
    return system, [instruction, SPEECH] if instruction else [SPEECH]


def weights_gb(run_dir, whisper=None, llm=None):
    """Bytes of weights a run loads (its own + its encoder and LLM folders), before loading them."""
    import json
    try:
        cfg = json.load(open(os.path.join(run_dir, "config.json")))
    except (OSError, ValueError):
        return None
    folders = [run_dir] + [p if os.path.isabs(p) else os.path.join(run_dir, p)
                           for p in (whisper or cfg.get("whisper"), llm or cfg.get("llm")) if p]
    return sum(os.path.getsize(os.path.join(d, f)) for d in folders if os.path.isdir(d)
               for f in os.listdir(d) if f.endswith(".safetensors")) / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="audio clips to answer (none: interactive)")
    p.add_argument("--ckpt", default="runs/emotion", help="run folder (config.json + model.safetensors)")
    p.add_argument("--whisper", default=None, help="override the run's Whisper folder")
    p.add_argument("--llm", default=None, help="override the run's LLM folder")
    p.add_argument("--system", default=None)
    p.add_argument("--instruction", default=None, help="text before the speech in a speech turn")
    p.add_argument("--emotion", action="store_true", help="the empathy system prompt (BLSP-Emo's)")
    p.add_argument("--ser", action="store_true", help="print the emotion head's prediction too")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", help="fp32, bf16 or fp16 (auto: bf16 where this machine runs it fast, else fp32)")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8: the LLM's linear layers in int8 weight-only (quantize.py): faster CPU decode, less memory")
    p.add_argument("--verbose", action="store_true", help="time to first token and tokens/s")
    p.add_argument("--speak", default=None, metavar="PATH", help="write the reply spoken, in a voice fitting the emotion "
                   "heard (speak.PROSODY), to PATH (16-bit mono wav); several replies (several clips, or each turn of "
                   "the chat) to PATH numbered: reply-1.wav, reply-2.wav, ...")
    args = p.parse_args(argv)
    from adapter import SpeechLM   # imported late: --help answers at once
    try:
        clips = [read_clip(f) for f in args.files]   # check the input before spending seconds on loading
        if args.speak and not os.path.isdir(os.path.dirname(os.path.abspath(args.speak))):
            raise InputError(f"--speak={args.speak}: no such folder")
        gb = weights_gb(args.ckpt, args.whisper, args.llm)
        if gb and (gb > 2 or args.verbose):   # the release (Qwen-7B + whisper-large) needs ~17 GB in bf16
            print(f"loading {gb:.1f} GB of weights from {args.ckpt} (as stored; fp32 doubles a bf16 checkpoint)",
                  file=sys.stderr)
        model = SpeechLM.from_run(args.ckpt, device=args.device, dtype=args.dtype, whisper=args.whisper, llm=args.llm)
        if args.quantize:
            from quantize import quantize_decoder
            quantize_decoder(model.decoder, args.quantize)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {str(e).strip(chr(34) + chr(39))}", file=sys.stderr)
        return 2
    if args.ser and model.emotion_head is None:
        print(f"error: {args.ckpt} has no emotion head (a stage-1 run): drop --ser", file=sys.stderr)
        return 2
    system, user = prompts(model, args.system, args.emotion, args.instruction)
    if not clips:
        interactive(model, args, system, user)
        return 0
    feats = model.encode_audio(clips)
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": user}] for _ in clips]
    sers = ser_line(model, feats) if args.ser else [None] * len(clips)
    if len(clips) == 1:
        if sers[0]:
            print(sers[0])
        answer = reply(model, args, convs[0], feats)[0]
        print()
        say(model, args, answer, feats)
        return 0
    for i, (f, text, s) in enumerate(zip(args.files, reply(model, args, convs, feats, stream=False), sers)):
        print(f"== {f}" + (f"\n{s}" if s else "") + f"\n{text}\n")
        say(model, args, text, feats[i:i + 1], i + 1)
    return 0


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())
