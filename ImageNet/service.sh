#!/usr/bin/env bash
# Answer one query from the ImageNet pool, e.g.: ImageNet/service.sh bird_passerine bird_etc1
# DATA_ROOT holds imagenet/val/<wnid>/ (only the query's classes are read).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python Run_Service.py --dataset imagenet ${DATA_ROOT:+--data_root "$DATA_ROOT"} --queriedTask "$@"
