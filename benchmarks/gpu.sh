#!/usr/bin/env bash
# One-shot benchmark on a lent GPU (H100/H200): about 5 minutes; results under $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu.sh [extra flags for benchmarks/train.py]
#
# Runs `python -m benchmarks.train` from the repository root with the accelerator defaults:
# sizes small, medium, ViT-B, ViT-L; M in 1 4 8 16; float32 and bfloat16; in-memory batch 4096;
# end to end from synthetic shards (small SAEs, M = 4, batch 16384) for saev_jax and the torch
# baseline with its per-example loader (a bounded number of batches). The figures the targets
# name (ViT-L M=8, small M=16) are measured before the rest. The Python side starts no new
# measurement after 270 s and writes <device>.json, .md and -scaling.png under $OUT after every
# measurement, so a timeout still leaves everything measured so far.
#
# Needs python3 with jax[cuda], equinox, optax, jaxtyping, torch, numpy, matplotlib,
# safetensors, tqdm. Not tyro or wandb: benchmarks/train.py stubs them when they are missing.
# PYTHON=/path/to/python picks the interpreter.
#
# SCALE=1 also runs `benchmarks/scale.py --gpu` afterwards: saev's classification.toml group
# (12 SAEs, d_vit 1024, exp 32, batch 16384) at full size, chunk 1, 2, 4 and 12, with the planned,
# XLA and measured peak bytes per device (results/scale-gpu.{json,md}; a few more minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"

export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU.
export TQDM_DISABLE=1                       # Progress bars would flood the log.
export PYTHONUNBUFFERED=1

"$PYTHON" -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__, "cuda:", torch.cuda.is_available())'

status=0
timeout --signal=INT --kill-after=15 340 \
    "$PYTHON" -m benchmarks.train --out "$OUT" --time-budget-s 270 --no-table "$@" 2>&1 | tee "$OUT/log.txt" \
    || status=$?

if [ "${SCALE:-0}" = 1 ]; then
    timeout --signal=INT --kill-after=15 600 "$PYTHON" benchmarks/scale.py --gpu 2>&1 | tee "$OUT/scale-log.txt" || status=$?
    cp benchmarks/results/scale-gpu.* "$OUT"/ 2>/dev/null || true
fi

# The TopK family's sparse step against ReLU and against its dense reference (benchmarks/kinds_speed.py),
# a few minutes (each TopK-family step also compiles its dense fallback branch); KINDS_SPEED=0 skips it.
# Its failure does not change the exit status; results so far are in its json after each grid point.
if [ "${KINDS_SPEED:-1}" = 1 ]; then
    timeout --signal=INT --kill-after=15 300 \
        "$PYTHON" -m benchmarks.kinds_speed --d-vit 1024 --d-sae 16384,65536 --k 32,128 --n-saes 4 --repeats 5 --dense \
        --out "$OUT/kinds-speed-gpu" 2>&1 | tee "$OUT/kinds-speed-log.txt" || true
fi

echo
echo "exit status $status; files in $OUT:"
ls -l "$OUT"
echo
cat "$(ls -t "$OUT"/*.md | head -n 1)"
exit "$status"
