#!/usr/bin/env bash
# The paper's schedule (--profile paper: Oracle WRN-40-4 and library 200 epochs, experts 100) on one lent GPU,
# in two calls of under 10 minutes each on the same warm machine (docs/gpu.md has the plan and the minutes):
#   call 1, with the last data part:  bash .gpu/join && bash scripts/gpu_paper.sh oracle
#   call 2:                           bash scripts/gpu_paper.sh rest
# Each call packs what it made into $OUT (parts of at most 15 MiB), so a call cut short still returns its stage;
# a stage cut short resumes from its per-epoch checkpoint in the next call. The Oracle's logits are cached for 10
# augmented views (the paper's schedule runs it on every batch: 100 s more than a lease has). POE_PAPER_ARGS
# replaces that flag, e.g. a CPU try: POE_DATA=../shared/data POE_PRECISION=fp32 POE_PAPER_ARGS="--device cpu
# --epochs 1 --train_limit 512 --oracle_arch wrn-10-1" bash scripts/gpu_paper.sh oracle (then rest).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = oracle ] || [ "${1:-}" = rest ] || { sed -n "2,10p" "$0"; exit 2; }
OUT=${OUT:-runs/gpu_out}
D=${POE_DATA:-.gpu}  # holds cifar100/{train,test}.npz
R=${POE_RUN:-runs/paper}
mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1
# shellcheck disable=SC2086  # POE_PAPER_ARGS is a list of flags
P="python3 Run_preprocessing.py --profile paper --precision ${POE_PRECISION:-bf16} --data_root $D --db $R/DB_PoE
   --pretrained $R/DB_pretrained --no_progress ${POE_PAPER_ARGS:---teacher_views 10}"
pack() {  # pack paths into $OUT/$1.tar.N, 15 MiB parts (the device returns at most 8 files of 16 MiB)
  local name=$1; shift
  rm -f "$OUT/$name".tar.*
  tar cf - --exclude=resume --exclude=cache "$@" | split -b 15M -d -a 1 - "$OUT/$name.tar."
}
if [ "$1" = oracle ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  $P --stages oracle 2>&1 | tee "$R/oracle.log"
  pack oracle "$R/DB_pretrained" "$R/oracle.log"
else
  $P 2>&1 | tee "$R/library_experts.log"
  python3 Run_Evaluation.py --db "$R/DB_PoE" --data_root "$D" --out "$R/results/paper_pool" 2>&1 | tail -8
  python3 Run_Service.py --db "$R/DB_PoE" --data_root "$D" --queriedTask people vehicles_1 vehicles_2 2>&1 \
    | tee "$R/results/service_example.txt"
  pack pool "$R/DB_PoE" "$R/DB_pretrained/cifar100/library_student.pt" "$R/results" "$R/library_experts.log"
fi
ls -la "$OUT"
