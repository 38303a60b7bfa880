#!/usr/bin/env bash
# README command 1: from a fresh clone to a trained BLSP-Emo in the small, on 2 CPU cores.
#   install -> real weights + emotional speech (scripts/prepare.py) -> stage 1 -> stage 2 -> evaluation + report
# Extra arguments go to the steps that take them, e.g.  bash run.sh --llm=qwen2.5-0.5b   or   bash run.sh --ctc_steps=0
# --budget=1h runs the shorter recipe (config/budget_1h_stage*.py) instead of the default one (--budget=2h)
set -euo pipefail
cd "$(dirname "$0")"
START=$(date +%s)
PY=.venv/bin/python
W=checkpoints/whisper-base; L=checkpoints/smollm2-135m-instruct; PREP=(); TRAIN=(); S1=(); S2=()
for a in "$@"; do
    case "$a" in
        --budget=2h) ;;
        --budget=1h) S1=(config/budget_1h_stage1.py); S2=(config/budget_1h_stage2.py) ;;
        --budget=*) echo "run.sh: --budget is 2h (the default) or 1h, not '${a#--budget=}'" >&2; exit 2 ;;
        --whisper=tiny.en) W=checkpoints/whisper-tiny.en; PREP+=("$a") ;;
        --llm=qwen2.5-0.5b) L=checkpoints/qwen2.5-0.5b-instruct; PREP+=("$a") ;;
        --whisper=*|--llm=*) PREP+=("$a"); [[ "$a" == --whisper=* ]] && W=${a#--whisper=} || L=${a#--llm=} ;;
        *) TRAIN+=("$a") ;;
    esac
done
# each --key=value goes to the training scripts that have that setting; one that neither has is an error
for a in "${TRAIN[@]}"; do
    k=${a#--}; k=${k%%=*}
    if [[ "$a" != --* ]]; then S1+=("$a"); S2+=("$a"); continue; fi
    grep -q "^$k = " train_semantic.py && S1+=("$a")
    grep -q "^$k = " train_emotion.py && S2+=("$a")
    grep -q "^$k = " train_semantic.py train_emotion.py || { echo "run.sh: no setting '$k' in train_semantic.py or train_emotion.py" >&2; exit 2; }
done
bash install.sh
$PY scripts/prepare.py "${PREP[@]}"
$PY train_semantic.py --whisper="$W" --llm="$L" "${S1[@]}"
$PY train_emotion.py "${S2[@]}"
$PY evaluate.py --stage1=runs/semantic --stage2=runs/emotion --out=runs/demo --started="$START"
# chat.py on held-out clips: one test sentence, one test voice, in a happy and in a sad voice
for e in happy sad; do
    clip=$(ls speech/emo_test/*_"$e".flac | head -1)
    echo "== $PY chat.py $clip --ser"
    $PY chat.py "$clip" --ser
    echo
done
echo "report: runs/demo/report.md; try it:  $PY chat.py speech/emo_test/\$(ls speech/emo_test | head -1) --ser"
