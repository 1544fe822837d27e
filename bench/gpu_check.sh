#!/usr/bin/env bash
# One pass over everything that needs a CUDA GPU, for a machine lent for a few minutes:
#   1. tests/train/test_cuda.py (training/sampling on CUDA vs CPU, fp16 + GradScaler,
#      deterministic resume);
#   2. `difflab demo` on the GPU (time and SVM accuracy);
#   3. bench/train_throughput.py and bench/sample_throughput.py on the GPU.
# Runs from the repository root without installing difflab (PYTHONPATH=src). diffusers may
# travel as wheels in .whl/ (installed to /tmp/site). Logs and tables go to $OUT.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
stage() { echo "=== $1 ($(date +%T))"; }

stage env
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
    nproc
} 2>&1 | tee "$OUT/env.txt"

stage tests
CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 120 python3 -m pytest tests/train/test_cuda.py \
    -p no:cacheprovider -q -rfEs 2>&1 | tee "$OUT/tests.txt" | tail -25

stage demo
timeout 100 python3 -m difflab.cli demo --out /tmp/demo_gpu --overwrite --threads 8 \
    2>&1 | tee "$OUT/demo.txt" | tail -6

stage train_throughput
timeout 120 python3 bench/train_throughput.py --device cuda --preset cifar10 \
    --batch-size 128 --iters 10 --repeats 3 --warmup 3 --precisions fp32,bf16,fp16 \
    --threads 8 --out "$OUT/train_cifar10.md" 2>&1 | tail -12

stage sample_throughput
timeout 80 python3 bench/sample_throughput.py --device cuda --preset cifar10 \
    --batch-size 256 --steps 50 --precisions fp32,bf16,fp16 --out "$OUT/sample_cifar10.md" \
    2>&1 | tail -10
stage done
