"""How we measure BLSP-Emo: what is heard (content retrieval), how it is said (SER), and what is answered
("same words, different tone").

SER is asked the way the authors evaluate it: the model hears the clip after the question below and
answers in free text; the label is the first of the five emotion words (or their inflections) in the
reply, "unknown" when none appears (counted, and wrong). The emotion head's own accuracy is reported
beside it, and closed-set SER scores the five label words as replies instead of reading one. The tone
test plays every held-out sentence in all five emotions and compares the replies: do they differ, and
does a happy voice get a brighter reply than a sad one (VADER's sentiment)? Content retrieval asks
whether stage 1 heard the words: is the clip's own continuation the likeliest among other clips'?
Each measure has a floor or a ceiling beside it, so a number says how much of the possible was reached.

    python evaluate.py --stage1=runs/demo/semantic --stage2=runs/demo/emotion --out=runs/demo
    python evaluate.py --ser_manifest=speech/ser_iemocap_test.jsonl --stage2=runs/blsp-emo-release   # one SER set
"""
import json
import os
import sys
import time
from collections import defaultdict

import torch

import cache
import data
from adapter import Adapter, SpeechLM, partial_lora
from cache import emotion_label, make_example, read_manifest
from chat import REPETITION_PENALTY, sampler
from data import CONTINUE, CONTINUE_HEARD_EMOTION, EMOTION_SYSTEM_PROMPT, EMOTIONS, IGNORE, SPEECH, SYSTEM_PROMPT
from model import KVCache
from trainer import atomic_write, peak_rss_gb

# The authors' SER question.
SER_QUESTION = ("Please identify the emotion tone of the speech provided below. Select from the following "
                "options: neutral, sad, angry, happy, or surprise.\n\nSpeech: ")


@torch.no_grad()
def replies(model, items, system, instruction, max_new_tokens, batch_size=64, repetition_penalty=1.0):
    """The model's greedy replies (with CTRL's repetition_penalty, 1: none) to each item's clip (its cached encoder
    features) after an instruction."""
    out = []
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": [instruction, SPEECH]}]
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        new = model.generate([msgs] * len(chunk), feats=[it["feats"] for it in chunk], max_new_tokens=max_new_tokens,
                             pick=sampler(repetition_penalty=repetition_penalty))
        out += [model.tok.decode(t).strip() for t in new]
    return out


@torch.no_grad()
def text_replies(model, texts, system, instruction, max_new_tokens, batch_size=64):
    """The LLM's replies to the same instruction given the transcript as text (no speech)."""
    out = []
    for i in range(0, len(texts), batch_size):
        convs = [[{"role": "system", "content": system}, {"role": "user", "content": instruction + t}]
                 for t in texts[i:i + batch_size]]
        new = model.generate(convs, max_new_tokens=max_new_tokens)
        out += [model.tok.decode(t).strip() for t in new]
    return out


def accuracy(conf):
    """The fraction of clips on the diagonal of a confusion matrix (rows: truth, columns: answers)."""
    total = sum(sum(row) for row in conf)   # not map(sum, ...): `map` is one of this script's settings
    return sum(row[i] for i, row in enumerate(conf)) / max(total, 1)


def uar(conf):
    """Unweighted average recall: each true class's fraction recognised, averaged over the classes that occur,
    so every class counts alike whatever its share of the clips (chance is 1 / classes, not the majority
    class's share). With accuracy, the figure SER tables report."""
    recalls = [row[i] / sum(row) for i, row in enumerate(conf) if sum(row)]
    return sum(recalls) / max(len(recalls), 1)


