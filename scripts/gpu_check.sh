#!/usr/bin/env bash
# On a lent GPU machine (first call): the CUDA test subset, then per-epoch times of every stage under the
# gpu and paper profiles (benchmarks/stage_speed.py), bf16 against fp32 and torch.compile against eager
# for the Oracle. Expects the test split and the original release in .gpu/shared (see docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 POE_SHARED=.gpu/shared POE_REQUIRE_DATA=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
B="python3 benchmarks/stage_speed.py --device cuda"
$B --profile gpu paper --precision bf16 --compile off --out "$OUT/speed_profiles.json" | tail -4
$B --profile gpu --precision fp32 --compile off --stages oracle --out "$OUT/speed_oracle_fp32.json" | tail -3
$B --profile gpu --precision bf16 --compile oracle --stages oracle --out "$OUT/speed_oracle_compiled.json" | tail -3
