"""Talk to BLSP-Emo: it hears a clip (the words *and* the tone) and answers, streamed token by token.

    python chat.py clip.wav [more.wav ...]   # a reply to each clip, from the run folder --ckpt (runs/emotion)
    python chat.py                           # multi-turn: type text, or /audio path.wav (or a bare path); /reset, /quit

--ser prints the emotion head's reading; --speak reply.wav writes the reply spoken in a voice fitting the emotion heard
(several replies numbered: reply-1.wav, ...); --emotion takes BLSP-Emo's empathy system prompt (--system, --instruction:
your own); --repetition_penalty=1 decodes plain greedy; --quantize int8 decodes faster on a CPU; --dtype auto picks
bf16 where this machine runs it fast; --whisper, --llm load other folders than the run's; --verbose times the reply.
Clips over Whisper's 30 s window are cut to their first 30 s (said on stderr). Bad input: one line on stderr, exit 2.
"""
import argparse
import itertools
import os
import sys
import time

import torch

from data import (CONTINUE, CONTINUE_HEARD_EMOTION, EMOTION_SYSTEM_PROMPT, EMOTIONS, N_SAMPLES, SAMPLE_RATE, SPEECH,
                  SYSTEM_PROMPT, AudioError, load_audio)

# How chat.py, demo.py and the report's tone table decode a reply: CTRL's repetition penalty at its authors' value
# (Keskar et al., 2019). Greedy alone loops on one sentence ("I'm so sorry to hear that. I'm so sorry ...").
REPETITION_PENALTY = 1.2


def read_clip(path):
    audio = load_audio(path)   # AudioError names a missing, unreadable or empty file
    if audio.abs().max() < 1e-4:
        raise AudioError(f"{path}: the clip is silent (peak amplitude {audio.abs().max():.1e})")
    if audio.numel() > N_SAMPLES:   # data.log_mel_batch cuts it
        print(f"note: {path} is {audio.numel() / SAMPLE_RATE:.1f} s; only its first 30 s are heard (Whisper's window)",
              file=sys.stderr)
    return audio


def prompts(model, system=None, emotion=False, instruction=None):
    """-> (system prompt, speech turn) as the run was trained, unless overridden (stage 1 continues the speech)."""
    stage = model.config.get("stage", "emotion")
    system = system or (EMOTION_SYSTEM_PROMPT if emotion or stage in ("emotion", "release") else SYSTEM_PROMPT)
    trained = CONTINUE_HEARD_EMOTION if model.config.get("paper_prompts") else CONTINUE if stage == "semantic" else ""
    instruction = trained if instruction is None else instruction
    return system, [instruction, SPEECH] if instruction else [SPEECH]


def emotion_probs(model, feats):   # (B, 5) in EMOTIONS' order
    emb, lengths = model.speech_embeds(feats)
    return model.emotion_logits(emb, lengths).float().softmax(-1)


def heard(probs):
    """The emotion heard (the spoken reply's prosody, here and in demo.py); neutral for a typed turn or no head."""
    return "neutral" if probs is None else EMOTIONS[int(probs.argmax())]


def sampler(temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0, generator=None):
    """-> pick(logits (B, V)) -> ids (B,), each step's choice for one reply (Decoder.generate's pick): greedy at
    temperature 0, else sampled from the top_k ids or the smallest head reaching top_p. repetition_penalty > 1:
    CTRL's penalty (Keskar et al., 2019) on the ids this reply has already used (not the prompt's: a speech prompt
    has none): a positive logit is divided by it, a negative one multiplied."""
    used = None   # (B, V): the ids each reply has used, kept only when the penalty reads them

    def pick(logits):
        nonlocal used
        if repetition_penalty != 1.0:
            used = torch.zeros_like(logits, dtype=torch.bool) if used is None else used
            logits = torch.where(used, torch.where(logits > 0, logits / repetition_penalty,
                                                   logits * repetition_penalty), logits)
        if temperature <= 0:
            token = logits.argmax(-1)
        else:
            logits = logits.float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            if top_p is not None and top_p < 1.0:
                sorted_logits, order = logits.sort(-1, descending=True)
                p = sorted_logits.softmax(-1)
                drop = p.cumsum(-1) - p > top_p   # keep the smallest head reaching top_p, never empty
                logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
        if used is not None:
            used[torch.arange(len(token)), token] = True
        return token
    return pick


def reply(model, args, history, feats, show=None):
    """The reply to history, streamed through show (demo.py shows it in its page)."""
    show = show or (lambda piece: print(piece, end="", flush=True))
    ids, shown, times, t0 = [], "", [], time.time()

    def on_token(new):
        nonlocal shown   # the whole reply decoded each time: a character split across tokens shows once complete
        if (t := int(new[0])) >= 0:   # -1: the row has finished
            times.append(time.time())
            ids.append(t)
            if not (text := model.tok.decode(ids)).endswith("\ufffd"):
                show(text[len(shown):])
                shown = text
    gen = torch.Generator(device=model.decoder.embed_tokens.weight.device).manual_seed(args.seed)
    pick = sampler(args.temperature, args.top_k, args.top_p, args.repetition_penalty, gen)
    new = model.generate(history, feats=feats, max_new_tokens=args.max_new_tokens, pick=pick, on_token=on_token)[0]
    if args.verbose:
        n, ttft, dt = len(new), (times[0] if times else time.time()) - t0, time.time() - t0
        rate = (n - 1) / max(dt - ttft, 1e-9) if n > 1 else 0.0
        print(f"\n[{n} tokens; time to first token {ttft:.2f} s; {rate:.1f} tokens/s]", file=sys.stderr, end="")
    return model.tok.decode(new).strip()


