"""Deterministic, resumable streaming of corpus shards (``docs/data_format.md``) into batches.

Everything is index arithmetic on the manifest's exact per-shard sample counts; nothing is
replayed on resume.

* **Slots.** Each (rank, worker) pair is a *slot* ``s = rank * W + w`` (``W = max(1, num_workers)``,
  ``slots = world_size * W``). In epoch ``e`` the split's shards are permuted with
  ``numpy.random.default_rng([seed, e])`` and slot ``s`` reads shards ``perm[s::slots]``, one after
  the other. Within a shard the samples are read in a permuted order drawn from
  ``default_rng([seed, e, shard_index])`` (``shuffle=False``: tar order) through a per-shard index
  of member offsets, so a sample is addressed by (shard, position) and never by replay.
* **Equal batch counts by construction.** Every slot yields exactly ``K = min over all slots of
  floor(samples_in_slot / batch_size)`` batches in the epoch (computed from the manifest before
  anything is read); the rest of each slot is dropped (:attr:`ShardLoader.dropped_per_epoch`).
  A rank therefore yields ``W * K`` batches per epoch, the same on every rank, interleaved
  round-robin over its workers (torch's order for iterable datasets).
* **State** (:meth:`ShardLoader.state_dict`) is ``epoch``, ``batches`` (handed to the caller by this
  rank in the epoch), ``seed``, ``fingerprint``, ``world_size``, ``num_workers``, ``batch_size``.
  Rank batch ``n`` is batch ``n // W`` of worker ``n % W``; so after ``b`` batches worker ``w`` has
  produced ``ceil((b - w) / W)`` batches and restarts at that many x ``batch_size`` samples into its
  stream: the shard and the position in it follow from the counts, the reader seeks there and
  no skipped sample is read or decoded. The DataLoader's workers are rotated (DataLoader worker
  ``d`` plays worker ``(d + b) % W``) so that the first batch after a resume comes from worker ``b % W``.

Tar reading: the shard is memory-mapped and :func:`pipeline.data.format.index_samples` (the
one tar reader, shared with ``proseco prep verify``) walks its headers to build the per-shard
offset index; a sample is then one slice of the map and one ``np.frombuffer``.
"""

from __future__ import annotations

import hashlib
import io
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.format import index_samples
from pipeline.data.manifest import Manifest, Shard
from pipeline.distributed import world_from_env
from pipeline.errors import ProsecoError

STATE_KEYS = ("epoch", "batches", "seed", "fingerprint", "world_size", "num_workers", "batch_size")

# Samples decoded by this process (tests use it to show that a resume decodes nothing it skips).
DECODED_SAMPLES = 0


def default_rank_world() -> tuple[int, int]:
    """(rank, world size): torch.distributed if initialised, else ``RANK``/``WORLD_SIZE``, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return world_from_env()[:2]


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each slot reads in one epoch and how many batches every slot yields."""

    epoch: int
    slot_shards: tuple[tuple[int, ...], ...]  # per slot: indices into the split's shard list, in read order
    batches_per_slot: int  # K
    dropped: int  # samples of the split not yielded this epoch (all slots together)