@torch.no_grad()
def ser_eval(model, items, batch_size=64, max_new_tokens=24):
    """Free-text SER accuracy and UAR, per-class recall, confusion (rows: truth, columns: EMOTIONS + unknown),
    and the emotion head's accuracy and UAR where the model has one."""
    model.eval()
    texts = replies(model, items, SYSTEM_PROMPT, SER_QUESTION, max_new_tokens, batch_size)
    cols = EMOTIONS + ["unknown"]
    conf = [[0] * len(cols) for _ in EMOTIONS]
    for it, r in zip(items, texts):
        conf[it["label"]][cols.index(cache.extract_label(r))] += 1
    n = len(items)
    res = {"n": n, "acc": accuracy(conf), "uar": uar(conf),
           "recall": {e: conf[i][i] / max(sum(conf[i]), 1) for i, e in enumerate(EMOTIONS)},
           "unknown": sum(row[-1] for row in conf), "confusion": conf, "columns": cols,
           "replies": [{"audio": it["audio"], "emotion": EMOTIONS[it["label"]], "reply": r} for it, r in zip(items, texts)]}
    if model.emotion_head is not None:
        head = head_confusion(model, items, batch_size)
        res.update(head_acc=accuracy(head), head_uar=uar(head))
    return res


@torch.no_grad()
def head_confusion(model, items, batch_size=16):
    """The emotion head's confusion matrix (rows: truth, columns: EMOTIONS): the argmax of its five logits on
    each clip's pooled adapter output."""
    conf = [[0] * len(EMOTIONS) for _ in EMOTIONS]
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        emb, lengths = model.speech_embeds([it["feats"] for it in chunk])
        for p, it in zip(model.emotion_logits(emb, lengths).argmax(-1).tolist(), chunk):
            conf[it["label"]][p] += 1
    return conf


@torch.no_grad()
def ser_text_oracle(model, items, batch_size=64, max_new_tokens=24):
    """A ceiling for free-text SER with this LLM: the same question over the transcript with the emotion
    *told* in words ("... (said in a sad tone)"), no speech. An LLM that cannot name an emotion it is
    told cannot be expected to name one it hears."""
    texts = [cache.told(it) for it in items]
    answers = text_replies(model, texts, SYSTEM_PROMPT, SER_QUESTION, max_new_tokens, batch_size)
    return sum(cache.extract_label(a) == EMOTIONS[it["label"]] for a, it in zip(answers, items)) / max(len(items), 1)


@torch.no_grad()
def reply_logprobs(model, examples, feats=None, batch_size=16):
    """(summed log-probability, number of tokens) of each example's labelled tokens (make_example rows:
    the reply). With feats (one clip per example, for its one SPEECH slot) the model hears the speech
    (partial LoRA, if any, at the speech positions); without, it reads text. Neighbouring examples with
    the same prompt and clip (a clip's five label words, its ten candidate continuations) share one run
    of the prompt: its keys and values are copied to each of their replies."""
    groups = []   # [prompt ids, clip, reply ids...]
    for k, (ids, labels) in enumerate(examples):
        start = next(j for j, y in enumerate(labels) if y != IGNORE)
        clip = feats[k] if feats is not None else None
        if groups and groups[-1][0] == ids[:start] and groups[-1][1] is clip:
            groups[-1].append(ids[start:])
        else:
            groups.append([ids[:start], clip, ids[start:]])
    dec, out, i = model.decoder, [], 0
    w = dec.embed_tokens.weight
    while i < len(groups):   # batches of about batch_size replies, a prompt's replies never split
        chunk = [groups[i]]
        while i + len(chunk) < len(groups) and sum(len(g) - 2 for g in chunk + [groups[i + len(chunk)]]) <= batch_size:
            chunk.append(groups[i + len(chunk)])
        i += len(chunk)
        emb, lengths = model.speech_embeds([g[1] for g in chunk if g[1] is not None])
        b = model.splice([g[0] for g in chunk], [emb[j, :n] for j, n in enumerate(lengths.tolist())], pad="left")
        answers = [r for g in chunk for r in g[2:]]
        n = torch.tensor([len(g) - 2 for g in chunk], device=w.device)
        cache = KVCache(dec.cfg, len(chunk), b["embeds"].shape[1] + max(len(r) for r in answers), w.device, w.dtype)
        with partial_lora(dec, b["speech_mask"], b["valid"]):
            first = dec(embeds=b["embeds"], valid=b["valid"], cache=cache, logits_at=-1)   # each reply's 1st token
        cache.kv, cache.valid = cache.kv.repeat_interleave(n, 2), cache.valid.repeat_interleave(n, 0)
        ids, _, valid = data.pad_batch(answers, model.tok.pad_id, side="right")
        ids, valid = ids.to(w.device), valid.to(w.device)
        logits = [first.repeat_interleave(n, 0)[:, None]]
        if ids.shape[1] > 1:   # the rest: each reply read after its prompt, from the copied keys and values
            logits.append(dec(ids[:, :-1], valid=valid[:, :-1], cache=cache))
        lp = torch.cat(logits, 1).float().log_softmax(-1).gather(-1, ids[..., None])[..., 0]
        out += [(lp[j, :len(r)].sum().item(), len(r)) for j, r in enumerate(answers)]
    return out


