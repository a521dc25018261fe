"""A prepared folder of arrays: how a synthetic task materialises its data as verified files.

Layout of a folder::

    <name>.npy ...   one numpy array per file (no pickles)
    manifest.json    the task's settings, counts, sha256 / shape / dtype per file, and a
                     fingerprint of it all

Why files rather than regenerating in memory: a demo then exercises the same path as the real
corpus runs (prepare once, verify, load), and the fingerprint makes "which data did this run
see?" answerable. Writes are atomic (temporary sibling folder, then rename) so an interrupted
prep never leaves a half-written folder that a later run would trust. Preparing again with the
same settings is a no-op; a folder holding other data or unknown files is refused, never
overwritten.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ProsecoError

MANIFEST = "manifest.json"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(file_hashes: dict[str, str], settings: dict[str, Any]) -> str:
    """sha256 over the sorted per-file hashes plus the settings (canonical JSON)."""
    payload = {"files": sorted(file_hashes.items()), "settings": settings}
    return _sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())


def build(arrays: dict[str, np.ndarray], settings: dict[str, Any], counts: dict[str, int]) -> tuple[dict, dict]:
    """(file name -> bytes, manifest) of ``arrays`` (file name -> array), computed in memory."""
    blobs = {name: _npy_bytes(arr) for name, arr in arrays.items()}
    hashes = {name: _sha256(blob) for name, blob in blobs.items()}
    manifest = {
        **settings,
        "counts": counts,
        "files": {name: {"sha256": hashes[name], "shape": list(arr.shape), "dtype": str(arr.dtype)}
                  for name, arr in arrays.items()},
        "fingerprint": _fingerprint(hashes, settings),
    }
    return blobs, manifest


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise ProsecoError(f"{path} is not a readable manifest ({exc}); use a new output folder") from exc
    if not isinstance(manifest, dict) or "fingerprint" not in manifest or "files" not in manifest:
        raise ProsecoError(f"{path} is not a data_prep manifest; use a new output folder")
    return manifest


def _verify_files(out: Path, manifest: dict) -> None:
    """Raise naming every listed file that is missing or whose sha256 differs from the manifest."""
    problems = []
    for name, meta in sorted(manifest["files"].items()):
        path = out / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif _sha256(path.read_bytes()) != meta["sha256"]:
            problems.append(f"{name} sha256 does not match (file corrupted or edited)")
    if problems:
        raise ProsecoError(
            f"{out}: {'; '.join(problems)} (checked against {MANIFEST}); re-run data prep into a new folder"
        )


def _existing(out: Path, manifest: dict, shown: tuple[str, ...]) -> dict | None:
    """The manifest already in ``out`` if it matches ``manifest``; None if ``out`` is free to use."""
    if out.exists() and not out.is_dir():
        raise ProsecoError(f"{out} exists and is not a folder; choose another output folder")
    if not out.is_dir():
        return None
    old = _read_manifest(out)
    if old is None:
        if any(out.iterdir()):
            raise ProsecoError(
                f"{out} is not empty and holds no {MANIFEST}; refusing to write into a folder of "
                "unknown files: choose a new or empty output folder"
            )
        return None
    if old["fingerprint"] != manifest["fingerprint"]:
        settings = ", ".join(f"{k}={old.get(k)!r}" for k in shown)
        raise ProsecoError(
            f"{out} already holds different prepared data ({settings}; fingerprint "
            f"{str(old['fingerprint'])[:12]}, wanted {manifest['fingerprint'][:12]}); "
            "choose a new output folder (or delete this one)"
        )
    _verify_files(out, old)
    return old


def write(out_dir: str | os.PathLike, blobs: dict[str, bytes], manifest: dict,
          shown: tuple[str, ...]) -> tuple[dict, bool]:
    """Write ``blobs`` and ``manifest`` (from :func:`build`) into ``out_dir`` atomically.

    Returns (the folder's manifest, whether files were written: False when the same data was
    already there). ``shown``: the settings named when the folder holds different data.
    """
    out = Path(out_dir)
    old = _existing(out, manifest, shown)
    if old is not None:
        return old, False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, blob in blobs.items():
            with open(tmp / name, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        with open(tmp / MANIFEST, "w") as f:  # last: a manifest implies complete files
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename cannot replace a folder on every OS
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Another process finished the same prep first: accept it if it is the same data.
            old = _existing(out, manifest, shown)
            if old is None:
                raise
            return old, False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest, True


def load(out_dir: str | os.PathLike, task: str, names: tuple[str, ...]) -> dict:
    """The arrays ``names`` of a prepared folder of ``task``, each file's sha256 verified first.

    Returns one tensor per file (key: the name without ``.npy``; bool arrays stay bool, integers
    become torch.long) and ``manifest``.
    """
    out = Path(out_dir)
    manifest = _read_manifest(out) if out.is_dir() else None
    if manifest is None:
        raise ProsecoError(f"{out / MANIFEST} not found: run data prep first (or check the path)")
    if manifest.get("task") != task:
        raise ProsecoError(f"{out} holds data for task {manifest.get('task')!r}, not {task!r}")
    missing = [name for name in names if name not in manifest["files"]]
    if missing:
        raise ProsecoError(f"{out / MANIFEST} lists no entry for {', '.join(missing)}; re-run data prep")
    _verify_files(out, manifest)
    tensors: dict[str, Any] = {}
    for name in names:
        array = np.load(out / name, allow_pickle=False)
        tensors[name.removesuffix(".npy")] = torch.from_numpy(array if array.dtype == np.bool_
                                                              else array.astype(np.int64))
    tensors["manifest"] = manifest
    return tensors
