#!/usr/bin/env bash
# The paper's ImageNet table: every combination of 1, 2 and 3 of the four bird tasks (mean +- std).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python Run_Evaluation.py --dataset imagenet ${DATA_ROOT:+--data_root "$DATA_ROOT"} --n 1 2 3 "$@"