@torch.no_grad()
def ser_closed(model, items, transcript=False, batch_size=32):
    """Closed-set SER, scored as lm-evaluation-harness scores multiple choice: after the SER question,
    each of the five label words is scored as the reply ("happy": its tokens, no closing ones) by its
    total log-likelihood, and the likeliest is the answer. Unlike free text, no answer is "unknown", so
    it measures what the model hears, not whether it follows the instruction. transcript=True: the LLM
    reads the transcript with the emotion told in words (as ser_text_oracle), no speech: the ceiling.
    -> (accuracy, calibrated accuracy). Calibrated: each label word's score minus its mean over these clips (no
    label used), so the LLM's prior for a word ("neutral", "happy") no longer decides every answer: what it hears."""
    examples, feats = [], []
    for it in items:
        parts = [SER_QUESTION + cache.told(it)] if transcript else [SER_QUESTION, SPEECH]
        for e in EMOTIONS:
            examples.append(make_example(model.tok, SYSTEM_PROMPT, parts, e, truncated=True))
            feats.append(it.get("feats"))
    scores = reply_logprobs(model, examples, None if transcript else feats, batch_size)
    table = torch.tensor([s for s, _ in scores]).view(len(items), len(EMOTIONS))
    labels = torch.tensor([it["label"] for it in items])
    return tuple((t.argmax(-1) == labels).sum().item() / max(len(items), 1) for t in (table, table - table.mean(0)))


def distractors(n, k=9, seed=0):
    """For each of n clips, k others: the next k after it in a fixed-seed permutation. Every clip is a
    distractor exactly k times, so no target is favoured by being shown more often."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    where = {c: p for p, c in enumerate(perm)}
    return [[perm[(where[i] + j) % n] for j in range(1, min(k, n - 1) + 1)] for i in range(n)]


def top1(scores):
    """scores (n, 1 + k), column 0 each row's own candidate: the fraction of rows where it beats every
    other. A tie is a miss, so a model that scores everything alike gets 0, not a lucky 1."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    return (scores[:, 0] > scores[:, 1:].max(-1).values).double().mean().item()


@torch.no_grad()
def content_retrieval(model, items, k=9, seed=0, transcript=False, batch_size=16):
    """Did the model hear *what* was said? Each clip's own stage-1 target (item["target"]) and those of
    k other clips are scored as the reply to the stage-1 prompt over the clip (transcript=True: over its
    transcript, the teacher's view: the ceiling); accuracy@1 of the own one. Mean log-likelihood per
    token, so a short continuation does not win for being short. Chance is 1 / (k + 1)."""
    if len(items) < 2:
        raise ValueError(f"content_retrieval: needs at least 2 clips, got {len(items)}")
    others = distractors(len(items), k, seed)
    examples, feats = [], []
    for it, rest in zip(items, others):
        parts = [CONTINUE + it["text"]] if transcript else [CONTINUE, SPEECH]
        for j in [None] + rest:         # the own target first: top1's column 0
            target = it["target"] if j is None else items[j]["target"]
            examples.append(make_example(model.tok, SYSTEM_PROMPT, parts, target, truncated=True))
            feats.append(it.get("feats"))
    scores = reply_logprobs(model, examples, None if transcript else feats, batch_size)
    return top1(torch.tensor([s / max(n, 1) for s, n in scores]).view(len(items), -1))


