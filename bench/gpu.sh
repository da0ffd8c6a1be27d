#!/usr/bin/env bash
# One prepared run for a lent GPU, at most 7 minutes on one H100: `bench/gpu.sh OUTDIR`. Installs
# nothing (the GPU image has no internet). Steps, each under its own time limit with its own log in
# OUTDIR; a failing or timed-out step is recorded and the next one still runs:
#   self_check           python -m kernels.bench --self-check: each kernel's first-use check at the
#                        training shapes in bf16 and fp16 (kernels/verify.py), its lines printed here,
#                        so correctness is settled before anything is timed
#   tests_kernels        tests/test_kernels_gpu.py without the compiled step (bf16 judged against
#                        SDPA's own bf16 error, D=128, the real batch, int64 offsets, the loss's bits),
#                        every test also under --test-timeout (tests/conftest.py; no pytest-timeout)
#   tests_compiled_step  the torch.compile(mode="reduce-overhead") training step: compile-heavy, alone
#   bench_attention      python -m kernels.bench --only attention: 1024 and 128 images per GPU, eager
#                        and CUDA-graph timings side by side with every SDPA backend
#   bench_loss           python -m kernels.bench --only loss: the fused loss against eager losses.py
#                        and torch.compile (a compile per model kind: its own step)
#   bench_train          python bench.py train (train.py's own step, B=1024, eager)
# Ends with one `PASS|FAIL|SKIP name measured goal` line per step (did it finish), per test step (its
# tests) and per goal, OUTDIR/results.json, and exit status 0 only if every line is PASS.
set -uo pipefail
OUT=${1:?usage: bench/gpu.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=$(command -v python || command -v python3) || { echo "gpu.sh: neither python nor python3 on PATH"; exit 1; }
export TRITON_INTERPRET=0  # compiled kernels on CUDA tensors (tests/conftest.py only sets 1 without CUDA)
export PYTHONUNBUFFERED=1

status=0
run() {  # run NAME LIMIT_S CMD...: one step under a time limit, its output in OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "   $name: timed out after ${limit}s"; status=1
    elif [ $rc -ne 0 ]; then echo "   $name: exit $rc (last lines of $OUT/$name.log:)"; tail -n 3 "$OUT/$name.log" | sed 's/^/     /'; status=1; fi
    echo "   $name: $((SECONDS - t0)) s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >> "$OUT/steps.tsv"  # read by --summarize
}

rm -f "$OUT/steps.tsv" "$OUT"/tests_*.xml "$OUT"/kernels_bench*.json  # no stale results from an earlier run
{ if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else echo "no nvidia-smi"; fi
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Limits sum to 385 s (+ start-up and the summary: about 7 minutes). Triton's kernel cache on disk
# carries compiled kernels from one step to the next.
run self_check 90 "$PY" -m kernels.bench --self-check
grep -E "^(kernel check|self-check|[0-9]+ checks)" "$OUT/self_check.log"
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider -m gpu)
run tests_kernels 60 "${PYTEST[@]}" --test-timeout 30 --junitxml="$OUT/tests_kernels.xml" \
    tests/test_kernels_gpu.py -k "not compiled_train_step"
run tests_compiled_step 75 "${PYTEST[@]}" --test-timeout 70 --junitxml="$OUT/tests_compiled_step.xml" \
    tests/test_kernels_gpu.py -k "compiled_train_step"
run bench_attention 60 "$PY" -m kernels.bench --only attention --json "$OUT/kernels_bench_attention.json"
run bench_loss 60 "$PY" -m kernels.bench --only loss --json "$OUT/kernels_bench_loss.json"
run bench_train 40 "$PY" bench.py train --steps 10
tail -n 8 "$OUT/bench_train.log"

echo "== goals (PASS|FAIL|SKIP name measured goal)"
"$PY" -m kernels.bench --summarize "$OUT" || status=1
exit $status
