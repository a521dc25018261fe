"""Kernel launches and host syncs per sampling step on the GPU code path, counted on a CPU.

    python benchmarks/sampler_launches.py            # the five settings of bench_sampler.py, batch 64

On a GPU the sampler is launch-bound whenever the forward takes a few milliseconds (an H200 ran
small-text's 2-3 ms forward at ratio_net 1.8-5.6), so the number of kernels the sampler launches
per step, and the host syncs that stall the launch queue, are what its speed there depends on.
This counts them without a GPU: the sampler runs on CPU with its GPU-only choices forced (the
unchunked argmax and CDF inversion, the accelerator's block size of over_rows), under
torch.profiler; every leaf aten op outside the network that is not a view or an allocation is one
launch, every ``_local_scalar_dense`` (``bool(t)``, ``int(t)``, ``t.item()``) one sync. A proxy:
the Denoiser's row cache still takes its CPU branch (one index-copy kernel fewer per step than the
GPU's), and fused or composite ops may launch a different number of kernels on CUDA.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from pipeline.config import ModelConfig, SamplerConfig
from pipeline.diffusion import decoding
from pipeline.diffusion.sampling import sample
from pipeline.model import Backbone

NO_KERNEL = {  # views, metadata and allocations: no kernel on a GPU
    "aten::slice", "aten::squeeze", "aten::unsqueeze", "aten::reshape", "aten::view", "aten::as_strided",
    "aten::select", "aten::expand", "aten::expand_as", "aten::t", "aten::transpose", "aten::permute",
    "aten::unflatten", "aten::alias", "aten::view_as", "aten::_unsafe_view", "aten::_reshape_alias",
    "aten::split", "aten::unbind", "aten::detach", "aten::detach_", "aten::empty", "aten::empty_strided",
    "aten::empty_like", "aten::resize_", "aten::result_type", "aten::lift_fresh", "aten::to",
    "aten::contiguous", "aten::item", "aten::_local_scalar_dense",
}
SETTINGS = {
    "ancestral S=0": {"name": "ancestral"},
    "ancestral S=0 p=0.9": {"name": "ancestral", "nucleus_p": 0.9},
    "ancestral S=2": {"name": "ancestral", "corrector_steps": 2},
    "confidence S=2": {"name": "confidence", "corrector_steps": 2},
    "remdm S=0": {"name": "remdm"},
}


def count(model, sampler: SamplerConfig, batch: int, seq: int, mask_id: int) -> tuple[float, float]:
    """(launches, syncs) per unmasking step of one sampling run."""
    def fn(x, t, valid):
        with record_function("network"):
            return model(x, t, valid)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sample(fn, sampler, seq_len=seq, mask_id=mask_id, batch=batch)
    launches = syncs = 0
    for event in prof.events():
        parent = event
        while parent is not None and parent.name != "network":
            parent = parent.cpu_parent
        if parent is not None:
            continue
        syncs += event.name == "aten::_local_scalar_dense"
        launches += not event.cpu_children and event.name not in NO_KERNEL
    return launches / sampler.steps, syncs / sampler.steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--cpu-blocks", action="store_true",
                   help="keep the CPU's cache-sized blocks (what the GPU path used before it had its own)")
    args = p.parse_args()
    torch.set_num_threads(1)
    decoding._chunked = lambda x: False  # the GPU's one-kernel argmax and CDF inversion
    if not args.cpu_blocks:
        decoding.BLOCK_ELEMENTS = decoding.BLOCK_ELEMENTS_ACCELERATOR
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, hidden=64, layers=1, heads=2, max_seq_len=args.seq)  # only its calls are skipped
    model = Backbone(cfg).eval()
    print(f"batch {args.batch}, {args.seq} tokens, vocabulary {args.vocab}, T = {args.seq // 4} steps")
    for label, kw in SETTINGS.items():
        launches, syncs = count(model, SamplerConfig(steps=args.seq // 4, **kw), args.batch, args.seq, args.vocab - 1)
        print(f"{label:22s} launches/step {launches:7.1f}   host syncs/step {syncs:5.1f}", flush=True)


if __name__ == "__main__":
    main()
