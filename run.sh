#!/usr/bin/env bash
# README command 1: from a fresh clone to a trained BLSP-Emo in the small, on 2 CPU cores.
#   install -> real weights + emotional speech (scripts/prepare.py) -> stage 1 -> stage 2 -> evaluation + report
# Extra arguments go to every step, e.g.  bash run.sh --llm=qwen2.5-0.5b   or   bash run.sh --whisper=tiny.en
set -euo pipefail
cd "$(dirname "$0")"
START=$(date +%s)
bash install.sh
PY=.venv/bin/python
W=checkpoints/whisper-base; L=checkpoints/smollm2-135m-instruct; PREP=(); TRAIN=()
for a in "$@"; do
    case "$a" in
        --whisper=tiny.en) W=checkpoints/whisper-tiny.en; PREP+=("$a") ;;
        --llm=qwen2.5-0.5b) L=checkpoints/qwen2.5-0.5b-instruct; PREP+=("$a") ;;
        --whisper=*|--llm=*) PREP+=("$a"); [[ "$a" == --whisper=* ]] && W=${a#--whisper=} || L=${a#--llm=} ;;
        *) TRAIN+=("$a") ;;
    esac
done
$PY scripts/prepare.py "${PREP[@]}"
$PY train_semantic.py --whisper="$W" --llm="$L" "${TRAIN[@]}"
$PY train_emotion.py "${TRAIN[@]}"
$PY evaluate.py --stage1=runs/semantic --stage2=runs/emotion --out=runs/demo --started="$START"
# chat.py on held-out clips: one test sentence, one test voice, in a happy and in a sad voice
for e in happy sad; do
    clip=$(ls speech/emo_test/*_"$e".flac | head -1)
    echo "== $PY chat.py $clip --ser"
    $PY chat.py "$clip" --ser
    echo
done
echo "report: runs/demo/report.md; try it:  $PY chat.py speech/emo_test/\$(ls speech/emo_test | head -1) --ser"
