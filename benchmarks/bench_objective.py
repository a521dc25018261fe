"""Cost of the ProSeCo objective against plain MDLM, measured side by side in one process.

    python benchmarks/bench_objective.py                       # CPU, 2 threads, a small text-like model
    python benchmarks/bench_objective.py --hidden 768 --layers 12 --heads 12 --seq 1024 --vocab 50258 --batch 8

Reports, on the same batch and model:
* step time ProSeCo / MDM (two forward + two backward vs one of each; target <= 2.05x);
* peak memory during the step, ProSeCo / MDM, with the memory-saving order (pass 1's backward
  before pass 2; target <= 1.15x) and without it (both graphs alive at one backward).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the allocations and frees that
``torch.profiler`` (``profile_memory=True``) attributes to each op, replayed in time order. Both count
tensor memory only (activations, gradients, optimizer state), not the Python process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from pipeline.config import DiffusionConfig, ModelConfig
from pipeline.diffusion.objective import proseco_loss
from pipeline.model import Backbone, count_parameters


def step_fn(model, x, diffusion, mask_id, seed):
    def run():
        gen = torch.Generator(device=x.device).manual_seed(seed)
        model.zero_grad(set_to_none=True)
        fn = (lambda z, t, v: model(z, t, v))
        if diffusion.split_backward:
            proseco_loss(fn, x, diffusion, mask_id, generator=gen, backward=lambda loss: loss.backward())
        else:
            proseco_loss(fn, x, diffusion, mask_id, generator=gen).loss.backward()
    return run


def sync(device) -> None:
    """Wait for the device's queued work, so a wall-clock timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run, repeats: int, device) -> float:
    """Median wall seconds of ``run()`` over ``repeats`` calls after one warm-up, device synchronised."""
    run()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(run, device) -> int:
    """Peak tensor bytes allocated during one step, above what was allocated before it."""
    run()  # gradients exist from here on, as in a training loop
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # Each allocation/free is attributed to the innermost op that made it (its "self" memory);
    # orphan frees appear as "[memory]" events. Replayed in time order they give the curve.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def add_model_args(p: argparse.ArgumentParser, vocab: int, vocab_help: str | None = None) -> None:
    """The model-size options the benchmarks share: --hidden --layers --heads --seq --vocab --batch."""
    for name, default in (("hidden", 256), ("layers", 4), ("heads", 4), ("seq", 256)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--vocab", type=int, default=vocab, help=vocab_help)
    p.add_argument("--batch", type=int, default=8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, 4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU path)")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                      max_seq_len=args.seq)
    torch.manual_seed(0)
    model = Backbone(cfg).to(device)
    x = torch.randint(0, args.vocab - 1, (args.batch, args.seq), device=device)
    mask_id = args.vocab - 1
    base = DiffusionConfig()
    variants = {
        "mdm": dataclasses.replace(base, corrector_weight=0.0),
        "proseco": dataclasses.replace(base, split_backward=True),
        "proseco_joint_backward": dataclasses.replace(base, split_backward=False),
    }
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    results = {}
    with autocast:
        for name, diffusion in variants.items():
            run = step_fn(model, x, diffusion, mask_id, seed=1)
            results[name] = {"step_s": time_steps(run, args.repeats, device), "peak_mb": peak_bytes(run, device) / 2**20}
        # time once more in interleaved order so drift on a shared machine hits both alike
        for name, diffusion in variants.items():
            run = step_fn(model, x, diffusion, mask_id, seed=1)
            results[name]["step_s"] = min(results[name]["step_s"], time_steps(run, args.repeats, device))
    mdm = results["mdm"]
    summary = {
        "device": str(device), "params": count_parameters(model), "batch": args.batch, "seq": args.seq,
        "threads": args.threads, "bf16": args.bf16, **{f"{k}_{m}": v[m] for k, v in results.items() for m in v},
        "time_ratio": results["proseco"]["step_s"] / mdm["step_s"],
        "peak_ratio_split": results["proseco"]["peak_mb"] / mdm["peak_mb"],
        "peak_ratio_joint": results["proseco_joint_backward"]["peak_mb"] / mdm["peak_mb"],
    }
    print(f"model {summary['params'] / 1e6:.2f}M params, batch {args.batch} x seq {args.seq}, {device}, "
          f"threads {args.threads}{', bf16' if args.bf16 else ''}")
    for name, r in results.items():
        print(f"  {name:24s} step {r['step_s'] * 1e3:8.1f} ms   peak {r['peak_mb']:8.1f} MiB")
    print(f"  step time ProSeCo / MDM             {summary['time_ratio']:.3f}  (target <= 2.05)")
    print(f"  peak memory ProSeCo / MDM (split)   {summary['peak_ratio_split']:.3f}  (target <= 1.15)")
    print(f"  peak memory ProSeCo / MDM (joint)   {summary['peak_ratio_joint']:.3f}  (one backward, both graphs alive)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
