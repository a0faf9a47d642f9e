#!/usr/bin/env bash
# Trains the Helios demo family: three LayerSkip Llamas of different depth and width on different
# mixes of Python code (the CPython 3.11 standard library) and prose (the python3.11-doc text).
# They share one byte-level BPE tokenizer, trained first, so their exits compare token for token.
# The three models train in parallel. The shipped models were trained on one NVIDIA H100 (see each
# model card for the time); on a CPU the same command works but takes many hours.
#   CODE=stdlib PROSE=pydoc DEVICE=auto TIME_LIMIT=  models/train_family.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CODE=${CODE:-stdlib}
PROSE=${PROSE:-pydoc}
HELIOS=${HELIOS:-helios}
common=(--vocab 4096 --seq-len 512 --batch-size 32 --steps 3000 --warmup 200 --lr 3e-3
        --checkpoint-every 250 --heads 4 --kv-heads 2 --device "${DEVICE:-auto}" --quiet)
[[ -n "${TIME_LIMIT:-}" ]] && common+=(--time-limit "$TIME_LIMIT")

# The family tokenizer: trained on all of both sources (held-out files excluded), weights do not matter.
$HELIOS train --out models/helios-demo-code-6l --corpus "code=$CODE:0.85" "prose=$PROSE:0.15" \
  --layers 6 --hidden 192 --intermediate 512 "${common[@]}" --steps 0

$HELIOS train --out models/helios-demo-code-6l --corpus "code=$CODE:0.85" "prose=$PROSE:0.15" \
  --layers 6 --hidden 192 --intermediate 512 "${common[@]}" > models/helios-demo-code-6l.log 2>&1 &
$HELIOS train --out models/helios-demo-prose-12l --corpus "code=$CODE:0.15" "prose=$PROSE:0.85" \
  --tokenizer models/helios-demo-code-6l \
  --layers 12 --hidden 160 --intermediate 448 "${common[@]}" > models/helios-demo-prose-12l.log 2>&1 &
$HELIOS train --out models/helios-demo-mixed-16l --corpus "code=$CODE:0.5" "prose=$PROSE:0.5" \
  --tokenizer models/helios-demo-code-6l \
  --layers 16 --hidden 128 --intermediate 384 "${common[@]}" > models/helios-demo-mixed-16l.log 2>&1 &
wait
tail -n 1 models/helios-demo-*.log