def budget_trim(model, history, feats, max_new_tokens):
    """Drops the oldest turns after the system prompt (and their clips) until the prompt and reply fit the window."""
    def size():
        rows = model.tok.encode_chat(history)
        return len(rows) - rows.count(SPEECH) + sum(int(model.adapter.out_lengths(f.shape[0])) for f in feats)
    while size() > model.decoder.cfg.max_seq_len - max_new_tokens and len(history) > 2:
        dropped = history.pop(1)
        del feats[:sum(part == SPEECH for part in dropped["content"])]   # a typed turn (a str) has none
        if len(history) > 1 and history[1]["role"] == "assistant":
            del history[1]


def answer(model, args, history, feats, clip=None, n=None, prefix=""):
    """One turn: the clip heard (--ser shows its emotion), the reply streamed, kept, spoken (--speak); n: its number."""
    probs = None
    if clip is not None:
        feats.append(model.encode_audio([clip])[0])
        probs = emotion_probs(model, feats[-1:])[0] if model.emotion_head is not None else None
        if args.ser:
            ranked = sorted(zip(EMOTIONS, probs.tolist()), key=lambda x: -x[1])
            print("emotion head: " + ", ".join(f"{e} {p:.0%}" for e, p in ranked))
    budget_trim(model, history, feats, args.max_new_tokens)
    print(prefix, end="", flush=True)
    history.append({"role": "assistant", "content": reply(model, args, history, feats)})
    print()
    if args.speak:
        import speak   # imported late: chat without --speak never loads espeak-ng
        root, ext = os.path.splitext(args.speak)
        path = args.speak if n is None else f"{root}-{n}{ext}"
        print(f"[spoken as a {heard(probs)} voice calls for: {path}]", file=sys.stderr)
        speak.speak(history[-1]["content"], heard(probs), path)


def interactive(model, args, system, user):
    history, feats, numbers = [{"role": "system", "content": system}], [], itertools.count(1)
    print("type a message, or /audio PATH (or a bare path to a clip); /reset clears, /quit ends", file=sys.stderr)
    for line in map(str.strip, sys.stdin):
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history, feats = history[:1], []
        elif line:
            path = line.removeprefix("/audio").strip() if line.startswith("/audio") else line
            try:
                clip = read_clip(path) if line.startswith("/audio") or os.path.isfile(line) else None
            except AudioError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line if clip is None else user})
            answer(model, args, history, feats, clip, next(numbers), "assistant: ")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="audio clips to answer (none: a multi-turn chat)")
    p.add_argument("--quantize", choices=["int8"])
    for flag in ("--emotion", "--ser", "--verbose"):
        p.add_argument(flag, action="store_true")
    for flag in ("--whisper", "--llm", "--system", "--instruction", "--device", "--speak"):
        p.add_argument(flag)
    for flag, kind, default in [("--ckpt", str, "runs/emotion"), ("--dtype", str, "auto"), ("--seed", int, 0),
                                ("--temperature", float, 0.0), ("--top_p", float, None), ("--top_k", int, None),
                                ("--max_new_tokens", int, 128), ("--repetition_penalty", float, REPETITION_PENALTY)]:
        p.add_argument(flag, type=kind, default=default)
    args = p.parse_args(argv)
    from adapter import SpeechLM   # imported late: --help answers at once
    try:
        clips = [read_clip(f) for f in args.files]   # check the input before spending seconds on loading
        if args.speak and not os.path.isdir(os.path.dirname(os.path.abspath(args.speak))):
            raise ValueError(f"--speak={args.speak}: no such folder")
        if args.repetition_penalty <= 0:   # it divides and multiplies logits: 0 or a negative flips or breaks them
            raise ValueError(f"--repetition_penalty={args.repetition_penalty}: must be > 0 (1: none)")
        model = SpeechLM.from_run(args.ckpt, device=args.device, dtype=args.dtype, whisper=args.whisper, llm=args.llm)
        if args.ser and model.emotion_head is None:
            raise ValueError(f"{args.ckpt} has no emotion head (a stage-1 run): drop --ser")
        if args.quantize:
            from quantize import quantize_decoder
            quantize_decoder(model.decoder, args.quantize)
    except (FileNotFoundError, ValueError, KeyError) as e:   # AudioError is a ValueError
        print(f"error: {str(e).strip(chr(34) + chr(39))}", file=sys.stderr)
        return 2
    system, user = prompts(model, args.system, args.emotion, args.instruction)
    if not clips:
        interactive(model, args, system, user)
    for i, (f, clip) in enumerate(zip(args.files, clips), 1):   # each clip on its own
        if len(clips) > 1:
            print(f"== {f}")
        history = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        answer(model, args, history, [], clip, i if len(clips) > 1 else None)
    return 0


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())
