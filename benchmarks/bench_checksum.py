"""What every-file checksums cost a checkpoint: save and load of a ~1 GiB state with and without them.

    python benchmarks/bench_checksum.py [--gib 1.0] [--repeat 3] [--dir /tmp]

Measured side by side, alternating, best of ``--repeat`` (the page cache is warm after the first
write, as it is right after a save):

* ``save``: plain ``torch.save`` + fsync;
* ``save + hash while writing``: ``torch.save`` into a file object that hashes every byte it passes on
  (the alternative: no read-back, but ``torch.save`` into a Python file object is slow);
* ``save + hash by reading back``: :func:`pipeline.io.save_torch` (what the checkpoint manager uses):
  ``torch.save`` + fsync, then :func:`pipeline.io.sha256_file` of the file, from the page cache;
* ``verify``: :func:`pipeline.io.sha256_file` of the saved file (what a resume does first);
* ``load``: ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.io import save_torch, sha256_file


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _HashingWriter:
    def __init__(self, f) -> None:
        self.f, self.hash = f, hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()


def _save_hashing(state: dict, path: Path) -> str:
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(state, writer)
        f.flush()
        os.fsync(f.fileno())
    return writer.hash.hexdigest()


def _save_plain(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="state size in GiB (default 1)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = int(args.gib * 2**30) // 4
    state = {"model": torch.randn(n // 2), "optimizer": torch.randn(n - n // 2)}
    cases = {
        "save": lambda p: _save_plain(state, p),
        "save + hash while writing": lambda p: _save_hashing(state, p),
        "save + hash by reading back": lambda p: save_torch(state, p),
        "verify (sha256 of the file)": sha256_file,
        "load": lambda p: torch.load(p, weights_only=True),
    }
    best = {k: float("inf") for k in cases}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "state.pt"
        _save_plain(state, path)
        for _ in range(args.repeat):
            for name, fn in cases.items():
                best[name] = min(best[name], _timed(lambda fn=fn: fn(path)))
        size = path.stat().st_size
    print(f"state {size / 2**30:.2f} GiB, best of {args.repeat}:")
    for name, secs in best.items():
        print(f"  {name:<30} {secs:6.2f} s  ({size / 2**30 / secs:5.2f} GiB/s)")
    print(f"checksum cost of a save: {best['save + hash by reading back'] / best['save']:.2f}x (read back, used) "
          f"vs {best['save + hash while writing'] / best['save']:.2f}x (hash while writing); "
          f"verify before a load: +{best['verify (sha256 of the file)'] / best['load']:.0%} of the load time")


if __name__ == "__main__":
    main()
