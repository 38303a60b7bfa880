"""
Manifests of the public SER corpora, read from each one's own layout, labels folded into BLSP-Emo's five.

    python scripts/ser_corpora.py iemocap /data/IEMOCAP_full_release    # Session 5: speech/ser_iemocap_test.jsonl
    python scripts/ser_corpora.py meld /data/MELD.Raw --split=test
    python scripts/ser_corpora.py ravdess /data/RAVDESS
    python scripts/ser_corpora.py cremad /data/CREMA-D
    python evaluate.py --ser_manifest=speech/ser_iemocap_test.jsonl --stage2=runs/blsp-emo-release

Each line is {"audio", "text", "emotion", "speaker", "corpus", "label"}: emotion is one of data.EMOTIONS, label the
corpus's own. A clip whose label has no place among the five is dropped, and counted by its label.

The folds. The release labels its data with exactly the five (neutral, happy, angry, sad, surprise) and tests
IEMOCAP on Session 5; the rest is chosen here and said so. Where a corpus names one of the five differently it
is renamed (joy -> happy, sadness -> sad, anger -> angry, surprised -> surprise). IEMOCAP's "excited" is folded
into happy, the usual IEMOCAP convention. Everything else is dropped, RAVDESS's "calm" included (it is not
neutral in that corpus: both are recorded, as separate emotions).
"""
import argparse
import csv
import json
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: data.py

from data import EMOTIONS

# each corpus's label -> one of the five; a label not here is dropped
RAVDESS_EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
                    "07": "disgust", "08": "surprised"}
RAVDESS_FOLD = {"neutral": "neutral", "happy": "happy", "sad": "sad", "angry": "angry", "surprised": "surprise"}
RAVDESS_STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
CREMAD_FOLD = {"NEU": "neutral", "HAP": "happy", "ANG": "angry", "SAD": "sad"}   # DIS, FEA dropped; no surprise
CREMAD_SENTENCES = {
    "IEO": "It's eleven o'clock.", "TIE": "That is exactly what happened.", "IOM": "I'm on my way to the meeting.",
    "IWW": "I wonder what this is about.", "TAI": "The airplane is almost full.",
    "MTI": "Maybe tomorrow it will be cold.", "IWL": "I would like a new alarm clock.",
    "ITH": "I think I have a doctor's appointment.", "DFA": "Don't forget a jacket.",
    "ITS": "I think I've seen this before.", "TSI": "The surface is slick.",
    "WSI": "We'll stop in a couple of minutes."}
IEMOCAP_FOLD = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad", "sur": "surprise"}
IEMOCAP_SESSIONS = {"test": (5,), "train": (1, 2, 3, 4), "all": (1, 2, 3, 4, 5)}
MELD_FOLD = {"neutral": "neutral", "joy": "happy", "anger": "angry", "sadness": "sad", "surprise": "surprise"}
# split -> (label file, clip folder) as the MELD.Raw archives unpack
MELD_SPLITS = {"train": ("train_sent_emo.csv", "train_splits"), "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
               "test": ("test_sent_emo.csv", "output_repeated_splits_test")}
AUDIO = (".wav", ".flac")   # what data.load_audio decodes; MELD's .mp4 clips are not


class CorpusError(ValueError):
    """A folder that is not the corpus it should be; the message names the path and what was looked for."""


def _walk(root, what):
    """Every file under root (sorted; macOS "._" resource forks skipped), or CorpusError if root is no folder."""
    if not os.path.isdir(root):
        raise CorpusError(f"{root}: no such folder (the {what} corpus)")
    for d, dirs, files in os.walk(root):
        dirs.sort()
        yield from (os.path.join(d, f) for f in sorted(files) if not f.startswith("._"))


def _row(path, text, emotion, speaker, corpus, label):
    assert emotion in EMOTIONS, emotion
    return {"audio": os.path.abspath(path), "text": text, "emotion": emotion, "speaker": speaker, "corpus": corpus,
            "label": label}


def _none_found(rows, dropped, root, what):
    if not rows and not dropped:
        raise CorpusError(f"{root}: no {what} found")


