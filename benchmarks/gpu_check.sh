#!/usr/bin/env bash
# One prepared script for a lent GPU machine (a few minutes): the GPU-marked tests, then the
# training throughput / MFU benchmark (DiT-small, seq 1024, bf16) for the torch backend and
# DeepSpeed ZeRO-2. Results land in ${OUT:-gpu_results}/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}; [ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' | tee "$OUT/torch.txt"
"$PY" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt"
"$PY" benchmarks/bench_gpu.py --backends torch deepspeed --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
