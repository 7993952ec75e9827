#!/usr/bin/env bash
# Reproduce checkpoints/protonet-conv4-omniglot end to end: train Conv-4 as a Prototypical Network
# on the Omniglot Vinyals train split (validating on val), then evaluate it on the test split with
# the paper's protocol (1000 episodes, 15 queries, 5/20-way 1/5-shot).
#
#   scripts/train_omniglot_protonet.sh [OUTPUT_DIR]
#
# Environment: DATA (Omniglot root, default ../shared/data/omniglot), EPISODES (default 8000;
# the CPU budget here; the paper trains far longer), THREADS (torch CPU threads, default 2),
# DEVICE (default cpu; cuda on a GPU machine), PYTHON (default .venv/bin/python), EXTRA (more
# `protonets train` options, e.g. "--resume" to continue an interrupted or finished run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-checkpoints/protonet-conv4-omniglot}
DATA=${DATA:-../shared/data/omniglot}
EPISODES=${EPISODES:-8000}
THREADS=${THREADS:-2}
DEVICE=${DEVICE:-cpu}
PYTHON=${PYTHON:-.venv/bin/python}

start=$(date +%s)
# shellcheck disable=SC2086
"$PYTHON" -m protonets train --method protonet --dataset omniglot --data "$DATA" \
    --split train --val-split val --encoder conv4 \
    --ways 60 --shots 5 --queries 5 --episodes "$EPISODES" \
    --lr 1e-3 --lr-step 2000 --lr-gamma 0.5 \
    --val-ways 20 --val-shots 1 --val-queries 15 --val-episodes 500 --val-every 200 \
    --seed 0 --threads "$THREADS" --device "$DEVICE" --output "$OUT" ${EXTRA:-}
echo "training wall time: $(( $(date +%s) - start )) s"

"$PYTHON" -m protonets eval --dataset omniglot --data "$DATA" --split test \
    --ways 5 20 --shots 1 5 --queries 15 --episodes 1000 --seed 0 \
    --checkpoint "$OUT" --device "$DEVICE" --no-cache --quiet --output "$OUT/test_results.json"
echo "total wall time: $(( $(date +%s) - start )) s"