def untrained(model, seed=0):
    """The same encoder and LLM behind a freshly initialised adapter (same settings): the floor that
    shows what training the adapter bought."""
    a = model.adapter
    with torch.random.fork_rng(devices=[]):      # seeded here, the caller's random state untouched
        torch.manual_seed(seed)
        fresh = Adapter(**a.settings).to(a.fc1.weight.device)
    return SpeechLM(model.encoder, fresh, model.decoder, model.tok, config=model.config).eval()


def print_ser(res, title):
    print(f"\n{title}: free-text accuracy {res['acc']:.1%}, UAR {res['uar']:.1%} over {res['n']} clips "
          f"({res['unknown']} replies named no emotion)" +
          (f"; emotion head accuracy {res['head_acc']:.1%}, UAR {res['head_uar']:.1%}" if "head_acc" in res else ""))
    print("  recall: " + "  ".join(f"{e} {v:.0%}" for e, v in res["recall"].items()))
    print("  confusion (rows: truth; columns: " + " ".join(res["columns"]) + ")")
    for e, row in zip(EMOTIONS, res["confusion"]):
        print(f"  {e:>9} " + " ".join(f"{v:4d}" for v in row))


def pyplot(what):
    """matplotlib's pyplot, drawing to files only; None, with a note that `what` is not drawn, without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {what} (pip install matplotlib)")
        return None
    return plt


def plot_confusion(res, path):
    if (plt := pyplot("confusion-matrix plot")) is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.imshow(res["confusion"], cmap="Blues")
    ax.set_xticks(range(len(res["columns"])), res["columns"], rotation=30)
    ax.set_yticks(range(len(EMOTIONS)), EMOTIONS)
    for i, row in enumerate(res["confusion"]):
        for j, v in enumerate(row):
            ax.text(j, i, v, ha="center", va="center")
    ax.set_xlabel("answer (free text)")
    ax.set_ylabel("truth")
    ax.set_title(f"SER, held-out voices and sentences: {res['acc']:.0%}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def tone_table(model, items, system, instruction, repetition_penalty, max_new_tokens=48):
    """Replies to every held-out sentence in its five emotional versions (one voice per sentence)."""
    groups = defaultdict(dict)
    for it in items:
        key = (it["text"], it.get("voice", ""))
        groups[key][EMOTIONS[it["label"]]] = it
    keys = sorted(k for k, g in groups.items() if len(g) == len(EMOTIONS))
    seen, chosen = set(), []
    for text, voice in keys:        # one voice per sentence keeps the table readable
        if text not in seen:
            seen.add(text)
            chosen.append((text, voice))
    flat = [groups[k][e] for k in chosen for e in EMOTIONS]
    out = replies(model, flat, system, instruction, max_new_tokens, repetition_penalty=repetition_penalty)
    rows = [{"text": k[0], "voice": k[1], **{e: out[i * len(EMOTIONS) + j] for j, e in enumerate(EMOTIONS)}}
            for i, k in enumerate(chosen)]
    differ = sum(r["happy"] != r["sad"] for r in rows) / max(len(rows), 1)
    return rows, differ


def distinct_replies(texts):
    """Distinct reply strings / replies: 1.0 when every clip gets its own reply, 0.2 when the five tones
    of each sentence get one reply between them."""
    return len(set(texts)) / max(len(texts), 1)


def load_vader():
    """VADER's sentiment analyzer, or None (with a note) when vaderSentiment is not installed: the fit
    measures are then reported as None, nothing else changes."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        print("vaderSentiment is not installed: no fit gap (pip install vaderSentiment==3.3.2)")
        return None
    return SentimentIntensityAnalyzer()


