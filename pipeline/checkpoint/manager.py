"""Resumable training checkpoints: ``RUN/checkpoints/step_XXXXXXXX/``.

A checkpoint folder holds the files the backend's writer puts there (called on every rank),
``meta.json`` (the caller's metadata - topology, manifest
fingerprint, config, code version - plus ``step``, ``time``, ``format`` and the size and sha256 of
*every* file, whatever its size) and ``COMPLETE``, the marker that makes it visible; the marker
holds the sha256 of ``meta.json``, so no byte of the folder is unchecked. Discovery only ever
returns folders that have the marker.

Checksums: a file written through :func:`pipeline.io.save_torch` is hashed by the rank that wrote
it, straight from the page cache; the others (DeepSpeed's own files) are hashed afterwards,
spread over the ranks. :meth:`CheckpointManager.verify` re-hashes every file before anything is
loaded, also spread over the ranks (``benchmarks/bench_checksum.py`` measures both for a 1 GiB
state).

Save protocol (rank 0 drives it; other ranks only call the writer):

1. remove leftovers of earlier crashed saves (:meth:`CheckpointManager.cleanup_partial`);
2. create ``step_XXXXXXXX.tmp-<pid>``; every rank writes its files into it (barriers around);
3. checksum every file (the writers report the ones they hashed themselves; the rest are
   hashed by all ranks, a share each); write ``meta.json``, fsync every file and the folder;
4. rename the tmp folder to ``step_XXXXXXXX`` and fsync ``checkpoints/``;
5. write ``COMPLETE`` (the step and the sha256 of ``meta.json``) inside it and fsync the folder;
   then prune old checkpoints.

Asynchronous saves (:meth:`CheckpointManager.save_async`, ``checkpoint.async_save``): step 2's
writes go on in the background while training continues; steps 3-5 run at the next save or at the
end of training, once every rank's write has finished. Until then the new folder is a tmp folder
like any interrupted save, so a crash leaves the previous checkpoint in charge.

Crash cases (``kill -9``, node loss, preemption without grace):

* before step 4: a ``*.tmp-*`` folder is left. Discovery never looks at it; the next start-up
  or save removes it.
* between 4 and 5: a final-named folder without ``COMPLETE``. Discovery ignores it;
  ``cleanup_partial`` removes it.
* during pruning: ``COMPLETE`` is deleted before the rest of a folder, so a half-deleted
  checkpoint is just another incomplete folder.
* saving a step that already exists (again, after a resume): the old folder loses its marker and
  is moved aside before the rename, so a crash there leaves that step absent, never half-old.

Only one job may write a run folder at a time (the run's SLURM job); a second writer's tmp folder
would be taken for a crashed save. The engines load with ``torch.load(weights_only=True)``, so states
must be plain containers of tensors / numbers / strings (optimizer and scheduler ``state_dict()``s are).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import ProsecoError
from pipeline.io import atomic_write, fsync_path, sha256_file, sha256_files

FORMAT = "proseco-ckpt/1"
META_FILE = "meta.json"
MARKER = "COMPLETE"
TOPOLOGY_KEYS = ("backend", "dp", "tp", "zero_stage")

_FINAL = re.compile(r"^step_(\d{8})$")
_TMP = re.compile(r"^step_\d{8}\.tmp-")


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _gather(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, on every rank (just ``[obj]`` in one process)."""
    if not (_dist_on() and world_size > 1):
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


FileInfo = dict  # {"size": int, "sha256": str}