def plan_epoch(counts: tuple[int, ...], seed: int, epoch: int, slots: int, batch_size: int) -> EpochPlan:
    """The epoch's shard permutation, dealt round-robin to ``slots`` readers, and K (see module doc)."""
    perm = np.random.default_rng([seed, epoch]).permutation(len(counts))
    slot_shards = tuple(tuple(int(i) for i in perm[s::slots]) for s in range(slots))
    k = min(sum(counts[i] for i in shards) // batch_size for shards in slot_shards)
    return EpochPlan(epoch, slot_shards, k, sum(counts) - k * batch_size * slots)


def sample_order(n: int, seed: int, epoch: int, shard_index: int, shuffle: bool) -> np.ndarray:
    """Order in which a slot reads the ``n`` samples of shard ``shard_index`` in ``epoch``."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, shard_index]).permutation(n)


class _TokenDecoder:
    """``.npy`` bytes -> 1-D array; after the first sample, a header match plus ``np.frombuffer``."""

    def __init__(self, dtype: np.dtype, seq_len: int, where: Path):
        self.dtype, self.seq_len, self.where = dtype, seq_len, where
        self.header: bytes | None = None

    def __call__(self, raw: bytes) -> np.ndarray:
        global DECODED_SAMPLES
        DECODED_SAMPLES += 1
        nbytes = self.seq_len * self.dtype.itemsize
        if self.header is not None and len(raw) == len(self.header) + nbytes and raw.startswith(self.header):
            return np.frombuffer(raw, dtype=self.dtype, offset=len(self.header))
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
        if arr.shape != (self.seq_len,) or arr.dtype != self.dtype:
            raise ProsecoError(f"shard {self.where} holds a {arr.dtype}{list(arr.shape)} sample, but the manifest "
                               f"says {self.dtype}[{self.seq_len}]; re-run `proseco prep shards`")
        self.header = bytes(raw[: len(raw) - nbytes])  # the header names dtype and shape
        return arr


def read_slot(shards: list[Shard], shard_indices: tuple[int, ...], *, dtype: np.dtype, seq_len: int,
              seed: int, epoch: int, shuffle: bool, start: int, stop: int) -> Iterator[np.ndarray]:
    """Samples ``start .. stop-1`` of a slot's stream (its shards in order, each in its sample order)."""
    first = 0
    for index in shard_indices:
        shard = shards[index]
        last = first + shard.samples
        lo, hi = max(start, first), min(stop, last)
        if lo < hi:
            try:
                with open(shard.path, "rb") as f:
                    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:  # ValueError: an empty file
                raise ProsecoError(f"cannot read shard {shard.path}: {exc}; re-run `proseco prep shards`") from None
            with buf:
                # a shard changed since prep would train silently on other tokens: check it whole
                # once per opening (~1.5 GB/s, a small cost next to a training step's)
                if shard.sha256 is not None and hashlib.sha256(buf).hexdigest() != shard.sha256:
                    raise ProsecoError(f"shard {shard.path} fails its sha256 check: it changed since `proseco prep "
                                       "shards` wrote it; `proseco prep verify` lists the damage, re-run prep")
                entries = index_samples(buf, shard.path)
                if len(entries) != shard.samples:
                    raise ProsecoError(f"shard {shard.path} holds {len(entries)} samples, but the manifest says "
                                       f"{shard.samples}; re-run `proseco prep shards`")
                order = sample_order(shard.samples, seed, epoch, index, shuffle)
                decode = _TokenDecoder(dtype, seq_len, shard.path)
                for pos in order[lo - first: hi - first].tolist():
                    offset, size = entries[pos]
                    yield decode(buf[offset:offset + size])
        if last >= stop:
            return
        first = last


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


class _RankEpoch(IterableDataset):
    """One rank's epoch from rank batch ``start_batches`` on; each DataLoader worker reads one slot."""

    def __init__(self, loader: ShardLoader, plan: EpochPlan, start_batches: int):
        self.shards, self.plan, self.start_batches = loader.shards, plan, start_batches
        self.rank, self.workers, self.batch_size = loader.rank, loader.workers, loader.batch_size
        self.dtype, self.seq_len, self.pad = loader.manifest.dtype, loader.manifest.sample_len, loader.manifest.pad_id
        self.sft = loader.manifest.sft
        self.seed, self.shuffle = loader.seed, loader.shuffle

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.start_batches) % self.workers
        done = max(0, -(-(self.start_batches - worker) // self.workers))  # ceil((b - w) / W)
        b = self.batch_size
        samples = read_slot(self.shards, self.plan.slot_shards[self.rank * self.workers + worker],
                            dtype=self.dtype, seq_len=self.seq_len, seed=self.seed, epoch=self.plan.epoch,
                            shuffle=self.shuffle, start=done * b, stop=self.plan.batches_per_slot * b)
        rows: list[np.ndarray] = []
        for row in samples:
            rows.append(row)
            if len(rows) == b:
                tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
                rows = []
                if self.sft:  # EOS padding is trained on (LLaDA): every position is valid
                    lengths, tokens = tokens[:, 0], tokens[:, 1:]
                    prompt = torch.arange(tokens.shape[1])[None] < lengths[:, None]
                    yield {"tokens": tokens, "valid": torch.ones_like(prompt), "prompt": prompt}
                    continue
                yield {"tokens": tokens, "valid": tokens != self.pad}


class ShardLoader:
    """Batches ``{"tokens": LongTensor[B, L], "valid": BoolTensor[B, L]}`` of one split, for one rank
    (sft shards add ``"prompt": BoolTensor[B, L]``, True on each sample's prompt).

    ``rank``/``world_size`` default to :func:`default_rank_world`. ``num_workers`` DataLoader
    processes (0 = read in this process) each read one slot. ``iter(loader)`` runs forever across
    epochs; :meth:`epoch_iter` runs the rest of the current epoch. The position advances when a
    batch is handed to the caller (not when workers prefetch it), so :meth:`state_dict` taken
    after consuming ``n`` batches resumes with batch ``n + 1``. Raises :class:`ProsecoError` at
    construction when the split has fewer shards than ranks x workers or too few samples for one
    batch per slot.
    """

    def __init__(self, manifest: Manifest | str | Path, split: str = "train", batch_size: int = 8, *,
                 rank: int | None = None, world_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, pin_memory: bool = False, prefetch_factor: int = 2,
                 multiprocessing_context: str | None = None, allow_new_manifest: bool = False,
                 allow_new_world_size: bool = False):
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        if rank is None or world_size is None:
            found_rank, found_world = default_rank_world()
            rank = found_rank if rank is None else rank
            world_size = found_world if world_size is None else world_size
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("num_workers", num_workers, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ProsecoError(f"loader {name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ProsecoError(f"loader rank {rank} is outside world size {world_size}")
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.num_workers, self.workers, self.seed, self.shuffle = num_workers, max(1, num_workers), seed, shuffle
        self.pin_memory, self.prefetch_factor, self.mp_context = pin_memory, prefetch_factor, multiprocessing_context
        self.allow_new_manifest, self.allow_new_world_size = allow_new_manifest, allow_new_world_size
        self.shards = self.manifest.shards(split)
        self.counts = tuple(s.samples for s in self.shards)
        self.slots = world_size * self.workers
        self._plans: dict[tuple[int, int], EpochPlan] = {}
        where = f"split {split!r} of {self.manifest.root}"
        if not self.shards:
            raise ProsecoError(f"{where} is empty (no shard, no sample): prepare more data for it "
                               "(`proseco prep shards`; prep.val_fraction sets the share of val)")
        if len(self.shards) < self.slots:
            fewer = (f"use at most {len(self.shards) // world_size} loader workers per rank (num_workers), or "
                     if len(self.shards) >= world_size else "")
            raise ProsecoError(
                f"{where} has {len(self.shards)} shards, fewer than {world_size} ranks x {self.workers} loader "
                f"workers = {self.slots} readers (each reader needs a shard of its own); {fewer}re-shard with a "
                f"smaller shard size (prep.shard_mb) so there are at least {self.slots} shards")
        if self.plan(0).batches_per_slot == 0:
            raise ProsecoError(f"{where}: some of the {self.slots} readers get fewer than batch_size={batch_size} "
                               f"samples; lower the batch size or the number of ranks x workers")
        self.epoch = 0
        self.batches = 0
        self._generation = 0

    # -- epoch geometry -------------------------------------------------------------------------

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's slot assignment and K (cached; a few per run)."""
        key = (self.seed, epoch)
        if key not in self._plans:
            if len(self._plans) >= 8:
                self._plans.clear()
            self._plans[key] = plan_epoch(self.counts, self.seed, epoch, self.slots, self.batch_size)
        return self._plans[key]

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank (every rank) yields in ``epoch`` (default: the current one): W x K."""
        return self.workers * self.plan(self.epoch if epoch is None else epoch).batches_per_slot

    @property
    def batches_per_epoch(self) -> int:
        return self.batches_in_epoch()

    @property
    def dropped_per_epoch(self) -> int:
        """Samples of the split that no rank sees in the current epoch (slot tails past K batches)."""
        return self.plan(self.epoch).dropped

    # -- iteration --------------------------------------------------------------------------------

    def _normalise(self) -> None:
        while self.batches >= self.batches_in_epoch():
            self.epoch, self.batches = self.epoch + 1, self.batches - self.batches_in_epoch()

    def epoch_iter(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the current epoch; afterwards the position is the start of the next one."""
        self._normalise()
        generation, epoch, start = self._generation, self.epoch, self.batches
        total = self.batches_in_epoch()
        extra = {"prefetch_factor": self.prefetch_factor,
                 "multiprocessing_context": self.mp_context} if self.num_workers else {}
        data = DataLoader(_RankEpoch(self, self.plan(epoch), start), batch_size=None, num_workers=self.num_workers,
                          worker_init_fn=_worker_init, persistent_workers=False, pin_memory=self.pin_memory, **extra)
        n = start
        for batch in data:
            if self._generation != generation:
                raise RuntimeError("this loader iterator was invalidated by load_state_dict; call iter(loader) again")
            n += 1
            self.batches = n
            yield batch
        if n != total:  # the shards' contents are checked against the manifest, so this is a bug
            raise RuntimeError(f"loader epoch {epoch} yielded {n} batches on rank {self.rank}, expected {total}")
        if self._generation == generation:
            self.epoch, self.batches = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever, epoch after epoch."""
        while True:
            yield from self.epoch_iter()

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The position as a few integers plus the manifest fingerprint."""
        self._normalise()
        return {"epoch": self.epoch, "batches": self.batches, "seed": self.seed,
                "fingerprint": self.manifest.fingerprint, "world_size": self.world_size,
                "num_workers": self.num_workers, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict, allow_new_manifest: bool | None = None,
                        allow_new_world_size: bool | None = None) -> None:
        """Continue at the next batch this rank has not seen; iterators made before are invalidated.

        The saved seed is adopted. A state saved for another manifest (fingerprint) or another
        reader layout (world size, num_workers, batch size) is refused unless opted in:
        ``allow_new_manifest=True`` keeps the epoch counter and starts the new data at the
        beginning of the saved epoch; ``allow_new_world_size=True`` restarts the saved epoch
        from its beginning with the new layout (samples of that epoch seen before are seen again).
        Both default to the constructor's settings.
        """
        new_manifest = self.allow_new_manifest if allow_new_manifest is None else allow_new_manifest
        new_layout = self.allow_new_world_size if allow_new_world_size is None else allow_new_world_size
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ProsecoError(f"loader state lacks {', '.join(missing)} (not a ShardLoader state_dict?)")
        restart = False
        if state["fingerprint"] != self.manifest.fingerprint:
            if not new_manifest:
                raise ProsecoError(
                    f"the checkpoint's data position belongs to manifest {str(state['fingerprint'])[:12]}, but this "
                    f"run reads {self.manifest.root} (manifest {self.manifest.fingerprint[:12]}); point the run at "
                    f"the original shards, or opt in with allow_new_manifest=True to start the new data at the "
                    f"beginning of epoch {state['epoch']}")
            restart = True
        old = (state["world_size"], state["num_workers"], state["batch_size"])
        new = (self.world_size, self.num_workers, self.batch_size)
        if old != new:
            if not new_layout:
                raise ProsecoError(
                    f"the checkpoint's data position was saved with world size {old[0]}, {old[1]} loader workers "
                    f"and batch size {old[2]}, but this run has {new[0]}, {new[1]} and {new[2]}; restore those "
                    f"settings to resume exactly, or opt in with allow_new_world_size=True to restart epoch "
                    f"{state['epoch']} from its beginning with the new layout")
            restart = True
        if self.seed != state["seed"]:
            self.seed = int(state["seed"])
        epoch, batches = int(state["epoch"]), 0 if restart else int(state["batches"])
        if epoch < 0 or not 0 <= batches <= self.batches_in_epoch(epoch):
            raise ProsecoError(f"loader state epoch {epoch}, batch {batches} is out of range for this data")
        self.epoch, self.batches = epoch, batches
        self._generation += 1
