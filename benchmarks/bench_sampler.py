"""Sampler overhead: sampling wall time / (NFE x one bare forward at the same batch).

    python benchmarks/bench_sampler.py                 # CPU, 2 threads, batch 64, two model sizes
    python benchmarks/bench_sampler.py --device cuda   # the same on a GPU (timers synchronise the device)

Three denominators, all "network time the sampler could not avoid":
* ``ratio``: batched network calls x one bare forward at the full batch (NFE counted per call);
* ``ratio_rows``: (sum of per-sample NFE / batch) bare forwards - lower when the sampler runs
  only the rows that changed, as the corrector's fixed-point exit does;
* ``ratio_net``: the time spent inside the sampler's own network calls, timed where they run.
  The bare forward swings by +-25% between measurements on a shared machine, which moves the
  first two; this one compares the sampler with the very calls it made (the steadiest figure).
Everything above 1.0 is the sampler's own work: float64 categorical draws, nucleus, per-sample
random streams, bookkeeping. Target: <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_objective import sync, time_steps

from pipeline.config import ModelConfig, SamplerConfig
from pipeline.diffusion.sampling import sample
from pipeline.model import Backbone

MODELS = {
    # the demo's model (4x4 Sudoku): the forward is tiny, so per-step overhead shows most
    "tiny-sudoku": ModelConfig(vocab_size=5, hidden=64, layers=3, heads=4, max_seq_len=16, learned_positions=True),
    # a text-like shape: 8k vocabulary, 64 tokens
    "small-text": ModelConfig(vocab_size=8192, hidden=256, layers=4, heads=4, max_seq_len=64),
}


def bare_forward(model, batch: int, seq: int, vocab: int, repeats: int, device: torch.device) -> float:
    x = torch.randint(0, vocab - 1, (batch, seq), device=device)
    t = torch.ones(batch, device=device)
    with torch.no_grad():
        return time_steps(lambda: model(x, t, None), repeats, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    for name in args.models.split(","):
        cfg = MODELS[name]
        torch.manual_seed(0)
        model = Backbone(cfg).eval().to(device)
        mask_id, seq = cfg.vocab_size - 1, cfg.max_seq_len
        for sampler in (SamplerConfig(name="ancestral", steps=seq // 4),
                        SamplerConfig(name="ancestral", steps=seq // 4, nucleus_p=0.9),
                        SamplerConfig(name="ancestral", steps=seq // 4, corrector_steps=2),
                        SamplerConfig(name="confidence", steps=seq // 4, corrector_steps=2),
                        SamplerConfig(name="remdm", steps=seq // 4)):
            # the bare forward is re-measured next to each sampler, so drift on a shared machine
            # hits numerator and denominator alike; cheap models get more repeats (noisier)
            fwd = bare_forward(model, args.batch, seq, cfg.vocab_size, 10, device)
            repeats = args.repeats if fwd > 0.05 else max(args.repeats, 15)
            walls, nets, outs = [], [], []
            for r in range(repeats):
                net = [0.0]

                def timed(x, t, valid, net=net, model=model):
                    sync(device)
                    t0 = time.perf_counter()
                    out = model(x, t, valid)
                    sync(device)
                    net[0] += time.perf_counter() - t0
                    return out

                sync(device)
                t0 = time.perf_counter()
                out = sample(timed, sampler, seq_len=seq, mask_id=mask_id, device=device,
                             batch=args.batch, seeds=list(range(r * args.batch, (r + 1) * args.batch)))
                sync(device)
                walls.append(time.perf_counter() - t0)
                nets.append(walls[-1] / net[0])
                outs.append(out)
            wall, ratio_net = statistics.median(walls), statistics.median(nets)
            nfe_rows = float(statistics.median(o.nfe.sum().item() for o in outs))
            calls = float(statistics.median(o.calls for o in outs))
            ratio, ratio_rows = wall / (calls * fwd), wall / (nfe_rows / args.batch * fwd)
            label = (f"{sampler.name} T={sampler.steps} S={sampler.corrector_steps}"
                     + (f" p={sampler.nucleus_p}" if sampler.nucleus_p < 1 else ""))
            rows.append({"model": name, "device": str(device), "sampler": label, "wall_s": wall, "forward_s": fwd,
                         "nfe_mean": nfe_rows / args.batch, "calls": calls, "ratio": ratio,
                         "ratio_rows": ratio_rows, "ratio_net": ratio_net})
            print(f"{name:12s} {label:32s} wall {wall * 1e3:8.1f} ms  NFE {nfe_rows / args.batch:5.1f}  "
                  f"calls {calls:5.1f}  forward {fwd * 1e3:7.2f} ms  ratio {ratio:.3f}  ratio_rows {ratio_rows:.3f}  ratio_net {ratio_net:.3f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
