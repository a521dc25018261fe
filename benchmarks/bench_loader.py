"""Shard loader throughput against what a training step consumes, side by side in one process.

    python benchmarks/bench_loader.py                 # CPU; writes temporary shards, ~1 minute
    python benchmarks/bench_loader.py --json out.json

For each case it writes shards with ``webdataset.TarWriter`` (uint16 tokens, the layout of
``docs/data_format.md``), reads one full epoch with :class:`pipeline.data.ShardLoader` at 1 and 2
DataLoader workers (worker start-up included, as every epoch pays it), and times a plain MDM
training step (forward + backward + AdamW, one torch thread) of the matching model at the same
batch and sequence length. Headroom = loader samples/s / step samples/s (goal >= 10x on CPU):

* ``tiny``: the ``configs/tiny.yaml`` backbone (4x4 Sudoku, seq 16, batch 128);
* ``text``: the ``configs/text.yaml`` backbone (hidden 256, 4 layers, vocab 8192, seq 256, batch 32);
* ``text1k``: the same backbone at seq 1024, batch 8.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from pipeline.config import DiffusionConfig, ModelConfig
from pipeline.data import ShardLoader, manifest_fingerprint
from pipeline.diffusion.objective import proseco_loss
from pipeline.io import sha256_file
from pipeline.model import Backbone

CASES = {  # name: (model config, batch, samples written, shards)
    "tiny": ({"vocab_size": 6, "hidden": 64, "layers": 3, "heads": 4, "max_seq_len": 16, "learned_positions": True},
             128, 65536, 8),
    "text": ({"vocab_size": 8192, "hidden": 256, "layers": 4, "heads": 4, "max_seq_len": 256}, 32, 16384, 8),
    "text1k": ({"vocab_size": 8192, "hidden": 256, "layers": 4, "heads": 4, "max_seq_len": 1024}, 8, 8192, 8),
}


def write_shards(root: Path, samples: int, shards: int, seq_len: int, vocab: int) -> None:
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    table, per = [], samples // shards
    for s in range(shards):
        name = f"train/shard-00000-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for j in range(per):
                tokens = rng.integers(5, vocab, seq_len, dtype=np.uint16)
                sink.write({"__key__": f"p00000-{s * per + j:010d}", "tokens.npy": tokens})
        table.append({"name": name, "samples": per, "tokens": per * seq_len, "sha256": sha256_file(root / name)})
    manifest = {"format": "proseco-shards/1", "seq_len": seq_len, "mode": "wrap", "dtype": "uint16",
                "tokenizer": {"file": "-", "sha256": "-", "vocab_size": vocab,
                              "special": {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}},
                "splits": {"train": {"samples": per * shards, "tokens": per * shards * seq_len, "shards": table}}}
    manifest["fingerprint"] = manifest_fingerprint(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def loader_rate(root: Path, batch: int, workers: int) -> float:
    """Samples/s over one epoch, DataLoader start-up included; the best of two epochs."""
    loader = ShardLoader(root, batch_size=batch, rank=0, world_size=1, num_workers=workers, seed=0)
    rates = []
    for _ in range(2):
        t0 = time.perf_counter()
        n = sum(b["tokens"].shape[0] for b in loader.epoch_iter())
        rates.append(n / (time.perf_counter() - t0))
    return max(rates)


def step_rate(model_kw: dict, batch: int, repeats: int) -> float:
    """Samples/s of one MDM training step (forward, backward, AdamW) at this batch."""
    torch.manual_seed(0)
    cfg = ModelConfig(**model_kw)
    model = Backbone(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size - 1, (batch, cfg.max_seq_len))
    diffusion = dataclasses.replace(DiffusionConfig(), corrector_weight=0.0)
    gen = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        proseco_loss(lambda z, t, v: model(z, t, v), x, diffusion, cfg.vocab_size - 1, generator=gen).loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        for name in args.cases:
            model_kw, batch, samples, shards = CASES[name]
            seq = model_kw["max_seq_len"]
            root = Path(tmp, name)
            t0 = time.perf_counter()
            write_shards(root, samples, shards, seq, model_kw["vocab_size"])
            write_s = time.perf_counter() - t0
            train = step_rate(model_kw, batch, args.repeats)
            row = {"seq_len": seq, "batch": batch, "samples": samples, "write_samples_per_s": samples / write_s,
                   "step_samples_per_s": train, "step_ms": 1e3 * batch / train}
            for w in args.workers:
                rate = loader_rate(root, batch, w)
                row[f"loader_w{w}_samples_per_s"] = rate
                row[f"headroom_w{w}"] = rate / train
            results[name] = row
            loaders = "  ".join(f"{w} worker{'s' if w > 1 else ''} {row[f'loader_w{w}_samples_per_s']:9.0f}/s "
                                f"({row[f'headroom_w{w}']:6.1f}x)" for w in args.workers)
            print(f"{name:7s} seq {seq:5d} batch {batch:4d}: step {row['step_ms']:7.1f} ms = {train:7.0f} samples/s;"
                  f"  loader {loaders}")
    worst = min(v for r in results.values() for k, v in r.items() if k.startswith("headroom"))
    print(f"smallest headroom {worst:.1f}x (goal >= 10x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
