# evaluate.py: the label read from a free-text SER reply, and the bookkeeping of the SER and tone tables
# (counts that add up, accuracies that are what the confusion matrix says), on scripted replies and on a
# tiny random SpeechLM with an emotion head. Then the likelihood-scored measures (closed-set SER, content
# retrieval) on scorers whose answers are planted, reply scoring against the decoder's own numbers, and
# the reply measures (distinct replies, VADER fit gap) on texts of known valence.
import json
import os
import sys

import pytest
import torch

import cache
import data
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
    assert cache.extract_label(reply) == label
    assert cache.extract_label(reply.upper()) == label and cache.extract_label(reply.lower()) == label


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
    assert res["uar"] == pytest.approx(3.5 / 5)
    assert [r["reply"] for r in res["replies"]] == scripted
    assert [r["emotion"] for r in res["replies"]] == [EMOTIONS[it["label"]] for it in its]


def test_accuracy_and_uar_on_planted_answers():
    # 8 neutral clips and 2 happy ones, every one answered "neutral": accuracy 80%, but UAR 50% (neutral 1, happy 0)
    conf = [[0] * 6 for _ in EMOTIONS]
    conf[0][0], conf[1][0] = 8, 2
    assert ev.accuracy(conf) == pytest.approx(0.8) and ev.uar(conf) == pytest.approx(0.5)
    # a class with no clips does not count (CREMA-D has no surprise); "unknown" answers (last column) are misses
    conf = [[3, 1, 0, 0, 0, 0], [0, 2, 0, 0, 0, 2], [0] * 6, [1, 0, 0, 3, 0, 0], [0] * 6]
    assert ev.accuracy(conf) == pytest.approx(8 / 12) and ev.uar(conf) == pytest.approx((3 / 4 + 2 / 4 + 3 / 4) / 3)
    assert ev.accuracy([[0] * 6 for _ in EMOTIONS]) == 0.0 and ev.uar([[0] * 6 for _ in EMOTIONS]) == 0.0


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
    assert texts == [f"sentence 0 (said in {a} tone)" for a in ("a neutral", "a happy", "an angry", "a sad", "a surprised")]


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
        assert conf[it["label"]][res["columns"].index(cache.extract_label(r["reply"]))] >= 1
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

    def fake_replies(m, flat, system, instruction, max_new_tokens, batch_size=16, repetition_penalty=1.0):
        seen.append([(it["text"], it["voice"], EMOTIONS[it["label"]], repetition_penalty) for it in flat])
        # sentence 1: happy and sad answered alike; the others differ
        return [("same" if it["text"] == "sentence 1" and it["label"] in (1, 3) else f"{it['text']} {it['label']}")
                for it in flat]
    monkeypatch.setattr(ev, "replies", fake_replies)
    rows, differ = ev.tone_table(model, its + extra + partial, ev.EMOTION_SYSTEM_PROMPT, ev.CONTINUE_HEARD_EMOTION, 1.3)
    assert [(r["text"], r["voice"]) for r in rows] == [("sentence 0", "v0"), ("sentence 1", "v0"), ("sentence 2", "v0")]
    assert seen == [[(f"sentence {s}", "v0", e, 1.3) for s in range(3) for e in EMOTIONS]]   # decoded as asked
    assert rows[1]["happy"] == rows[1]["sad"] == "same" and rows[0]["happy"] == "sentence 0 1"
    assert differ == pytest.approx(2 / 3)


# ---- reply scoring, closed-set SER, content retrieval, distinct replies, fit gap

def split(tok, example):
    """A make_example row -> (prompt ids, reply text): what a scorer is asked about."""
    ids, labels = example
    start = next(i for i, t in enumerate(labels) if t != data.IGNORE)
    return ids[:start], tok.decode(ids[start:])


