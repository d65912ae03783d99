#!/usr/bin/env bash
# The CUDA checks and GPU figures in one command, on a machine with an NVIDIA GPU:
#   AUTOSOD_SHARED=/path/to/shared bash benchmarks/gpu_check.sh OUTDIR
# 1. tests/test_cuda.py (GPU against CPU on real images; skipped where no GPU is) and the
#    model tests; 2. predict's network and edge refinement (images/s, bf16); 3. the
#    backbone + POTNet core (fp32, bf16). Each step has its own time limit and log in
#    OUTDIR, so one that fails or overruns leaves the others' results.
set -u
out=${1:-gpu_check}
mkdir -p "$out"
shared=${AUTOSOD_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
export AUTOSOD_SHARED=$shared PYTHONUNBUFFERED=1
weights=$shared/weights/dinov2_vits14_imgfocus.fp16.safetensors
images=$shared/data/ecssd/images
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)"
  nproc; } 2>&1 | tee "$out/machine.txt"
timeout "${TESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider -rs \
  tests/test_cuda.py tests/test_autosod.py 2>&1 | tee "$out/tests.txt"
timeout "${PREDICT_S:-150}" python3 benchmarks/predict_throughput.py --images "$images" \
  --weights "$weights" --device cuda --batch-sizes 16 64 --limit 64 \
  --json "$out/predict_gpu.json" 2>&1 | tee "$out/predict.txt"
timeout "${CORE_S:-240}" python3 benchmarks/core_throughput.py --images "$images" \
  --weights "$weights" --device cuda --engines native --precisions bf16 fp32 \
  --batch-sizes 16 32 --limit 32 --json "$out/core_gpu.json" 2>&1 | tee "$out/core.txt"