def fit_gap(texts, emotions, vader):
    """Do the replies fit the tone? Mean VADER compound sentiment (-1..1) of the replies to happy clips
    minus that of the replies to sad ones; other emotions are left out. Replies that ignore the tone score
    about 0, whether or not they differ. None without VADER or without both a happy and a sad reply."""
    if vader is None:
        return None
    mean = {}
    for e in ("happy", "sad"):
        scores = [vader.polarity_scores(t)["compound"] for t, x in zip(texts, emotions) if x == e]
        if not scores:
            return None
        mean[e] = sum(scores) / len(scores)
    return mean["happy"] - mean["sad"]


def teacher_replies(model, texts, emotions, path, max_new_tokens=48, paper=False):
    """What stage 2 trains toward: the LLM's own replies to each transcript told its emotion (a name in
    EMOTIONS), with the prompt stage 2 makes its targets with (cache.emotion_target_messages, the one
    place it is defined), read from or added to the targets cache at path (JSON lines, cache.make_targets),
    and cut where they loop as the training targets are (cache.trim_repeats)."""
    items = [{"text": t, "emotion": e} for t, e in zip(texts, emotions)]
    recs = cache.make_targets(model, items, path,
                              lambda it: cache.emotion_target_messages(it["text"], it["emotion"], paper=paper),
                              max_new_tokens=max_new_tokens)
    return [cache.trim_repeats(recs[it["target_key"]]["target"])[0] for it in items]


# ---- settings for the report (python evaluate.py --key=value) ----
stage1 = "runs/semantic"
stage2 = "runs/emotion"
out = "runs/demo"
asr_manifest = "speech/asr_test.jsonl"
real_manifest = "speech/real.jsonl"
emo_manifest = "speech/emo_test.jsonl"
other_manifest = "speech/emo_other.jsonl"   # the test sentences by another speech engine, never trained on
ser_manifest = ""               # a SER test set (scripts/ser_corpora.py): only its accuracy and UAR, for stage2
map = {}                        # fold a dataset's labels into the five (as train_emotion.py --map)
device = ""
dtype = "auto"                  # bf16 where the device runs it fast, else fp32
repetition_penalty = REPETITION_PENALTY   # the tone table's replies, decoded as chat.py's (1: plain greedy)
quantize = ""                   # "int8": the LLM's linear layers in int8 weight-only (quantize.py), faster CPU decode
n_stage1_examples = 6
content_clips = 100             # content retrieval: the first clips of asr_manifest (30 moved +-8 points) ...
content_distractors = 9         # ... each against this many other clips' targets (chance 1 / 10)
started = 0                     # run.sh passes its start time, so wall_s covers the whole run


def emotion_items(model, manifest):
    rows = read_manifest(manifest)
    for n, r in enumerate(rows, 1):
        r["label"] = emotion_label(r["emotion"], map, f"{manifest}:{n}")
    return cache.with_features(model, rows)[0]


def content_items(model, manifest, n, run_dir):
    """The first n clips of manifest with their features and stage 1's own target for each: read from the
    run's targets.jsonl (the held-out ones are there already), generated only where missing."""
    rows, n_bad = cache.with_features(model, read_manifest(manifest)[:n])
    targets = cache.make_targets(model, rows, os.path.join(run_dir, "targets.jsonl"),
                                 lambda it: cache.continue_target_messages(it["text"]),
                                 max_new_tokens=model.config.get("max_new_tokens", 48))
    return cache.training_items(rows, targets, lambda row, t: {}, n_bad, manifest)


def load(run_dir):
    model = SpeechLM.from_run(run_dir, device=device or None, dtype=dtype)
    if quantize:
        from quantize import quantize_decoder
        quantize_decoder(model.decoder, quantize)
    return model


