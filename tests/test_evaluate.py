# evaluate.py: the label read from a free-text SER reply, and the bookkeeping of the SER and tone tables
# (counts that add up, accuracies that are what the confusion matrix says), on scripted replies and on a
# tiny random SpeechLM with an emotion head.
import pytest
import torch

import evaluate as ev
import tiny
from data import EMOTIONS

# reply -> label. The rule (the authors'): the first of the five emotion words, or an inflection of one, that
# appears as a whole word, case-insensitive; "unknown" when none does.
REPLIES = [
    ("I'd say it sounds sad, not angry", "sad"),          # the first one named is the answer given
    ("Not angry, I'd say sad", "angry"),                  # ... whatever follows it (no negation handling)
    ("The speaker seems surprised!", "surprise"),
    ("Surprise.", "surprise"),
    ("What a surprising tone", "surprise"),
    ("Happiness.", "happy"),
    ("happy", "happy"),
    ("She sounds happier than before", "happy"),
    ("joyful", "happy"),
    ("The emotion is: HAPPY", "happy"),                   # case-insensitive
    ("ANGER, clearly.", "angry"),
    ("He spoke angrily", "angry"),
    ("Sadness", "sad"),
    ("sadly, the tone is angry", "sad"),                  # "sadly" is an inflection of sad
    ("I'm sad😢", "sad"),                                  # a word boundary before an emoji
    ("The tone is neutral.", "neutral"),
    ("Neutrality", "neutral"),
    ("neutral/sad", "neutral"),
    ("unclear", "unknown"),
    ("", "unknown"),
    ("The speaker is calm and relaxed.", "unknown"),      # not one of the five: unknown, counted as wrong
    ("a crusade", "unknown"),                             # word boundaries: "sad" inside a word is not sad
    ("crusade against anger", "angry"),
    ("unhappy", "unknown"),                               # not read as happy (the opposite)
    ("the prosadic melody", "unknown"),
    ("saddled with work", "unknown"),
    ("the surpriseful moment", "unknown"),
    # Decided: "saddening" / "saddened" are not among the inflections evaluate.py lists (sad, sadly,
    # sadness, sadder), so they read as unknown, as every other derived word does; the reply must name
    # the emotion itself. Conservative: it can only lower the free-text accuracy, never inflate it.
    ("It's saddening", "unknown"),
    ("I feel saddened", "unknown"),
]


@pytest.mark.parametrize("reply,label", REPLIES)
def test_extract_label(reply, label):
    assert ev.extract_label(reply) == label
    assert ev.extract_label(reply.upper()) == label and ev.extract_label(reply.lower()) == label


def items(n_per_class, seed=0, lengths=(30, 90)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_per_class * len(EMOTIONS)):
        T = int(torch.randint(*lengths, (1,), generator=g))
        out.append(dict(audio=f"clip{k}.wav", text=f"sentence {k // len(EMOTIONS)}", voice=f"v{k % 2}",
                        label=k % len(EMOTIONS), feats=torch.randn(T, 16, generator=g)))
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    m = tiny.make_models(root / "models")
    run = tiny.make_run(root / "run", m["whisper"], m["llm"], stage="emotion", num_emotions=5)
    from adapter import SpeechLM
    return SpeechLM.from_run(run, device="cpu")


def test_ser_eval_counts_scripted_replies(model, monkeypatch):
    its = items(1)[:5] + items(1, seed=1)[:2]             # labels 0 1 2 3 4 0 1
    scripted = ["It sounds neutral.", "I'd say sad, not happy", "Anger!", "unclear", "surprised", "Neutral", "joy"]
    asked = []

    def fake_replies(m, its_, system, instruction, max_new_tokens, batch_size=16):
        asked.append((system, instruction, len(its_)))
        return scripted
    monkeypatch.setattr(ev, "replies", fake_replies)
    res = ev.ser_eval(model, its, batch_size=3)
    assert asked == [(ev.SYSTEM_PROMPT, ev.SER_QUESTION, 7)]   # the authors' question, every clip once
    cols = EMOTIONS + ["unknown"]
    want = [[0] * 6 for _ in EMOTIONS]
    for it, label in zip(its, ["neutral", "sad", "angry", "unknown", "surprise", "neutral", "happy"]):
        want[it["label"]][cols.index(label)] += 1
    assert res["confusion"] == want and res["columns"] == cols
    assert res["n"] == 7 and res["acc"] == pytest.approx(5 / 7) and res["unknown"] == 1
    assert res["recall"] == pytest.approx({"neutral": 1.0, "happy": 0.5, "angry": 1.0, "sad": 0.0, "surprise": 1.0})
    assert [r["reply"] for r in res["replies"]] == scripted
    assert [r["emotion"] for r in res["replies"]] == [EMOTIONS[it["label"]] for it in its]


