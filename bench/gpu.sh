#!/usr/bin/env bash
# One prepared run for a lent GPU (about 5 minutes on one H200): `bench/gpu.sh OUTDIR`. Installs
# nothing. GPU tests first (tests/test_kernels_gpu.py: bf16, D=128, the real batch, int64 offsets,
# every fitting config, torch.compile fullgraph and CUDA graphs), then `python -m kernels.bench` (attention and fused
# loss against SDPA / eager / torch.compile), then `python bench.py train`. Every step has a time
# limit and its own log in OUTDIR; a failing step is recorded and the next one still runs. Ends
# with one `PASS|FAIL name measured goal` line per goal and OUTDIR/results.json; exit status 1 if
# any goal failed or any step failed.
set -uo pipefail
OUT=${1:?usage: bench/gpu.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
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
    elif [ $rc -ne 0 ]; then echo "   $name: failed (exit $rc)"; status=1; fi
    echo "   $name: $((SECONDS - t0)) s"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Limits sum to 290 s.
# The tests check correctness over many shapes: KERNELS_AUTOTUNE=0 runs the first fitting config
# instead of compiling and timing every config at each one (the benchmark tunes).
run gpu_tests 125 env KERNELS_AUTOTUNE=0 python -m pytest -q -rs -p no:cacheprovider -m gpu --junitxml="$OUT/gpu_tests.xml" \
    tests/test_kernels_gpu.py
run kernels_bench 120 python -m kernels.bench --json "$OUT/kernels_bench.json"
run bench_train 45 python bench.py train
tail -n 15 "$OUT/bench_train.log"

echo "== goals (PASS|FAIL name measured goal)"
python -m kernels.bench --summarize "$OUT" || status=1
exit $status
