"""Checkpoint save time and peak memory: full state (gathered on rank 0) vs sharded (DCP), 2 ranks.

    python benchmarks/bench_ckpt.py [--config configs/owt_small.yaml] [--nproc 2] [--distributed fsdp]
                                    [--dir /tmp] [--formats full sharded async] [--set KEY=VALUE ...]

For each format, a fresh set of ``--nproc`` gloo ranks builds the torch engine (FSDP2 by default,
EMA on), takes one optimizer step (so AdamW has its moments), then saves two checkpoints (the second is measured) through
:class:`pipeline.checkpoint.manager.CheckpointManager` exactly as ``proseco train`` does (files,
checksums, ``meta.json``, rename, ``COMPLETE``). Reported per format:

* ``blocked s``: how long the training loop waits (for ``async``: until ``save_async`` returns);
* ``total s``: until the checkpoint is committed (``COMPLETE`` written);
* ``rank-0 peak +MiB`` / ``rank-1 peak +MiB``: the largest resident-memory increase of each rank
  during the save, over its resident memory just before (sampled every 5 ms from /proc);
* ``files``: the checkpoint's files and total size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.checkpoint import sharded
from pipeline.checkpoint.manager import CheckpointManager
from pipeline.config import load_config
from pipeline.engines import build_engine

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _PeakRSS:
    """The largest resident memory seen while the block runs (a sampling thread)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rank(rank: int, world: int, port: int, args, fmt: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(args.config, [f"parallel.distributed={args.distributed}", "optim.ema=0.999",
                                    f"checkpoint.format={'full' if fmt == 'full' else 'sharded'}",
                                    f"checkpoint.async_save={str(fmt == 'async').lower()}", *args.set])
    vocab = cfg.model.vocab_size
    engine = build_engine(cfg, vocab, torch.device("cpu"), rank, world)
    x = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine.forward(x, torch.full((1,), 0.5), None, sync=True).float().mean())
    engine.step()
    params = sum(p.numel() for p in engine.model.parameters())  # a DTensor counts its global shape
    run = Path(args.dir) / f"bench_ckpt_{fmt}"
    ckpt = CheckpointManager(run, keep_last=1, rank=rank, world_size=world)

    def writer(tmp: Path):
        if fmt == "full":
            return engine.save(tmp, rank) or {}, None
        return {}, sharded.save(engine.sharded_state(), tmp, asynchronous=fmt == "async")

    for step in (1, 2):  # the second save is measured: the first also sets up (process groups, plans)
        dist.barrier()
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            if fmt == "async":
                ckpt.save_async(step, {}, writer=writer)
                blocked = time.perf_counter() - t0
                ckpt.wait()
            else:
                ckpt.save(step, {}, writer=lambda tmp: writer(tmp)[0])
                blocked = time.perf_counter() - t0
            total = time.perf_counter() - t0
    row = {"blocked": blocked, "total": total, "peak": (mem.peak - mem.base) / 2**20, "params": params}
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        files = [p for p in (run / "checkpoints" / "step_00000002").rglob("*") if p.is_file()]
        out.update(rank_rows=rows, files=len(files), mib=sum(p.stat().st_size for p in files) / 2**20)
        shutil.rmtree(run)
    dist.destroy_process_group()


def _worker(rank, world, port, args, fmt, queue):
    out: dict = {}
    _rank(rank, world, port, args, fmt, out)
    if rank == 0:
        queue.put(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "owt_small.yaml"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--distributed", default="fsdp", choices=("fsdp", "ddp"))
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides (model.hidden=256 ...)")
    parser.add_argument("--formats", nargs="+", default=["full", "sharded", "async"],
                        choices=("full", "sharded", "async"))
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(f"{args.nproc} ranks, {args.distributed}, {Path(args.config).name}, EMA on, after one optimizer step")
    print(f"{'format':8} {'blocked s':>10} {'total s':>8} {'rank-0 peak +MiB':>17} {'rank-1 peak +MiB':>17} "
          f"{'files':>6} {'MiB':>8}")
    for fmt in args.formats:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, args.nproc, port, args, fmt, queue)) for r in range(args.nproc)]
        for p in procs:
            p.start()
        out = queue.get()
        for p in procs:
            p.join()
        r0, r1 = out["rank_rows"][0], out["rank_rows"][-1]
        print(f"{fmt:8} {r0['blocked']:10.2f} {r0['total']:8.2f} {r0['peak']:17,.0f} {r1['peak']:17,.0f} "
              f"{out['files']:6d} {out['mib']:8,.0f}   ({r0['params'] / 1e6:.0f}M parameters)", flush=True)


if __name__ == "__main__":
    main()
