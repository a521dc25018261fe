#!/usr/bin/env bash
# One prepared script for a lent GPU machine (a few minutes). In order of value, each step's output
# teed to ${OUT:-gpu_results}/ so a run cut short still returns what finished:
#   1. the training throughput / MFU benchmark (DiT-small, seq 1024, bf16): torch backend, DeepSpeed ZeRO-2;
#   2. the GPU-marked tests (bf16 train + resume + export on torch, ZeRO-2, ZeRO-3, megatron-core);
#   3. the sampler's overhead on the GPU (bench_sampler.py --device cuda, batch 64);
#   4. ProSeCo vs MDM step time and peak memory on a SmolLM2-135M-shaped Llama (random weights:
#      the ratios do not depend on them), bf16, batch 8 x 512.
# Steps are independent: one failing does not stop the next (the exit status reports any failure).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}; [ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
status=0
step() { local name=$1; shift; echo "== $name"; "$@" 2>&1 | tee "$OUT/$name.txt"; [ "${PIPESTATUS[0]}" = 0 ] || status=1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' | tee -a "$OUT/nvidia-smi.csv"
step bench_gpu "$PY" benchmarks/bench_gpu.py --backends torch deepspeed --json "$OUT/bench_gpu.json"
step pytest_gpu "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
step bench_sampler "$PY" benchmarks/bench_sampler.py --device cuda --repeats 3 --json "$OUT/bench_sampler.json"
SMOL=$(mktemp -d)/smollm2-shaped
step smollm2_shape "$PY" - "$SMOL" <<'PY'
import sys, torch, transformers
cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                               rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
transformers.LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
print("wrote", sys.argv[1])
PY
step bench_hf "$PY" benchmarks/bench_hf.py --model "hf:$SMOL" --batch 8 --seq 512 --bf16 --repeats 5 --json "$OUT/bench_hf.json"
exit $status