def ravdess(root):
    """RAVDESS speech: Actor_NN/MM-VV-EE-II-SS-RR-AA.wav, the label in the name (modality 03 audio-only, vocal
    channel 01 speech, 02 song; emotion EE; statement SS; actor AA). Song clips are dropped and counted as
    "song": the five are speech emotions. Returns (rows, Counter of what was dropped)."""
    rows, dropped = [], Counter()
    for path in _walk(root, "RAVDESS"):
        m = re.fullmatch(r"(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)\.wav", os.path.basename(path))
        if not m:
            continue
        modality, channel, emo, _, statement, _, actor = m.groups()
        if modality != "03":   # 01 and 02 are the video files of the audio-visual release
            continue
        label = RAVDESS_EMOTIONS.get(emo, emo)
        if channel != "01":
            dropped["song"] += 1
        elif label not in RAVDESS_FOLD:
            dropped[label] += 1
        else:
            rows.append(_row(path, RAVDESS_STATEMENTS.get(statement, ""), RAVDESS_FOLD[label], f"Actor_{actor}",
                             "ravdess", label))
    _none_found(rows, dropped, root, "RAVDESS clips (MM-VV-EE-II-SS-RR-AA.wav)")
    return rows, dropped


def cremad(root):
    """CREMA-D: AudioWAV/AAAA_SSS_EEE_LL.wav, actor, sentence code, emotion (ANG DIS FEA HAP NEU SAD) and level in
    the name. Returns (rows, Counter of what was dropped)."""
    rows, dropped = [], Counter()
    for path in _walk(root, "CREMA-D"):
        m = re.fullmatch(r"(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})\.wav", os.path.basename(path))
        if not m:
            continue
        actor, sentence, emo, _ = m.groups()
        if emo not in CREMAD_FOLD:
            dropped[emo] += 1
            continue
        rows.append(_row(path, CREMAD_SENTENCES.get(sentence, ""), CREMAD_FOLD[emo], actor, "cremad", emo))
    _none_found(rows, dropped, root, "CREMA-D clips (AudioWAV/AAAA_SSS_EEE_LL.wav)")
    return rows, dropped


