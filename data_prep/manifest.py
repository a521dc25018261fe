"""Shard-folder bookkeeping for ``proseco prep shards``: atomic writes, partitions, merge.

Contract: ``docs/data_format.md``. A prep run writes, per partition (task ``i`` of ``n``), a work
folder ``OUT/.parts/part-PPPPP/`` holding ``state.json`` (the resume checkpoint, rewritten after
every finished shard) and, when the partition is complete, ``DONE.json`` (its shard table,
counts, sources and skip counts). :func:`merge` combines every partition's ``DONE.json`` into
``OUT/manifest.json``, written last and atomically, so its presence means "complete".

Two hashes keep runs apart:

* the **run key**: sha256 of the output-defining settings, the tokenizer sha256 and the list of
  all input files (relative path, size). Every partition of one run has the same key; a folder
  whose manifest or partitions carry another key belongs to a different run and is refused.
* the manifest **fingerprint** (:func:`pipeline.data.format.manifest_fingerprint`, the single
  implementation shared with the loader): sha256 of the canonical JSON of every other key.

Names, dtypes and the fingerprint are the shard contract's, from :mod:`pipeline.data.format`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from data_prep.readers import SkipLog
from data_prep.tokenizer import MODEL_FILE, SIDECAR, sidecar_bytes
from pipeline.data.format import (
    FORMAT,
    MANIFEST,
    SPLITS,
    TOKENIZER_FILES,
    canonical_json,
    dtype_for,
    manifest_fingerprint,
    shard_name,
)
from pipeline.errors import ProsecoError
from pipeline.io import AtomicFile, is_temporary

PARTS = ".parts"
STATE = "state.json"
DONE = "DONE.json"
# What a shard output folder may hold; anything else means it is somebody else's folder.
OWN_ENTRIES = {MANIFEST, PARTS, *SPLITS, *TOKENIZER_FILES}

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}

__all__ = ["MANIFEST", "check_trainable", "dtype_for", "merge", "part_dir", "run_key", "shard_name"]


def part_dir(out: Path, partition: int) -> Path:
    return out / PARTS / f"part-{partition:05d}"


def run_key(config: dict, tokenizer_sha256: str, sources: list[dict]) -> str:
    """sha256 naming one run: its settings, tokenizer and input files (path + size)."""
    files = [[s["path"], s["bytes"]] for s in sources]
    return hashlib.sha256(canonical_json({"config": config, "tokenizer": tokenizer_sha256,
                                          "sources": files})).hexdigest()


# ------------------------------------------------------------------ writing


def io_error(exc: OSError, path: Path | str, out: Path | str) -> ProsecoError | None:
    """A one-line user error for a full disk or an unwritable output folder; None otherwise."""
    if exc.errno in _DISK_FULL:
        return ProsecoError(
            f"disk full while writing {path} ({exc.strerror}); free some space (or choose an output "
            f"folder on another disk) and rerun: finished shards are kept and the run resumes"
        )
    if exc.errno in _READ_ONLY:
        return ProsecoError(
            f"output folder {out} is read-only (cannot write {path}: {exc.strerror}); "
            "choose a writable output folder"
        )
    return None


def file_write(f: Any, data: bytes) -> None:
    """The one place prep output bytes are written (tests inject ENOSPC/EROFS here)."""
    f.write(data)


def write_atomic(path: Path, data: bytes, out: Path, *, unique: bool = False) -> None:
    """Write ``path`` through :class:`pipeline.io.AtomicFile`; a full disk or read-only folder is one line.
    ``unique``: a temporary name of its own, for files that several prep processes write at once."""
    try:
        with AtomicFile(path, unique=unique) as f:
            file_write(f, data)
    except OSError as exc:
        err = io_error(exc, path, out)
        if err is not None:
            raise err from None
        raise


def write_json(path: Path, obj: dict, out: Path) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), out)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None if absent; ProsecoError if unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProsecoError(f"{path} is not readable JSON ({exc}); delete it or use a new output folder") from None
    if not isinstance(data, dict):
        raise ProsecoError(f"{path} is not a JSON object; delete it or use a new output folder")
    return data


# ------------------------------------------------------------------ output folder


def check_out_folder(out: Path, key: str) -> dict | None:
    """The finished manifest if ``out`` already holds this run; refuse folders of other runs."""
    if out.exists() and not out.is_dir():
        raise ProsecoError(f"{out} exists and is not a folder; choose another output folder")
    if not out.is_dir():
        return None
    # a sibling array task's write in flight (the tokenizer copy) is not foreign
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES and not is_temporary(p.name))
    if foreign:
        raise ProsecoError(f"{out} holds files that are not shard output ({', '.join(foreign[:5])}); "
                           "choose a new or empty output folder")
    old = read_json(out / MANIFEST)
    new_folder = "choose a new output folder (or delete this one)"
    if old is not None:
        if old.get("config") is None or manifest_run_key(old) != key:
            raise ProsecoError(f"{out} already holds shards of a different run (other settings, tokenizer or "
                               f"inputs; fingerprint {str(old.get('fingerprint'))[:12]}); {new_folder}")
        return old
    for folder in sorted((out / PARTS).glob("part-*")) if (out / PARTS).is_dir() else []:
        record = read_json(folder / DONE) or read_json(folder / STATE)
        if record is not None and record.get("run_key") != key:
            raise ProsecoError(f"{out} holds partition {folder.name} of a different run (other settings, "
                               f"tokenizer or inputs); {new_folder}")
    return None


def clean_partition(out: Path, partition: int, keep: dict[str, int]) -> None:
    """Remove this partition's temporary files and any shard past its checkpoint (from a kill)."""
    for split in SPLITS:
        folder = out / split
        if not folder.is_dir():
            continue
        for path in folder.glob(f".shard-{partition:05d}-*.tar.tmp"):
            path.unlink()
        for path in folder.glob(f"shard-{partition:05d}-*.tar"):
            if int(path.stem.rsplit("-", 1)[1]) >= keep.get(split, 0):
                path.unlink()
    for path in part_dir(out, partition).glob(".*.tmp"):
        path.unlink()


