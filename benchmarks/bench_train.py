"""Overhead of `proseco train` over a bare PyTorch loop running the same model, batch and loss.

    python benchmarks/bench_train.py                  # CPU, 2 threads, a small text model, ~1 minute
    python benchmarks/bench_train.py --hidden 512 --layers 8 --json out.json

Goal (CPU): step time of ``proseco train`` / bare loop <= 1.05.

* ``train``: :func:`pipeline.train.run` in this process (single process, ``parallel.backend=torch``,
  ``log.wandb=disabled`` unless ``--wandb``, no validation, no checkpoint until the end) on
  random-token shards written to a temporary folder (``bench_loader.write_shards``: the
  ``docs/data_format.md`` layout, the ``configs/text.yaml`` vocabulary). Its step time is the
  ``step_s`` column of ``metrics.jsonl`` (``log.every=1``): data loading, lr schedule,
  :func:`proseco_loss` with the split backward, clip, AdamW step and metric reduction.
* ``bare``: the same :class:`Backbone` config and initial weights, :func:`make_optimizer`'s AdamW,
  batches of the same shape taken from the same shards beforehand, the same ``proseco_loss`` with
  the split backward, gradient clipping and ``optimizer.step()``, timed with ``time.perf_counter``.

The two alternate (train, bare, train, bare, ...) for ``--rounds`` rounds so that drift on a shared
machine hits both alike; the first ``--warmup`` steps of each round are not counted. Reported: the
median ms/step of each over all counted steps, their ratio, the per-round medians, and the ratio of
the fastest steps (other load on the machine only ever adds time, so the minimum is the steadier
estimate on a busy machine).
``step_s`` ends after the metrics reduction, so what ``run()`` does between steps (writing the
metrics row, the checkpoint and stop checks) is outside it; ``train_wall_ms`` (``run()``'s wall
time / steps, start-up and the final checkpoint included) bounds that from above. It is context,
not part of the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.config import load_config
from pipeline.data import ShardLoader
from pipeline.diffusion.objective import proseco_loss
from pipeline.model import Backbone, count_parameters
from pipeline.optim import make_optimizer

try:  # run as a script (benchmarks/ is on sys.path) or as `python -m benchmarks.bench_train`
    from bench_loader import write_shards
    from bench_objective import add_model_args
except ImportError:
    from benchmarks.bench_loader import write_shards
    from benchmarks.bench_objective import add_model_args

PRESET = Path(__file__).resolve().parents[1] / "configs" / "text.yaml"


def make_config(args, shards: Path, run: Path):
    return load_config(PRESET, [
        f"data.shards={shards}", f"run.dir={run}", "run.name=bench_train", "model.vocab_size=null",
        f"model.hidden={args.hidden}", f"model.layers={args.layers}", f"model.heads={args.heads}",
        f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}", f"optim.batch_size={args.batch}",
        f"optim.steps={args.steps}", f"parallel.threads={args.threads}", "log.every=1", "log.val_every=0",
        f"checkpoint.every={10**9}", "parallel.distributed=none", "parallel.backend=torch",
        f"log.wandb={args.wandb}", "data.loader_workers=0",
    ])


def train_round(args, shards: Path, run: Path) -> tuple[list[float], float, list[float]]:
    """(step_s of the counted steps, run() wall seconds, data_wait_s of the counted steps)."""
    from pipeline.train import run as train_run  # imported late: another engineer may be editing it

    cfg = make_config(args, shards, run)
    sink = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sink if not args.verbose else sys.stdout), \
                contextlib.redirect_stderr(sink if not args.verbose else sys.stderr):
            code = train_run(cfg)
    finally:
        sink.close()
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"pipeline.train.run returned {code}")
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            rows[row["step"]] = row
    counted = [rows[s] for s in sorted(rows) if s > args.warmup]
    if len(counted) != args.steps - args.warmup:
        raise SystemExit(f"metrics.jsonl has {len(counted)} rows after warm-up, expected {args.steps - args.warmup}")
    return [r["step_s"] for r in counted], wall, [r.get("data_wait_s", 0.0) for r in counted]


def take_batches(cfg, n: int) -> list[dict]:
    loader = ShardLoader(cfg.data.shards, "train", cfg.optim.batch_size, rank=0, world_size=1, seed=cfg.run.seed)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def bare_round(args, cfg, vocab: int, mask_id: int, batches: list[dict]) -> list[float]:
    """Seconds per step of the counted steps of a hand-written loop."""
    torch.set_num_threads(cfg.parallel.threads)
    torch.manual_seed(cfg.run.seed)
    model = Backbone(cfg.model, vocab_size=vocab)
    optimizer = make_optimizer(model, cfg.optim)
    model.train()
    gen = torch.Generator().manual_seed(cfg.run.seed)

    def forward(z, tt, v):
        return model(z, tt, v)

    def backward(loss):
        loss.backward()

    times = []
    for step in range(args.steps):
        batch = batches[step % len(batches)]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        proseco_loss(forward, batch["tokens"], cfg.diffusion, mask_id, valid=batch["valid"], generator=gen,
                     backward=backward)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[args.warmup:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, 8192, "the tokenizer vocabulary written to the manifest")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per round (warm-up included)")
    p.add_argument("--warmup", type=int, default=2, help="steps of each round not counted")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wandb", default="disabled", choices=["disabled", "offline"],
                   help="log.wandb of the `proseco train` rounds")
    p.add_argument("--verbose", action="store_true", help="show the output of pipeline.train.run")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()
    if not 0 <= args.warmup < args.steps:
        p.error("need 0 <= --warmup < --steps")
    torch.set_num_threads(args.threads)
    train_s, bare_s, walls, waits, per_round = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        shards = Path(tmp, "shards")
        write_shards(shards, samples=max(64, args.batch * args.steps * 2), shards=4, seq_len=args.seq,
                     vocab=args.vocab)
        cfg = make_config(args, shards, Path(tmp, "unused"))
        manifest = json.loads((shards / "manifest.json").read_text())
        vocab, mask_id = cfg.model.vocab_size or args.vocab, int(manifest["tokenizer"]["special"]["mask"])
        batches = take_batches(cfg, min(args.steps, 16))
        for r in range(args.rounds):
            tr, wall, wait = train_round(args, shards, Path(tmp, f"run{r}"))
            br = bare_round(args, cfg, vocab, mask_id, batches)
            train_s += tr
            bare_s += br
            walls.append(wall / args.steps)
            waits += wait
            per_round.append((statistics.median(tr), statistics.median(br)))
        params = count_parameters(Backbone(cfg.model, vocab_size=vocab))
    train_ms, bare_ms = 1e3 * statistics.median(train_s), 1e3 * statistics.median(bare_s)
    summary = {
        "device": "cpu", "params": params, "hidden": args.hidden, "layers": args.layers, "seq": args.seq,
        "batch": args.batch, "vocab": vocab, "threads": args.threads, "rounds": args.rounds,
        "counted_steps_per_round": args.steps - args.warmup, "wandb": args.wandb,
        "train_ms": train_ms, "bare_ms": bare_ms, "ratio": train_ms / bare_ms,
        "train_min_ms": 1e3 * min(train_s), "bare_min_ms": 1e3 * min(bare_s), "ratio_min": min(train_s) / min(bare_s),
        "train_data_wait_ms": 1e3 * statistics.median(waits), "train_wall_ms": 1e3 * statistics.median(walls),
        "rounds_ms": [{"train": 1e3 * a, "bare": 1e3 * b} for a, b in per_round],
    }
    print(f"model {params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers, vocab {vocab}), "
          f"batch {args.batch} x seq {args.seq}, cpu, threads {args.threads}, log.wandb={args.wandb}")
    print(f"  {args.rounds} rounds x {args.steps - args.warmup} counted steps (after {args.warmup} warm-up), "
          f"alternating train / bare")
    for i, (a, b) in enumerate(per_round):
        print(f"  round {i}: train {a * 1e3:8.1f} ms   bare {b * 1e3:8.1f} ms   ratio {a / b:.3f}")
    print(f"  proseco train (step_s)    {train_ms:8.1f} ms/step   (data wait {summary['train_data_wait_ms']:.2f} ms)")
    print(f"  bare PyTorch loop         {bare_ms:8.1f} ms/step")
    print(f"  ratio train / bare        {summary['ratio']:8.3f}   (goal <= 1.05)")
    print(f"  fastest step train / bare {summary['train_min_ms']:8.1f} / {summary['bare_min_ms']:.1f} ms = "
          f"{summary['ratio_min']:.3f}   (less sensitive to other load on the machine)")
    print(f"  run() wall / steps        {summary['train_wall_ms']:8.1f} ms/step   (start-up and final save included)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
