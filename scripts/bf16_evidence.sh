#!/usr/bin/env bash
# The same short real run in fp32 and bf16 (and bf16 with another seed, for the run-to-run spread), into runs/bf16/.
# POE_DATA: the folder holding cifar100/ (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${POE_DATA:-../shared/data}
mkdir -p runs/bf16
T="large_omnivores_and_herbivores medium-sized_mammals people small_mammals vehicles_1 vehicles_2"
for run in fp32:0 bf16:0 bf16:1; do
  prec=${run%:*}; seed=${run#*:}; out=runs/bf16/${prec}_seed$seed
  python Run_preprocessing.py --profile quick --oracle_arch wrn-16-2 --epochs 4 --teacher_views 2 --train_limit 25000 \
      --precision $prec --seed $seed --device cpu --data_root "$DATA" --db $out/DB_PoE --pretrained $out/DB_pretrained \
      --no_progress --tasks $T 2>&1 | tee $out.log
  python Run_Evaluation.py --db $out/DB_PoE --data_root "$DATA" --out $out/eval 2>&1 | tail -7 | tee -a $out.log
done