def copy_tokenizer(tok: Any, out: Path) -> None:
    """Put the run's tokenizer files into the shard folder (rewritten only when they differ). The
    partitions of an array job all do this at once, so each writes under a temporary name of its own."""
    for name, data in ((MODEL_FILE, tok.model_proto), (SIDECAR, sidecar_bytes(tok.sidecar))):
        path = out / name
        if not (path.is_file() and path.read_bytes() == data):
            write_atomic(path, data, out, unique=True)


# ------------------------------------------------------------------ merge


def manifest_run_key(manifest: dict) -> str:
    return run_key(manifest["config"], manifest["tokenizer"]["sha256"], manifest["sources"])


def _done_partitions(out: Path) -> dict[int, dict]:
    done: dict[int, dict] = {}
    root = out / PARTS
    if root.is_dir():
        for folder in sorted(root.glob("part-*")):
            record = read_json(folder / DONE)
            if record is not None:
                done[int(folder.name.split("-", 1)[1])] = record
    return done


def build_manifest(done: dict[int, dict]) -> dict:
    """The manifest implied by every partition's DONE record (partitions in order)."""
    parts = [done[p] for p in sorted(done)]
    first = parts[0]
    skipped = SkipLog().as_dict()
    for part in parts:
        for reason, count in part["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    splits = {}
    for split in SPLITS:
        shards = [shard for part in parts for shard in part["splits"][split]["shards"]]
        splits[split] = {
            "samples": sum(s["samples"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            # Not in the example of the contract, which says the dropped tail "is counted":
            # tokens + dropped_tokens == sum over documents of (len(encode(doc)) + 2).
            "dropped_tokens": sum(part["splits"][split]["dropped_tokens"] for part in parts),
            "shards": shards,
        }
    manifest = {
        "format": FORMAT,
        "tokenizer": first["tokenizer"],
        "seq_len": first["config"]["seq_len"],
        "mode": first["config"]["mode"],
        "dtype": first["dtype"],
        "splits": splits,
        "documents": {split: sum(part["splits"][split]["documents"] for part in parts) for split in SPLITS},
        "sources": sorted((s for part in parts for s in part["sources"]), key=lambda s: s["path"]),
        "skipped": skipped,
        "config": first["config"],
    }
    manifest["fingerprint"] = manifest_fingerprint(manifest)
    return manifest


def check_trainable(manifest: dict, inputs: list[str] | None = None) -> None:
    """Refuse (one-line ProsecoError) a run whose train split holds no sample.

    A partition may be empty (few input files); the run as a whole may not: no manifest without
    a train sample is written. ``inputs`` (what the user named; default: the source files) goes
    into the message when no document was found at all. An empty val split passes.
    """
    train, docs, config = manifest["splits"]["train"], manifest["documents"], manifest["config"]
    if train["samples"]:
        return
    if not sum(docs.values()):
        paths = [s["path"] for s in manifest["sources"]]
        names = [str(name) for name in inputs or paths]
        named = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items() if v) or "nothing"
        raise ProsecoError(f"no documents found in {named} ({len(paths)} file(s); skipped: {skipped}); "
                           "no manifest written")
    if not docs["train"]:
        raise ProsecoError(f"the train split is empty: all {docs['val']} document(s) went to val (val_fraction "
                           f"{config['val_fraction']}); give more documents or a lower val_fraction; "
                           "no manifest written")
    per = " per partition" if config["num_tasks"] > 1 else ""
    raise ProsecoError(f"the train split has no sample: its {docs['train']} document(s) hold "
                       f"{train['dropped_tokens']} tokens with bos/eos, fewer than seq_len {config['seq_len']}"
                       f"{per} (wrap mode drops the last partial sequence); give more text or a shorter seq_len; "
                       "no manifest written")


def merge(out_dir: str | os.PathLike) -> dict:
    """Combine all partitions' ``DONE.json`` under ``out_dir`` into ``manifest.json``; return it.

    Refuses (ProsecoError) when a partition of the run is missing or unfinished, when
    partitions were built with different settings, tokenizer or inputs, or when together they
    hold no train sample (:func:`check_trainable`). Idempotent: an existing
    identical manifest is returned untouched; a different one is refused.
    """
    out = Path(out_dir)
    done = _done_partitions(out)
    if not done:
        raise ProsecoError(f"{out} holds no finished partition (.parts/part-*/{DONE}); "
                           "run `proseco prep shards` first")
    first = done[min(done)]
    num_tasks = int(first["config"]["num_tasks"])
    odd = sorted(p for p, record in done.items() if record["run_key"] != first["run_key"])
    if odd:
        raise ProsecoError(
            f"cannot merge {out}: partition(s) {', '.join(map(str, odd))} were built with other settings, "
            f"tokenizer or inputs than partition {min(done)}; rebuild every partition into a new folder"
        )
    extra = sorted(p for p in done if p >= num_tasks)
    missing = [p for p in range(num_tasks) if p not in done]
    if extra or missing:
        what = []
        if missing:
            what.append(f"partition(s) {', '.join(map(str, missing))} of {num_tasks} are not finished")
        if extra:
            what.append(f"partition(s) {', '.join(map(str, extra))} lie outside 0..{num_tasks - 1}")
        raise ProsecoError(f"cannot merge {out}: {'; '.join(what)}; run `proseco prep shards` with "
                           f"task i of {num_tasks} for each missing i, then merge again")
    for name in TOKENIZER_FILES:
        if not (out / name).is_file():
            raise ProsecoError(f"cannot merge {out}: {name} is missing (prep copies it there); rerun prep")
    manifest = build_manifest(done)
    check_trainable(manifest)
    old = read_json(out / MANIFEST)
    if old is not None:
        if old.get("fingerprint") == manifest["fingerprint"]:
            return old
        raise ProsecoError(f"{out / MANIFEST} already describes a different run (fingerprint "
                           f"{str(old.get('fingerprint'))[:12]}); choose a new output folder")
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            if not (out / shard["name"]).is_file():
                raise ProsecoError(f"cannot merge {out}: shard {shard['name']} listed by its partition is "
                                   "missing; delete that partition's .parts folder and rerun it")
    for orphan in out.glob(".*.tmp"):  # left by a killed run (every partition is done: no writer)
        orphan.unlink(missing_ok=True)
    write_json(out / MANIFEST, manifest, out)  # last: a manifest means "complete"
    return manifest