def _remove_tree(folder: Path) -> None:
    """Delete the marker first, so an interrupted delete never looks like a checkpoint."""
    (folder / MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, permanent_every: int = 0,
                 rank: int = 0, world_size: int = 1):
        if keep_last < 1:
            raise ProsecoError(f"checkpoint keep_last must be >= 1 (got {keep_last})")
        if permanent_every < 0:
            raise ProsecoError(f"checkpoint permanent_every must be >= 0 (got {permanent_every}; 0 = none)")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last, self.permanent_every = keep_last, permanent_every
        self.rank, self.world_size = rank, world_size
        self._pending: tuple | None = None  # an asynchronous save not yet committed (save_async)

    # ---- discovery -------------------------------------------------------------------------
    @staticmethod
    def step_of(path: Path) -> int:
        m = _FINAL.match(Path(path).name)
        if not m:
            raise ProsecoError(f"{path} is not a checkpoint folder (expected step_XXXXXXXX)")
        return int(m.group(1))

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}"

    def list_complete(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir()
                 if p.is_dir() and _FINAL.match(p.name) and (p / MARKER).is_file()]
        return sorted(found, key=self.step_of)

    def latest(self) -> Path | None:
        done = self.list_complete()
        return done[-1] if done else None

    def cleanup_partial(self) -> list[Path]:
        """Remove tmp folders and final-named folders without ``COMPLETE`` (rank 0 only; never the
        folder of a pending asynchronous save)."""
        if self.rank != 0 or not self.dir.is_dir():
            return []
        removed = []
        for p in sorted(self.dir.iterdir()):
            if not p.is_dir() or (self._pending is not None and p == self._pending[1]):
                continue
            if _TMP.match(p.name) or (_FINAL.match(p.name) and not (p / MARKER).is_file()):
                _remove_tree(p)
                removed.append(p)
        return removed

    def prune(self, protect: Path | None = None) -> list[Path]:
        """Keep the newest ``keep_last`` plus every multiple of ``permanent_every``; rank 0 only."""
        if self.rank != 0:
            return []
        done = self.list_complete()
        keep = set(done[-self.keep_last:])
        if self.permanent_every > 0:
            keep |= {p for p in done if self.step_of(p) % self.permanent_every == 0}
        if protect is not None:
            keep.add(Path(protect))
        removed = [p for p in done if p not in keep]
        for p in removed:
            _remove_tree(p)
        return removed

    # ---- save ----------------------------------------------------------------------------
    def save(self, step: int, meta: dict, *, writer: Callable[[Path], dict[str, FileInfo] | None]) -> Path:
        """Write checkpoint ``step``; returns its final folder on every rank.

        Every rank calls ``writer(tmp_folder)`` (a collective, for sharded backends); a writer may
        return ``{relative path: {"size", "sha256"}}`` for files it hashed itself
        (:func:`pipeline.io.save_torch`), the other files are hashed afterwards. All ranks must
        call ``save`` together when torch.distributed is initialised."""
        self.wait()
        tmp = self._begin(step)
        return self._commit(step, tmp, meta, writer(tmp) or {})

    def save_async(self, step: int, meta: dict, *,
                   writer: Callable[[Path], tuple[dict[str, FileInfo], Future | None]]) -> Path | None:
        """Start checkpoint ``step`` and return while its files are still being written.

        ``writer(tmp_folder)`` returns (files it hashed, the background write or None, whose result
        may add files it hashed). The previous pending save is committed first (:meth:`wait`); this
        one is committed by the next call of :meth:`save`, :meth:`save_async` or :meth:`wait`. Until
        then the folder has no ``COMPLETE``: a crash leaves the checkpoint before it in charge.
        Returns the folder of the save committed now, if any."""
        committed = self.wait()
        tmp = self._begin(step)
        known, future = writer(tmp)
        self._pending = (step, tmp, meta, known or {}, future)
        return committed

    def wait(self) -> Path | None:
        """Commit the pending asynchronous save (a collective), once every rank's write has
        finished; its final folder, or None when nothing was pending. A write that failed on any
        rank fails on every rank, and the folder stays uncommitted."""
        if self._pending is None:
            return None
        step, tmp, meta, known, future = self._pending
        self._pending = None
        error = None
        try:
            if future is not None:
                known = {**known, **(future.result() or {})}  # files the background write hashed
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        errors = [e for e in _gather(error, self.world_size) if e]
        if errors:
            raise RuntimeError(f"asynchronous save of step {step} failed ({errors[0]}); {tmp} stays uncommitted")
        return self._commit(step, tmp, meta, known)

    def _begin(self, step: int) -> Path:
        """Create the temporary folder of ``step`` (rank 0) and tell every rank its name."""
        if step < 0 or step > 99_999_999:
            raise ProsecoError(f"checkpoint step must be in 0..99999999 (got {step})")
        tmp = None
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.cleanup_partial()
            tmp = self.dir / f"{self.path_for(step).name}.tmp-{os.getpid()}"
            tmp.mkdir()
        if _dist_on() and self.world_size > 1:
            box = [str(tmp) if tmp is not None else None]
            dist.broadcast_object_list(box, src=0)  # other ranks learn rank 0's pid-named folder
            tmp = Path(box[0])
        if tmp is None:
            raise RuntimeError(f"rank {self.rank} of {self.world_size} saving without torch.distributed "
                               "initialised: only rank 0 may save in a single process")
        _barrier()
        return tmp

    def _commit(self, step: int, tmp: Path, meta: dict, known: dict[str, FileInfo]) -> Path:
        """Checksums, ``meta.json``, rename, ``COMPLETE`` (a collective; every rank's files are written)."""
        final = self.path_for(step)
        files = self._checksums(tmp, known)
        if self.rank == 0:
            self._finish(step, tmp, final, meta, files)
        _barrier()  # nobody returns (or resumes reading) before COMPLETE exists
        return final

    def _checksums(self, tmp: Path, known: dict[str, FileInfo]) -> dict[str, FileInfo]:
        """Size and sha256 of every file in ``tmp`` (a collective): the files some rank hashed after
        writing are taken as reported, the rest are read back, each rank hashing a share."""
        _barrier()  # every rank's files are complete
        reported: dict[str, FileInfo] = {}
        for part in _gather(known, self.world_size):
            reported.update(part)
        box: list[Any] = [None]
        if self.rank == 0:
            names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            box = [names]
        if _dist_on() and self.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        names = box[0]
        mine = [n for n in names if n not in reported][self.rank::self.world_size]
        hashed = dict(zip(mine, ({"size": (tmp / n).stat().st_size, "sha256": h}
                                 for n, h in zip(mine, sha256_files(tmp / n for n in mine)))))
        for part in _gather(hashed, self.world_size):
            reported.update(part)
        return {n: reported[n] for n in names}

    def _finish(self, step: int, tmp: Path, final: Path, meta: dict, files: dict[str, FileInfo]) -> None:
        for name in files:
            fsync_path(tmp / name)
        full = {**meta, "step": step, "time": time.time(), "format": FORMAT, "files": files}
        meta_bytes = (json.dumps(full, indent=1, default=str) + "\n").encode()
        with open(tmp / META_FILE, "wb") as f:
            f.write(meta_bytes)
            f.flush()
            os.fsync(f.fileno())
        for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}):
            fsync_path(d)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            old = self.dir / f"{final.name}.tmp-old-{os.getpid()}"
            (final / MARKER).unlink(missing_ok=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        fsync_path(self.dir)
        with open(final / MARKER, "w") as f:
            f.write(f"{step} {hashlib.sha256(meta_bytes).hexdigest()}\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_path(final)
        self.prune(protect=final)

    # ---- load ----------------------------------------------------------------------------
    def read_meta(self, path: str | os.PathLike) -> dict:
        """``meta.json`` of a complete checkpoint, checked against the sha256 in its marker."""
        path = Path(path)
        if not (path / MARKER).is_file():
            raise ProsecoError(f"{path} is not a complete checkpoint (no {MARKER} marker): "
                               "its save was interrupted; resume from another one")
        try:
            marker = (path / MARKER).read_text(errors="replace").split()  # damaged bytes: a failed check
            raw = (path / META_FILE).read_bytes()
        except OSError as exc:
            raise ProsecoError(f"{path / META_FILE} is missing or unreadable ({exc})") from exc
        if len(marker) > 1 and hashlib.sha256(raw).hexdigest() != marker[1]:
            raise ProsecoError(f"{path / META_FILE} fails its sha256 check (recorded in {MARKER}): the checkpoint "
                               "is corrupted; move it aside to resume from the one before")
        try:
            meta = json.loads(raw)
        except ValueError as exc:
            raise ProsecoError(f"{path / META_FILE} is unreadable ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ProsecoError(f"{path} is not a {FORMAT} checkpoint (format "
                               f"{meta.get('format') if isinstance(meta, dict) else None!r})")
        return meta

    def verify(self, path: str | os.PathLike, meta: dict) -> None:
        """Check every file against the size and sha256 recorded in ``meta.json``, before anything
        loads. A collective when several ranks share the manager: each rank hashes a share of the
        files and every rank raises the same error."""
        path = Path(path)
        names = sorted(meta.get("files", {}))
        problems = [_check_file(path / n, meta["files"][n]) for n in names[self.rank::self.world_size]]
        found = sorted(p for part in _gather([p for p in problems if p], self.world_size) for p in part)
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise ProsecoError(f"checkpoint {path} is corrupted: {found[0]}{more}; move it aside to resume from "
                               "the one before")


def _check_file(f: Path, info: FileInfo) -> str | None:
    """Why ``f`` does not match its recorded size / sha256 (None when it does)."""
    if not f.is_file():
        return f"{f.name} is missing"
    size = f.stat().st_size
    if size != info.get("size"):
        return f"{f.name} has {size} bytes, meta.json says {info.get('size')}"
    if "sha256" not in info:  # written before every file had a checksum: only its size is known
        return None
    if sha256_file(f) != info["sha256"]:
        return f"{f.name} fails its sha256 check"
    return None


def file_entries(folder: Path, names: list[str]) -> dict[str, FileInfo]:
    """``{name: {"size", "sha256"}}`` of files in ``folder`` (for writers outside a save)."""
    return {n: {"size": (folder / n).stat().st_size, "sha256": h}
            for n, h in zip(names, sha256_files(folder / n for n in names))}


def rewrite_meta(path: Path, meta: dict) -> None:
    """Replace a complete checkpoint's ``meta.json`` (e.g. after adding converted files) and the
    checksum in its marker; a crash between the two leaves a checkpoint that fails its check
    (never one that passes with a wrong meta.json)."""
    raw = (json.dumps(meta, indent=1, default=str) + "\n").encode()
    atomic_write(path / META_FILE, raw)
    atomic_write(path / MARKER, f"{meta['step']} {hashlib.sha256(raw).hexdigest()}\n")


# ---- RNG state -----------------------------------------------------------------------------
def rng_state() -> dict:
    """python / numpy / torch (CPU, CUDA) generator states as ``weights_only``-loadable types."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(d: dict) -> None:
    py = d["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = d["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(d["torch"])
    if "cuda" in d and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(d["cuda"])


# ---- metadata helpers ----------------------------------------------------------------------
def code_version() -> dict:
    """{"git_sha", "dirty", "version"} of the code that runs; never raises (None where unknown)."""
    import pipeline

    out: dict[str, Any] = {"git_sha": None, "dirty": None, "version": getattr(pipeline, "__version__", None)}
    where = Path(pipeline.__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], check=False,
                             capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            out["git_sha"] = sha.stdout.strip()
            st = subprocess.run(["git", "--no-optional-locks", "-C", str(where), "status", "--porcelain"],
                                check=False, capture_output=True, text=True, timeout=30)
            if st.returncode == 0:
                out["dirty"] = bool(st.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):  # no git binary, timeout, ...
        return out  # the package version alone must do
    return out


def topology_mismatch(saved_meta: dict, current: dict) -> list[str]:
    """Differences in backend / dp / tp / zero_stage (``saved_meta["topology"]`` or flat keys)."""
    saved = saved_meta.get("topology", saved_meta)
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in TOPOLOGY_KEYS
            if saved.get(k) != current.get(k)]
