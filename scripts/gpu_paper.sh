#!/usr/bin/env bash
# The paper's schedule (--profile paper: Oracle WRN-40-4 and library 200 epochs, experts 100) on one lent GPU lease,
# as one detached pipeline that keeps the GPU busy between calls (docs/gpu.md has the plan and the minutes).
# here:   bash scripts/gpu_paper.sh layout   # .gpu/p1 .gpu/p2 .gpu/p3 (about 62 MiB a call with the working tree)
# A call removes the ignored files an earlier call carried, so each call copies its part out of the tree, and the
# pipeline runs from a copy of the repository there (the next call replaces the tree under a running process):
#   call 1, carry .gpu/p1 .whl:  mkdir -p /tmp/g && cp -r .gpu/p1 .whl /tmp/g/
#   call 2, carry .gpu/p2:       cp -r .gpu/p2 /tmp/g/
#   call 3, carry .gpu/p3:       cp -r .gpu/p3 /tmp/g/ && mkdir -p /tmp/g/repo && tar --exclude=./.gpu -cf - . |
#     tar -C /tmp/g/repo -xf - && cd /tmp/g/repo && export POE_GPU=/tmp/g POE_RUN=/tmp/g/paper &&
#     bash scripts/gpu_paper.sh start && bash scripts/gpu_paper.sh wait 548
#   call 4:  cd /tmp/g/repo && POE_GPU=/tmp/g POE_RUN=/tmp/g/paper bash scripts/gpu_paper.sh wait SECONDS_LEFT
# `start` joins the data, then starts (setsid) the pipeline on cores 0-3 and the side checks (the CUDA tests, then
# the service's load test) on cores 4-15; `wait` returns when the pipeline ended or SECONDS passed, packing what is
# done into $OUT (15 MiB parts). POE_PAPER_ARGS replaces --teacher_views 10; a CPU try: POE_PAPER_ARGS="--device cpu
# --epochs 1 --train_limit 512 --oracle_arch wrn-10-1" POE_PRECISION=fp32 POE_CORES=0 POE_SIDE=0, start then wait.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
OUT=${OUT:-runs/gpu_out}
R=${POE_RUN:-runs/paper}
G=${POE_GPU:-.gpu}  # the parts; on the device outside the tree (a call removes ignored files it did not carry)
export PYTHONUNBUFFERED=1 POE_SHARED=$G
usage() { sed -n "2,16p" "$0" >&2; exit 2; }
case $mode in
layout)  # the data and the original release in three parts that fit a call each with the working tree
  src=../shared
  rm -rf $G && mkdir -p $G/p1 $G/p2 $G/p3
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
  t=$src/data/cifar100/train.npz n=$(stat -c %s $src/data/cifar100/train.npz) a=24400000  # p1 also holds the test split
  b=$(((n - a) / 2))
  head -c $b $t >$G/p2/train.npz.part0
  dd if=$t of=$G/p3/train.npz.part1 bs=1M iflag=skip_bytes,count_bytes skip=$b count=$b status=none
  tail -c +$((2 * b + 1)) $t >$G/p1/train.npz.part2
  cp $src/data/cifar100/test.npz $G/p1/
  mkdir -p $G/p1/official && cp -r $src/official/cifar100 $G/p1/official/
  (cd $src/data/cifar100 && sha256sum train.npz test.npz) >$G/p1/SHA256SUMS
  du -b -s $G/p1 $G/p2 $G/p3 .whl 2>/dev/null; git ls-files -z | du -b -c --files0-from=- | tail -1  # each call < 64 MiB
  ;;
start)
  mkdir -p $G/data/cifar100 "$R/side"
  cat $G/p2/train.npz.part0 $G/p3/train.npz.part1 $G/p1/train.npz.part2 >$G/data/cifar100/train.npz
  cp $G/p1/test.npz $G/data/cifar100/ && ln -sfn p1/official $G/official
  (cd $G/data/cifar100 && sha256sum -c ../../p1/SHA256SUMS)
  setsid nohup bash "$0" pipeline >"$R/pipeline.log" 2>&1 </dev/null &
  [ "${POE_SIDE:-1}" = 0 ] || setsid nohup bash "$0" side >"$R/side/side.log" 2>&1 </dev/null &
  sleep 2
  ;;
pipeline)  # every stage in one process: no second start, no reload of the data
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  rc=0
  # shellcheck disable=SC2086  # POE_PAPER_ARGS is a list of flags
  taskset -c "${POE_CORES:-0-3}" python3 Run_preprocessing.py --profile paper --precision "${POE_PRECISION:-bf16}" \
    --data_root $G/data --db "$R/DB_PoE" --pretrained "$R/DB_pretrained" --no_progress \
    ${POE_PAPER_ARGS:---teacher_views 10} || rc=$?
  echo "$rc" >"$R/DONE"
  ;;
side)  # on the other cores: the CUDA tests, then the service's load test (CPU server), each bounded
  w=$G/.whl && [ -d "$w" ] || w=.whl
  if [ -d "$w" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$w"/*.whl
    export PYTHONPATH=/tmp/site
  fi
  c=${POE_SIDE_CORES:-4-15}
  timeout 240 taskset -c "$c" python3 -m pytest -m cuda tests/ tests/test_tf32.py -q -p no:cacheprovider -rs 2>&1 \
    | tee "$R/side/cuda_tests.log" || true
  # the CUDA server, model downloads (exports on CUDA) among its mixed requests: any 5xx shows as errors
  timeout 180 taskset -c "$c" python3 benchmarks/load_test.py --data_root $G/data --device cuda --configs workers:1 \
    --n_mixed 600 --out "$R/side/load_test_cuda.md" 2>&1 | tee "$R/side/load_test_cuda.log" || true
  timeout 420 taskset -c "$c" python3 benchmarks/load_test.py --data_root $G/data --device cpu \
    --configs workers:1 workers:8 --out "$R/side/load_test_gpu_machine.md" 2>&1 | tee "$R/side/load_test.log" || true
  echo done >"$R/side/DONE"
  ;;
wait)
  [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "error: wait needs whole seconds >= 0, got '${2:-}'" >&2; exit 2; }
  [ -f "$R/pipeline.log" ] || { echo "error: no pipeline at $R (run start first, or set POE_RUN)" >&2; exit 2; }
  t_end=$((SECONDS + $2))
  while [ ! -f "$R/DONE" ] && [ $SECONDS -lt $t_end ]; do sleep 3; done
  tail -n 25 "$R/pipeline.log" || true
  tail -n 6 "$R/side/side.log" 2>/dev/null || true
  mkdir -p "$OUT"
  # the library's and experts' resume files too, so that a stage the lease cut short can go on elsewhere; not the
  # Oracle's (72 MB with its momentum: over what a call brings back with the rest) nor the teacher cache (200 MB)
  tar cf - --exclude=cache --exclude='*/resume/oracle.pt' "$R" | split -b 15M -d -a 1 - "$OUT/paper.tar."
  ls -la "$OUT"
  ;;
*) usage ;;
esac