def test_reply_logprobs_is_the_decoders_own_likelihood(model):
    # text rows: against one plain decoder forward per row (no splice, no batching, no gathering)
    ex = [cache.make_example(model.tok, data.SYSTEM_PROMPT, [data.CONTINUE + t], r, truncated=tr)
          for t, r, tr in (("the cat", "sat on the mat.", True), ("hello", "world", False), ("a mat", "the cat sat", True))]
    got = ev.reply_logprobs(model, ex, batch_size=2)      # a ragged last batch
    for (ids, labels), (s, n) in zip(ex, got):
        with torch.no_grad():
            lp = model.decoder(torch.tensor([ids]))[0].log_softmax(-1)
        want = [lp[i - 1, t].item() for i, t in enumerate(labels) if t != data.IGNORE]
        assert n == len(want) and s == pytest.approx(sum(want), abs=1e-4)
    n_tokens = [len(model.tok.encode(r)) for r in ("sat on the mat.", "world", "the cat sat")]
    n_tokens[1] += len(model.tok.closing_ids)              # not truncated: the closing tokens are scored too
    assert [n for _, n in got] == n_tokens
    # speech rows: each example alone == all in one batch (clips of different lengths: padding must not leak)
    its = items(1, seed=5)
    sx = [cache.make_example(model.tok, data.SYSTEM_PROMPT, [data.CONTINUE, data.SPEECH], f"the cat {k}", truncated=True)
          for k in range(len(its))]
    feats = [it["feats"] for it in its]
    alone = [ev.reply_logprobs(model, [e], [f])[0] for e, f in zip(sx, feats)]
    batch = ev.reply_logprobs(model, sx, feats, batch_size=5)
    assert [n for _, n in batch] == [n for _, n in alone]
    assert [s for s, _ in batch] == pytest.approx([s for s, _ in alone], abs=1e-4)
    assert all(s < 0 for s, _ in batch)
    # one clip, several replies (its prompt run once, copied to each): the training path's numbers, reply by reply
    shared = [cache.make_example(model.tok, data.SYSTEM_PROMPT, [data.CONTINUE, data.SPEECH], r, truncated=True)
              for r in ("the cat", "a mat sat on the cat", "hello")]
    got = ev.reply_logprobs(model, shared + sx[:2], [feats[0]] * 3 + feats[:2], batch_size=4)
    for e, f, (s, n) in zip(shared + sx[:2], [feats[0]] * 3 + feats[:2], got):
        with torch.no_grad():
            r = model.response_logits([e], [f])
        lp = r["logits"].log_softmax(-1).gather(-1, r["targets"][:, None])
        assert n == len(r["targets"]) and s == pytest.approx(lp.sum().item(), abs=1e-4)


