"""Files that are never half-written and never silently corrupt: atomic writes and checksums.

* :class:`AtomicFile`, :func:`atomic_write` / :func:`atomic_write_json`: a hidden temporary
  sibling, fsync, rename, fsync of the folder; a crash leaves either the old file or the new one, never a torn one. New
  files get the mode an ordinary ``open()`` would give them (``0o666`` minus the umask), so a
  shared group folder stays shared (``tempfile.mkstemp`` alone would make them ``0600``).
* :func:`atomic_folder`: the same for a folder of files (an export, a converted checkpoint): written
  in a temporary sibling, then renamed over the old one.
* :func:`sha256_file` / :func:`sha256_files`: checksums of files already on disk (several files
  hashed in threads: ``hashlib`` releases the GIL on large buffers).
* :func:`save_torch`: ``torch.save`` + fsync, then the sha256 of the file read back from the page
  cache by the process that wrote it. (Hashing the bytes on their way out, through a file object
  ``torch.save`` writes into, was measured 3x slower: ``benchmarks/bench_checksum.py``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

CHUNK = 8 << 20  # read size for hashing: large enough that hashlib runs without the GIL


def current_umask() -> int:
    """The process umask, read without changing it (Linux exposes it in /proc; elsewhere it is
    set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the umask."""
    return 0o666 & ~current_umask()


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (folders: best effort; not every filesystem allows it)."""
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


class AtomicFile:
    """A file written under a hidden temporary sibling name and renamed over its target on :meth:`commit`.

    The one implementation of "never a torn file": :func:`atomic_write` uses it for whole files,
    streaming writers (a shard tar) keep one open across many ``write`` calls. :meth:`discard`
    (or leaving a ``with`` block by an exception) removes the temporary file. The temporary name
    is ``.NAME.tmp-XXXXXXXX`` (unique, for folders that several processes write into), or
    ``.NAME.tmp`` with ``unique=False`` (a folder one writer owns: a rerun finds a killed run's
    leftover by name). A new file gets the mode ``open()`` would give it (:func:`default_file_mode`).
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True, unique: bool = True) -> None:
        self.path, self.fsync = Path(path), fsync
        if unique:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
            self.tmp = Path(tmp)
        else:
            self.tmp = self.path.with_name(f".{self.path.name}.tmp")
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.fchmod(fd, default_file_mode())
            self.file = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def commit(self) -> None:
        """Flush, fsync, rename over the target, fsync the folder; the temporary file is gone."""
        try:
            if self.fsync:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        if self.fsync:
            fsync_path(self.path.parent)

    def discard(self) -> None:
        """Close and remove the temporary file (best effort: never raises OSError)."""
        try:
            self.file.close()
        except OSError:
            pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of the temporary names this module writes under (``.NAME.tmp``,
    ``.NAME.tmp-XXXXXXXX``): another process's write in flight, not a foreign file."""
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``path`` to fill; when the block ends without an error it
    replaces ``path`` (an old folder there is removed first), else it is removed. Created with the
    umask's mode (``mkdtemp`` would make it 0700)."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(out.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (temporary sibling + fsync + rename)."""
    with AtomicFile(path, fsync=fsync) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = True) -> None:
    atomic_write(path, json.dumps(obj, indent=1, default=str) + "\n", fsync=fsync)


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; raises OSError / ValueError as ``json`` does (callers word the error)."""
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike], threads: int = 4) -> list[str]:
    """sha256 of each file, in order, hashed ``threads`` files at a time."""
    paths = list(paths)
    if len(paths) <= 1 or threads <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(min(threads, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


def save_torch(obj: Any, path: str | os.PathLike) -> dict:
    """``torch.save(obj, path)``, fsynced; returns ``{"size", "sha256"}`` of the file."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


SUMS_FILE = "SHA256SUMS"


def write_sums(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """``folder/SHA256SUMS`` in ``sha256sum`` format (``sha256sum -c SHA256SUMS`` checks it by hand)."""
    folder = Path(folder)
    names = sorted(names)
    lines = "".join(f"{h}  {n}\n" for n, h in zip(names, sha256_files(folder / n for n in names)))
    atomic_write(folder / SUMS_FILE, lines)


def check_sums(folder: str | os.PathLike) -> list[str]:
    """What in ``folder`` does not match its ``SHA256SUMS`` (empty: all files match). Raises
    FileNotFoundError when there is no ``SHA256SUMS``."""
    folder = Path(folder)
    expected: dict[str, str] = {}
    for line in (folder / SUMS_FILE).read_text(errors="replace").splitlines():  # a damaged line: its file is "missing"
        digest, _, name = line.partition("  ")
        if line.strip():
            expected[name] = digest
    present = [n for n in sorted(expected) if (folder / n).is_file()]
    problems = [f"{n} is missing" for n in sorted(expected) if n not in present]
    problems += [f"{n} fails its sha256 check" for n, h in zip(present, sha256_files(folder / n for n in present))
                 if h != expected[n]]
    return problems
