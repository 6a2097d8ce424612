#!/usr/bin/env bash
# On a lent GPU machine (last data call): join the training split, build the pool under --profile gpu,
# score it, and pack pool + logs into $OUT in parts of at most 15 MiB. The Oracle is packed as soon as it
# is trained, so a run cut short still returns it; a second call resumes where this one stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
D=${POE_DATA:-.gpu/shared/data}  # where cifar100/{train,test}.npz are
[ -f $D/cifar100/train.npz ] || bash .gpu/join
R=runs/gpu
mkdir -p $R

P="python3 Run_preprocessing.py --profile gpu --data_root $D --db $R/DB_PoE --pretrained $R/DB_pretrained --no_progress"
pack() {  # pack the given paths into $OUT/$1.tar.* (15 MiB parts)
  local name=$1; shift
  rm -f "$OUT/$name".tar.*
  tar cf - --exclude=resume --exclude=cache "$@" | split -b 15M -d -a 1 - "$OUT/$name.tar."
}
$P --stages oracle "$@" 2>&1 | tee "$R.oracle.log"
pack oracle $R/DB_pretrained $R.oracle.log
$P "$@" 2>&1 | tee "$R.library_experts.log"
mkdir -p $R/results
python3 Run_Evaluation.py --db $R/DB_PoE --data_root $D --out $R/results/gpu_pool 2>&1 | tail -8
python3 Run_Experiments.py --methods oracle poe --db $R/DB_PoE --pretrained $R/DB_pretrained --data_root $D \
  --no_progress --out $R/results/oracle_vs_pool 2>&1 | tail -12
python3 Run_Service.py --db $R/DB_PoE --data_root $D --queriedTask people vehicles_1 vehicles_2 2>&1 \
  | tee $R/results/service_example.txt
rm -f "$OUT"/oracle.tar.*
pack pool $R/DB_pretrained $R/DB_PoE $R/results $R.oracle.log $R.library_experts.log
ls -la "$OUT"
