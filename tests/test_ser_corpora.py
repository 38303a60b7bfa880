# scripts/ser_corpora.py: each builder on a tiny fake copy of its corpus, made here in the corpus's own layout
# (folders, file names, label-file and transcript lines as the corpus writes them); then evaluate.py on such a
# manifest, with planted replies: the accuracy and the UAR it prints are the known answer.
import json
import os

import pytest
import torch

import evaluate as ev
import ser_corpora as sc
import tiny


def touch(path, seconds=0.0, seed=0):
    """A clip at path: a short chirp as 16-bit wav (or an empty placeholder for a file that is never decoded)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if seconds:
        tiny.write_wav(path, tiny.chirp(seconds, seed=seed))
    else:
        open(path, "wb").close()
    return str(path)


def names(rows):
    return [os.path.basename(r["audio"]) for r in rows]


def test_ravdess(tmp_path):
    speech = tmp_path / "RAVDESS" / "Audio_Speech_Actors_01-24"
    for actor in ("01", "02"):
        for emo in ("01", "02", "03", "04", "05", "06", "07", "08"):   # neutral calm happy sad angry fear disgust surprise
            touch(speech / f"Actor_{actor}" / f"03-01-{emo}-01-0{int(actor)}-01-{actor}.wav")
    touch(tmp_path / "RAVDESS" / "Audio_Song_Actors_01-24" / "Actor_01" / "03-02-03-01-01-01-01.wav")   # song
    touch(speech / "Actor_01" / "01-01-03-01-01-01-01.mp4")                   # the audio-visual release's video
    touch(speech / "Actor_01" / "._03-01-03-01-01-01-01.wav")                 # a macOS resource fork
    rows, dropped = sc.ravdess(str(tmp_path / "RAVDESS"))
    kept = ("01", "03", "04", "05", "08")
    assert names(rows) == [f"03-01-{e}-01-0{int(a)}-01-{a}.wav" for a in ("01", "02") for e in kept]
    assert [r["emotion"] for r in rows] == ["neutral", "happy", "sad", "angry", "surprise"] * 2
    assert [r["label"] for r in rows][:5] == ["neutral", "happy", "sad", "angry", "surprised"]
    assert rows[0]["text"] == "Kids are talking by the door" and rows[5]["text"] == "Dogs are sitting by the door"
    assert rows[5]["speaker"] == "Actor_02" and rows[0]["corpus"] == "ravdess" and os.path.isabs(rows[0]["audio"])
    assert dropped == {"calm": 2, "fearful": 2, "disgust": 2, "song": 1}


def test_cremad(tmp_path):
    wav = tmp_path / "CREMA-D" / "AudioWAV"
    for n in ("1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1002_TIE_NEU_XX", "1002_ITS_SAD_LO", "1003_WSI_DIS_MD",
              "1003_TSI_FEA_XX"):
        touch(wav / f"{n}.wav")
    touch(tmp_path / "CREMA-D" / "AudioMP3" / "1001_DFA_ANG_XX.mp3")
    rows, dropped = sc.cremad(str(tmp_path / "CREMA-D"))
    assert names(rows) == ["1001_DFA_ANG_XX.wav", "1001_IEO_HAP_HI.wav", "1002_ITS_SAD_LO.wav", "1002_TIE_NEU_XX.wav"]
    assert [(r["emotion"], r["speaker"], r["text"]) for r in rows] == [
        ("angry", "1001", "Don't forget a jacket."), ("happy", "1001", "It's eleven o'clock."),
        ("sad", "1002", "I think I've seen this before."), ("neutral", "1002", "That is exactly what happened.")]
    assert dropped == {"DIS": 1, "FEA": 1}   # CREMA-D has no surprise


EMO_EVALUATION = """% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[6.2901 - 8.2357]\t{d}_F000\tneu\t[2.5000, 2.5000, 2.5000]
C-E2:\tNeutral;\t()
C-E3:\tNeutral;\t()
A-E3:\tval 3; act 2; dom  2;\t()

[10.0100 - 11.3925]\t{d}_M000\texc\t[3.5000, 3.5000, 3.0000]
C-E1:\tExcited;\tHappiness;\t()

[14.8872 - 18.0175]\t{d}_F001\tfru\t[2.0000, 3.5000, 3.5000]
C-E2:\tFrustration;\t()

[19.2900 - 20.7875]\t{d}_M001\txxx\t[2.5000, 2.5000, 2.5000]

[21.1000 - 23.0000]\t{d}_F002\tsur\t[3.0000, 4.0000, 3.0000]

[24.0000 - 26.5000]\t{d}_M002\tang\t[1.5000, 4.0000, 4.0000]

