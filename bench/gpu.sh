#!/usr/bin/env bash
# One prepared run for a lent GPU: `bench/gpu.sh OUTDIR`. Installs nothing. Within ~5 minutes it
# runs every test marked `gpu` (tests/test_kernels_gpu.py), `python -m kernels.bench`,
# `python bench.py train`, and the two kernel test files (interpreter tests on CPU) on CUDA, and
# writes OUTDIR/results.md (a table of steps, status and seconds) beside each step's full log. A failing step is recorded and the next one still runs; the exit
# status is non-zero if any step failed.
set -uo pipefail
OUT=${1:?usage: bench/gpu.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export TRITON_INTERPRET=0  # compiled kernels on CUDA tensors (tests/conftest.py only sets 1 without CUDA)
export PYTHONUNBUFFERED=1

status=0
table="| step | status | seconds | log |\n|---|---|---|---|\n"
run() {  # run NAME LIMIT_S CMD...: one step under a time limit, log to OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name: $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local st="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st="timed out after ${limit}s"; status=1
    elif [ $rc -ne 0 ]; then st="failed (exit $rc)"; status=1; fi
    tail -n 3 "$OUT/$name.log"
    table+="| $name | $st | $((SECONDS - t0)) | $name.log |\n"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1

# Most important first; limits sum to 295 s.
run gpu_tests 100 python -m pytest -q -rs -p no:cacheprovider -m gpu tests/
run kernels_bench 100 python -m kernels.bench --json "$OUT/kernels_bench.json"
if [ -f bench.py ]; then
    run bench_train 45 python bench.py train
else
    table+="| bench_train | skipped: no bench.py | 0 | |\n"
fi
run kernel_tests 50 python -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_loss.py

{ echo "# GPU run $(date -u +%Y-%m-%dT%H:%MZ)"; echo; echo '```'; cat "$OUT/env.txt"; echo '```'; echo
  printf "%b" "$table"; echo
  echo "## python -m kernels.bench"; echo; echo '```'
  sed -n '/^bench /,$p' "$OUT/kernels_bench.log" 2>/dev/null; echo '```'
  echo; echo "## python bench.py train"; echo; echo '```'; tail -n 20 "$OUT/bench_train.log" 2>/dev/null; echo '```'
} > "$OUT/results.md.tmp" && mv "$OUT/results.md.tmp" "$OUT/results.md"
cat "$OUT/results.md"
exit $status
