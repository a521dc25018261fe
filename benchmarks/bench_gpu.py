"""Training throughput and MFU of `proseco train` on one GPU: torch backend vs DeepSpeed ZeRO-2.

    python benchmarks/bench_gpu.py                       # DiT-small, seq 1024, bf16, one GPU (~3 min)
    python benchmarks/bench_gpu.py --json gpu.json --backends torch deepspeed megatron
    python benchmarks/bench_gpu.py --smoke               # a tiny model on CPU: checks the script runs

Each backend runs `proseco train` (a subprocess, as a user runs it) for ``--steps`` optimizer steps
on synthetic shards (random tokens: throughput does not depend on the text), logging every step;
the first ``--warmup`` steps are dropped and the median of the rest is reported.

FLOPs per trained token (:func:`pipeline.plan.flops_per_token`, the planner's and the train log's MFU
use the same; both ProSeCo passes counted - each is a full forward and backward):
``passes x (6 N + 12 L H S)`` with N the parameters that do matmuls (every weight but the embedding
table and position table), L layers, H hidden size, S sequence length (bidirectional attention:
QK^T and AV, forward + backward). MFU = tokens/s x FLOPs per token / peak bf16 dense FLOP/s of the
card (H100 / H200 SXM: 989 TFLOP/s; override with ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import write_shards

from pipeline.plan import PEAK_TFLOPS, flops_per_token, param_counts

DIT_SMALL = ["--config", "owt_small", "model.dropout=0.0"]  # 12 x 768, 12 heads, seq 1024, vocab 50259
SMOKE = ["model.vocab_size=512", "model.hidden=32", "model.layers=1", "model.heads=2", "model.max_seq_len=64",
         "data.seq_len=64"]


def run_backend(backend: str, shards: Path, run: Path, args, overrides: list[str]) -> list[dict]:
    extra = {"torch": [], "deepspeed": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
             "megatron": ["parallel.backend=megatron"]}[backend]
    cmd = [sys.executable, "-m", "pipeline", "train", *overrides, "data.task=text", f"data.shards={shards}",
           f"run.dir={run}", f"optim.steps={args.steps}", f"optim.batch_size={args.batch}", "log.every=1",
           "log.val_every=0", f"checkpoint.every={10 * args.steps}", "optim.ema=0",
           "log.wandb=disabled", f"parallel.bf16={str(not args.smoke).lower()}",
           f"parallel.activation_checkpointing={str(args.activation_checkpointing).lower()}", *extra]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                str(ROOT / ".cache" / "torch_extensions"))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{backend} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows[args.warmup:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["torch", "deepspeed"], choices=["torch", "deepspeed", "megatron"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16, help="sequences per step (per GPU)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 dense TFLOP/s of the card (default: by name)")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, fp32: only checks that the script works")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch = min(args.steps, 4), min(args.warmup, 1), min(args.batch, 2)
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device (use --smoke to check the script on CPU)")

    from pipeline.config import load_config

    overrides = SMOKE if args.smoke else DIT_SMALL
    cli_cfg = load_config([str(ROOT / "configs" / "owt_small.yaml")] if not args.smoke else None,
                          overrides[2:] if not args.smoke else overrides)
    cfg, vocab, seq = cli_cfg.model, cli_cfg.model.vocab_size, cli_cfg.data.seq_len
    passes = 2 if cli_cfg.diffusion.corrector_weight > 0 else 1
    fpt = flops_per_token(cfg, vocab, seq, passes)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    results = {"device": device, "model_params": param_counts(cfg, vocab).matmul, "seq_len": seq, "batch": args.batch,
               "flops_per_token": fpt, "peak_tflops": peak, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        shards = Path(tmp) / "shards"
        write_shards(shards, samples=max(args.batch * (args.steps + 2), 64), shards=4, seq_len=seq, vocab=min(vocab, 50000))
        for backend in args.backends:
            rows = run_backend(backend, shards, Path(tmp) / backend, args, overrides)
            tps = statistics.median(r["tokens_per_s"] for r in rows)
            mfu = tps * fpt / (peak * 1e12) if peak else None
            results["backends"][backend] = {
                "tokens_per_s": tps, "step_s": statistics.median(r["step_s"] for r in rows),
                "memory_mb": max(r["memory_mb"] for r in rows), "mfu": mfu, "final_loss": rows[-1]["loss"]}
    print(f"device {device}; {results['model_params'] / 1e6:.1f}M matmul params, seq {seq}, batch {args.batch}, "
          f"{fpt / 1e9:.2f} GFLOP per token ({passes} passes)")
    print(f"{'backend':<10} {'tokens/s':>12} {'step ms':>9} {'peak MiB':>9} {'MFU':>7}")
    for name, r in results["backends"].items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{name:<10} {r['tokens_per_s']:>12,.0f} {1000 * r['step_s']:>9.1f} {r['memory_mb']:>9.0f} {mfu:>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