def main():
    from configurator import configure
    config = configure(globals(), sys.argv[1:])
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    if ser_manifest:
        model = load(stage2)
        res = ser_eval(model, emotion_items(model, ser_manifest), batch_size=16)   # a 7B release: its memory
        print_ser(res, f"{ser_manifest}, {stage2}")
        path = os.path.join(out, f"ser_{os.path.splitext(os.path.basename(ser_manifest))[0]}.json")
        with open(path, "w") as f:
            json.dump({"manifest": ser_manifest, "run": stage2, **res}, f, indent=2)
        print(f"wrote {path}")
        return
    report = {}
    # Stage 1: the reply to the speech beside the reply to its transcript, real human and held-out synthetic clips.
    m1 = load(stage1)
    s1 = json.load(open(os.path.join(stage1, "summary.json")))
    report.update(ctc_start=s1.get("ctc_start"), ctc_end=s1.get("ctc_end"), kl_start=s1.get("kl_start"), kl_end=s1.get("kl_end"))
    side_by_side = []
    for manifest in (real_manifest, asr_manifest):
        if not os.path.exists(manifest):
            print(f"{manifest} not found: no stage-1 examples from it")
            continue
        items = cache.with_features(m1, read_manifest(manifest)[:n_stage1_examples])[0]
        speech = replies(m1, items, SYSTEM_PROMPT, CONTINUE, 48)
        text = text_replies(m1, [it["text"] for it in items], SYSTEM_PROMPT, CONTINUE, 48)
        side_by_side += [{"set": os.path.basename(manifest), "transcript": it["text"], "speech_reply": a,
                          "text_reply": b} for it, a, b in zip(items, speech, text)]
    # Did stage 1 hear the words? Its own continuation among other clips', beside an untrained adapter (floor)
    # and the LLM reading the transcript (ceiling).
    content = dict(content_acc=None, content_acc_floor=None, content_acc_ceiling=None, content_n=0, content_candidates=0)
    if os.path.exists(asr_manifest):
        items, k = content_items(m1, asr_manifest, content_clips, stage1), content_distractors
        content = dict(content_acc=content_retrieval(m1, items, k),
                       content_acc_floor=content_retrieval(untrained(m1), items, k),
                       content_acc_ceiling=content_retrieval(m1, items, k, transcript=True),
                       content_n=len(items), content_candidates=min(k, len(items) - 1) + 1)
        print(f"content retrieval, own continuation among {content['content_candidates']}: "
              f"stage 1 {content['content_acc']:.1%}, untrained adapter {content['content_acc_floor']:.1%}, "
              f"the LLM reading the transcript {content['content_acc_ceiling']:.1%}")
    # Stage 2 against the stage-1-only baseline, on held-out voices and sentences.
    base_items = emotion_items(m1, emo_manifest)
    base = ser_eval(m1, base_items)
    print_ser(base, "stage 1 only (baseline)")
    oracle = ser_text_oracle(m1, base_items)
    print(f"the LLM told the emotion in words (no speech): free-text accuracy {oracle:.1%}, the ceiling for this LLM")
    closed1, cal1 = ser_closed(m1, base_items)
    closed_ceiling, cal_ceiling = ser_closed(m1, base_items, transcript=True)
    vader = load_vader()
    # the tone table asks what stage 2 was trained to hear (as chat.py): the speech alone, or after the paper's
    # instruction; stage 1 is asked the same, as the baseline of the fit gap
    paper = json.load(open(os.path.join(stage2, "config.json"))).get("paper_prompts", False)
    heard = CONTINUE_HEARD_EMOTION if paper else ""
    tone1 = tone_table(m1, base_items, EMOTION_SYSTEM_PROMPT, heard, repetition_penalty)[0] if vader else []
    del m1
    m2 = load(stage2)
    test = emotion_items(m2, emo_manifest)
    res = ser_eval(m2, test)
    print_ser(res, "stage 2")
    plot_confusion(res, os.path.join(out, "confusion.png"))
    tone, differ = tone_table(m2, test, EMOTION_SYSTEM_PROMPT, heard, repetition_penalty)
    closed, cal = ser_closed(m2, test)
    head_other = (accuracy(head_confusion(m2, emotion_items(m2, other_manifest)))
                  if os.path.exists(other_manifest) else None)
    if head_other is not None:
        print(f"emotion head on another speech engine ({other_manifest}): {head_other:.1%}")
    print(f"closed-set SER (the likeliest of the five label words): stage 2 {closed:.1%}, stage 1 only {closed1:.1%}, "
          f"the LLM told the emotion in words {closed_ceiling:.1%}; calibrated {cal:.1%}, {cal1:.1%}, {cal_ceiling:.1%}")
    # Do the replies fit the tone? The same clips' replies from both stages, and stage 2's own targets for them.
    texts, emos = [r[e] for r in tone for e in EMOTIONS], [e for _ in tone for e in EMOTIONS]
    fit = dict(fit_gap=None, fit_gap_stage1=None, fit_gap_ceiling=None, distinct_replies_ceiling=None)
    if vader:
        teacher = teacher_replies(m2, [r["text"] for r in tone for _ in EMOTIONS], emos,
                                  os.path.join(stage2, "targets.jsonl"), m2.config.get("max_new_tokens", 48), paper)
        fit = dict(fit_gap=fit_gap(texts, emos, vader),
                   fit_gap_stage1=fit_gap([r[e] for r in tone1 for e in EMOTIONS], emos, vader),
                   fit_gap_ceiling=fit_gap(teacher, emos, vader), distinct_replies_ceiling=distinct_replies(teacher))
        print(f"distinct replies: stage 2 {distinct_replies(texts):.0%}, the LLM's own stage-2 targets "
              f"{fit['distinct_replies_ceiling']:.0%}")
        print("fit gap (VADER compound, replies to happy minus sad clips): " +
              ", ".join(f"{k} {v:+.3f}" for k, v in fit.items() if k.startswith("fit") and v is not None))
    peaks = [peak_rss_gb()] + [json.load(open(os.path.join(d, "summary.json"))).get("peak_rss_gb", 0)
                               for d in (stage1, stage2) if os.path.exists(os.path.join(d, "summary.json"))]
    report.update(ser_head_acc=res.get("head_acc"), head_acc_other_engine=head_other, ser_text_acc=res["acc"], ser_text_acc_stage1=base["acc"], ser_text_oracle=oracle,
                  ser_recall=res["recall"], ser_unknown=res["unknown"], ser_confusion=res["confusion"],
                  ser_stage1_recall=base["recall"], tone_differ=differ, ser_closed_acc=closed,
                  ser_closed_acc_stage1=closed1, ser_closed_ceiling=closed_ceiling, ser_closed_calibrated=cal,
                  ser_closed_calibrated_stage1=cal1, ser_closed_calibrated_ceiling=cal_ceiling, **content,
                  distinct_replies=distinct_replies(texts), **fit,
                  wall_s=time.time() - (started or t0), cpu=torch.backends.cpu.get_cpu_capability(),
                  dtype=str(m2.decoder.embed_tokens.weight.dtype).removeprefix("torch."), peak_rss_gb=max(peaks), eval_s=time.time() - t0,
                  stage1_side_by_side=side_by_side, tone=tone, ser_replies=res["replies"][:50], config=config)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    for name, run in (("semantic", stage1), ("emotion", stage2)):
        plot_losses(os.path.join(run, "log.jsonl"), os.path.join(out, f"{name}_loss.png"))
    write_markdown(report, os.path.join(out, "report.md"))
    print(open(os.path.join(out, "report.md")).read())