[27.0000 - 28.0000]\t{d}_F003\tsad\t[1.5000, 2.0000, 2.0000]
"""
TRANSCRIPTION = """{d}_F000 [006.2901-008.2357]: Excuse me.
{d}_M000 [010.0100-011.3925]: Do you have your forms?
{d}_F001 [014.8872-018.0175]: Yeah.
{d}_M001 [019.2900-020.7875]: Let me see them.
{d}_F002 [021.1000-023.0000]: Oh! Really?
{d}_M002 [024.0000-026.5000]: I've been standing here for two hours.
M: [LAUGHTER]
"""


TRAIN = ((1, "Ses01F_impro01"), (2, "Ses02M_impro03"), (3, "Ses03F_script01_1"), (4, "Ses04M_impro05"))


def make_iemocap(root):
    for n, dialog in TRAIN + ((5, "Ses05F_impro01"), (5, "Ses05M_script02_1")):
        s = root / "IEMOCAP_full_release" / f"Session{n}"
        (s / "dialog" / "EmoEvaluation" / "Categorical").mkdir(parents=True, exist_ok=True)
        (s / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text(EMO_EVALUATION.format(d=dialog))
        (s / "dialog" / "EmoEvaluation" / "Categorical" / f"{dialog}_e2_cat.txt").write_text(
            f"{dialog}_F000 :Neutral; ()\n")
        (s / "dialog" / "transcriptions").mkdir(parents=True, exist_ok=True)
        (s / "dialog" / "transcriptions" / f"{dialog}.txt").write_text(TRANSCRIPTION.format(d=dialog))
        for turn in ("F000", "M000", "F001", "M001", "F002", "M002", "F003"):
            if not (dialog == "Ses05M_script02_1" and turn == "M002"):   # one labelled turn without its clip
                touch(s / "sentences" / "wav" / dialog / f"{dialog}_{turn}.wav")


def test_iemocap(tmp_path):
    make_iemocap(tmp_path)
    rows, dropped = sc.iemocap(str(tmp_path), "test")   # the parent folder works too
    kept = ("F000", "M000", "F002", "M002", "F003")
    want = [f"{d}_{t}.wav" for d in ("Ses05F_impro01", "Ses05M_script02_1") for t in kept]
    want.remove("Ses05M_script02_1_M002.wav")
    assert names(rows) == want
    assert [(r["emotion"], r["label"]) for r in rows[:5]] == [
        ("neutral", "neu"), ("happy", "exc"), ("surprise", "sur"), ("angry", "ang"), ("sad", "sad")]
    assert [r["text"] for r in rows[:5]] == ["Excuse me.", "Do you have your forms?", "Oh! Really?",
                                            "I've been standing here for two hours.", ""]   # F003 has no transcript
    assert [r["speaker"] for r in rows[:2]] == ["Ses05F", "Ses05M"]
    assert dropped == {"fru": 2, "xxx": 2, "no audio file": 1}
    train, _ = sc.iemocap(str(tmp_path / "IEMOCAP_full_release"), "train")
    assert names(train) == [f"{d}_{t}.wav" for _, d in TRAIN for t in ("F000", "M000", "F002", "M002", "F003")]
    assert len(sc.iemocap(str(tmp_path), "all")[0]) == len(train) + len(rows)
    with pytest.raises(sc.CorpusError, match=r"Session5/Session5/dialog/EmoEvaluation: missing"):
        sc.iemocap(str(tmp_path / "IEMOCAP_full_release" / "Session5"), "test")


MELD_CSV = """Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime
1,"Why do all you’re coffee mugs have numbers on the bottom?",Mark,surprise,positive,0,0,3,19,"00:14:38,127","00:14:40,378"
2,"Oh. That’s so Monica can keep track. That way if one on them is missing, she can be like, ‘Where’s number 27?!’",Rachel,anger,negative,0,1,3,19,"00:14:40,629","00:14:47,385"
3,Y'know what?,Rachel,neutral,neutral,0,2,3,19,"00:14:56,353","00:14:57,520"
4,Come on.,Joey,joy,positive,1,0,1,22,"00:01:52,321","00:01:53,564"
5,"No, I, I don't want to.",Chandler,fear,negative,1,1,1,22,"00:01:53,898","00:01:56,190"
6,Eww!,Phoebe,disgust,negative,1,2,1,22,"00:01:56,500","00:01:57,000"
7,I miss her.,Ross,sadness,negative,2,0,1,22,"00:02:00,000","00:02:01,500"
"""


def test_meld(tmp_path):
    raw = tmp_path / "MELD.Raw"
    raw.mkdir()
    (raw / "test_sent_emo.csv").write_text(MELD_CSV, encoding="utf-8")
    (raw / "dev_sent_emo.csv").write_text(MELD_CSV.splitlines()[0] + "\n", encoding="utf-8")
    clips = raw / "test" / "output_repeated_splits_test"
    for stem, audio in (("dia0_utt0", True), ("dia0_utt1", False), ("dia0_utt2", True), ("dia1_utt0", True),
                        ("dia1_utt1", True), ("dia1_utt2", True)):   # dia2_utt0 has no clip at all
        touch(clips / f"{stem}.mp4")
        if audio:   # the audio extracted beside the video
            touch(clips / f"{stem}.wav")
    rows, dropped = sc.meld(str(raw), "test")
    assert names(rows) == ["dia0_utt0.wav", "dia0_utt2.wav", "dia1_utt0.wav"]
    assert [(r["emotion"], r["label"], r["speaker"]) for r in rows] == [
        ("surprise", "surprise", "Mark"), ("neutral", "neutral", "Rachel"), ("happy", "joy", "Joey")]
    assert rows[0]["text"] == "Why do all you’re coffee mugs have numbers on the bottom?"
    assert dropped == {"mp4 only": 1, "fear": 1, "disgust": 1, "no clip": 1}
    with pytest.raises(sc.CorpusError, match="no dev_splits_complete in it"):
        sc.meld(str(raw), "dev")


def test_cli_writes_the_manifest_and_says_what_it_dropped(tmp_path, capsys):
    raw = tmp_path / "MELD.Raw"
    raw.mkdir()
    (raw / "test_sent_emo.csv").write_text(MELD_CSV, encoding="utf-8")
    clips = raw / "output_repeated_splits_test"   # unpacked without the test/ folder around it
    touch(clips / "dia0_utt0.wav")
    touch(clips / "dia0_utt1.mp4")
    out = tmp_path / "m.jsonl"
    assert sc.main(["meld", str(raw), f"--out={out}"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["emotion"] for r in lines] == ["surprise"]
    said = capsys.readouterr().out
    assert f"{out}: 1 clips (neutral 0, happy 0, angry 0, sad 0, surprise 1); dropped 6:" in said
    assert "'mp4 only': 1" in said and f'for v in "{clips}"/*.mp4; do ffmpeg' in said
    assert sc.main(["ravdess", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: no such folder (the RAVDESS corpus)\n"
    with pytest.raises(SystemExit):
        sc.main(["cremad", str(tmp_path), "--split=test"])   # CREMA-D has no splits


def test_evaluate_prints_accuracy_and_uar_on_a_corpus_manifest(tmp_path, monkeypatch, capsys):
    """evaluate.py --ser_manifest on a CREMA-D manifest, replies planted: 6 angry clips, 2 happy, 2 sad; the model
    says "angry" to every angry and happy clip and "sad" to the sad ones. Accuracy 8/10; UAR (1 + 0 + 1) / 3."""
    wav = tmp_path / "CREMA-D" / "AudioWAV"
    clips = [f"10{i:02d}_DFA_ANG_XX" for i in range(6)] + ["1101_IEO_HAP_HI", "1102_IEO_HAP_LO"] + \
            ["1201_TIE_SAD_XX", "1202_TIE_SAD_XX"]
    for k, n in enumerate(clips):
        touch(wav / f"{n}.wav", seconds=0.5, seed=k)
    assert sc.main(["cremad", str(tmp_path / "CREMA-D"), f"--out={tmp_path / 'cremad.jsonl'}"]) == 0
    models = tiny.make_models(tmp_path / "models")
    run = tiny.make_run(tmp_path / "run", models["whisper"], models["llm"])
    planted = {"ANG": "It sounds angry.", "HAP": "Angry, I'd say.", "SAD": "sad"}

    def replies(model, items, system, instruction, max_new_tokens, batch_size=16):
        return [planted[os.path.basename(it["audio"]).split("_")[2]] for it in items]
    monkeypatch.setattr(ev, "replies", replies)
    settings = {"ser_manifest": str(tmp_path / "cremad.jsonl"), "stage2": run, "out": str(tmp_path / "out"),
                "dtype": "fp32", "device": "cpu"}
    for k in settings:   # main() sets these module globals from the command line: restored after the test
        monkeypatch.setattr(ev, k, getattr(ev, k))
    monkeypatch.chdir(tmp_path)   # the feature cache lands here
    monkeypatch.setattr("sys.argv", ["evaluate.py"] + [f"--{k}={v}" for k, v in settings.items()])
    ev.main()
    said = capsys.readouterr().out
    assert "free-text accuracy 80.0%, UAR 66.7% over 10 clips (0 replies named no emotion)" in said
    res = json.loads((tmp_path / "out" / "ser_cremad.json").read_text())
    assert res["acc"] == pytest.approx(0.8) and res["uar"] == pytest.approx(2 / 3)
    assert res["recall"] == pytest.approx({"neutral": 0.0, "happy": 0.0, "angry": 1.0, "sad": 1.0, "surprise": 0.0})
    # the emotion head's figures (a random head) are read off its own confusion matrix
    from adapter import SpeechLM
    m = SpeechLM.from_run(run, device="cpu", dtype="fp32")
    head = ev.head_confusion(m, ev.emotion_items(m, str(tmp_path / "cremad.jsonl")))
    assert res["head_acc"] == pytest.approx(ev.accuracy(head)) and res["head_uar"] == pytest.approx(ev.uar(head))
    assert sum(map(sum, head)) == 10 and [sum(r) for r in head] == [0, 2, 6, 2, 0]
