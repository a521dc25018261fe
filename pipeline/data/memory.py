"""A training set held in memory (the demo's Sudoku grids) as a batch source for the train loop.

:class:`TensorLoader` has the interface of :class:`pipeline.data.loader.ShardLoader` that the
loop uses - ``iter(loader)`` yields ``{"tokens": LongTensor[B, L], "valid": BoolTensor[B, L]}``
forever, ``state_dict`` / ``load_state_dict`` save and restore the position, and
``batches_per_epoch`` - so `proseco demo` trains through the same loop, engine and checkpoints
as `proseco train` on shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import ProsecoError

STATE_KEYS = ("epoch", "batches", "seed", "fingerprint", "world_size", "batch_size")


@dataclass
class MemoryData:
    """Sequences of one task held in memory: ``tokens`` [N, L] (every position valid), the model's
    vocabulary size and mask id, and a fingerprint of the data (kept in checkpoints to refuse a
    resume on other data)."""

    tokens: torch.Tensor
    vocab_size: int
    mask_id: int
    fingerprint: str
    name: str  # how the header names the data

    def loader(self, batch_size: int, *, rank: int, world_size: int, seed: int) -> TensorLoader:
        return TensorLoader(self.tokens, batch_size, fingerprint=self.fingerprint, rank=rank,
                            world_size=world_size, seed=seed)


class TensorLoader:
    """Batches of rows of ``tokens`` for one rank. Each epoch is a permutation of the rows drawn
    from ``(seed, epoch)``; rank ``r`` of ``w`` reads every ``w``-th row of it from the ``r``-th on.
    Batches are consecutive runs of ``batch_size`` rows of that stream, epoch after epoch (a batch
    may span two epochs), so every row is read equally often and the position is one counter."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, *, fingerprint: str, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if tokens.ndim != 2:
            raise ProsecoError(f"in-memory training data must be [sequences, length], got shape {tuple(tokens.shape)}")
        self.tokens, self.batch_size, self.fingerprint = tokens.long(), batch_size, fingerprint
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.rows = len(range(rank, len(tokens), world_size))  # this rank's rows per epoch
        self.batches = 0  # batches handed out so far
        self._orders: dict[int, torch.Tensor] = {}
        if self.batches_per_epoch == 0:
            raise ProsecoError(f"{len(tokens)} training sequences over {world_size} ranks give fewer than "
                               f"optim.batch_size={batch_size} per rank; lower the batch size")

    @property
    def batches_per_epoch(self) -> int:
        return self.rows // self.batch_size

    @property
    def epoch(self) -> int:
        return self.batches * self.batch_size // self.rows

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]) & (2**63 - 1)
            perm = torch.randperm(len(self.tokens), generator=torch.Generator().manual_seed(seed))
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = perm[self.rank::self.world_size]
        return self._orders[epoch]

    def _batch(self, index: int) -> dict[str, torch.Tensor]:
        positions = range(index * self.batch_size, (index + 1) * self.batch_size)
        rows = torch.stack([self._order(p // self.rows)[p % self.rows] for p in positions])
        x = self.tokens[rows]
        return {"tokens": x, "valid": torch.ones_like(x, dtype=torch.bool)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever from the current position."""
        while True:
            batch = self._batch(self.batches)
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "seed": self.seed, "fingerprint": self.fingerprint,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict, allow_new_world_size: bool = False) -> None:
        """Continue after the last batch handed out before ``state_dict``; the saved seed is adopted.
        Another data fingerprint is refused; another world size or batch size restarts the saved
        epoch when ``allow_new_world_size``, else is refused."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ProsecoError(f"loader state lacks {', '.join(missing)} (not a TensorLoader state_dict?)")
        if state["fingerprint"] != self.fingerprint:
            raise ProsecoError(f"the checkpoint's data position belongs to data {str(state['fingerprint'])[:12]}, "
                               f"not to this run's {self.fingerprint[:12]}")
        same = (state["world_size"], state["batch_size"]) == (self.world_size, self.batch_size)
        if not same and not allow_new_world_size:
            raise ProsecoError(f"the checkpoint's data position was saved with world size {state['world_size']} "
                               f"and batch size {state['batch_size']}, this run has {self.world_size} and "
                               f"{self.batch_size}")
        self.seed, self._orders = int(state["seed"]), {}
        self.batches = int(state["batches"]) if same else -(-int(state["epoch"]) * self.rows // self.batch_size)
