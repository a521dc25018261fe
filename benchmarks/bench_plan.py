"""`proseco plan`'s predicted peak memory per device vs the measured peak, on CPU.

    python benchmarks/bench_plan.py                    # 3 model sizes x (single process, 2-rank DDP)
    python benchmarks/bench_plan.py --layouts single ddp fsdp --sizes s m --json plan.json
    python benchmarks/bench_plan.py --sizes s --layouts single --checkpointing   # activation checkpointing
    python benchmarks/bench_plan.py --sizes s --layouts single --extra parallel.bf16=true --steps 4

Each case runs in fresh processes (2 gloo ranks for ddp / fsdp, one thread each): a worker builds the
engine of the config (:func:`pipeline.engines.build_engine`) and runs ``--steps`` optimizer steps of
the train loop's step (ProSeCo loss with the split backward, clip, AdamW, EMA) on random tokens.

What is measured: the growth of the process's peak resident set (VmHWM) from just before the engine
is built to the end of the steps, per rank (the largest rank is reported). Before the baseline the
worker runs one tiny forward/backward/AdamW step, so the kernels' code and thread pools are already
resident, and the peak counter is reset (``/proc/self/clear_refs`` = 5). The workers run with
``MALLOC_MMAP_THRESHOLD_=65536``: every tensor buffer above 64 KiB is its own mmap, returned to the
system when freed, so resident memory follows the live tensors instead of glibc's free lists (glibc's
default threshold grows to 32 MiB after the first free and then keeps freed buffers resident). This
is why RSS is a fair measure of what the planner predicts: it is what the allocator holds at the
peak, including everything the planner might forget (DDP buckets, temporaries, gloo buffers), and
it needs no instrumentation that would change the program. The prediction is
:func:`pipeline.plan.memory` for the same config and layout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> overrides; batch and sequence chosen so one step takes seconds on one CPU thread
SIZES = {
    "s": ["model.hidden=256", "model.layers=4", "model.heads=4", "model.vocab_size=4096",
          "optim.batch_size=4", "data.seq_len=256"],
    "m": ["model.hidden=512", "model.layers=6", "model.heads=8", "model.vocab_size=8192",
          "optim.batch_size=4", "data.seq_len=256"],
    "l": ["model.hidden=768", "model.layers=8", "model.heads=12", "model.vocab_size=16384",
          "optim.batch_size=2", "data.seq_len=256"],
}
LAYOUTS = {"single": (1, ["parallel.distributed=none"]), "ddp": (2, ["parallel.distributed=ddp"]),
           "fsdp": (2, ["parallel.distributed=fsdp"])}
COMMON = ["model.max_seq_len=256", "model.dropout=0.0", "data.task=text"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(overrides: list[str], steps: int) -> dict:
    """One rank of a case: the peak RSS growth (bytes) over the engine's build and ``steps`` steps."""
    import torch

    from pipeline.config import load_config
    from pipeline.diffusion.objective import proseco_loss
    from pipeline.distributed import init_process_group, world_from_env
    from pipeline.engines import build_engine

    torch.set_num_threads(1)
    cfg = load_config([], overrides)
    rank, world, _ = world_from_env()
    if world > 1:
        init_process_group("gloo", rank, world, 120)
    device = torch.device("cpu")
    vocab, mask_id = cfg.model.vocab_size, cfg.model.vocab_size - 1
    gen = torch.Generator().manual_seed(rank)
    x = torch.randint(0, vocab - 1, (cfg.optim.batch_size, cfg.data.seq_len), generator=gen)
    valid = torch.ones_like(x, dtype=torch.bool)

    warm = load_config([], [*overrides, "model.hidden=32", "model.layers=1", "model.heads=2", "model.vocab_size=64",
                            "parallel.distributed=none"])
    _steps(build_engine(warm, 64, device, 0, 1), warm, x[:, :16] % 63, valid[:, :16], 63, 1, proseco_loss, world=1)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    engine = build_engine(cfg, vocab, device, rank, world)
    times = _steps(engine, cfg, x, valid, mask_id, steps, proseco_loss, world)
    return {"rank": rank, "peak_growth": (_status_kib("VmHWM") - base) * 1024, "base": base * 1024,
            "first_step_s": times[0], "step_s": sorted(times[1:])[len(times[1:]) // 2] if steps > 1 else times[0]}


def _steps(engine, cfg, x, valid, mask_id, steps, proseco_loss, world) -> list[float]:
    """``steps`` optimizer steps as :mod:`pipeline.train` runs them (one micro-step each); their seconds."""
    import torch

    engine.model.train()
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        engine.set_lr(1e-4)
        engine.zero_grad()
        calls = [0]

        def model_fn(z, t, v, _calls=calls):
            _calls[0] += 1
            return engine.forward(z, t, v, sync=_calls[0] == 2)

        proseco_loss(model_fn, x, cfg.diffusion, mask_id, valid=valid,
                     generator=torch.Generator().manual_seed(step), backward=engine.backward)
        engine.step()
        times.append(time.perf_counter() - t0)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return times


def run_case(size: str, layout: str, steps: int, checkpointing: bool, ema: float, extra: list[str]) -> dict:
    """Start the ranks of one case; the prediction beside the largest rank's measurement."""
    from pipeline.config import load_config
    from pipeline.plan import layout_of, memory

    nproc, lay = LAYOUTS[layout]
    overrides = [*COMMON, *SIZES[size], *lay, f"parallel.activation_checkpointing={str(checkpointing).lower()}",
                 f"optim.ema={ema}", *extra]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "WORLD_SIZE": str(nproc)}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--steps", str(steps), "--", *overrides],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(nproc)]
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{size}/{layout} failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    cfg = load_config([], overrides)
    pred = memory(cfg, cfg.model.vocab_size, layout_of(cfg, nproc))
    measured = max(r["peak_growth"] for r in results)
    from pipeline.model import parameter_count

    return {"size": size, "layout": layout, "checkpointing": checkpointing, "ema": ema, "extra": " ".join(extra),
            "first_step_s": max(r["first_step_s"] for r in results),
            "params": parameter_count(cfg.model, cfg.model.vocab_size), "predicted_mib": pred.total / 2**20,
            "measured_mib": measured / 2**20, "error": pred.total / measured - 1,
            "step_s": max(r["step_s"] for r in results), "terms_mib": {k: v / 2**20 for k, v in vars(pred).items()}}


def table(rows: list[dict]) -> str:
    """Markdown table of the cases."""
    lines = [("| size | params | layout | act. ckpt | EMA | other settings | predicted MiB | measured MiB | error "
             "| s/step |"), "|---|---:|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['layout']} | {'yes' if r['checkpointing'] else 'no'} "
                     f"| {'yes' if r['ema'] else 'no'} | {r['extra'] or '-'} | {r['predicted_mib']:,.0f} | {r['measured_mib']:,.0f} | {r['error']:+.1%} | {r['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--layouts", nargs="+", default=["single", "ddp"], choices=list(LAYOUTS))
    p.add_argument("--checkpointing", action="store_true", help="with activation checkpointing")
    p.add_argument("--ema", type=float, default=0.999,
                   help="optim.ema (0 for fsdp: the torch engine keeps an unsharded EMA until issue 14 item 2)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per case (>= 2: AdamW state exists)")
    p.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more config overrides for every case, e.g. parallel.bf16=true parallel.compile=true")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.overrides, args.steps)))
        return
    rows = []
    for size in args.sizes:
        for layout in args.layouts:
            rows.append(run_case(size, layout, args.steps, args.checkpointing, args.ema, args.extra))
            r = rows[-1]
            print(f"{size} {layout}: predicted {r['predicted_mib']:,.0f} MiB, measured {r['measured_mib']:,.0f} MiB "
                  f"({r['error']:+.1%}), {r['step_s']:.2f} s/step (first {r['first_step_s']:.1f} s); terms "
                  + ", ".join(f"{k} {v:,.0f}" for k, v in r["terms_mib"].items()), flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
