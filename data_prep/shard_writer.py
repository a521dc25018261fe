"""Samples into shards for ``proseco prep shards``: the packer (wrap | pad) and the shard tar writer.

:class:`SplitWriter` packs one split's tokenized documents into ``seq_len`` samples and the samples
into shards of a fixed sample count, keeping the checkpoint state a resume needs (the stream
position where the open shard's tokens begin); :class:`ShardFile` writes one shard tar through
:class:`pipeline.io.AtomicFile`, hashing it on the way. Names and tar metadata are the contract's
(:mod:`pipeline.data.format`); the orchestration is :mod:`data_prep.shards`.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_prep import manifest as mf
from data_prep.tokenizer import Tokenizer
from pipeline.data.format import TAR_BLOCK, TAR_END, TAR_MTIME, TAR_USER, sample_key, shard_name
from pipeline.io import AtomicFile

if TYPE_CHECKING:
    from data_prep.shards import ShardSettings

__all__ = ["ShardFile", "SplitWriter"]


class ShardFile:
    """A tar being written to a hidden temporary name, hashed on the fly, renamed when closed."""

    def __init__(self, out: Path, name: str) -> None:
        from webdataset import TarWriter  # imported here: it pulls in torch, workers need neither

        self.name = name
        self.final = out / name
        self.hasher = hashlib.sha256()
        self.file = AtomicFile(self.final, unique=False)  # committed in close(), discarded in abort()
        self.tar = TarWriter(self, user=TAR_USER, group=TAR_USER, mode=0o444, mtime=TAR_MTIME, encoder=False)
        self.samples = self.tokens = 0
        self.aborted = False

    def write(self, data: bytes) -> None:  # the file object TarWriter streams into
        if self.aborted:  # tarfile flushes its buffer again when garbage-collected
            return
        self.hasher.update(data)
        try:
            mf.file_write(self.file, data)
        except OSError as exc:
            exc.filename = exc.filename or str(self.final)
            raise

    def add(self, key: str, npy: bytes, tokens: int) -> None:
        self.tar.write({"__key__": key, "tokens.npy": npy})
        self.samples += 1
        self.tokens += tokens

    def close(self) -> dict:
        self.tar.close()
        self.file.commit()
        return {"name": self.name, "samples": self.samples, "tokens": self.tokens,
                "sha256": self.hasher.hexdigest()}

    def abort(self) -> None:
        self.aborted = True
        self.file.discard()


class SplitWriter:
    """Packs one split's documents into samples and samples into shards, with checkpoint state."""

    def __init__(self, split: str, out: Path, partition: int, settings: ShardSettings, tok: Tokenizer,
                 dtype: str, state: dict | None, on_shard) -> None:
        self.split, self.out, self.partition = split, out, partition
        self.seq_len, self.mode = settings.seq_len, settings.mode
        self.pad, self.bos, self.eos = tok.pad_id, tok.bos_id, tok.eos_id
        self.dtype = np.dtype(dtype).newbyteorder("<")
        header = io.BytesIO()
        np.lib.format.write_array(header, np.zeros(self.seq_len, self.dtype), allow_pickle=False)
        self.npy_header = header.getvalue()[: -self.seq_len * self.dtype.itemsize]
        member = TAR_BLOCK + ((len(self.npy_header) + self.seq_len * self.dtype.itemsize + TAR_BLOCK - 1)
                              // TAR_BLOCK) * TAR_BLOCK
        self.per_shard = max(1, (settings.shard_bytes - TAR_END) // member)
        state = state or {"start": [0, 0, 0], "pending": [], "shards": [], "documents": 0, "dropped_tokens": 0}
        self.shards: list[dict] = list(state["shards"])
        self.start = tuple(state["start"])  # where the open (unfinished) shard's tokens begin
        self.documents = int(state["documents"])
        self.dropped = int(state["dropped_tokens"])
        self.next_index = sum(s["samples"] for s in self.shards)
        self.buf = np.full(self.seq_len, self.pad, dtype=self.dtype)
        self.fill = len(state["pending"])
        self.buf[: self.fill] = state["pending"]
        self.pending_at_start = list(state["pending"])
        # the counters as of `start`, for the checkpoint: the live ones also count the open shard,
        # whose documents a resume reads (and counts) again
        self.documents_at_start, self.dropped_at_start = self.documents, self.dropped
        self.open: ShardFile | None = None
        self.on_shard = on_shard
        (out / split).mkdir(parents=True, exist_ok=True)

    def state(self) -> dict:
        """Checkpoint: resuming from it redoes exactly what came after the last shard boundary.

        Also called while this split has an open shard (when the other split finishes one).
        """
        return {"start": list(self.start), "pending": self.pending_at_start, "shards": self.shards,
                "documents": self.documents_at_start, "dropped_tokens": self.dropped_at_start}

    def wants(self, pos: tuple[int, int]) -> bool:
        return pos >= self.start[:2]

    def add(self, fi: int, n: int, ids: np.ndarray) -> None:
        """Document ``n`` of partition file ``fi`` (``ids`` without bos/eos)."""
        k = self.start[2] if (fi, n) == self.start[:2] else 0
        if k == 0:
            self.documents += 1
        total = len(ids) + 2
        if self.mode == "pad":
            sample = np.full(self.seq_len, self.pad, dtype=self.dtype)
            used = min(total, self.seq_len)
            sample[0] = self.bos
            body = min(len(ids), self.seq_len - 1)
            sample[1: 1 + body] = ids[:body]
            if used == total:
                sample[total - 1] = self.eos
            self.dropped += total - used
            self._emit(sample, (fi, n + 1, 0))
            return
        pos = k
        while pos < total:
            take = min(self.seq_len - self.fill, total - pos)
            # piece [pos, pos+take) of bos + ids + eos, written without building that array
            lo, hi, dst = pos, pos + take, self.fill
            if lo == 0:
                self.buf[dst] = self.bos
                dst, lo = dst + 1, 1
            body_hi = min(hi, total - 1)
            if body_hi > lo:
                self.buf[dst: dst + body_hi - lo] = ids[lo - 1: body_hi - 1]
                dst += body_hi - lo
            if hi == total:
                self.buf[dst] = self.eos
            self.fill += take
            pos += take
            if self.fill == self.seq_len:
                self.fill = 0
                self._emit(self.buf, (fi, n, pos) if pos < total else (fi, n + 1, 0))

    def _emit(self, sample: np.ndarray, after: tuple[int, int, int]) -> None:
        """Add one sample to the open shard; close the shard when full (``after``: where the next begins)."""
        if self.open is None:
            self.open = ShardFile(self.out, shard_name(self.split, self.partition, len(self.shards)))
        key = sample_key(self.partition, self.next_index)
        tokens = self.seq_len - int(np.count_nonzero(sample == self.pad))  # real tokens: != pad
        self.open.add(key, self.npy_header + sample.tobytes(), tokens)
        self.next_index += 1
        if self.open.samples == self.per_shard:
            self._finish_shard(after)

    def _finish_shard(self, after: tuple[int, int, int]) -> None:
        shard, self.open = self.open, None
        try:
            self.shards.append(shard.close())
        except BaseException:
            shard.abort()
            raise
        self.start = after
        self.pending_at_start = self.buf[: self.fill].tolist()
        self.documents_at_start, self.dropped_at_start = self.documents, self.dropped
        self.on_shard()

    def finish(self, end: tuple[int, int, int]) -> None:
        """End of the partition: drop (and count) a wrap tail, close the last partial shard.

        ``end`` lies past every document, so a checkpoint taken here resumes with nothing left
        for this split (its counts are final).
        """
        self.dropped += self.fill
        self.fill = 0
        if self.open is not None:
            self._finish_shard(end)

    def abort(self) -> None:
        if self.open is not None:
            self.open.abort()
            self.open = None

    def summary(self) -> dict:
        return {"shards": self.shards, "documents": self.documents, "dropped_tokens": self.dropped,
                "samples": sum(s["samples"] for s in self.shards), "tokens": sum(s["tokens"] for s in self.shards)}
