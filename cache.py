"""The training data of both stages: manifests, the teacher prompts, the examples, and what is computed once from the
frozen networks and kept on disk: encoder features, the LLM's targets (a rerun continues where the last stopped)."""
import hashlib
import json
import os
import re
import sys

import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import (CONTINUE, CONTINUE_WITH_EMOTION, EMOTION_SYSTEM_PROMPT, EMOTIONS, IGNORE, N_SAMPLES, SAMPLE_RATE,
                  SYSTEM_PROMPT, AudioError, load_audio)
from trainer import atomic_write

# Refusals and disclaimers are dropped from the targets: a speech model trained on "I'm sorry for your loss, but as a
# language AI, I don't have the ability to ..." says it to any clip, whatever it hears (the release drops "i'm sorry,
# but i" and "i'm not sure what you" too).
REFUSALS = ("i'm sorry, but i", "i am sorry, but i", "i'm not sure what you", "as an ai", "as a language",
            "as a helpful ai", "i cannot fulfill", "i can't assist", "i cannot assist", "i'm not equipped",
            "i don't have the ability", "i'm unable to")


# Inflections a free-text reply uses for each label ("she sounds surprised", "anger", "happiness").
_WORDS = {"neutral": r"neutral(?:ity)?", "happy": r"happ(?:y|ier|iness|ily)|joy(?:ful)?",
          "angry": r"angr(?:y|ier|ily)|anger", "sad": r"sad(?:ly|ness|der)?",
          "surprise": r"surpris(?:e|ed|ing|ingly)"}
_LABEL_RE = re.compile(r"\b(" + "|".join(f"(?P<{k}>{v})" for k, v in _WORDS.items()) + r")\b", re.IGNORECASE)


def extract_label(reply):
    """The first emotion word in a free-text reply, as its label ("it sounds sad, not angry" -> "sad"); "unknown"
    when there is none."""
    m = _LABEL_RE.search(reply)
    return next(k for k, v in m.groupdict().items() if v) if m else "unknown"


def check_manifests(*paths):
    """Each manifest given ("" or None: none) is a file: said before a run spends its first minutes loading models."""
    for path in filter(None, paths):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such manifest")


def read_manifest(path):
    """JSON lines -> dicts; a bad line is a ValueError naming file:line."""
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for n, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rows[-1], dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rows[-1]).__name__}")
    return rows


def emotion_label(name, mapping=None, where="manifest"):
    """An emotion name, folded through a dataset's mapping (e.g. {"excited": "happy"}) -> its id in EMOTIONS."""
    e = (mapping or {}).get(name, name)
    if e not in EMOTIONS:
        raise ValueError(f"{where}: unknown emotion {name!r}; allowed: {', '.join(EMOTIONS)} "
                         f"(fold other labels in with --map=\"{{'{name}': 'happy'}}\")")
    return EMOTIONS.index(e)


def continue_target_messages(text):
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": CONTINUE + text}]


# EMOTIONS' label -> the word a sentence says it with: "a surprise tone" reads as no emotion (asked how that speaker
# feels, Qwen2.5 answers "neutral")
ADJECTIVE = {"surprise": "surprised"}


