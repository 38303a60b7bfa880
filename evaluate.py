"""How we measure BLSP-Emo: speech emotion recognition (SER) and "same words, different tone".

SER is asked the way the authors evaluate it: the model hears the clip after the question below and
answers in free text; the label is the first of the five emotion words (or their inflections) in the
reply, "unknown" when none appears (counted, and wrong). The emotion head's own accuracy is reported
beside it. The tone test plays every held-out sentence in all five emotions and compares the replies.

    python evaluate.py --stage1=runs/demo/semantic --stage2=runs/demo/emotion --out=runs/demo
"""
import json
import os
import re
import resource
import sys
import time
from collections import defaultdict

import torch

import cache
from data import (CONTINUE, CONTINUE_HEARD_EMOTION, EMOTION_SYSTEM_PROMPT, EMOTIONS, SER_QUESTION, SPEECH,
                  SYSTEM_PROMPT, emotion_label, read_manifest)

# Inflections a free-text reply uses for each label ("she sounds surprised", "anger", "happiness").
_WORDS = {"neutral": r"neutral(?:ity)?", "happy": r"happ(?:y|ier|iness|ily)|joy(?:ful)?",
          "angry": r"angr(?:y|ier|ily)|anger", "sad": r"sad(?:ly|ness|der)?",
          "surprise": r"surpris(?:e|ed|ing|ingly)"}
_LABEL_RE = re.compile(r"\b(" + "|".join(f"(?P<{k}>{v})" for k, v in _WORDS.items()) + r")\b", re.IGNORECASE)


def extract_label(reply):
    """The first emotion word in a free-text reply, as its label; "unknown" when there is none.

    "I'd say it sounds sad, not angry" -> "sad": the first one named is the answer given.
    """
    m = _LABEL_RE.search(reply)
    return next(k for k, v in m.groupdict().items() if v) if m else "unknown"


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # kB on Linux


@torch.no_grad()
def replies(model, items, system, instruction, max_new_tokens, batch_size=16):
    """Greedy replies of the model to each item's clip (its cached encoder features) after an instruction."""
    out = []
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": [instruction, SPEECH]}]
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        new = model.generate([msgs] * len(chunk), feats=[it["feats"] for it in chunk], max_new_tokens=max_new_tokens)
        out += [model.tok.decode(t).strip() for t in new]
    return out


@torch.no_grad()
def text_replies(model, texts, system, instruction, max_new_tokens, batch_size=16):
    """The LLM's replies to the same instruction given the transcript as text (no speech)."""
    out = []
    for i in range(0, len(texts), batch_size):
        convs = [[{"role": "system", "content": system}, {"role": "user", "content": instruction + t}]
                 for t in texts[i:i + batch_size]]
        new = model.generate(convs, max_new_tokens=max_new_tokens)
        out += [model.tok.decode(t).strip() for t in new]
    return out


@torch.no_grad()
def ser_eval(model, items, batch_size=16, max_new_tokens=24):
    """Free-text SER accuracy, per-class recall, confusion (rows: truth, columns: EMOTIONS + unknown),
    and the emotion head's accuracy where the model has one."""
    model.eval()
    texts = replies(model, items, SYSTEM_PROMPT, SER_QUESTION, max_new_tokens, batch_size)
    cols = EMOTIONS + ["unknown"]
    conf = [[0] * len(cols) for _ in EMOTIONS]
    for it, r in zip(items, texts):
        conf[it["label"]][cols.index(extract_label(r))] += 1
    n = len(items)
    res = {"n": n, "acc": sum(conf[i][i] for i in range(len(EMOTIONS))) / max(n, 1),
           "recall": {e: conf[i][i] / max(sum(conf[i]), 1) for i, e in enumerate(EMOTIONS)},
           "unknown": sum(row[-1] for row in conf), "confusion": conf, "columns": cols,
           "replies": [{"audio": it["audio"], "emotion": EMOTIONS[it["label"]], "reply": r} for it, r in zip(items, texts)]}
    if model.emotion_head is not None:
        hits = 0
        for i in range(0, n, batch_size):
            chunk = items[i:i + batch_size]
            emb, lengths = model.speech_embeds([it["feats"] for it in chunk])
            pred = model.emotion_logits(emb, lengths).argmax(-1).tolist()
            hits += sum(p == it["label"] for p, it in zip(pred, chunk))
        res["head_acc"] = hits / max(n, 1)
    return res


@torch.no_grad()
def ser_text_oracle(model, items, batch_size=16, max_new_tokens=24):
    """A ceiling for free-text SER with this LLM: the same question over the transcript with the emotion
    *told* in words ("... (said in a sad tone)"), no speech. An LLM that cannot name an emotion it is
    told cannot be expected to name one it hears."""
    texts = [f"{it['text']} (said in a {EMOTIONS[it['label']]} tone)" for it in items]
    answers = text_replies(model, texts, SYSTEM_PROMPT, SER_QUESTION, max_new_tokens, batch_size)
    return sum(extract_label(a) == EMOTIONS[it["label"]] for a, it in zip(answers, items)) / max(len(items), 1)