def test_ser_closed_picks_the_likeliest_label_word(model, monkeypatch):
    its = items(2, seed=6)                                 # 10 clips, labels 0..4 twice
    g = torch.Generator().manual_seed(7)
    table = torch.randn(len(its), len(EMOTIONS), generator=g)   # the total log-likelihood of each label word
    for i in (0, 1, 2, 3):                                 # four planted hits; the rest wherever the table says
        table[i, its[i]["label"]] = 5.0
    # clip 4 is "surprise" (3 tokens here): the likeliest per token, but "neutral" (1 token) has the larger total
    table[4] = torch.tensor([-2.0, -10.0, -10.0, -10.0, -3.0])
    seen = []

    def fake(m, examples, feats=None, batch_size=16):
        out = []
        for k, ex in enumerate(examples):
            prompt, reply = split(m.tok, ex)
            clip = k // len(EMOTIONS)
            n = len(m.tok.encode(reply))
            seen.append((prompt, reply, None if feats is None else feats[k] is its[clip]["feats"]))
            out.append((table[clip, EMOTIONS.index(reply)].item(), n))
        return out
    monkeypatch.setattr(ev, "reply_logprobs", fake)
    want = sum(int(table[i].argmax()) == it["label"] for i, it in enumerate(its)) / len(its)
    by_mean = sum(int(max(range(5), key=lambda j: table[i, j] / len(model.tok.encode(EMOTIONS[j])))) == it["label"]
                  for i, it in enumerate(its)) / len(its)
    assert want >= 0.4 and want != by_mean                 # the table tells a total from a per-token mean
    assert ev.ser_closed(model, its)[0] == pytest.approx(want)
    speech_prompt = model.tok.encode_chat([{"role": "system", "content": ev.SYSTEM_PROMPT},
                                           {"role": "user", "content": [ev.SER_QUESTION, ev.SPEECH]}])
    assert [s[1] for s in seen] == EMOTIONS * len(its)     # the bare label words, no closing tokens
    assert all(p == speech_prompt and own for p, _, own in seen)
    # the ceiling: the transcript with the emotion told, no speech
    seen.clear()
    assert ev.ser_closed(model, its, transcript=True)[0] == pytest.approx(want)
    for k, (p, _, feats_given) in enumerate(seen):
        it = its[k // 5]
        assert feats_given is None
        word = EMOTIONS[it["label"]].replace("surprise", "surprised")
        user = ev.SER_QUESTION + f"{it['text']} (said in {'an' if word == 'angry' else 'a'} {word} tone)"
        assert p == model.tok.encode_chat([{"role": "system", "content": ev.SYSTEM_PROMPT}, {"role": "user", "content": user}])


def test_ser_closed_calibration_removes_the_label_prior(model, monkeypatch):
    # every clip hears its own label (+1 over noise of 0.1), but the LLM likes "neutral" 10 more whatever it hears:
    # the raw answer is always neutral (right for the 2 neutral clips of 10); calibrated, all 10 are right
    its = items(2, seed=6)
    g = torch.Generator().manual_seed(9)
    table = 0.1 * torch.rand(len(its), len(EMOTIONS), generator=g)
    table[:, EMOTIONS.index("neutral")] += 10.0
    for i, it in enumerate(its):
        table[i, it["label"]] += 1.0
    monkeypatch.setattr(ev, "reply_logprobs", lambda m, examples, feats=None, batch_size=16: [
        (table[k // len(EMOTIONS), k % len(EMOTIONS)].item(), 1) for k in range(len(examples))])
    assert ev.ser_closed(model, its) == pytest.approx((0.2, 1.0))


def test_ser_closed_on_a_tiny_model(model):
    its = items(1, seed=8)
    acc, cal = ev.ser_closed(model, its, batch_size=7)      # batches split clips' five rows apart
    for a in (acc, cal):
        assert 0 <= a <= 1 and round(a * len(its), 6) == int(round(a * len(its)))
    assert ev.ser_closed(model, its, batch_size=50) == (acc, cal)
    assert all(0 <= a <= 1 for a in ev.ser_closed(model, its, transcript=True))


def test_distractors_are_fair_and_fixed():
    d = ev.distractors(30, 9, seed=0)
    assert d == ev.distractors(30, 9, seed=0) and d != ev.distractors(30, 9, seed=1)
    assert all(len(row) == 9 == len(set(row)) and i not in row for i, row in enumerate(d))
    counts = [sum(j in row for row in d) for j in range(30)]
    assert counts == [9] * 30                              # every target shown as a distractor equally often
    assert ev.distractors(4, 9) and all(sorted(row + [i]) == [0, 1, 2, 3] for i, row in enumerate(ev.distractors(4, 9)))


def test_top1_counts_strict_wins():
    scores = [[-1.0, -2.0, -3.0],     # own first: hit
              [-2.0, -1.0, -3.0],     # another wins: miss
              [-1.0, -1.0, -5.0],     # tie: miss
              [0.5, 0.4, 0.49]]       # hit
    assert ev.top1(scores) == pytest.approx(0.5)
    assert ev.top1([[1.0, 1.0, 1.0]] * 3) == 0.0


def test_content_retrieval_ranks_by_mean_log_likelihood(model, monkeypatch):
    n = 8
    g = torch.Generator().manual_seed(9)
    its = [dict(text=f"the cat {k}", target="the mat. " * (1 + k % 4) + str(k), feats=torch.randn(20 + k, 16, generator=g))
           for k in range(n)]
    mean = torch.randn(n, n, generator=g)                  # mean log-likelihood of clip j's target for clip i
    for i in (0, 3, 5):
        mean[i, i] = 4.0                                   # planted: the own continuation is the likeliest
    mean[6, 6] = mean[6].max()                             # a tie with the best distractor: a miss
    others = ev.distractors(n, 3)
    seen = []

    def fake(m, examples, feats=None, batch_size=16):
        out = []
        for k, ex in enumerate(examples):
            prompt, reply = split(m.tok, ex)
            i, j = k // 4, int(reply.rsplit(" ", 1)[-1].rsplit(".", 1)[-1])
            assert reply == its[j]["target"]               # the candidate itself, no closing tokens
            seen.append((i, j, prompt, feats is not None and feats[k] is its[i]["feats"]))
            tokens = len(m.tok.encode(reply))
            out.append((mean[i, j].item() * tokens, tokens))
        return out
    monkeypatch.setattr(ev, "reply_logprobs", fake)
    want = ev.top1([[mean[i, i]] + [mean[i, j] for j in others[i]] for i in range(n)])
    assert want == pytest.approx(3 / n)
    assert ev.content_retrieval(model, its, k=3) == pytest.approx(want)
    assert [(i, j) for i, j, _, _ in seen] == [(i, j) for i in range(n) for j in [i] + others[i]]
    speech_prompt = model.tok.encode_chat([{"role": "system", "content": ev.SYSTEM_PROMPT},
                                           {"role": "user", "content": [ev.CONTINUE, ev.SPEECH]}])
    assert all(p == speech_prompt and own for _, _, p, own in seen)
    seen.clear()
    assert ev.content_retrieval(model, its, k=3, transcript=True) == pytest.approx(want)
    assert all(p == model.tok.encode_chat(cache.continue_target_messages(its[i]["text"])) and not own for i, _, p, own in seen)


def test_content_retrieval_on_a_tiny_model(model):
    g = torch.Generator().manual_seed(10)
    its = [dict(text=f"the cat sat {k}", target=t, feats=torch.randn(25 + 3 * k, 16, generator=g))
           for k, t in enumerate(["on the mat.", "hello world.", "the cat sat on the mat.", "hello."])]
    for kw in (dict(), dict(transcript=True)):
        acc = ev.content_retrieval(model, its, k=9, **kw)  # k above n - 1: every other clip
        assert 0 <= acc <= 1 and round(acc * 4, 6) == int(round(acc * 4))
        assert ev.content_retrieval(model, its, k=9, batch_size=3, **kw) == acc
    with pytest.raises(ValueError, match="at least 2"):
        ev.content_retrieval(model, its[:1])
    # the floor: the same encoder and LLM behind a fresh adapter, the same one for the same seed
    trained = {n: p.clone() for n, p in model.adapter.state_dict().items()}
    a, b, c = ev.untrained(model), ev.untrained(model), ev.untrained(model, seed=1)
    assert a.decoder is model.decoder and a.encoder is model.encoder and a.adapter is not model.adapter
    assert a.adapter.settings == model.adapter.settings
    assert torch.equal(a.adapter.fc1.weight, b.adapter.fc1.weight)
    assert not torch.equal(a.adapter.fc1.weight, c.adapter.fc1.weight)
    assert all(torch.equal(p, trained[n]) for n, p in model.adapter.state_dict().items())   # left as it was
    state = torch.get_rng_state()
    ev.untrained(model)
    assert torch.equal(torch.get_rng_state(), state)      # the caller's random state too
    assert 0 <= ev.content_retrieval(a, its) <= 1


def test_distinct_replies():
    assert ev.distinct_replies(["a", "b", "a", "c"]) == pytest.approx(0.75)
    assert ev.distinct_replies(["same"] * 5) == pytest.approx(0.2)
    assert ev.distinct_replies(["A", "a", "a "]) == 1.0    # exact strings: the table shows them as they are
    assert ev.distinct_replies([]) == 0.0


BRIGHT = ["What a wonderful day, I love it!", "That is great news, congratulations!", "I am so happy and excited for you."]
DARK = ["That is terrible, I am so sorry.", "This is awful and sad.", "I hate how painful and hopeless this feels."]


def test_fit_gap_reads_the_valence_of_happy_and_sad_replies():
    vader = ev.load_vader()
    assert vader is not None                               # requirements.txt installs it
    emos = ["happy"] * 3 + ["sad"] * 3
    gap = ev.fit_gap(BRIGHT + DARK, emos, vader)
    assert gap > 0.5 and ev.fit_gap(DARK + BRIGHT, emos, vader) == pytest.approx(-gap)
    # replies to the other emotions are left out, whatever they say
    assert ev.fit_gap(BRIGHT + DARK + DARK, emos + ["neutral"] * 3, vader) == pytest.approx(gap)
    # the gap is the difference of the two means
    c = [vader.polarity_scores(t)["compound"] for t in BRIGHT + DARK]
    assert gap == pytest.approx(sum(c[:3]) / 3 - sum(c[3:]) / 3)
    assert ev.fit_gap(["The train leaves at noon."] * 2, ["happy", "sad"], vader) == pytest.approx(0.0)
    assert ev.fit_gap(BRIGHT, ["happy"] * 3, vader) is None   # no sad reply: no gap


def test_no_vader_means_no_fit_gap(monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)   # import fails as if not installed
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    vader = ev.load_vader()
    assert vader is None and "vaderSentiment is not installed" in capsys.readouterr().out
    assert ev.fit_gap(BRIGHT + DARK, ["happy"] * 3 + ["sad"] * 3, vader) is None


def test_teacher_replies_use_the_stage2_prompt_and_its_cache(model, monkeypatch, tmp_path):
    asked = []

    def emotion_target_messages(text, emotion, paper=False):   # stands in for cache.py's (the one prompt builder)
        asked.append((text, emotion, paper))
        return [{"role": "system", "content": ev.EMOTION_SYSTEM_PROMPT},
                {"role": "user", "content": f"Continue in a {emotion} tone{'!' if paper else ''}: {text}"}]
    monkeypatch.setattr(cache, "emotion_target_messages", emotion_target_messages, raising=False)
    texts, emos = ["the cat sat", "the cat sat", "hello world"], ["happy", "sad", "happy"]
    path = str(tmp_path / "targets.jsonl")
    got = ev.teacher_replies(model, texts, emos, path, max_new_tokens=5)
    assert asked == [(t, e, False) for t, e in zip(texts, emos)] and len(got) == 3 and all(got)
    want = [model.tok.decode(model.generate(emotion_target_messages(t, e), max_new_tokens=5)[0]).strip()
            for t, e in zip(texts, emos)]
    assert got == [cache.trim_repeats(w)[0] for w in want]   # the LLM's own greedy reply, as training cuts it
    # a second call reads the cache: nothing is generated

    def generate(*args, **kwargs):
        raise RuntimeError("regenerated a cached target")
    monkeypatch.setattr(model.decoder, "generate", generate)
    assert ev.teacher_replies(model, texts, emos, path, max_new_tokens=5) == got
    llm = model.config["llm"]   # the same LLM folder named another way: the same targets
    monkeypatch.setitem(model.config, "llm", os.path.relpath(llm) if os.path.isabs(llm) else os.path.abspath(llm))
    assert ev.teacher_replies(model, texts, emos, path, max_new_tokens=5) == got
    monkeypatch.setitem(model.config, "llm", llm + "-other")
    with pytest.raises(RuntimeError, match="regenerated"):   # another LLM's targets are not these
        ev.teacher_replies(model, texts, emos, path, max_new_tokens=5)
    monkeypatch.setitem(model.config, "llm", llm)
    with pytest.raises(RuntimeError, match="regenerated"):   # targets of another length are other targets
        ev.teacher_replies(model, texts, emos, path, max_new_tokens=6)
    asked.clear()
    with pytest.raises(RuntimeError, match="regenerated"):   # the paper's prompt is another prompt: not cached
        ev.teacher_replies(model, texts, emos, path, max_new_tokens=5, paper=True)
    assert asked and all(p for _, _, p in asked)


def test_loss_plot_and_its_optional_matplotlib(tmp_path, monkeypatch, capsys):
    """The curves of a run's log with seconds per step as the last panel; without matplotlib, a note and no file."""
    import matplotlib.pyplot as plt
    log = tmp_path / "log.jsonl"
    rows = [dict(step=s, split="train", loss=1 / s, elapsed=2.0 * s) for s in (10, 20, 30)] + [dict(step=30, split="eval", kl=0.3)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    panels = []
    monkeypatch.setattr(plt.Axes, "set_ylabel", lambda ax, label: panels.append(label))
    assert ev.plot_losses(log, tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 1000
    assert panels == ["kl", "loss", "s_per_step"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert not ev.plot_losses(log, tmp_path / "b.png") and not (tmp_path / "b.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out
