"""Sharded checkpoints (``checkpoint.format: sharded``) through ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own part of model, optimizer and EMA into ``<checkpoint>/dcp/``
(``__<rank>_0.distcp`` files plus DCP's ``.metadata``, which records every tensor's global shape and
which chunk lives where). Nothing is gathered on one rank: FSDP2 parameters are DTensor shards, the
megatron engine's tensor-parallel weights are ShardedTensors whose chunks sit at their place in the
full Backbone tensor, and a tensor every rank holds (DDP, replicated weights) is written once, by
one rank (DCP's planner removes the duplicates). Loading reads, on every rank, the chunks that
overlap what this rank holds now, so a checkpoint resumes under another world size or TP size.

The engine supplies the state (:meth:`pipeline.engines.base.Engine.sharded_state`: its tensors,
in the layout DCP writes and loads in place) and takes it back after a load
(:meth:`~pipeline.engines.base.Engine.load_sharded_state`). The checkpoint manager's contract is
unchanged: the ``dcp/`` files are written into the temporary folder, then hashed, listed in
``meta.json`` and verified before any load like every other file.

Asynchronous saves (``checkpoint.async_save``): :func:`save` stages a CPU copy of the state
(synchronously, so the next optimizer step may change the live weights), writes it from a
background thread and hashes the files this rank wrote there too; it returns the pending write. The checkpoint manager commits it (checksums,
``meta.json``, rename, ``COMPLETE``) only once every rank's write is finished, at the next save or
at the end of training (:meth:`pipeline.checkpoint.manager.CheckpointManager.save_async`). The
background write talks over its own gloo process group, so it never interleaves with the
training's collectives.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

DCP_DIR = "dcp"  # inside a checkpoint folder
_ASYNC_GROUP: list = []  # the process group of background writes, made once per process group


def is_sharded(meta: dict) -> bool:
    """Whether a checkpoint (its ``meta.json``) holds a sharded state (``dcp/``) rather than ``state.pt``."""
    return any(name.startswith(f"{DCP_DIR}/") for name in meta.get("files", {}))


def _single() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process call that it assumes a single process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _async_group():
    """A gloo group over all ranks for background writes (None in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if not _ASYNC_GROUP or _ASYNC_GROUP[0][0] is not dist.group.WORLD:
        _ASYNC_GROUP[:] = [(dist.group.WORLD, dist.new_group(backend="gloo"))]
    return _ASYNC_GROUP[0][1]


def save(state: dict, folder: Path, asynchronous: bool = False) -> Future | None:
    """Write ``state`` (this rank's part) to ``folder/dcp`` (a collective); with ``asynchronous``,
    return the background write, whose result is ``{relative path: {"size", "sha256"}}`` of the
    files this rank wrote, hashed in the background too."""
    writer = dcp.FileSystemWriter(folder / DCP_DIR, sync_files=True)
    if not asynchronous:
        with _quiet():
            dcp.save(state, storage_writer=writer, no_dist=_single())
        return None
    if _single():  # the background thread's warning escapes catch_warnings (thread-local in effect)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", module="torch.distributed")
    with _quiet():
        write = dcp.async_save(state, storage_writer=writer, process_group=_async_group(), no_dist=_single())
    rank = 0 if _single() else dist.get_rank()
    hashed: Future = Future()

    def then_hash(done: Future) -> None:
        try:
            done.result()
            hashed.set_result(_own_files(folder, rank))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the save
            hashed.set_exception(exc)

    write.add_done_callback(then_hash)
    return hashed


def _own_files(folder: Path, rank: int) -> dict[str, dict]:
    """Size and sha256 of the files rank ``rank`` wrote (its ``__<rank>_*.distcp``; rank 0 also
    writes ``.metadata``), keyed by their path in the checkpoint folder."""
    from pipeline.checkpoint.manager import file_entries

    names = [p.relative_to(folder).as_posix() for p in sorted((folder / DCP_DIR).glob(f"__{rank}_*.distcp"))]
    if rank == 0:
        names.append(f"{DCP_DIR}/.metadata")
    return file_entries(folder, names)


def load(state: dict, folder: Path) -> None:
    """Fill ``state`` (this rank's tensors, in place) from ``folder/dcp`` (a collective)."""
    with _quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(folder / DCP_DIR), no_dist=_single())


def read_full(folder: Path, prefix: str) -> dict[str, torch.Tensor] | None:
    """The full tensors under ``prefix`` (``model`` or ``ema``) of a sharded checkpoint, read in one
    process (for export and evaluation): ``{Backbone name: tensor}``, or None when absent."""
    reader = dcp.FileSystemReader(folder / DCP_DIR)
    entries = reader.read_metadata().state_dict_metadata
    head = f"{prefix}."
    full = {key: torch.empty(md.size, dtype=md.properties.dtype) for key, md in entries.items()
            if key.startswith(head) and isinstance(md, TensorStorageMetadata)}
    if not full:
        return None
    with _quiet():
        dcp.load(full, storage_reader=reader, no_dist=True)
    return {key[len(head):]: value for key, value in full.items()}