def plot_losses(log_path, png_path):
    """A run's log.jsonl as curves: one panel per measure (train a line, eval dots), and seconds per training
    step last, which stays flat over a run unless something slows the steps. matplotlib is optional."""
    if (plt := pyplot("loss plot")) is None:
        return False
    rows = [json.loads(r) for r in open(log_path) if r.strip()]
    train = [r for r in rows if r["split"] == "train" and "elapsed" in r]
    for a, b in zip(train, train[1:]):
        b["s_per_step"] = (b["elapsed"] - a["elapsed"]) / (b["step"] - a["step"])
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))} - {"step", "lr", "elapsed",
                                                                                           "s_per_step"})
    keys += ["s_per_step"] if len(train) > 1 else []
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.5 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
            if points:
                ax.plot(*zip(*points), style, label=split, markersize=3)
        ax.set_ylabel(key)
        ax.legend()
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    atomic_write(png_path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return True


def write_markdown(r, path):
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"   # noqa: E731
    signed = lambda x: "n/a" if x is None else f"{x:+.3f}"   # noqa: E731
    lines = ["# BLSP-Emo in the small: report", "",
             f"- stage 1 held-out KL: {r['kl_start']:.3f} at step 0 -> {r['kl_end']:.3f} at the end"
             + (f" (step 0 follows the CTC warm-up: CTC {r['ctc_start']:.3f} -> {r['ctc_end']:.3f})"
                if r.get("ctc_end") is not None else ""),
             f"- emotion head accuracy: {pct(r['ser_head_acc'])} on held-out espeak voices, "
             f"{pct(r.get('head_acc_other_engine'))} on another speech engine (never trained on)",
             f"- free-text SER accuracy: stage 2 {pct(r['ser_text_acc'])}, stage 1 only {pct(r['ser_text_acc_stage1'])}; "
             f"the LLM told the emotion in words: {pct(r['ser_text_oracle'])} (its ceiling)",
             f"- closed-set SER accuracy (the likeliest of the five label words): stage 2 {pct(r['ser_closed_acc'])}, "
             f"stage 1 only {pct(r['ser_closed_acc_stage1'])}; the LLM told the emotion in words: "
             f"{pct(r['ser_closed_ceiling'])} (its ceiling); calibrated (each word's mean score over the clips "
             f"removed): stage 2 {pct(r.get('ser_closed_calibrated'))}, stage 1 only "
             f"{pct(r.get('ser_closed_calibrated_stage1'))}, told {pct(r.get('ser_closed_calibrated_ceiling'))}",
             f"- stage 1 content retrieval (its own continuation the likeliest among {r['content_candidates']}, "
             f"{r['content_n']} held-out clips): {pct(r['content_acc'])}; untrained adapter {pct(r['content_acc_floor'])}, "
             f"the LLM reading the transcript {pct(r['content_acc_ceiling'])}",
             f"- happy and sad replies differ for {pct(r['tone_differ'])} of held-out sentences; "
             f"{pct(r['distinct_replies'])} of the tone table's replies are distinct "
             f"(the LLM's own stage-2 targets for them: {pct(r.get('distinct_replies_ceiling'))})",
             f"- fit gap (VADER compound, replies to happy minus sad clips, -2..2): stage 2 {signed(r['fit_gap'])}, "
             f"stage 1 only {signed(r['fit_gap_stage1'])}; the LLM's own stage-2 targets {signed(r['fit_gap_ceiling'])}",
             f"- wall time {r['wall_s'] / 60:.1f} min on a {r.get('cpu')} CPU ({r.get('dtype')}), "
             f"peak memory {r['peak_rss_gb']:.2f} GB", "",
             "## Stage 1: reply to the speech beside the reply to its transcript", ""]
    for s in r["stage1_side_by_side"]:
        lines += [f"- *{s['transcript']}* ({s['set']})", f"  - speech: {s['speech_reply']}", f"  - text: {s['text_reply']}"]
    lines += ["", "## Stage 2: same words, different tone", ""]
    for t in r["tone"]:
        lines += [f"- *{t['text']}* ({t['voice']})"] + [f"  - {e}: {t[e]}" for e in EMOTIONS]
    lines += ["", "![confusion](confusion.png) ![stage 1 loss](semantic_loss.png) ![stage 2 loss](emotion_loss.png)"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