def emotion_target_messages(text, emotion, paper=False):
    """Stage 2's teacher prompt, the emotion told in words. Under the paper's continuation instruction a small LLM
    repeats the sentence whatever the label; asked to reply to it "(said in a sad voice)", Qwen2.5 refuses (it
    cannot speak). Told "I feel sad." first, both LLMs reply to the feeling. ("I feel neutral." it refuses too.)"""
    feeling = {**ADJECTIVE, "neutral": "calm"}.get(emotion, emotion)
    user = CONTINUE_WITH_EMOTION.format(emotion=emotion) + text if paper else f"I feel {feeling}. {text}"
    return [{"role": "system", "content": EMOTION_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def told(item):
    """The transcript with its emotion told in words: what the LLM reads where the speech model must hear it (the
    asked clips' teacher, the SER ceilings)."""
    word = ADJECTIVE.get(EMOTIONS[item["label"]], EMOTIONS[item["label"]])
    return f"{item['text']} (said in {'an' if word[0] in 'aeiou' else 'a'} {word} tone)"


def encoder_id(folder, padded, tone_layer=0):   # the encoder's files (names, sizes, mtimes) and what it outputs
    h = hashlib.sha1()
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            st = os.stat(p)
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    # padded features are cut at ceil(n / 160) mel frames: the tag says so, features cut at n // 160 are not reused
    h.update((b"padded:ceil" if padded else b"real") + (f"|tone:{tone_layer}".encode() if tone_layer else b""))
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_clips(encode, paths, cache_dir, enc_id, *, batch_size=8):
    """encode(clips) (SpeechLM.encode_audio) for each path, fp16 on the CPU; None (warned) for an unreadable clip."""
    os.makedirs(cache_dir, exist_ok=True)
    out, todo, audios = [None] * len(paths), [], {}
    for i, p in enumerate(paths):
        try:
            if not os.path.isfile(p):
                load_audio(p)   # raises the AudioError that says why
            st = os.stat(p)   # key: the path as written (a moved clone keeps its cache), the file now, the encoder
            key = hashlib.sha1(f"{os.path.normpath(p)}|{st.st_size}|{st.st_mtime_ns}|{enc_id}".encode()).hexdigest()
            f = os.path.join(cache_dir, key + ".safetensors")
            if os.path.exists(f):
                out[i] = load_file(f)["feats"]
                continue
            audios[i] = load_audio(p)
        except AudioError as e:
            tqdm.write(f"warning: {e}; skipped", file=sys.stderr)
            continue
        if audios[i].numel() > N_SAMPLES:   # the mel cuts it
            tqdm.write(f"warning: {p}: {audios[i].numel() / SAMPLE_RATE:.1f} s is longer than Whisper's 30 s window; "
                       "cut to 30 s", file=sys.stderr)
        todo.append((i, f))
    todo.sort(key=lambda t: audios[t[0]].numel())   # similar lengths: less padding
    for b in tqdm(range(0, len(todo), batch_size), desc="encode speech", unit="batch", disable=not todo):
        chunk = todo[b:b + batch_size]
        for (i, f), x in zip(chunk, encode([audios[i] for i, _ in chunk])):
            out[i] = x.to("cpu", torch.float16).contiguous()
            atomic_write(f, lambda p: save_file({"feats": out[i]}, p))
    return out


def with_features(model, rows, padded=None, cache_dir=".cache/features"):
    """-> (the rows that could be encoded, each with its "feats"; the number skipped)."""
    padded = model.padded if padded is None else padded
    feats = encode_clips(lambda clips: model.encode_audio(clips, padded), [r["audio"] for r in rows], cache_dir,
                         encoder_id(model.config["whisper"], padded, model.tone_layer))
    kept = [dict(r, feats=f) for r, f in zip(rows, feats) if f is not None]
    return kept, len(rows) - len(kept)


def drop_by_duration(rows, min_seconds, max_seconds, where):
    """The release's clip filter by duration (0: no bound); an unreadable file is kept, for with_features to name."""
    if not (min_seconds or max_seconds):
        return rows

    def why(row):
        try:
            s = sf.info(row["audio"]).duration
        except (sf.SoundFileError, RuntimeError, OSError):
            return None
        return "short" if min_seconds and s < min_seconds else "long" if max_seconds and s > max_seconds else None
    reasons = [why(r) for r in rows]
    kept = [r for r, w in zip(rows, reasons) if w is None]
    print(f"{where}: {len(kept)} of {len(rows)} clips kept; dropped {reasons.count('short')} under {min_seconds} s, "
          f"{reasons.count('long')} over {max_seconds or 'any'} s")
    return kept


@torch.no_grad()
def make_targets(model, items, path, build_prompt, *, max_new_tokens=48, batch_size=128):
    """The frozen LLM's greedy reply (model: a SpeechLM, reading text only) to build_prompt(item) for each item ->
    {key: record}, cached in `path` by a hash of the prompt, the LLM's folder and max_new_tokens, so a changed
    instruction, LLM or length never reuses stale targets; refusals are kept (training_items drops them)."""
    done, prompts = {}, {}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:   # read from the start, written at the end
        f.seek(0)
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue   # a blank line, or one cut by a kill: regenerated
            done[r["key"]] = r
        for it in items:
            msgs = build_prompt(it)
            made_by = [msgs, os.path.realpath(model.config.get("llm", "")), max_new_tokens]   # relative or not
            key = hashlib.sha1(json.dumps(made_by, sort_keys=True).encode()).hexdigest()[:16]
            it["target_key"] = key
            if key not in done:
                prompts[key] = msgs
        todo = sorted(prompts.items(), key=lambda kv: len(json.dumps(kv[1])))   # similar lengths: less padding
        for b in tqdm(range(0, len(todo), batch_size), desc="LLM targets", unit="batch", disable=not todo):
            chunk = todo[b:b + batch_size]
            new = model.generate([m for _, m in chunk], max_new_tokens=max_new_tokens)
            for (key, _), toks in zip(chunk, new):
                text = model.tok.decode(toks).strip()
                rec = {"key": key, "target": text, "truncated": len(toks) >= max_new_tokens}
                f.write(json.dumps(rec) + "\n")
                done[key] = rec
            f.flush()
    return done


def trim_repeats(text):
    """A small LLM's greedy text often loops ("I'm sure. I'm sure."): -> (text up to the first repeated sentence,
    whether anything was cut)."""
    seen, kept = set(), []
    for p in re.split(r"(?<=[.!?])\s+", text.strip()):
        key = p.lower().strip()
        if key in seen:
            return " ".join(kept), True
        seen.add(key)
        kept.append(p)
    return text, False


def make_example(tok, system, user_parts, target, truncated=False):
    """(ids with SPEECH slots, labels): IGNORE but on the target and the closing tokens, unless the target was cut."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user_parts}]
    prompt = tok.encode_chat(messages, add_generation_prompt=True)
    answer = tok.encode(target) + ([] if truncated else tok.closing_ids)
    return prompt + answer, [IGNORE] * len(prompt) + answer


def training_items(rows, targets, make_examples, n_unreadable, where, max_text_tokens=0):
    """Rows + make_targets' records -> items: each row with its "target" and make_examples(row, record). Refusals,
    empty targets and (as the release) teacher examples over max_text_tokens are dropped and counted."""
    items, skipped, n_cut = [], {"unreadable audio": n_unreadable, "refusal": 0, "empty target": 0}, 0
    too_long = f"over {max_text_tokens} text tokens"
    if max_text_tokens:
        skipped[too_long] = 0
    for row in rows:
        t = targets[row["target_key"]]
        said = t["target"].lower().replace("’", "'")   # judged here, so cached targets meet today's list
        why = "refusal" if any(r in said for r in REFUSALS) else "empty target" if not t["target"] else None
        if why:
            skipped[why] += 1
            continue
        text, cut = trim_repeats(t["target"])
        n_cut += cut
        t = dict(t, target=text, truncated=t["truncated"] and not cut)   # a cut loop ends where it is cut
        examples = make_examples(row, t)
        if max_text_tokens and len(examples["teacher"][0]) > max_text_tokens:
            skipped[too_long] += 1
            continue
        items.append(dict(row, target=text, **examples))
    print(f"{where}: {len(items)} items ({n_cut} targets cut where they began to repeat); skipped {skipped}")
    return items
