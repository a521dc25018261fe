"""Tokenize a corpus into fixed-length webdataset shards (``proseco prep shards``).

The on-disk contract is ``docs/data_format.md``; this module is its writer. Overview::

    inputs --expand_inputs--> sorted files --(file j -> partition j % num_tasks)--> this task's files
      --iter_documents (main process, in order)--> documents
      --split by sha256(relative path, document index)--> train / val
      --encode_batch in worker processes (ordered, bounded read-ahead)--> token ids
      --packer per split (wrap | pad)--> seq_len samples --> train|val/shard-PPPPP-SSSSSS.tar

**Determinism.** Documents are read in one process in a fixed order; workers only tokenize
chunks of texts and results are consumed in submission order, so the samples, the shard
boundaries (a fixed number of samples per shard, derived from ``shard_bytes``) and the tar bytes
(fixed mtime, owner, mode; sorted members) do not depend on ``num_workers``, ``chunk_docs`` or
timing.

**Partitioning by file.** Task ``i`` of ``n`` owns input files ``j`` with ``j % n == i`` (sorted
order). Files are the natural unit: a gzip/zstd stream cannot be entered in the middle, a
document's index is only known by reading its file from the start, and a task then reads only
its own files, never the whole corpus. The price is balance: give many files of similar size.

**Resuming.** After each finished shard, ``.parts/part-PPPPP/state.json`` records, per split, the
completed shards and the stream position where the split's next shard starts: ``(file, document
ordinal, tokens of that document already emitted)`` plus the packer's pending partial sequence
(always empty at a shard boundary, since a shard closes right after a sample; recorded anyway).
A rerun re-reads the files from the earliest split position, skips documents already in finished
shards without tokenizing them, and rewrites only the unfinished shards. Each split's counters
(documents, dropped tokens) in the checkpoint are as of that split's own last shard boundary,
also in a checkpoint written when the *other* split finishes a shard while this one has a shard
open, so a killed run neither drops nor double-counts a document. Per-file skip counts are
stored whole once a file is read to its end and replaced when a rerun reads the file again.
``DONE.json`` marks a finished partition; a rerun skips it.

**Failures.** A shard is written to a hidden ``.shard-...tar.tmp`` sibling, fsynced and renamed;
every JSON file likewise. A full disk or an unwritable folder removes the temporary file and
raises :class:`ProsecoError`; finished shards stay valid for the rerun; no manifest is written.
Nor is one for a run without a train sample (no document found, all went to val, too little text
for one sequence): :func:`data_prep.manifest.check_trainable` raises; a lone empty partition is fine.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep import manifest as mf
from data_prep.readers import SkipLog, expand_inputs, iter_documents
from data_prep.shard_writer import SplitWriter
from data_prep.tokenizer import Tokenizer
from pipeline.data.format import SPLITS, dtype_for
from pipeline.errors import ProsecoError
from pipeline.io import sha256_file

MODES = ("wrap", "pad")
# A worker task closes at chunk_docs documents or this many characters, whichever comes first, so
# a file of whole books does not become one task for one worker. Does not affect the output.
CHUNK_CHARS = 1 << 18
VAL_HASH = "sha256(relpath + '\\n' + index)[:8] / 2**64 < val_fraction"

__all__ = [
    "ShardSettings",
    "build_shards",
    "is_val_document",
    "partition_files",
    "val_score",
]


@dataclass
class ShardSettings:
    """Settings of one ``prep shards`` task. Only the output-defining ones enter the manifest."""

    inputs: list[str]
    tokenizer_dir: str
    out_dir: str
    seq_len: int = 1024
    mode: str = "wrap"  # "wrap" | "pad" (docs/data_format.md)
    shard_bytes: int = 64 * 2**20  # target tar size; a shard holds a fixed number of samples
    val_fraction: float = 0.005  # share of documents (by hash) in the val split
    text_field: str = "text"
    doc_split: str = "paragraph"
    fmt: str = "auto"
    max_chars: int = 1_000_000
    num_workers: int = 1  # tokenizer processes; 0 = tokenize in this process
    task_index: int = 0
    num_tasks: int = 1
    chunk_docs: int = 256  # documents per worker task

    def check(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        problems = []
        if isinstance(self.inputs, (str, os.PathLike)):
            self.inputs = [str(self.inputs)]
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not is_int(self.seq_len) or self.seq_len < 2:
            problems.append(f"seq_len must be an integer >= 2 (room for bos and eos), got {self.seq_len!r}")
        if not is_int(self.shard_bytes) or self.shard_bytes < 1:
            problems.append(f"shard_bytes must be a positive integer, got {self.shard_bytes!r}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not is_int(self.num_workers) or self.num_workers < 0:
            problems.append(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not is_int(self.num_tasks) or self.num_tasks < 1:
            problems.append(f"num_tasks must be an integer >= 1, got {self.num_tasks!r}")
        elif not is_int(self.task_index) or not 0 <= self.task_index < self.num_tasks:
            problems.append(f"task_index must be in 0..{self.num_tasks - 1}, got {self.task_index!r}")
        if not is_int(self.chunk_docs) or self.chunk_docs < 1:
            problems.append(f"chunk_docs must be an integer >= 1, got {self.chunk_docs!r}")
        if not is_int(self.max_chars) or self.max_chars < 1:
            problems.append(f"max_chars must be a positive integer, got {self.max_chars!r}")
        if problems:
            raise ProsecoError("prep shards: " + "; ".join(problems))

    def config(self) -> dict:
        """The settings that define the output (worker count, chunking, paths do not)."""
        return {
            "seq_len": self.seq_len, "mode": self.mode, "shard_bytes": self.shard_bytes,
            "val_fraction": float(self.val_fraction), "val_hash": VAL_HASH,
            "text_field": self.text_field, "doc_split": self.doc_split, "fmt": self.fmt,
            "max_chars": self.max_chars, "num_tasks": self.num_tasks,
            "partition": "input file j (sorted) -> partition j % num_tasks",
        }


# ------------------------------------------------------------------ documents -> splits


def val_score(relpath: str, index: int) -> float:
    """A stable number in [0, 1) for a document: its split is val when this is < val_fraction."""
    digest = hashlib.sha256(f"{relpath}\n{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_val_document(relpath: str, index: int, val_fraction: float) -> bool:
    return val_score(relpath, index) < val_fraction


def _relative_paths(files: list[Path]) -> list[str]:
    """Each file relative to the inputs' common folder, POSIX style (the hash and manifest key)."""
    absolute = [os.path.abspath(p) for p in files]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return [Path(os.path.relpath(p, root)).as_posix() for p in absolute]