def test_text_oracle_tells_the_label_and_counts(model, monkeypatch):
    its = items(1)                                         # labels 0..4, texts "sentence 0"
    asked = []

    def fake_text_replies(m, texts, system, instruction, max_new_tokens, batch_size=16):
        asked.append((system, instruction, texts))
        return ["It is neutral.", "sad", "The tone is angry.", "no idea", "Surprise!"]
    monkeypatch.setattr(ev, "text_replies", fake_text_replies)
    assert ev.ser_text_oracle(model, its) == pytest.approx(3 / 5)
    (system, instruction, texts), = asked
    assert (system, instruction) == (ev.SYSTEM_PROMPT, ev.SER_QUESTION)
    assert texts == [f"sentence 0 (said in a {e} tone)" for e in EMOTIONS]


def test_ser_eval_on_a_tiny_model_is_consistent(model, capsys):
    its = items(2, seed=3)                                 # 10 clips, batches of 4: a ragged last batch
    res = ev.ser_eval(model, its, batch_size=4, max_new_tokens=6)
    conf, n = res["confusion"], len(its)
    assert res["n"] == n and len(conf) == 5 and all(len(row) == 6 for row in conf)
    assert sum(map(sum, conf)) == n and [sum(row) for row in conf] == [2] * 5
    assert res["acc"] == pytest.approx(sum(conf[i][i] for i in range(5)) / n)
    assert res["unknown"] == sum(row[5] for row in conf)
    assert res["recall"] == pytest.approx({e: conf[i][i] / 2 for i, e in enumerate(EMOTIONS)})
    for r, it in zip(res["replies"], its):               # each reply is counted under the label read from it
        assert r["audio"] == it["audio"]
        assert conf[it["label"]][res["columns"].index(ev.extract_label(r["reply"]))] >= 1
    # the emotion head's accuracy: each clip's argmax, computed alone, against its label
    with torch.no_grad():
        pred = [int(model.emotion_logits(*model.speech_embeds([it["feats"]])).argmax()) for it in its]
    assert res["head_acc"] == pytest.approx(sum(p == it["label"] for p, it in zip(pred, its)) / n)
    assert 0 <= res["head_acc"] <= 1
    # the same clips in other batches: the same answers
    again = ev.ser_eval(model, its, batch_size=10, max_new_tokens=6)
    assert again["confusion"] == conf and again["head_acc"] == res["head_acc"]
    ev.print_ser(res, "tiny")
    out = capsys.readouterr().out
    assert f"over {n} clips" in out and f"({res['unknown']} replies named no emotion)" in out
    assert "emotion head" in out and out.count("\n") >= 8


def test_tone_table_pairs_the_five_versions(model, monkeypatch):
    its = [it for it in items(3, seed=4)]
    for it in its:                                         # sentences 0..2, each in the five emotions
        it["voice"] = "v0"
    extra = [dict(it, voice="v1") for it in its[:5]]      # sentence 0 again by another voice: one voice kept
    partial = [dict(it, text="sentence 9") for it in its[:4]]   # only four emotions: left out
    seen = []

    def fake_replies(m, flat, system, instruction, max_new_tokens, batch_size=16):
        seen.append([(it["text"], it["voice"], EMOTIONS[it["label"]]) for it in flat])
        # sentence 1: happy and sad answered alike; the others differ
        return [("same" if it["text"] == "sentence 1" and it["label"] in (1, 3) else f"{it['text']} {it['label']}")
                for it in flat]
    monkeypatch.setattr(ev, "replies", fake_replies)
    rows, differ = ev.tone_table(model, its + extra + partial, ev.EMOTION_SYSTEM_PROMPT, ev.CONTINUE_HEARD_EMOTION)
    assert [(r["text"], r["voice"]) for r in rows] == [("sentence 0", "v0"), ("sentence 1", "v0"), ("sentence 2", "v0")]
    assert seen == [[(f"sentence {s}", "v0", e) for s in range(3) for e in EMOTIONS]]
    assert rows[1]["happy"] == rows[1]["sad"] == "same" and rows[0]["happy"] == "sentence 0 1"
    assert differ == pytest.approx(2 / 3)
