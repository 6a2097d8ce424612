#!/usr/bin/env bash
# Build the ImageNet pool: load the pretrained Oracle and library, extract the four bird experts (20 epochs).
# DATA_ROOT holds imagenet/{train,val}/<wnid>/; extra arguments go to Run_preprocessing.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python Run_preprocessing.py --dataset imagenet ${DATA_ROOT:+--data_root "$DATA_ROOT"} "$@"