def partition_files(files: list[Path], task_index: int, num_tasks: int) -> list[int]:
    """Indices (into the sorted file list) of the files of partition ``task_index``."""
    return list(range(task_index, len(files), num_tasks))


# ------------------------------------------------------------------ tokenizing (workers)

_WORKER: dict = {}


def _init_worker(tokenizer: Tokenizer, dtype: str) -> None:
    _WORKER["tok"], _WORKER["dtype"] = tokenizer, np.dtype(dtype)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids concatenated, per-document lengths): two arrays pickle far cheaper than lists."""
    ids = _WORKER["tok"].encode_batch(texts)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=_WORKER["dtype"], count=int(lengths.sum()))
    return flat, lengths


class _Encoder:
    """Ordered chunk tokenization with bounded read-ahead (in-process when ``num_workers == 0``).

    ``Pool.imap`` would be the obvious tool, but its feeder thread drains the input iterator as
    fast as it can (the whole corpus into memory, and document reading on another thread);
    a window of ``apply_async`` calls, consumed in order, keeps both bounded and ordered.
    """

    def __init__(self, tokenizer: Tokenizer, dtype: str, num_workers: int) -> None:
        self.pool = None
        self.window = 2 * num_workers + 1
        if num_workers > 0:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer, dtype))
        else:
            _init_worker(tokenizer, dtype)

    def map(self, chunks: Iterator[list]) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
        if self.pool is None:
            for chunk in chunks:
                yield (chunk, *_encode_chunk([item[-1] for item in chunk]))
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, self.pool.apply_async(_encode_chunk, ([item[-1] for item in chunk],))))
            if len(pending) >= self.window:
                done, result = pending.popleft()
                yield (done, *result.get())
        while pending:
            done, result = pending.popleft()
            yield (done, *result.get())

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None


# ------------------------------------------------------------------ one partition


def _progress(enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(desc=desc, unit="doc", unit_scale=True, disable=not enabled, smoothing=0.1, mininterval=0.5)


def build_shards(settings: ShardSettings, *, progress: bool = True) -> dict:
    """Run partition ``task_index`` of ``num_tasks``; with one task also merge into ``manifest.json``.

    Returns the manifest (``num_tasks == 1``) or this partition's ``DONE.json`` record. Resumes
    an interrupted run from its checkpoint; returns at once for a finished partition / run.
    Raises ProsecoError when the run (one task, or the merge) has no train sample.
    Workers are started with ``spawn``: a script calling this with ``num_workers > 0`` needs the
    usual ``if __name__ == "__main__":`` guard (the ``proseco`` CLI has it).
    """
    settings.check()
    out = Path(settings.out_dir)
    files = expand_inputs(settings.inputs, fmt=settings.fmt)
    rel = _relative_paths(files)
    tok = Tokenizer.load(settings.tokenizer_dir)
    dtype = dtype_for(tok.vocab_size)
    config = settings.config()
    all_sources = [{"path": r, "bytes": p.stat().st_size} for p, r in zip(files, rel)]
    key = mf.run_key(config, tok.sha256, all_sources)
    finished = mf.check_out_folder(out, key)
    if finished is not None:
        return finished if settings.num_tasks == 1 else mf.read_json(
            mf.part_dir(out, settings.task_index) / mf.DONE) or finished

    part = settings.task_index
    work = mf.part_dir(out, part)
    try:
        work.mkdir(parents=True, exist_ok=True)
        mf.copy_tokenizer(tok, out)
    except OSError as exc:
        raise (mf.io_error(exc, work, out) or exc) from None
    done = mf.read_json(work / mf.DONE)
    if done is None:
        mine = partition_files(files, part, settings.num_tasks)
        sources = [{**all_sources[j], "sha256": sha256_file(files[j])} for j in mine]
        state = mf.read_json(work / mf.STATE)
        if state is not None and (state.get("run_key") != key or state.get("sources") != sources):
            raise ProsecoError(f"{work / mf.STATE} was written for other inputs or settings (an input file "
                               "changed since?); delete that folder's run or choose a new output folder")
        done = _run_partition(settings, out, work, files, rel, mine, sources, tok, dtype, key, state, progress)
    if settings.num_tasks == 1:
        return mf.merge(out)
    return done


def _run_partition(settings, out, work, files, rel, mine, sources, tok, dtype, key, state, progress) -> dict:
    part = settings.task_index
    splits_state = (state or {}).get("splits", {})
    file_skips: dict[str, dict] = dict((state or {}).get("file_skips", {}))
    writers: dict[str, SplitWriter] = {}

    def checkpoint() -> None:
        mf.write_json(work / mf.STATE, {
            "run_key": key, "partition": part, "sources": sources, "file_skips": file_skips,
            "files": [rel[j] for j in mine],
            "splits": {s: w.state() for s, w in writers.items()},
        }, out)

    ok = False
    encoder = None
    try:
        mf.clean_partition(out, part, {s: len(splits_state.get(s, {}).get("shards", [])) for s in SPLITS})
        for split in SPLITS:
            writers[split] = SplitWriter(split, out, part, settings, tok, dtype, splits_state.get(split),
                                          checkpoint)
        first = min(w.start[:2] for w in writers.values())

        def documents() -> Iterator[tuple]:
            for fi, j in enumerate(mine):
                if fi < first[0]:
                    continue  # wholly inside finished shards; its skip counts are in the checkpoint
                log = SkipLog()
                for n, doc in enumerate(iter_documents(files[j], fmt=settings.fmt, text_field=settings.text_field,
                                                       doc_split=settings.doc_split, max_chars=settings.max_chars,
                                                       skips=log)):
                    split = "val" if is_val_document(rel[j], doc.index, settings.val_fraction) else "train"
                    if writers[split].wants((fi, n)):
                        yield split, fi, n, doc.text
                file_skips[rel[j]] = log.as_dict()

        def chunks() -> Iterator[list]:
            chunk: list = []
            chars = 0
            for item in documents():
                chunk.append(item)
                chars += len(item[-1])
                if len(chunk) == settings.chunk_docs or chars >= CHUNK_CHARS:
                    yield chunk
                    chunk, chars = [], 0
            if chunk:
                yield chunk

        encoder = _Encoder(tok, dtype, settings.num_workers)
        bar = _progress(progress, "prep shards" if settings.num_tasks == 1
                        else f"prep shards task {part}/{settings.num_tasks}")
        t0, tokens, last = time.monotonic(), 0, 0.0
        with bar:
            for chunk, flat, lengths in encoder.map(chunks()):
                offsets = np.concatenate(([0], np.cumsum(lengths)))
                for (split, fi, n, _text), lo, hi in zip(chunk, offsets[:-1], offsets[1:]):
                    writers[split].add(fi, n, flat[lo:hi])
                tokens += int(offsets[-1]) + 2 * len(chunk)
                bar.update(len(chunk))
                now = time.monotonic()
                if now - last > 0.5:
                    last = now
                    bar.set_postfix_str(f"{tokens / max(now - t0, 1e-9):,.0f} tok/s", refresh=False)
        for writer in writers.values():
            writer.finish((len(mine), 0, 0))
        skipped = SkipLog().as_dict()
        for j in mine:
            for reason, count in file_skips.get(rel[j], {}).items():
                skipped[reason] = skipped.get(reason, 0) + count
        record = {
            "run_key": key, "partition": part, "config": settings.config(),
            "tokenizer": {"file": "tokenizer.model", "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                          "special": {"pad": tok.pad_id, "unk": tok.unk_id, "bos": tok.bos_id,
                                      "eos": tok.eos_id, "mask": tok.mask_id}},
            "dtype": dtype, "sources": sources, "skipped": skipped,
            "splits": {s: w.summary() for s, w in writers.items()},
        }
        if settings.num_tasks == 1:  # the whole run: refuse before DONE.json (an empty corpus leaves no record)
            mf.check_trainable(mf.build_manifest({part: record}), settings.inputs)
        mf.write_json(work / mf.DONE, record, out)
        (work / mf.STATE).unlink(missing_ok=True)
        ok = True
        return record
    except OSError as exc:
        err = mf.io_error(exc, getattr(exc, "filename", None) or out, out)
        if err is None:
            raise
        raise err from None
    finally:
        if not ok:
            for writer in writers.values():
                writer.abort()
        if encoder is not None:
            encoder.close(ok)
