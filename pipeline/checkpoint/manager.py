"""Resumable training checkpoints: ``RUN/checkpoints/step_XXXXXXXX/``.

A checkpoint folder holds the backend's files (``state.pt`` by default; a distributed backend
writes its own, from every rank), ``meta.json`` (the caller's metadata - topology, manifest
fingerprint, config, code version - plus ``step``, ``time``, ``format`` and the size / sha256 of
every file) and ``COMPLETE``, the marker that makes it visible. Discovery only ever returns
folders that have the marker.

Save protocol (rank 0 drives it; other ranks only call the writer):

1. remove leftovers of earlier crashed saves (:meth:`CheckpointManager.cleanup_partial`);
2. create ``step_XXXXXXXX.tmp-<pid>``; every rank writes its files into it (barriers around);
3. write ``meta.json``, fsync every file and the folder;
4. rename the tmp folder to ``step_XXXXXXXX`` and fsync ``checkpoints/``;
5. write ``COMPLETE`` inside it and fsync the folder; then prune old checkpoints.

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
would be taken for a crashed save. Loading uses ``torch.load(weights_only=True)``, so states must be
plain containers of tensors / numbers / strings (optimizer and scheduler ``state_dict()``s are).
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import ProsecoError

FORMAT = "proseco-ckpt/1"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
MARKER = "COMPLETE"
SHA_LIMIT = 64 * 2**20  # files below this size get a sha256 in meta.json
TOPOLOGY_KEYS = ("backend", "dp", "tp", "zero_stage")

_FINAL = re.compile(r"^step_(\d{8})$")
_TMP = re.compile(r"^step_\d{8}\.tmp-")


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: best effort, not every OS/filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


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
        """Remove tmp folders and final-named folders without ``COMPLETE`` (rank 0 only)."""
        if self.rank != 0 or not self.dir.is_dir():
            return []
        removed = []
        for p in sorted(self.dir.iterdir()):
            if not p.is_dir():
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
    def save(self, step: int, state: dict[str, Any], meta: dict, *,
             writer: Callable[[Path, dict], None] | None = None) -> Path:
        """Write checkpoint ``step``; returns its final folder on every rank.

        Without ``writer``, rank 0 writes ``state`` to ``state.pt``. With one, every rank calls
        ``writer(tmp_folder, state)`` (a collective, for sharded backends). All ranks must call
        ``save`` together when torch.distributed is initialised."""
        if step < 0 or step > 99_999_999:
            raise ProsecoError(f"checkpoint step must be in 0..99999999 (got {step})")
        final = self.path_for(step)
        tmp = None
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.cleanup_partial()
            tmp = self.dir / f"{final.name}.tmp-{os.getpid()}"
            tmp.mkdir()
        if _dist_on() and self.world_size > 1:
            box = [str(tmp) if tmp is not None else None]
            dist.broadcast_object_list(box, src=0)  # other ranks learn rank 0's pid-named folder
            tmp = Path(box[0])
        if tmp is None:
            raise RuntimeError(f"rank {self.rank} of {self.world_size} saving without torch.distributed "
                               "initialised: only rank 0 may save in a single process")
        _barrier()
        if writer is not None:
            writer(tmp, state)
        elif self.rank == 0:
            torch.save(state, tmp / STATE_FILE)
        _barrier()
        if self.rank == 0:
            self._finish(step, tmp, final, meta)
        _barrier()  # nobody returns (or resumes reading) before COMPLETE exists
        return final

    def _finish(self, step: int, tmp: Path, final: Path, meta: dict) -> None:
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_path(f)
            size = f.stat().st_size
            files[f.relative_to(tmp).as_posix()] = ({"size": size, "sha256": _sha256(f)}
                                                    if size < SHA_LIMIT else {"size": size})
        full = {**meta, "step": step, "time": time.time(), "format": FORMAT, "files": files}
        with open(tmp / META_FILE, "w") as f:
            json.dump(full, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}):
            _fsync_path(d)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            old = self.dir / f"{final.name}.tmp-old-{os.getpid()}"
            (final / MARKER).unlink(missing_ok=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_path(self.dir)
        with open(final / MARKER, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(final)
        self.prune(protect=final)

    # ---- load ----------------------------------------------------------------------------
    def read_meta(self, path: str | os.PathLike) -> dict:
        path = Path(path)
        if not (path / MARKER).is_file():
            raise ProsecoError(f"{path} is not a complete checkpoint (no {MARKER} marker): "
                               "its save was interrupted; resume from another one")
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ProsecoError(f"{path / META_FILE} is missing or unreadable ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise ProsecoError(f"{path} is not a {FORMAT} checkpoint (format {meta.get('format')!r})")
        return meta

    def verify(self, path: str | os.PathLike, meta: dict) -> None:
        """Check every file against the sizes / sha256s recorded in ``meta.json``."""
        path = Path(path)
        for name, info in meta.get("files", {}).items():
            f = path / name
            if not f.is_file():
                raise ProsecoError(f"checkpoint file {f} is missing")
            size = f.stat().st_size
            if size != info["size"]:
                raise ProsecoError(f"checkpoint file {f} has {size} bytes, meta.json says {info['size']}: "
                                   "it is corrupted; resume from another checkpoint")
            if "sha256" in info and _sha256(f) != info["sha256"]:
                raise ProsecoError(f"checkpoint file {f} fails its sha256 check: it is corrupted; "
                                   "resume from another checkpoint")

    def load(self, path: str | os.PathLike | None = None, *, map_location: Any = "cpu",
             reader: Callable[[Path], dict] | None = None) -> tuple[dict, dict]:
        """(state, meta) of ``path`` or, by default, of the latest complete checkpoint.

        ``reader(folder)`` loads a distributed backend's files; the default reads ``state.pt``."""
        if path is None:
            path = self.latest()
            if path is None:
                raise ProsecoError(f"no complete checkpoint in {self.dir}")
        path = Path(path)
        meta = self.read_meta(path)
        self.verify(path, meta)
        if reader is not None:
            return reader(path), meta
        try:
            state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
        except Exception as exc:  # truncated / foreign files raise many types
            raise ProsecoError(f"{path / STATE_FILE} is not loadable ({type(exc).__name__}: {exc})") from exc
        return state, meta


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


def topology_refusal(path: str | os.PathLike, diffs: list[str]) -> str:
    """The user-facing message for resuming a checkpoint under another topology."""
    return (f"cannot resume from {path}: it was saved with another parallel layout ({'; '.join(diffs)}). "
            "Resume with the same backend, dp, tp and zero_stage, or start a new run folder")
