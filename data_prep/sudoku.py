"""Materialise the 4x4 Sudoku demo task as files: prep -> train -> eval through real data.

Layout of an output folder::

    train.npy          uint8 [N_train, 16]  training grids (token ids 0..3)
    heldout_grids.npy  uint8 [N_held, 16]   grids never trained on
    puzzles.npy        uint8 [N_held, 16]   held-out grids with hidden cells set to MASK_ID
    puzzle_given.npy   bool  [N_held, 16]   which puzzle cells are clues
    manifest.json      settings, counts, sha256 per file, and a fingerprint of it all

Why files rather than regenerating in memory: the demo then exercises the same path as the
real corpus runs (prepare once, verify, load), and a manifest hash makes "which data did this
run see?" answerable. Writes are atomic (temporary sibling folder, then rename) so an
interrupted prep never leaves a half-written folder that a later run would trust.
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
from pipeline.tasks import sudoku

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILES = ("train.npy", "heldout_grids.npy", "puzzles.npy", "puzzle_given.npy")
# Puzzle cells are drawn with a seed derived from split_seed, so one number pins the dataset
# while the split and the cell choice still use different random streams.
PUZZLE_SEED_OFFSET = 1


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


def _check_settings(holdout_fraction: float, clues: int, split_seed: int) -> None:
    # Checked here too (not only in the config) because prepare() is a public entry point.
    if isinstance(holdout_fraction, bool) or not isinstance(holdout_fraction, (int, float)):
        raise ProsecoError(f"data.holdout_fraction must be a number, got {holdout_fraction!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ProsecoError(f"data.holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if isinstance(clues, bool) or not isinstance(clues, int) or not 0 <= clues <= sudoku.SEQ_LEN:
        raise ProsecoError(f"data.puzzle_clues must be an integer in 0..{sudoku.SEQ_LEN}, got {clues!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise ProsecoError(f"data.split_seed must be an integer, got {split_seed!r}")


def _build(holdout_fraction: float, clues: int, split_seed: int) -> tuple[dict[str, bytes], dict]:
    """The file contents and the manifest they imply, computed in memory (it is tiny)."""
    train, held = sudoku.split(split_seed, float(holdout_fraction))
    puzzles, given = sudoku.make_puzzles(held, clues, seed=split_seed + PUZZLE_SEED_OFFSET)
    arrays = {
        "train.npy": train.numpy().astype(np.uint8),
        "heldout_grids.npy": held.numpy().astype(np.uint8),
        "puzzles.npy": puzzles.numpy().astype(np.uint8),
        "puzzle_given.npy": given.numpy().astype(np.bool_),
    }
    blobs = {name: _npy_bytes(arr) for name, arr in arrays.items()}
    hashes = {name: _sha256(blob) for name, blob in blobs.items()}
    info = sudoku.TASK_INFO
    settings = {
        "format": FORMAT_VERSION,
        "task": info.name,
        "vocab_size": info.vocab_size,
        "mask_id": info.mask_id,
        "seq_len": info.seq_len,
        "holdout_fraction": float(holdout_fraction),
        "clues": int(clues),
        "split_seed": int(split_seed),
        "puzzle_seed": int(split_seed) + PUZZLE_SEED_OFFSET,
    }
    manifest = {
        **settings,
        "counts": {"train": len(train), "heldout_grids": len(held), "puzzles": len(puzzles)},
        "files": {
            name: {
                "sha256": hashes[name],
                "shape": list(arrays[name].shape),
                "dtype": str(arrays[name].dtype),
            }
            for name in FILES
        },
        "fingerprint": _fingerprint(hashes, settings),
    }
    return blobs, manifest


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
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


def _existing(out: Path, manifest: dict) -> dict | None:
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
        settings = ", ".join(
            f"{k}={old.get(k)!r}" for k in ("task", "holdout_fraction", "clues", "split_seed")
        )
        raise ProsecoError(
            f"{out} already holds different prepared data ({settings}; fingerprint "
            f"{str(old['fingerprint'])[:12]}, wanted {manifest['fingerprint'][:12]}); "
            "choose a new output folder (or delete this one)"
        )
    _verify_files(out, old)
    return old


def _prepare(
    out_dir: str | os.PathLike, holdout_fraction: float, clues: int, split_seed: int
) -> tuple[dict, bool]:
    """Like :func:`prepare`, also saying whether files were written (False: already there)."""
    _check_settings(holdout_fraction, clues, split_seed)
    out = Path(out_dir)
    blobs, manifest = _build(holdout_fraction, clues, split_seed)
    old = _existing(out, manifest)
    if old is not None:
        return old, False

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name in FILES:
            with open(tmp / name, "wb") as f:
                f.write(blobs[name])
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
            old = _existing(out, manifest)
            if old is None:
                raise
            return old, False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest, True


def prepare(out_dir: str | os.PathLike, *, holdout_fraction: float, clues: int, split_seed: int) -> dict:
    """Write the Sudoku dataset into ``out_dir`` and return its manifest.

    Idempotent: if ``out_dir`` already holds a manifest with the same fingerprint (and its
    files verify), that manifest is returned and nothing is rewritten. A folder holding
    different prepared data, or unknown files, raises :class:`ProsecoError` rather than being
    overwritten.
    """
    return _prepare(out_dir, holdout_fraction, clues, split_seed)[0]


def load(out_dir: str | os.PathLike) -> dict:
    """Load a prepared folder, verifying every file's sha256 against the manifest.

    Returns ``train``, ``heldout_grids``, ``puzzles`` (torch.long), ``puzzle_given``
    (torch.bool) and ``manifest``.
    """
    out = Path(out_dir)
    manifest = _read_manifest(out) if out.is_dir() else None
    if manifest is None:
        raise ProsecoError(f"{out / MANIFEST} not found: run data prep first (or check the path)")
    if manifest.get("task") != sudoku.TASK_INFO.name:
        raise ProsecoError(
            f"{out} holds data for task {manifest.get('task')!r}, not {sudoku.TASK_INFO.name!r}"
        )
    missing = [name for name in FILES if name not in manifest["files"]]
    if missing:
        raise ProsecoError(f"{out / MANIFEST} lists no entry for {', '.join(missing)}; re-run data prep")
    _verify_files(out, manifest)
    tensors: dict[str, Any] = {}
    for name in FILES:
        array = np.load(out / name, allow_pickle=False)
        key = name.removesuffix(".npy")
        tensors[key] = torch.from_numpy(array if array.dtype == np.bool_ else array.astype(np.int64))
    tensors["manifest"] = manifest
    return tensors


def main(cfg: Any, out_dir: str) -> int:
    """CLI entry: prepare ``cfg.data`` (a :class:`pipeline.config.Config`) into ``out_dir``."""
    data = cfg.data
    if data.task != sudoku.TASK_INFO.name:
        raise ProsecoError(f"data.task={data.task!r}: this preparer handles {sudoku.TASK_INFO.name!r} only")
    if data.seq_len != sudoku.SEQ_LEN:
        raise ProsecoError(
            f"data.seq_len={data.seq_len} but {sudoku.TASK_INFO.name} grids have {sudoku.SEQ_LEN} cells"
        )
    manifest, wrote = _prepare(
        out_dir, holdout_fraction=data.holdout_fraction, clues=data.puzzle_clues, split_seed=data.split_seed
    )
    counts = manifest["counts"]
    verb = "wrote" if wrote else "already prepared (unchanged)"
    print(
        f"{manifest['task']}: {verb} {out_dir}\n"
        f"  train grids {counts['train']}, held-out grids {counts['heldout_grids']}, "
        f"puzzles {counts['puzzles']} with {manifest['clues']} clues\n"
        f"  split_seed {manifest['split_seed']}, fingerprint {manifest['fingerprint'][:16]}"
    )
    return 0
