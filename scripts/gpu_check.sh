#!/bin/bash
# The GPU checks as ONE call on a GPU machine: the GPU tests, then the side-by-side
# benchmark. Needs the GPU release bundle unpacked in .gpu/ (git-ignored). With the
# device tool, from the project root:
#
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=470)
#
# Budget (7.5 minutes, so that a session's 15 minutes of device time leave room for a second,
# shorter call after a fix; a start costs 0.5-2 minutes): tests at most TEST_TIMEOUT_S
# (230 s; -v, so a timeout still shows which tests passed; on the H200 the 21 tests took
# 161 s on 2026-11-27), then the benchmark, which starts no new row after
# BENCH_BUDGET_S (140 s) and is killed at BENCH_TIMEOUT_S (180 s).
# Extra arguments go to bench/bench_gpu.py (e.g. --archs terabyte --batches 8192).
# Writes gpu_tests.log, bench_gpu.log, bench_gpu.json and bench_gpu.md (README table) to $OUT (the device tool's
# folder that comes back), or to /tmp/gpu_check_out elsewhere; with time left over (CALL_LIMIT_S,
# 450 s, minus what ran) also bench_profile.{log,json,json.ops.txt}: launches and syncs per
# step, the heaviest operators and the Python functions the host time goes to.
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
# shellcheck disable=SC1091
source .gpu/install.sh || { echo "gpu_check: .gpu/install.sh failed"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
set -o pipefail

echo "== gpu tests"
timeout "${TEST_TIMEOUT_S:-230}" python3 -m pytest -v -rfEs --durations=12 --tb=short -p no:cacheprovider \
  tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | grep -v -e Warning -e 'warn(' | tail -60
test_rc=$?

echo "== bench"
# the goal's rows and batch sizes first, then the third size (2048), Terabyte before
# DCNv2 (the budget skips what does not fit); extra arguments replace these
if [ "$#" -eq 0 ]; then
  set -- --archs terabyte,dcnv2 --batches 8192,32768,2048 --rows "torchrec,\
trainer all+cuda_graph,trainer cuda_graph,trainer fp32,trainer direct,trainer all+direct+cudagraphs,\
trainer all+cudagraphs,trainer tf32+bf16,pytorch"
fi
timeout "${BENCH_TIMEOUT_S:-180}" python3 bench/bench_gpu.py \
  --time-budget-s "${BENCH_BUDGET_S:-140}" --out "$OUT/bench_gpu.json" "$@" 2>&1 |
  tee "$OUT/bench_gpu.log" | grep -v -e Warning -e 'warn('
bench_rc=$?
# the README's table, from whatever rows finished
[ -s "$OUT/bench_gpu.json" ] && python3 bench/bench_gpu.py --report "$OUT/bench_gpu.json" \
  > "$OUT/bench_gpu.md"

# Where the step time goes, with the seconds that are left (never more than the call allows):
# per-step kernel launches, host syncs and GPU kernel time of plain TorchRec and the trainer
# at batch 8192, and their heaviest operators (bench_profile.json.ops.txt). Does not change
# the exit status.
left=$(( ${CALL_LIMIT_S:-450} - SECONDS ))
if [ "$left" -ge 60 ]; then
  echo "== profile ($left s left)"
  timeout "$(( left - 5 ))" python3 bench/bench_gpu.py --archs terabyte --batches 8192 \
    --rows "torchrec,trainer fp32,trainer direct,trainer cuda_graph" --profile-steps 3 \
    --time-budget-s "$(( left - 45 ))" --out "$OUT/bench_profile.json" 2>&1 |
    tee "$OUT/bench_profile.log" | grep -v -e Warning -e 'warn(' -e USDT
else
  echo "gpu_check: ${left} s left, no profile run"
fi

echo "gpu_check: tests rc=$test_rc, bench rc=$bench_rc"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