def print_ser(res, title):
    print(f"\n{title}: free-text accuracy {res['acc']:.1%} over {res['n']} clips "
          f"({res['unknown']} replies named no emotion)" +
          (f"; emotion head {res['head_acc']:.1%}" if "head_acc" in res else ""))
    print("  recall: " + "  ".join(f"{e} {v:.0%}" for e, v in res["recall"].items()))
    print("  confusion (rows: truth; columns: " + " ".join(res["columns"]) + ")")
    for e, row in zip(EMOTIONS, res["confusion"]):
        print(f"  {e:>9} " + " ".join(f"{v:4d}" for v in row))


def plot_confusion(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no confusion-matrix plot (pip install matplotlib)")
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


def tone_table(model, items, system, instruction, max_new_tokens=48):
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
    out = replies(model, flat, system, instruction, max_new_tokens)
    rows = [{"text": k[0], "voice": k[1], **{e: out[i * len(EMOTIONS) + j] for j, e in enumerate(EMOTIONS)}}
            for i, k in enumerate(chosen)]
    differ = sum(r["happy"] != r["sad"] for r in rows) / max(len(rows), 1)
    return rows, differ


# ---- settings for the report (python evaluate.py --key=value) ----
stage1 = "runs/semantic"
stage2 = "runs/emotion"
out = "runs/demo"
asr_manifest = "speech/asr_test.jsonl"
real_manifest = "speech/real.jsonl"
emo_manifest = "speech/emo_test.jsonl"
map = {}                        # fold a dataset's labels into the five (as train_emotion.py --map)
device = ""
dtype = "bf16"
n_stage1_examples = 6
started = 0                     # run.sh passes its start time, so wall_s covers the whole run


def emotion_items(model, manifest):
    rows = read_manifest(manifest)
    for n, r in enumerate(rows, 1):
        r["label"] = emotion_label(r["emotion"], map, f"{manifest}:{n}")
    return cache.with_features(model, rows)[0]


def main():
    from adapter import SpeechLM
    from configurator import configure
    config = configure(globals(), sys.argv[1:])
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    report = {}
    # Stage 1: the reply to the speech beside the reply to its transcript, real human and held-out synthetic clips.
    m1 = SpeechLM.from_run(stage1, device=device or None, dtype=dtype)
    s1 = json.load(open(os.path.join(stage1, "summary.json")))
    report.update(kl_start=s1.get("kl_start"), kl_end=s1.get("kl_end"))
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
    # Stage 2 against the stage-1-only baseline, on held-out voices and sentences.
    base_items = emotion_items(m1, emo_manifest)
    base = ser_eval(m1, base_items)
    print_ser(base, "stage 1 only (baseline)")
    oracle = ser_text_oracle(m1, base_items)
    print(f"the LLM told the emotion in words (no speech): free-text accuracy {oracle:.1%}, the ceiling for this LLM")
    del m1
    m2 = SpeechLM.from_run(stage2, device=device or None, dtype=dtype)
    test = emotion_items(m2, emo_manifest)
    res = ser_eval(m2, test)
    print_ser(res, "stage 2")
    plot_confusion(res, os.path.join(out, "confusion.png"))
    tone, differ = tone_table(m2, test, EMOTION_SYSTEM_PROMPT, CONTINUE_HEARD_EMOTION)
    peaks = [peak_rss_gb()] + [json.load(open(os.path.join(d, "summary.json"))).get("peak_rss_gb", 0)
                               for d in (stage1, stage2) if os.path.exists(os.path.join(d, "summary.json"))]
    report.update(ser_head_acc=res.get("head_acc"), ser_text_acc=res["acc"], ser_text_acc_stage1=base["acc"], ser_text_oracle=oracle,
                  ser_recall=res["recall"], ser_unknown=res["unknown"], ser_confusion=res["confusion"],
                  ser_stage1_recall=base["recall"], tone_differ=differ,
                  wall_s=time.time() - (started or t0), peak_rss_gb=max(peaks), eval_s=time.time() - t0,
                  stage1_side_by_side=side_by_side, tone=tone, ser_replies=res["replies"][:50], config=config)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    write_markdown(report, os.path.join(out, "report.md"))
    print(open(os.path.join(out, "report.md")).read())


def write_markdown(r, path):
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"   # noqa: E731
    lines = ["# BLSP-Emo in the small: report", "",
             f"- stage 1 held-out KL: {r['kl_start']:.3f} at step 0 -> {r['kl_end']:.3f} at the end",
             f"- emotion head accuracy: {pct(r['ser_head_acc'])}",
             f"- free-text SER accuracy: stage 2 {pct(r['ser_text_acc'])}, stage 1 only {pct(r['ser_text_acc_stage1'])}; "
             f"the LLM told the emotion in words: {pct(r['ser_text_oracle'])} (its ceiling)",
             f"- happy and sad replies differ for {pct(r['tone_differ'])} of held-out sentences",
             f"- wall time {r['wall_s'] / 60:.1f} min, peak memory {r['peak_rss_gb']:.2f} GB", "",
             "## Stage 1: reply to the speech beside the reply to its transcript", ""]
    for s in r["stage1_side_by_side"]:
        lines += [f"- *{s['transcript']}* ({s['set']})", f"  - speech: {s['speech_reply']}", f"  - text: {s['text_reply']}"]
    lines += ["", "## Stage 2: same words, different tone", ""]
    for t in r["tone"]:
        lines += [f"- *{t['text']}* ({t['voice']})"] + [f"  - {e}: {t[e]}" for e in EMOTIONS]
    lines += ["", "![confusion](confusion.png) ![stage 1 loss](semantic/loss.png) ![stage 2 loss](emotion/loss.png)"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
