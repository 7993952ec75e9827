#!/usr/bin/env bash
# Reproduce checkpoints/siamese-conv4-omniglot end to end: Conv-4 + Siamese head trained on
# Omniglot's background set only (27 alphabets; 3 held out for validation), then the figures:
# 20-way within-alphabet one-shot on the 20 evaluation alphabets (Lake/Koch), verification ROC
# AUC on held-out evaluation pairs, and 20-way 1-shot on the Vinyals test split.
#
#   scripts/train_siamese_omniglot.sh [OUTPUT_DIR]
#
# Environment: DATA (Omniglot root), STEPS (default 6000; the CPU budget here), THREADS (2),
# PYTHON (.venv/bin/python), EXTRA (more train_siamese_omniglot.py options, e.g. --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-checkpoints/siamese-conv4-omniglot}
DATA=${DATA:-../shared/data/omniglot}
STEPS=${STEPS:-6000}
THREADS=${THREADS:-2}
PYTHON=${PYTHON:-.venv/bin/python}

start=$(date +%s)
# shellcheck disable=SC2086
"$PYTHON" scripts/train_siamese_omniglot.py --data "$DATA" --output "$OUT" --steps "$STEPS" \
    --ways 50 --shots 2 --queries 2 --lr 1e-3 --lr-step 2500 --proto-weight 1.0 --loss bce \
    --hard-fraction 0.5 --augment affine --val-every 500 --val-runs 500 --far 0.01 --seed 0 \
    --threads "$THREADS" --quiet ${EXTRA:-}
echo "training wall time: $(( $(date +%s) - start )) s"

"$PYTHON" scripts/eval_within_alphabet.py --checkpoint "$OUT" --data "$DATA" --runs 1000 --seed 0 \
    --threads "$THREADS" --output "$OUT/within_alphabet.json"

"$PYTHON" -m protonets eval --dataset omniglot --data "$DATA" --split test --head-checkpoint "$OUT" \
    --ways 20 --shots 1 --queries 15 --episodes 1000 --seed 0 --method siamese prototype \
    --checkpoint "$OUT" --no-cache --quiet --output "$OUT/vinyals_test.json"
echo "total wall time: $(( $(date +%s) - start )) s"