def iemocap(root, split="test"):
    """IEMOCAP: SessionN/dialog/EmoEvaluation/<dialog>.txt hold one line per turn, "[start - end]<TAB>turn<TAB>
    label<TAB>[V, A, D]" (the annotators' consensus); SessionN/dialog/transcriptions/<dialog>.txt the words,
    "turn [start-end]: text"; the clip is SessionN/sentences/wav/<dialog>/<turn>.wav. split: test (Session 5,
    as the release tests), train (Sessions 1-4) or all. Returns (rows, Counter of what was dropped)."""
    if split not in IEMOCAP_SESSIONS:
        raise CorpusError(f"IEMOCAP split {split!r}: use one of {', '.join(IEMOCAP_SESSIONS)}")
    if os.path.isdir(os.path.join(root, "IEMOCAP_full_release")):
        root = os.path.join(root, "IEMOCAP_full_release")
    rows, dropped = [], Counter()
    for n in IEMOCAP_SESSIONS[split]:
        session = os.path.join(root, f"Session{n}")
        labels_dir = os.path.join(session, "dialog", "EmoEvaluation")
        if not os.path.isdir(labels_dir):
            raise CorpusError(f"{labels_dir}: missing (is {root} IEMOCAP_full_release?)")
        for name in sorted(f for f in os.listdir(labels_dir) if f.endswith(".txt") and not f.startswith("._")):
            dialog = name[:-4]
            words, transcript = {}, os.path.join(session, "dialog", "transcriptions", name)
            if os.path.isfile(transcript):
                with open(transcript, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        m = re.fullmatch(r"(\S+) \[[\d.]+-[\d.]+\]: ?(.*)", line.rstrip("\r\n"))
                        if m:
                            words[m[1]] = m[2].strip()
            with open(os.path.join(labels_dir, name), encoding="utf-8", errors="replace") as f:
                for line in f:
                    m = re.match(r"\[[\d.]+ - [\d.]+\]\t(\S+)\t(\S+)\t\[", line)
                    if not m:
                        continue
                    turn, label = m.groups()
                    if label not in IEMOCAP_FOLD:
                        dropped[label] += 1
                        continue
                    wav = os.path.join(session, "sentences", "wav", dialog, turn + ".wav")
                    if not os.path.isfile(wav):
                        dropped["no audio file"] += 1
                        continue
                    rows.append(_row(wav, words.get(turn, ""), IEMOCAP_FOLD[label],
                                     turn[:5] + turn.split("_")[-1][0], "iemocap", label))
    _none_found(rows, dropped, root, "IEMOCAP turns")
    return rows, dropped


def _find_named(root, name, want_dir):
    """The first file (want_dir False) or folder named `name` under root, shallowest first: the MELD archives
    unpack with or without a split folder around their contents."""
    for d, dirs, files in sorted(os.walk(root), key=lambda w: w[0].count(os.sep)):
        if name in (dirs if want_dir else files):
            return os.path.join(d, name)
    return None


def meld(root, split="test"):
    """MELD: <split>_sent_emo.csv (Utterance, Speaker, Emotion, Dialogue_ID, Utterance_ID, ...) and the clip folder
    (train_splits, dev_splits_complete, output_repeated_splits_test) of diaD_uttU.mp4 video. data.load_audio reads
    no mp4: a clip counts where diaD_uttU.wav (or .flac) lies beside it; mp4-only clips are dropped and counted as
    "mp4 only" (main() prints the ffmpeg line that extracts them). Returns (rows, Counter of what was dropped)."""
    if split not in MELD_SPLITS:
        raise CorpusError(f"MELD split {split!r}: use one of {', '.join(MELD_SPLITS)}")
    if not os.path.isdir(root):
        raise CorpusError(f"{root}: no such folder (the MELD corpus)")
    csv_name, clips_name = MELD_SPLITS[split]
    labels, clips = _find_named(root, csv_name, False), _find_named(root, clips_name, True)
    if labels is None or clips is None:
        raise CorpusError(f"{root}: no {csv_name if labels is None else clips_name} in it (is it MELD.Raw, unpacked?)")
    rows, dropped = [], Counter()
    with open(labels, encoding="utf-8-sig", errors="replace", newline="") as f:
        for r in csv.DictReader(f):
            label = r["Emotion"].strip().lower()
            if label not in MELD_FOLD:
                dropped[label] += 1
                continue
            stem = os.path.join(clips, f"dia{int(r['Dialogue_ID'])}_utt{int(r['Utterance_ID'])}")
            audio = next((stem + ext for ext in AUDIO if os.path.isfile(stem + ext)), None)
            if audio is None:
                dropped["mp4 only" if os.path.isfile(stem + ".mp4") else "no clip"] += 1
                continue
            rows.append(_row(audio, r["Utterance"].strip(), MELD_FOLD[label], r["Speaker"].strip(), "meld", label))
    _none_found(rows, dropped, root, f"rows in {labels}")
    return rows, dropped


BUILDERS = {"ravdess": ravdess, "cremad": cremad, "iemocap": iemocap, "meld": meld}
SPLITS = {"iemocap": tuple(IEMOCAP_SESSIONS), "meld": tuple(MELD_SPLITS)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("corpus", choices=list(BUILDERS))
    ap.add_argument("root", help="the corpus folder as downloaded and unpacked")
    ap.add_argument("--split", default=None, help="iemocap: test (Session 5, default), train, all; "
                    "meld: test (default), dev, train; ravdess and cremad have none (every clip)")
    ap.add_argument("--out", default=None, help="manifest to write (default speech/ser_<corpus>[_<split>].jsonl)")
    args = ap.parse_args(argv)
    if args.split is not None and args.corpus not in SPLITS:
        ap.error(f"{args.corpus} has no splits: drop --split")
    split = args.split or ("test" if args.corpus in SPLITS else None)
    try:
        rows, dropped = BUILDERS[args.corpus](args.root, split) if split else BUILDERS[args.corpus](args.root)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("speech", f"ser_{args.corpus}" + (f"_{split}" if split else "") + ".jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    counts = Counter(r["emotion"] for r in rows)
    print(f"{out}: {len(rows)} clips ({', '.join(f'{e} {counts[e]}' for e in EMOTIONS)}); "
          f"dropped {sum(dropped.values())}: {dict(sorted(dropped.items()))}")
    if dropped["mp4 only"]:
        clips = _find_named(args.root, MELD_SPLITS[split][1], True)
        print("MELD ships mp4 video: extract each clip's audio beside it, then run this again, e.g.\n"
              f'  for v in "{clips}"/*.mp4; do '
              'ffmpeg -loglevel error -i "$v" -vn -ac 1 -ar 16000 "${v%.mp4}.wav"; done')
    return 0


if __name__ == "__main__":
    sys.exit(main())
